"""The Pallas shells lower for their real targets (Mosaic for TPU, Triton for GPU) on a CPU host.

No accelerator is needed to *lower*: Pallas checks block shapes (Mosaic's (8, 128) rule), the
supported primitives of each lowering and the grid / index maps while emitting Mosaic or Triton
IR. Interpret mode checks none of that. Executing the result needs the device, so these tests stop
at StableHLO text containing the kernel custom calls (forward, dQ, dK/dV).
"""
from __future__ import annotations

import pytest

import jax
import jax.numpy as jnp

from kernels import entropy_attention


def _lower(backend: str, platform: str, *, D: int, causal: bool, with_seg: bool, dtype):
    B, T, Hq, Hkv = 1, 384, 4, 2
    q = jax.ShapeDtypeStruct((B, T, Hq, D), dtype)
    kv = jax.ShapeDtypeStruct((B, T, Hkv, D), dtype)
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def grads(q, k, v, seg):
        def loss(q, k, v):
            out, ent = entropy_attention(q, k, v, causal=causal, backend=backend,
                                         segment_ids=seg if with_seg else None)
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(ent)
        return jax.grad(loss, (0, 1, 2))(q, k, v)

    return jax.jit(grads).trace(q, kv, kv, seg).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("D,causal,with_seg,dtype", [
    (128, True, True, jnp.bfloat16),   # [B, T, H·D] layout, segment tiles, causal skipping
    (64, False, False, jnp.float32),   # [B, H, T, D] layout, HIGHEST-precision f32 matmuls
])
def test_mosaic_lowering(D, causal, with_seg, dtype):
    text = _lower("tpu", "tpu", D=D, causal=causal, with_seg=with_seg, dtype=dtype)
    calls = [line for line in text.splitlines() if "custom_call @tpu_custom_call" in line]
    assert len(calls) == 3, calls  # forward, dQ, dK/dV


def test_triton_lowering():
    text = _lower("gpu", "cuda", D=128, causal=True, with_seg=True, dtype=jnp.bfloat16)
    calls = [line for line in text.splitlines() if "custom_call" in line and "triton" in line]
    assert len(calls) == 3, calls  # forward, dQ, dK/dV
