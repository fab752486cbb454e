"""Blockwise pure-XLA flash attention with row entropy (no Pallas).

Rules of this shell: `lax.map` over query blocks, `lax.fori_loop` over key blocks (the causal
bound makes it a while loop, so blocks above the diagonal are never computed), the maths of
`kernels.block_update`, memory O(T·block) instead of O(T²). GQA folds the G query heads of one
K/V head into the rows of a tile (`[B, Hkv, G·bq, D]`), so K/V are never repeated and dK/dV sum
over the group inside the matmul. The backward recomputes p from the saved log-sum-exp.

It is the fallback where Pallas is slow or missing, and the fast path on CPU (the demo trains with
it): XLA's CPU matmuls beat Pallas interpret mode by orders of magnitude.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kernels import block_update as bu

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


def _blocks(T: int, S: int, block_q: int | None, block_k: int | None) -> tuple[int, int]:
    """A block covering the whole (short) sequence needs no padding."""
    bq = min(block_q or DEFAULT_BLOCK_Q, T)
    bk = min(block_k or DEFAULT_BLOCK_K, S)
    return bq, bk


def _q_rows(x_BxTxHxD: jax.Array, Hkv: int, Tp: int) -> jax.Array:
    """`[B, T, Hq, D]` -> `[B, Hkv, G, Tp, D]` (query head h = hk·G + g), zero-padded on T."""
    B, T, Hq, D = x_BxTxHxD.shape
    x = bu.pad_axis(x_BxTxHxD, 1, Tp).reshape(B, Tp, Hkv, Hq // Hkv, D)
    return jnp.transpose(x, (0, 2, 3, 1, 4))


def _row_stat(x_BxTxH: jax.Array, Hkv: int, Tp: int, value: float) -> jax.Array:
    """`[B, T, Hq]` -> `[B, Hkv, G, Tp]` padded with `value`."""
    B, T, Hq = x_BxTxH.shape
    x = bu.pad_axis(x_BxTxH, 1, Tp, value).reshape(B, Tp, Hkv, Hq // Hkv)
    return jnp.transpose(x, (0, 2, 3, 1))


def _take_rows(x: jax.Array, i, bq: int) -> jax.Array:
    """Query block i of `[B, Hkv, G, Tp, ...]` as rows `[B, Hkv, G·bq, ...]`."""
    blk = lax.dynamic_slice_in_dim(x, i * bq, bq, axis=3)
    return blk.reshape(blk.shape[:2] + (-1,) + blk.shape[4:])


class _Geometry(bu.Tiling):
    """Static sizes and the mask of a (query block, key block) pair."""

    def __init__(self, q, k, segment_ids, causal, block_q, block_k):
        super().__init__(q, k, segment_ids, causal, *_blocks(q.shape[1], k.shape[1], block_q, block_k))
        if segment_ids is not None:
            seg = segment_ids.astype(jnp.int32)
            self.q_seg = bu.pad_axis(seg, 1, self.Tp)  # [B, Tp]
            self.k_seg = bu.pad_axis(seg, 1, self.Sp)  # [B, Sp]
        else:
            self.q_seg = self.k_seg = None

    def mask(self, i, j):
        """bool `[B | 1, 1, G·bq, bk]` for query block i and key block j, or None."""
        q_pos = jnp.tile(i * self.bq + jnp.arange(self.bq) + self.off, self.G)[:, None]
        k_pos = (j * self.bk + jnp.arange(self.bk))[None, :]
        q_seg = k_seg = None
        if self.q_seg is not None:
            qs = lax.dynamic_slice_in_dim(self.q_seg, i * self.bq, self.bq, axis=1)
            q_seg = jnp.tile(qs, (1, self.G))[:, None, :, None]
            k_seg = lax.dynamic_slice_in_dim(self.k_seg, j * self.bk, self.bk, axis=1)[:, None, None, :]
        return bu.tile_mask(q_pos, k_pos, causal=self.causal, kv_len=self.kv_len,
                            q_seg=q_seg, k_seg=k_seg)

    def kv_hi(self, i):
        """Number of key blocks query block i needs (all of them unless causal)."""
        if not self.causal:
            return self.nk
        last = (i + 1) * self.bq - 1 + self.off
        return jnp.clip(last // self.bk + 1, 0, self.nk)

    def q_lo(self, j):
        """First query block that sees key block j (0 unless causal)."""
        if not self.causal:
            return 0
        return jnp.clip((j * self.bk - self.off) // self.bq, 0, self.nq)


def forward(q, k, v, segment_ids, *, causal: bool, sm_scale: float, entropy: bool,
            block_q: int | None = None, block_k: int | None = None):
    """Returns `(out [B, T, Hq, D], entropy [B, T, Hq] f32 or None, lse [B, T, Hq] f32)`."""
    g = _Geometry(q, k, segment_ids, causal, block_q, block_k)
    prec = bu.matmul_precision(q.dtype)
    q5 = _q_rows(q, g.Hkv, g.Tp)
    k4 = jnp.transpose(bu.pad_axis(k, 1, g.Sp), (0, 2, 1, 3))  # [B, Hkv, Sp, D]
    v4 = jnp.transpose(bu.pad_axis(v, 1, g.Sp), (0, 2, 1, 3))

    def q_block(i):
        q_rows = _take_rows(q5, i, g.bq)  # [B, Hkv, G·bq, D]

        def body(j, state):
            kb = lax.dynamic_slice_in_dim(k4, j * g.bk, g.bk, axis=2)
            vb = lax.dynamic_slice_in_dim(v4, j * g.bk, g.bk, axis=2)
            s = jnp.einsum("bhrd,bhkd->bhrk", q_rows, kb, precision=prec,
                           preferred_element_type=jnp.float32) * sm_scale
            return bu.online_softmax_step(state, s, g.mask(i, j), vb, entropy=entropy, precision=prec)

        state = bu.init_state((g.B, g.Hkv, g.G * g.bq), 1, g.D)
        state = lax.fori_loop(0, g.kv_hi(i), body, state)
        out, ent, lse = bu.finalize(state, entropy=entropy)
        return out.astype(q.dtype), ent, lse

    out, ent, lse = lax.map(q_block, jnp.arange(g.nq))  # leading axis: query block

    def to_btd(x):  # [nq, B, Hkv, G·bq, X] -> [B, T, Hq, X]
        x = x.reshape(g.nq, g.B, g.Hkv, g.G, g.bq, -1)
        x = jnp.transpose(x, (1, 0, 4, 2, 3, 5)).reshape(g.B, g.Tp, g.Hq, -1)
        return x[:, : g.T]

    return to_btd(out), (to_btd(ent)[..., 0] if entropy else None), to_btd(lse)[..., 0]


def backward(q, k, v, segment_ids, do, lse, di, *, causal: bool, sm_scale: float,
             block_q: int | None = None, block_k: int | None = None):
    """Flash backward. lse, di: `[B, T, Hq]` f32. Returns `(dq, dk, dv)` in the input dtypes."""
    g = _Geometry(q, k, segment_ids, causal, block_q, block_k)
    prec = bu.matmul_precision(q.dtype)
    q5, do5 = _q_rows(q, g.Hkv, g.Tp), _q_rows(do.astype(q.dtype), g.Hkv, g.Tp)
    lse4 = _row_stat(lse, g.Hkv, g.Tp, bu.EMPTY_ROW_LSE)[..., None]  # [B, Hkv, G, Tp, 1]
    di4 = _row_stat(di, g.Hkv, g.Tp, 0.0)[..., None]
    k4 = jnp.transpose(bu.pad_axis(k, 1, g.Sp), (0, 2, 1, 3))
    v4 = jnp.transpose(bu.pad_axis(v, 1, g.Sp), (0, 2, 1, 3))

    def logits(q_rows, kb):
        return jnp.einsum("bhrd,bhkd->bhrk", q_rows, kb, precision=prec,
                          preferred_element_type=jnp.float32) * sm_scale

    def ds_of(i, j, q_rows, do_rows, kb, vb):
        p = bu.recompute_probs(logits(q_rows, kb), _take_rows(lse4, i, g.bq), g.mask(i, j))
        dp = jnp.einsum("bhrd,bhkd->bhrk", do_rows, vb, precision=prec,
                        preferred_element_type=jnp.float32)
        return p, bu.softmax_grad(p, dp, _take_rows(di4, i, g.bq))

    def dq_block(i):
        q_rows, do_rows = _take_rows(q5, i, g.bq), _take_rows(do5, i, g.bq)

        def body(j, dq):
            kb = lax.dynamic_slice_in_dim(k4, j * g.bk, g.bk, axis=2)
            vb = lax.dynamic_slice_in_dim(v4, j * g.bk, g.bk, axis=2)
            _, ds = ds_of(i, j, q_rows, do_rows, kb, vb)
            return dq + jnp.einsum("bhrk,bhkd->bhrd", ds.astype(k.dtype), kb, precision=prec,
                                   preferred_element_type=jnp.float32)

        dq = lax.fori_loop(0, g.kv_hi(i), body, jnp.zeros(q_rows.shape, jnp.float32))
        return (dq * sm_scale).astype(q.dtype)

    def dkv_block(j):
        kb = lax.dynamic_slice_in_dim(k4, j * g.bk, g.bk, axis=2)
        vb = lax.dynamic_slice_in_dim(v4, j * g.bk, g.bk, axis=2)

        def body(i, carry):
            dk, dv = carry
            q_rows, do_rows = _take_rows(q5, i, g.bq), _take_rows(do5, i, g.bq)
            p, ds = ds_of(i, j, q_rows, do_rows, kb, vb)
            # rows hold all G heads of the group: the contraction sums the GQA gradient
            dv = dv + jnp.einsum("bhrk,bhrd->bhkd", p.astype(do_rows.dtype), do_rows, precision=prec,
                                 preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bhrk,bhrd->bhkd", ds.astype(q.dtype), q_rows, precision=prec,
                                 preferred_element_type=jnp.float32)
            return dk, dv

        zeros = jnp.zeros(kb.shape, jnp.float32)
        dk, dv = lax.fori_loop(g.q_lo(j), g.nq, body, (zeros, zeros))
        return (dk * sm_scale).astype(k.dtype), dv.astype(v.dtype)

    dq = lax.map(dq_block, jnp.arange(g.nq))  # [nq, B, Hkv, G·bq, D]
    dq = dq.reshape(g.nq, g.B, g.Hkv, g.G, g.bq, g.D)
    dq = jnp.transpose(dq, (1, 0, 4, 2, 3, 5)).reshape(g.B, g.Tp, g.Hq, g.D)[:, : g.T]
    dk, dv = lax.map(dkv_block, jnp.arange(g.nk))  # [nk, B, Hkv, bk, D]

    def to_bsd(x):
        x = jnp.transpose(x, (1, 0, 3, 2, 4)).reshape(g.B, g.Sp, g.Hkv, g.D)
        return x[:, : g.S]

    return dq, to_bsd(dk), to_bsd(dv)
