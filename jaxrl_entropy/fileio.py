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
