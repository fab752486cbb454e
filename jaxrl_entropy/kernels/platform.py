"""Which shell runs a kernel: picked from `jax.default_backend()` unless the caller names one."""
from __future__ import annotations

import jax

BACKENDS = ("tpu", "gpu", "xla", "interpret_tpu", "interpret_gpu")


def resolve_backend(backend: str | None) -> str:
    """Map `None` to the platform's shell; validate an explicit name.

    TPU -> "tpu" (Mosaic), GPU -> "gpu" (Pallas Triton lowering), CPU -> "interpret_gpu"
    (Pallas interpret mode: the only way Pallas runs on a CPU). "xla" is the blockwise pure-XLA
    path (O(T) memory, no Pallas), usable everywhere.
    """
    if backend is None:
        platform = jax.default_backend()
        return {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(platform, "interpret_gpu")
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS} or None (auto)")
    return backend
