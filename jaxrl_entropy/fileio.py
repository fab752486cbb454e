"""Paths that may be local or remote (`gs://...`): the run directory of a TPU pod usually lives on
GCS. Local paths use `os`; remote ones go through `etils.epath` (what orbax and grain use too),
which reaches object stores through fsspec. Object stores have no append and no rename, so every
write here replaces a whole file."""
from __future__ import annotations

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
