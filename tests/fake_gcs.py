"""An in-memory object store behind `gs://`, for tests of the remote code path.

`fake_gcs` registers it as fsspec's `gcs` implementation, which is what `etils.epath` resolves a
`gs://` path to when tensorflow is absent: `fileio` → `epath.Path` → epath's fsspec backend →
this store. Everything but the network is the real path. Like GCS, the store has no append: a
file is written whole or not at all.
"""
from __future__ import annotations

import os
import sys

import fsspec
import fsspec.registry  # noqa: F401  (the module, for its private registry below)
import pytest
from fsspec.implementations.memory import MemoryFileSystem


class FakeGCS(MemoryFileSystem):
    """fsspec's in-memory filesystem under the `gs` / `gcs` protocols, keys `bucket/path`."""

    protocol = ("gs", "gcs")
    root_marker = ""
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = fsspec.utils.stringify_path(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix):]
        return path.rstrip("/")

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode or "+" in mode:
            raise NotImplementedError(f"object stores cannot {mode!r}: gs://{path}")
        return super()._open(path, mode=mode, **kwargs)


def _clear_epath_cache():
    from etils.epath import backend

    backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture()
def fake_gcs():
    """An empty in-memory `gs://` for the duration of one test; yields the store
    ({"bucket/path": file}) to look at what was written."""
    from etils import epath
    from etils.epath import backend

    fsspec.register_implementation("gcs", FakeGCS, clobber=True)
    _clear_epath_cache()
    if epath.Path("gs://bucket")._backend is not backend.fsspec_backend:
        why = "etils.epath sends gs:// to tensorflow here, not fsspec: the fake store is not reached"
        if os.environ.get("JAXRL_REQUIRE_FAKE_GCS") == "1":  # CI: every gs:// test skipped would hide a whole area
            pytest.fail(why + " (JAXRL_REQUIRE_FAKE_GCS=1)")
        pytest.skip(why)
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    yield FakeGCS.store
    FakeGCS.store.clear()
    # fsspec.registry (the attribute) is a read-only view; the module holds the dict behind it.
    sys.modules["fsspec.registry"]._registry.pop("gcs", None)  # back to fsspec's default (gcsfs)
    _clear_epath_cache()
