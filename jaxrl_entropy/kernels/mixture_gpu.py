"""Pallas GPU (Triton lowering) head-mixture entropy and attention probabilities.

Follows the rules of `kernels.flash_gpu` (whose padding, masks and visit ranges it reuses):
head-mixture grid (Tq/bq, B), one program per query block looping over its visited key blocks
and, inside, over *all* Hq heads (ā of a key is complete only once every head is added; loads
are per-head `(bq, D)` tiles, so Hq need not be a power of two); probabilities grid
(B, Hq, Tq/bq, Tk/bk), one tile per program, always masked (it writes every tile of its output
anyway). Matmul precision as in the fused forward (`block_update.matmul_precision`): Triton would
otherwise round float32 dots to TF32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxrl_entropy.kernels import block_update as bu
from jaxrl_entropy.kernels import flash_gpu as fg
from jaxrl_entropy.kernels import tiling

DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_K = 64


def blocks(T, S, block_q, block_k):
    return fg.blocks(T, S, block_q, block_k, DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K)


def _mixture_kernel(rng_ref, q_ref, k_ref, lse_ref, *refs, g: tiling.Tiling, scale, precision):
    qseg_ref, kseg_ref, out_ref = refs if g.has_seg else (None, None, *refs)
    i = pl.program_id(0)

    def key_block(j, ent, masked):
        start = pl.multiple_of(j * g.bk, g.bk)
        mask = fg.tile_mask(g, i * g.bq, start, qseg_ref, kseg_ref) if masked else None

        def head(h, psum):
            s = bu.dot(q_ref[:, h, :], k_ref[pl.ds(start, g.bk), lax.div(h, g.G), :], bu.NT, precision)
            return psum + bu.recompute_probs(s * scale, lse_ref[h, :].reshape(g.bq, 1), mask)

        psum = lax.fori_loop(0, g.Hq, head, jnp.zeros((g.bq, g.bk), jnp.float32))
        return ent + bu.mixture_entropy_term(psum, g.Hq)

    ent = tiling.fori_ranges(rng_ref, key_block, jnp.zeros((g.bq, 1), jnp.float32))
    out_ref[...] = ent.reshape(g.bq)


def _setup(q, k, segment_ids, causal, block_q, block_k):
    bq, bk = blocks(q.shape[1], k.shape[1], block_q, block_k)
    g = tiling.Tiling(q.shape, k.shape, causal=causal, has_seg=segment_ids is not None, bq=bq, bk=bk)
    return g, fg.pad_heads(q, g.Tp), fg.pad_heads(k, g.Sp)


def mixture(q, k, segment_ids, lse, *, causal: bool, sm_scale: float, block_q=None, block_k=None,
            interpret: bool = False):
    """Head-mixture entropy `[B, T]` float32; lse `[B, T, Hq]` f32 (finite)."""
    g, qp, kp = _setup(q, k, segment_ids, causal, block_q, block_k)
    Dp = qp.shape[-1]
    seg_specs, seg_args = fg.seg_inputs(g, segment_ids, lambda i, b: b)
    ent = pl.pallas_call(
        functools.partial(_mixture_kernel, g=g, scale=sm_scale, precision=bu.matmul_precision(q.dtype)),
        grid=(g.nq, g.B),
        in_specs=[fg.ranges_spec(lambda i, b: (b, i)),
                  pl.BlockSpec((None, g.bq, g.Hq, Dp), lambda i, b: (b, i, 0, 0)),
                  pl.BlockSpec((None, g.Sp, g.Hkv, Dp), lambda i, b: (b, 0, 0, 0)),
                  pl.BlockSpec((None, g.Hq, g.bq), lambda i, b: (b, 0, i))] + seg_specs,
        out_specs=pl.BlockSpec((None, g.bq), lambda i, b: (b, i)),
        out_shape=jax.ShapeDtypeStruct((g.B, g.Tp), jnp.float32),
        compiler_params=fg.compiler_params(Dp, interpret), interpret=interpret,
        name="head_mixture_entropy",
    )(tiling.visit_ranges(g.block_kinds(segment_ids)), qp, kp,
      fg.rows_BxHxT(lse, g.Tp, bu.EMPTY_ROW_LSE), *seg_args)
    return ent[:, : g.T]


def _probs_kernel(q_ref, k_ref, lse_ref, *refs, g: tiling.Tiling, scale, precision):
    qseg_ref, kseg_ref, out_ref = refs if g.has_seg else (None, None, *refs)
    i, j = pl.program_id(2), pl.program_id(3)
    mask = fg.tile_mask(g, i * g.bq, j * g.bk, qseg_ref, kseg_ref)
    s = bu.dot(q_ref[...], k_ref[pl.ds(pl.multiple_of(j * g.bk, g.bk), g.bk), :], bu.NT, precision)
    out_ref[...] = bu.recompute_probs(s * scale, lse_ref[...].reshape(g.bq, 1), mask)


def probs(q, k, segment_ids, lse, *, causal: bool, sm_scale: float, block_q=None, block_k=None,
          interpret: bool = False):
    """Per-head probabilities `[B, Hq, T, S]` float32."""
    g, qp, kp = _setup(q, k, segment_ids, causal, block_q, block_k)
    Dp, G = qp.shape[-1], g.G
    seg_specs, seg_args = fg.seg_inputs(g, segment_ids, lambda b, h, i, j: b)
    p = pl.pallas_call(
        functools.partial(_probs_kernel, g=g, scale=sm_scale, precision=bu.matmul_precision(q.dtype)),
        grid=(g.B, g.Hq, g.nq, g.nk),
        in_specs=[pl.BlockSpec((None, g.bq, None, Dp), lambda b, h, i, j: (b, i, h, 0)),
                  pl.BlockSpec((None, g.Sp, None, Dp), lambda b, h, i, j: (b, 0, lax.div(h, G), 0)),
                  pl.BlockSpec((None, None, g.bq), lambda b, h, i, j: (b, h, i))] + seg_specs,
        out_specs=pl.BlockSpec((None, None, g.bq, g.bk), lambda b, h, i, j: (b, h, i, j)),
        out_shape=jax.ShapeDtypeStruct((g.B, g.Hq, g.Tp, g.Sp), jnp.float32),
        compiler_params=fg.compiler_params(Dp, interpret), interpret=interpret,
        name="attention_probs",
    )(qp, kp, fg.rows_BxHxT(lse, g.Tp, bu.EMPTY_ROW_LSE), *seg_args)
    return p[:, :, : g.T, : g.S]
