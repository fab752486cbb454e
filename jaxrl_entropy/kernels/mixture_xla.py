"""Blockwise pure-XLA head-mixture entropy and attention probabilities, from each head's lse.

The tiles, masks and visit ranges are those of `kernels.flash_xla` (rows `[B, Hkv, G·bq, D]`
hold every head of a query block, so the head sum ā is one reduction per key tile); the maths
is `kernels.block_update` (`recompute_probs`, `mixture_entropy_term`).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxrl_entropy.kernels import block_update as bu
from jaxrl_entropy.kernels import flash_xla as fx
from jaxrl_entropy.kernels import tiling

blocks = fx.blocks


def _setup(q, k, segment_ids, lse, causal, block_q, block_k):
    bq, bk = blocks(q.shape[1], k.shape[1], block_q, block_k)
    g = tiling.Tiling(q.shape, k.shape, causal=causal, has_seg=segment_ids is not None, bq=bq, bk=bk)
    return (g, fx.Masks(g, segment_ids), fx.q_rows(q, g.Hkv, g.Tp), fx.kv_heads(k, g.Sp),
            fx.row_stat(lse, g.Hkv, g.Tp, bu.EMPTY_ROW_LSE))


def mixture(q, k, segment_ids, lse, *, causal: bool, sm_scale: float, block_q=None, block_k=None):
    """Head-mixture entropy `[B, T]` float32; lse `[B, T, Hq]` f32 (finite)."""
    g, masks, q5, k4, lse5 = _setup(q, k, segment_ids, lse, causal, block_q, block_k)
    prec = bu.matmul_precision(q.dtype)

    def q_block(i):
        rows, lse_rows = fx.take_rows(q5, i, g.bq), fx.take_rows(lse5, i, g.bq)

        def body(j, ent):
            s = fx.logits(rows, fx.take_keys(k4, j, g.bk), sm_scale, prec)
            p = bu.recompute_probs(s, lse_rows, masks(i, j))  # [B, Hkv, G·bq, bk]
            psum = jnp.sum(p.reshape(g.B, g.Hkv, g.G, g.bq, g.bk), axis=(1, 2))
            return ent + bu.mixture_entropy_term(psum, g.Hq)[..., 0]

        return fx.fori_visits(masks.kv[i], body, jnp.zeros((g.B, g.bq), jnp.float32))

    ent = lax.map(q_block, jnp.arange(g.nq))  # [nq, B, bq]
    return jnp.moveaxis(ent, 0, 1).reshape(g.B, g.Tp)[:, : g.T]


def probs(q, k, segment_ids, lse, *, causal: bool, sm_scale: float, block_q=None, block_k=None):
    """Per-head probabilities `[B, Hq, T, S]` float32 (every tile written, masked)."""
    g, masks, q5, k4, lse5 = _setup(q, k, segment_ids, lse, causal, block_q, block_k)
    prec = bu.matmul_precision(q.dtype)

    def q_block(i):
        rows, lse_rows = fx.take_rows(q5, i, g.bq), fx.take_rows(lse5, i, g.bq)

        def k_block(j):
            s = fx.logits(rows, fx.take_keys(k4, j, g.bk), sm_scale, prec)
            return bu.recompute_probs(s, lse_rows, masks(i, j))  # [B, Hkv, G·bq, bk]

        p = lax.map(k_block, jnp.arange(g.nk))  # [nk, B, Hkv, G·bq, bk]
        return jnp.moveaxis(p, 0, -2).reshape(g.B, g.Hq, g.bq, g.Sp)

    p = lax.map(q_block, jnp.arange(g.nq))  # [nq, B, Hq, bq, Sp]
    return jnp.moveaxis(p, 0, 2).reshape(g.B, g.Hq, g.Tp, g.Sp)[:, :, : g.T, : g.S]
