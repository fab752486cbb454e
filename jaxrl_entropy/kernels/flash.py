"""Public entry points: flash attention that also returns each row's attention entropy.

`entropy_attention` and `flash_attention` validate their arguments, pick a shell
(`kernels.platform.resolve_backend`) and wrap it in a `jax.custom_vjp` whose backward is the
flash backward of the same shell (p recomputed from the saved log-sum-exp). All three outputs are
differentiable: the cotangents of the entropy and the lse enter the same backward kernels
(`kernels.block_update.softmax_grad`); a cotangent that is symbolically zero (the output unused,
or behind `stop_gradient`) costs nothing.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxrl_entropy.kernels import block_update as bu
from jaxrl_entropy.kernels.platform import resolve_backend

_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class _Config:
    causal: bool
    sm_scale: float
    backend: str
    entropy: bool
    block_q: int | None
    block_k: int | None


def _shell(backend: str):
    """(module, extra kwargs) of the shell that runs `backend`."""
    if backend == "xla":
        from jaxrl_entropy.kernels import flash_xla
        return flash_xla, {}
    if backend in ("gpu", "interpret_gpu"):
        from jaxrl_entropy.kernels import flash_gpu
        return flash_gpu, {"interpret": backend == "interpret_gpu"}
    from jaxrl_entropy.kernels import flash_tpu
    return flash_tpu, {"interpret": backend == "interpret_tpu"}


def _forward(cfg: _Config, q, k, v, segment_ids):
    mod, extra = _shell(cfg.backend)
    return mod.forward(q, k, v, segment_ids, causal=cfg.causal, sm_scale=cfg.sm_scale,
                       entropy=cfg.entropy, block_q=cfg.block_q, block_k=cfg.block_k, **extra)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Config, q, k, v, segment_ids):
    return _forward(cfg, q, k, v, segment_ids)


def _attention_fwd(cfg: _Config, q, k, v, segment_ids):
    # symbolic_zeros=True: the primals come wrapped, and unused cotangents arrive as SymbolicZero
    q, k, v, segment_ids = (None if x is None else x.value for x in (q, k, v, segment_ids))
    out, ent, lse = _forward(cfg, q, k, v, segment_ids)
    return (out, ent, lse), (q, k, v, segment_ids, out, ent, lse)


def _nonzero(ct):
    return None if ct is None or isinstance(ct, SymbolicZero) else ct


def _attention_bwd(cfg: _Config, res, cotangents):
    q, k, v, segment_ids, out, ent, lse = res
    g_out, g_ent, g_lse = (_nonzero(ct) for ct in cotangents)
    if g_out is None:  # only entropy / lse are differentiated (e.g. an entropy regulariser)
        g_out = jnp.zeros_like(out)
    di = bu.row_delta(out, g_out, ent, g_ent, g_lse)  # [B, T, Hq]
    mod, extra = _shell(cfg.backend)
    dq, dk, dv = mod.backward(q, k, v, segment_ids, g_out, lse, di,
                              None if g_ent is None else g_ent.astype(jnp.float32),
                              causal=cfg.causal, sm_scale=cfg.sm_scale, block_q=cfg.block_q,
                              block_k=cfg.block_k, **extra)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


@functools.partial(jax.jit, static_argnums=(0,))
def _attention_jit(cfg: _Config, q, k, v, segment_ids):
    return _attention(cfg, q, k, v, segment_ids)


def _check_block(name: str, block) -> int | None:
    if block is None:
        return None
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
        raise ValueError(f"{name} must be a positive int or None (backend default), got {block!r}")
    return block


def _validate(q, k, v, segment_ids, causal, sm_scale, backend, block_q, block_k, entropy) -> _Config:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be 4-D ({'[B, T, Hq, D]' if name == 'q' else '[B, S, Hkv, D]'}),"
                             f" got shape {getattr(x, 'shape', None)}")
    B, T, Hq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, S, Hkv, D], got k {k.shape} and v {v.shape}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k/v {k.shape} must share batch B={B} and head_dim D={D} with q {q.shape}")
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads Hq={Hq} (q.shape[2]) must be a multiple of key/value heads "
                         f"Hkv={Hkv} (k.shape[2]) for grouped-query attention")
    if jnp.dtype(q.dtype) not in _DTYPES:
        raise ValueError(f"q dtype must be float32, bfloat16 or float16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}; "
                         "cast them before the call")
    if segment_ids is not None:
        if getattr(segment_ids, "shape", None) != (B, T):
            raise ValueError(f"segment_ids must be [B, T] = {(B, T)}, "
                             f"got {getattr(segment_ids, 'shape', None)}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be integer (0 = padding), got {segment_ids.dtype}")
        if k.shape[1] != T:
            raise ValueError(f"segment_ids need self-attention (S == T); got T={T}, S={k.shape[1]}")
    if sm_scale is None:
        sm_scale = D ** -0.5
    elif not isinstance(sm_scale, (int, float)) or isinstance(sm_scale, bool):
        raise ValueError(f"sm_scale must be a Python float (static), got {type(sm_scale).__name__}")
    return _Config(bool(causal), float(sm_scale), resolve_backend(backend), entropy,
                   _check_block("block_q", block_q), _check_block("block_k", block_k))


def entropy_attention(q, k, v, *, causal: bool = True, segment_ids=None, sm_scale: float | None = None,
                      backend: str | None = None, return_lse: bool = False,
                      block_q: int | None = None, block_k: int | None = None):
    """Flash attention that also returns the Shannon entropy of every attention row.

    Args:
      q: `[B, T, Hq, D]` float32 / bfloat16 / float16.
      k, v: `[B, S, Hkv, D]`, same dtype; Hq a multiple of Hkv (GQA: head h reads K/V head
        h // (Hq // Hkv); K/V are never repeated in memory).
      causal: query t sees keys j <= t + S - T (queries aligned to the end of the keys).
      segment_ids: `[B, T]` int, 0 = padding (left-padded prompts, packed segments); needs S == T.
        A query sees only keys of its own non-zero segment.
      sm_scale: logit scale, default 1/sqrt(D).
      backend: "tpu", "gpu", "xla", "interpret_tpu", "interpret_gpu", or None (by platform).
      return_lse: also return the log-sum-exp.
      block_q, block_k: tile sizes (None: the backend's defaults). T and S need not be multiples:
        the shells pad internally and never read the padding.

    Returns:
      `(out, entropy)` or `(out, entropy, lse)`:
      out `[B, T, Hq, D]` like q; entropy `[B, T, Hq]` float32 in nats (0 for a row that sees no
      key); lse `[B, T, Hq]` float32 natural-log log-sum-exp of the scaled logits over the visible
      keys; a row that sees no key gets lse = 1e30 (`kernels.block_update.EMPTY_ROW_LSE`), so
      exp(s - lse) is 0 there. Consumers must ignore such rows anyway.
      All three are differentiable w.r.t. q, k, v (an entropy regulariser gets its true gradient;
      empty rows contribute none). To use the entropy as a measurement, `stop_gradient` it.
    """
    cfg = _validate(q, k, v, segment_ids, causal, sm_scale, backend, block_q, block_k, entropy=True)
    out, ent, lse = _attention_jit(cfg, q, k, v, segment_ids)
    return (out, ent, lse) if return_lse else (out, ent)


def flash_attention(q, k, v, *, causal: bool = True, segment_ids=None, sm_scale: float | None = None,
                    backend: str | None = None, block_q: int | None = None, block_k: int | None = None):
    """The kernel of `entropy_attention` with the entropy accumulator switched off; returns out."""
    cfg = _validate(q, k, v, segment_ids, causal, sm_scale, backend, block_q, block_k, entropy=False)
    return _attention_jit(cfg, q, k, v, segment_ids)[0]
