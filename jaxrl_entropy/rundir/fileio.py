"""Paths that may be local or remote (`gs://...`): the run directory of a TPU pod usually lives on
GCS. Local paths use `os`; remote ones go through `etils.epath` (what orbax and grain use too),
which reaches object stores through fsspec. Object stores have no append and no rename, so every
write here replaces a whole file."""
from __future__ import annotations

import errno
import os


def is_remote(path: str) -> bool:
    return "://" in str(path)


def _epath(path: str):
    from etils import epath
    return epath.Path(path)


def join(path: str, *parts: str) -> str:
    if is_remote(path):
        return "/".join([str(path).rstrip("/"), *parts])
    return os.path.join(path, *parts)


def basename(path: str) -> str:
    """The last component (`gs://b/runs/full_seed0/` → `full_seed0`)."""
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else os.path.basename(os.path.normpath(path))


def parent(path: str) -> str:
    """The directory holding `path` (an absolute path for local ones)."""
    if is_remote(path):
        head, _, tail = str(path).rstrip("/").rpartition("/")
        if not tail or head.endswith(":/"):
            raise ValueError(f"{path!r} is a bucket root: it has no parent directory")
        return head
    return os.path.dirname(os.path.abspath(os.path.normpath(path)))


def makedirs(path: str) -> None:
    if is_remote(path):
        _epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    if is_remote(path):
        p = _epath(path)
        return p.exists() and not p.is_dir()
    return os.path.isfile(path)


def listdir(path: str) -> list[str]:
    """Names (not paths) of the entries of a directory, sorted."""
    if is_remote(path):
        return sorted(p.name for p in _epath(path).iterdir())
    return sorted(os.listdir(path))


def read_bytes(path: str) -> bytes:
    if is_remote(path):
        return _epath(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str, errors: str = "strict") -> str:
    """UTF-8 text; `errors="replace"` for files a killed job may have cut mid-character."""
    return read_bytes(path).decode("utf-8", errors=errors)


def write_text(path: str, text: str) -> None:
    """Whole-file write (atomic locally: temp file + rename)."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str, data: bytes) -> None:
    """Whole-file write (atomic locally: temp file + rename; an object store's upload is atomic)."""
    if is_remote(path):
        _epath(path).write_bytes(data)
        return
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def absolute(path: str) -> str:
    return str(path) if is_remote(path) else os.path.abspath(path)


class StorageError(OSError):
    """A run directory that cannot be written (read-only, full, missing permissions); the message
    names the path and what to do."""


def remove(path: str) -> None:
    """Delete a file; a missing file is fine."""
    if is_remote(path):
        from etils import epath
        epath.Path(path).unlink(missing_ok=True)
    elif os.path.lexists(path):
        os.remove(path)


def rmtree(path: str) -> None:
    """Delete a directory tree; a missing one is fine."""
    if is_remote(path):
        from etils import epath
        p = epath.Path(path)
        if p.exists():
            p.rmtree()
    else:
        import shutil
        if os.path.exists(path):
            shutil.rmtree(path)


def rename(src: str, dst: str) -> None:
    """Rename a file or directory (atomic locally; a copy and delete on object stores)."""
    if is_remote(src):
        from etils import epath
        epath.Path(src).rename(dst)
    else:
        os.rename(src, dst)


def list_files(root: str) -> list[str]:
    """Every file under `root`, as sorted paths relative to it ('/'-separated)."""
    out = []
    if is_remote(root):
        from etils import epath
        base = epath.Path(root)
        stack = [base]
        while stack:
            for p in stack.pop().iterdir():
                if p.is_dir():
                    stack.append(p)
                else:
                    out.append(str(p)[len(str(base)):].lstrip("/"))
    else:
        for dirpath, _, files in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            out += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in files]
    return sorted(out)


def open_binary(path: str):
    """A file object for reading bytes (local or remote)."""
    if is_remote(path):
        from etils import epath
        return epath.Path(path).open("rb")
    return open(path, "rb")


def check_writable(directory: str, what: str) -> None:
    """Create `directory` if needed and write, then delete, a probe file in it: a read-only or
    full run directory is found before the first step, not at the first save. Raises StorageError."""
    import socket
    probe = join(directory, f".write-test-{socket.gethostname()}-{os.getpid()}")  # one per process of a pod
    if exists(directory) and not isdir(directory):
        err = StorageError(f"{what} {directory} is a file, not a directory: choose another --workdir "
                           "(or move the file away)")
        err.errno = errno.ENOTDIR
        raise err
    try:
        makedirs(directory)
        write_text(probe, "ok")
        remove(probe)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        err = StorageError(f"{what} {directory} is not writable ({reason}): fix its permissions or free "
                           "space, or choose another --workdir")
        err.errno = e.errno
        raise err from None
