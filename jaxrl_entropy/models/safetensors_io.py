"""Minimal `.safetensors` reader/writer on numpy memory maps (bfloat16 included).

The `safetensors` package's numpy framework cannot represent bfloat16, and its flax framework
puts whole tensors on a device. A memory map lets the loader read exactly the slice each device
shard needs, so an 8B checkpoint never needs a full host copy per device.
Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian bytes.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from jaxrl_entropy.models.config import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool),
}
NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    """Lazily readable tensors of one file: `f.keys()`, `f.shape(name)`, `f[name]` (a memmap view)."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as fh:
                raw = fh.read(8)
                if len(raw) != 8:
                    raise CheckpointError(f"{path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", raw)
                size = os.fstat(fh.fileno()).st_size
                if n > size - 8:
                    raise CheckpointError(f"{path}: corrupt safetensors header (length {n} > file size {size})")
                header = json.loads(fh.read(n))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self._header = header
        self._offset = 8 + n
        self._size = size
        self._mmap = None

    def keys(self):
        return self._header.keys()

    def __contains__(self, name):
        return name in self._header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self._header[name]["dtype"]
        if code not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
        return DTYPES[code]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._header:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self._header[name]
        begin, end = info["data_offsets"]
        dtype, shape = self.dtype(name), tuple(info["shape"])
        if end - begin != dtype.itemsize * int(np.prod(shape)) or self._offset + end > self._size:
            raise CheckpointError(f"{self.path}: tensor {name!r} byte range does not match its shape {shape}")
        return self._mmap[self._offset + begin:self._offset + end].view(dtype).reshape(shape)


def save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write tensors (numpy, bfloat16 allowed) to `path`, atomically (temp file + rename)."""
    header, offset = {"__metadata__": dict(metadata or {"format": "pt"})}, 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in NAMES:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for arr in arrays:
            fh.write(arr.tobytes())
    os.replace(tmp, path)
