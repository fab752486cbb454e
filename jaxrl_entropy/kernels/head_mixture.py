"""Head-mixture attention entropy and per-head attention probabilities, from each head's lse.

The head-mixture entropy of query row t (docs/design-notes.md) is the entropy of the
head-averaged attention distribution

    ā_{t,j} = (1/Hq) Σ_h exp(s_{t,j}^h − lse_t^h),      H_t = −Σ_j ā_{t,j} log ā_{t,j},

which does not decompose into per-head statistics. It therefore needs a second pass over the keys
that uses every head's log-sum-exp (`lse`, from the fused forward's `return_lse=True`, or from
`attention_lse`, which is the fused forward's statistics-only pass): for one query block, one
kernel program sums all heads' probabilities for a key tile (ā for a key is complete only once
every head is added), then accumulates −ā log ā. The T×S matrix is never materialised.
`attention_probs` is the same lse-based pass writing p = exp(s − lse) tile by tile into a
`[B, Hq, T, S]` output (analysis of short sequences).

Shells (`backend`, see `kernels.platform.resolve_backend`): `kernels.mixture_tpu` (Mosaic),
`kernels.mixture_gpu` (Triton), `kernels.mixture_xla` (blockwise XLA), each built on the tiling,
masks and visit ranges of the fused kernel's shell of the same platform and on the maths of
`kernels.block_update`; matmuls use the fused forward's precision (`matmul_precision`).

These are measurements: q, k and lse pass through `stop_gradient`, so their gradient is zero (the
fused kernel's per-head entropy, `kernels.entropy_attention`, is the differentiable one).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxrl_entropy.kernels import block_update as bu
from jaxrl_entropy.kernels.platform import resolve_backend


def _shells(backend: str):
    """(fused-forward module, mixture module, extra kwargs) of the shell that runs `backend`."""
    if backend == "xla":
        from jaxrl_entropy.kernels import flash_xla, mixture_xla
        return flash_xla, mixture_xla, {}
    if backend in ("gpu", "interpret_gpu"):
        from jaxrl_entropy.kernels import flash_gpu, mixture_gpu
        return flash_gpu, mixture_gpu, {"interpret": backend == "interpret_gpu"}
    from jaxrl_entropy.kernels import flash_tpu, mixture_tpu
    return flash_tpu, mixture_tpu, {"interpret": backend == "interpret_tpu"}


def _check_inputs(q, k, segment_ids, lse, where: str):
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"{where}: q must be [B, T, Hq, D] and k [B, S, Hkv, D] "
                         f"(got q {q.shape}, k {k.shape})")
    B, T, Hq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{where}: q {q.shape} and k {k.shape} disagree on batch or head dim")
    S, Hkv = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"{where}: query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if segment_ids is not None and (segment_ids.shape != (B, T) or S != T):
        raise ValueError(f"{where}: segment_ids must be [B, T] = {(B, T)} with S == T "
                         f"(got {segment_ids.shape}, S={S})")
    if lse is not None and lse.shape != (B, T, Hq):
        raise ValueError(f"{where}: lse must be [B, T, Hq] = {(B, T, Hq)} (got {lse.shape})")


def _prepare(q, k, segment_ids, lse, sm_scale, backend, block_q, block_k, where):
    _check_inputs(q, k, segment_ids, lse, where)
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b <= 0):
            raise ValueError(f"{where}: {name} must be a positive int or None (backend default), got {b!r}")
    scale = float(q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)
    dt = jnp.promote_types(q.dtype, k.dtype)  # one dtype per dot (bf16 stays bf16)
    return q.astype(dt), k.astype(dt), resolve_backend(backend), scale


def _lse(q, k, segment_ids, *, causal, scale, backend, block_q=None, block_k=None):
    """Per-head lse `[B, T, Hq]` from the fused forward's statistics-only pass (no values)."""
    flash, _, extra = _shells(backend)
    return flash.forward(q, k, None, segment_ids, causal=causal, sm_scale=scale, entropy=False,
                         block_q=block_q, block_k=block_k, **extra)[2]


def _given_lse(lse):
    """A caller's lse as finite float32: garbage on rows that see no key (NaN, ±inf) becomes
    `EMPTY_ROW_LSE`, so their probabilities are exactly 0."""
    lse = lse.astype(jnp.float32)
    return jnp.where(jnp.isfinite(lse), lse, bu.EMPTY_ROW_LSE)


_STATIC = ("causal", "scale", "backend", "block_q", "block_k")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _lse_jit(q, k, segment_ids, *, causal, scale, backend, block_q, block_k):
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    return _lse(q, k, segment_ids, causal=causal, scale=scale, backend=backend, block_q=block_q,
                block_k=block_k)


def _pass_jit(which: str):
    @functools.partial(jax.jit, static_argnames=_STATIC)
    def run(q, k, segment_ids, lse, *, causal, scale, backend, block_q, block_k):
        q, k = lax.stop_gradient(q), lax.stop_gradient(k)
        if lse is None:  # default blocks: the caller's may be illegal for the fused forward
            lse = _lse(q, k, segment_ids, causal=causal, scale=scale, backend=backend)
        else:
            lse = _given_lse(lax.stop_gradient(lse))
        _, mod, extra = _shells(backend)
        return getattr(mod, which)(q, k, segment_ids, lse, causal=causal, sm_scale=scale,
                                   block_q=block_q, block_k=block_k, **extra)
    return run


_mixture_jit = _pass_jit("mixture")
_probs_jit = _pass_jit("probs")


def attention_lse(
    q: jax.Array,
    k: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    backend: str | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """Per-head natural-log log-sum-exp of the scaled logits over the visible keys.

    The fused forward (`kernels.entropy_attention`) without values and entropy: the same numbers
    as its `return_lse=True` output.

    Args:
      q: `[B, T, Hq, D]`; k: `[B, S, Hkv, D]` (Hq a multiple of Hkv).
      causal, segment_ids, sm_scale: as in `kernels.entropy_attention`.
      backend: "tpu", "gpu", "xla", "interpret_tpu", "interpret_gpu" or None (by platform).
      block_q, block_k: tile sizes (None: the fused kernel's defaults; checked against the
        shell's rules).

    Returns:
      `[B, T, Hq]` float32; a row with no visible key gets 1e30 (`block_update.EMPTY_ROW_LSE`),
      as in the fused forward. No gradient (a measurement).
    """
    q, k, backend, scale = _prepare(q, k, segment_ids, None, sm_scale, backend, block_q, block_k,
                                    "kernels.attention_lse")
    return _lse_jit(q, k, segment_ids, causal=causal, scale=scale, backend=backend,
                    block_q=block_q, block_k=block_k)


def head_mixture_entropy(
    q: jax.Array,
    k: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    lse: jax.Array | None = None,
    backend: str | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """Entropy (nats) of the head-averaged attention distribution, per query row.

    H_t = −Σ_j ā_{t,j} log ā_{t,j} with ā_{t,j} = (1/Hq) Σ_h exp(s_{t,j}^h − lse_t^h); GQA head h
    reads key head h // (Hq / Hkv). Computed blockwise without materialising T×S.

    Args:
      q: `[B, T, Hq, D]`; k: `[B, S, Hkv, D]`.
      causal: query t sees keys j <= t + (S − T).
      segment_ids: `[B, T]` int32, 0 = padding (needs S == T).
      sm_scale: logit scale, default 1/sqrt(D).
      lse: `[B, T, Hq]` float32 per-head log-sum-exp of the scaled logits (e.g. the fused
        forward's `return_lse=True`); values on rows that see no key are ignored (any value, NaN
        included). Computed here with the fused forward's statistics-only pass when None.
      backend: "tpu", "gpu", "xla", "interpret_tpu", "interpret_gpu" or None (by platform).
      block_q, block_k: tile sizes; None picks per shell (TPU: multiples of 128; GPU: powers of
        two >= 16).

    Returns:
      `[B, T]` float32; 0 for rows with no visible key. No gradient (a measurement: q, k and lse
      pass through `stop_gradient`).
    """
    q, k, backend, scale = _prepare(q, k, segment_ids, lse, sm_scale, backend, block_q, block_k,
                                    "kernels.head_mixture_entropy")
    return _mixture_jit(q, k, segment_ids, lse, causal=causal, scale=scale, backend=backend,
                        block_q=block_q, block_k=block_k)


def attention_probs(
    q: jax.Array,
    k: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    lse: jax.Array | None = None,
    backend: str | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """Per-head attention probabilities p = exp(s − lse), written tile by tile.

    Same arguments as `head_mixture_entropy`. Meant for analysis of short sequences: the output
    is `[B, Hq, T, S]` float32 (0 on invisible keys and on rows with no visible key). No
    gradient. Under a mesh, run it per shard (`jax.shard_map`): XLA cannot partition a kernel.
    """
    q, k, backend, scale = _prepare(q, k, segment_ids, lse, sm_scale, backend, block_q, block_k,
                                    "kernels.attention_probs")
    return _probs_jit(q, k, segment_ids, lse, causal=causal, scale=scale, backend=backend,
                      block_q=block_q, block_k=block_k)


__all__ = ["attention_lse", "attention_probs", "head_mixture_entropy"]
