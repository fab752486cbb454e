"""The Pallas shells lower (GPU) and compile (TPU) for their real targets on a CPU host.

No accelerator is needed to *lower*: Pallas checks block shapes, the supported primitives of each
lowering and the grid / index maps while emitting Mosaic or Triton IR (interpret mode checks none
of that). With libtpu installed (the `tpu` extra), `jax.experimental.topologies` goes further and
*compiles* the Mosaic kernels for real TPU generations, which also checks Mosaic's layouts and the
VMEM limits. Triton stops at lowering: executing or compiling it needs the GPU.
"""
from __future__ import annotations

import pytest

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from jaxrl_entropy.kernels import attention_lse, attention_probs, entropy_attention, head_mixture_entropy

# Qwen3's attention layout: head_dim 128, GQA 4:1 (at a small head count)
B, HQ, HKV, D = 1, 8, 2, 128


def _abstract(T, dtype, sharding=None):
    q = jax.ShapeDtypeStruct((B, T, HQ, D), dtype, sharding=sharding)
    kv = jax.ShapeDtypeStruct((B, T, HKV, D), dtype, sharding=sharding)
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sharding)
    return q, kv, kv, seg


def _train_step(backend, *, causal=True, with_seg=True, block=None):
    """Gradients of a loss on out and entropy (the entropy-regulariser backward), plus the
    head-mixture pass reading the forward's lse: every kernel the model runs at a probe layer."""
    def step(q, k, v, seg):
        seg = seg if with_seg else None

        def loss(q, k, v):
            out, ent, lse = entropy_attention(q, k, v, causal=causal, backend=backend, segment_ids=seg,
                                              return_lse=True, block_q=block, block_k=block)
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(ent), lse

        grads, lse = jax.grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
        mix = head_mixture_entropy(q, k, causal=causal, segment_ids=seg, lse=lse, backend=backend,
                                   block_q=block, block_k=block)
        return grads, mix
    return step


@pytest.mark.parametrize("D_,causal,with_seg,dtype", [
    (128, True, True, jnp.bfloat16),   # [B, T, H·D] layout, segment tiles, causal skipping
    (64, False, False, jnp.float32),   # [B, H, T, D] layout, HIGHEST-precision f32 matmuls
])
def test_mosaic_lowering(D_, causal, with_seg, dtype):
    T = 384  # 3 x 3 blocks of 128
    q = jax.ShapeDtypeStruct((B, T, HQ, D_), dtype)
    kv = jax.ShapeDtypeStruct((B, T, HKV, D_), dtype)
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32)
    step = _train_step("tpu", causal=causal, with_seg=with_seg, block=128)
    text = jax.jit(step).trace(q, kv, kv, seg).lower(lowering_platforms=("tpu",)).as_text()
    calls = [line for line in text.splitlines() if "custom_call @tpu_custom_call" in line]
    assert len(calls) == 4, calls  # forward, dQ, dK/dV, head mixture


def test_triton_lowering():
    # T = 384 with the GPU defaults: forward 3 x 6 blocks, backward 6 x 6, mixture 6 x 6
    step = _train_step("gpu")
    text = jax.jit(step).trace(*_abstract(384, jnp.bfloat16)).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "custom_call" in line and "triton" in line]
    assert len(calls) == 4, calls  # forward, dQ, dK/dV, head mixture


# ------------------------------------------------------------------------- matmul precision


def _dots(jaxpr, found):
    """(precision, operand dtype) of every dot_general in a jaxpr, kernel bodies included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append((eqn.params["precision"], eqn.invars[0].aval.dtype))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if hasattr(sub, "eqns"):
                    _dots(sub, found)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    _dots(sub.jaxpr, found)
    return found


@pytest.mark.parametrize("backend", ["tpu", "gpu", "xla"])
def test_float32_matmuls_use_full_precision_everywhere(backend):
    """Triton lowers a default-precision f32 dot to TF32 (10-bit mantissa: head-averaged rows off
    by up to 7e-3), TPUs to bf16 passes. Every kernel matmul on f32 (forward, backward, head
    mixture, lse, probabilities) must ask for HIGHEST, like the fused forward."""
    q, k, v, seg = _abstract(256, jnp.float32)

    def program(q, k, v, seg):
        grads, mix = _train_step(backend, block=128)(q, k, v, seg)
        lse = attention_lse(q, k, segment_ids=seg, backend=backend)
        probs = attention_probs(q, k, segment_ids=seg, lse=lse, backend=backend)
        return grads, mix, probs

    dots = _dots(jax.make_jaxpr(program)(q, k, v, seg).jaxpr, [])
    f32 = [prec for prec, dtype in dots if dtype == jnp.float32]
    # forward, dQ (2 dots + 1), dK/dV (4), mixture, lse, probs
    assert len(f32) >= 10, dots
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    assert all(prec == highest for prec in f32), dots


# ------------------------------------------------------------------ real TPU compiles (libtpu)


@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_mosaic_kernels_compile_for_real_tpus(tpu_devices, topology):
    """The training step's kernels at their default blocks (3 x 3 blocks of 512), with segment
    ids and the entropy backward, compile for v5e (16 MiB scoped VMEM) and v6e (256-wide MXU)."""
    sharding = SingleDeviceSharding(tpu_devices(topology)[0])
    compiled = jax.jit(_train_step("tpu")).trace(*_abstract(1536, jnp.bfloat16, sharding)).lower().compile()
    assert compiled.as_text().count("custom-call") >= 4  # forward, dQ, dK/dV, head mixture


def test_mosaic_float32_and_analysis_passes_compile(tpu_devices):
    """HIGHEST-precision f32 kernels (forward, backward, mixture) and the lse / probabilities
    passes, non-causal without segments (the FULL-block-only path), compile for v5p."""
    sharding = SingleDeviceSharding(tpu_devices("v5p:2x2x1")[0])

    def program(q, k, v, seg):
        grads, mix = _train_step("tpu", causal=False, with_seg=False, block=256)(q, k, v, seg)
        lse = attention_lse(q, k, segment_ids=seg, backend="tpu")
        return grads, mix, attention_probs(q, k, segment_ids=seg, lse=lse, backend="tpu")

    compiled = jax.jit(program).trace(*_abstract(768, jnp.float32, sharding)).lower().compile()
    assert compiled.as_text().count("custom-call") >= 6
