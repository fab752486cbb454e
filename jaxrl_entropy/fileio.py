"""Paths that may be local or remote (`gs://...`): the run directory of a TPU pod usually lives on
GCS. Local paths use `os`; remote ones go through `etils.epath` (what orbax and grain use too)."""
from __future__ import annotations

import os


def is_remote(path: str) -> bool:
    return "://" in str(path)


def join(path: str, *parts: str) -> str:
    if is_remote(path):
        return "/".join([str(path).rstrip("/"), *parts])
    return os.path.join(path, *parts)


def makedirs(path: str) -> None:
    if is_remote(path):
        from etils import epath
        epath.Path(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
    if is_remote(path):
        from etils import epath
        return epath.Path(path).exists()
    return os.path.exists(path)


def read_text(path: str) -> str:
    if is_remote(path):
        from etils import epath
        return epath.Path(path).read_text()
    with open(path) as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Whole-file write (atomic locally: temp file + rename)."""
    if is_remote(path):
        from etils import epath
        epath.Path(path).write_text(text)
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
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
