"""Blockwise pure-XLA flash attention with row entropy (no Pallas).

Rules of this shell: `lax.map` over query blocks, `lax.fori_loop` over the key blocks in
[lo, hi) of `kernels.tiling.visit_ranges` (blocks above the diagonal, leading padding and other
segments' blocks are never computed), the maths of `kernels.block_update`, memory O(T·block)
instead of O(T²). Every visited tile is masked: XLA fuses the mask into the softmax's elementwise
pass, where it costs a few integer ops per logit, while a second, unmasked loop body would
double the compile time (the Pallas shells, where the mask is real VPU work, do split).
GQA folds the G query heads of one K/V head into the rows of a tile (`[B, Hkv, G·bq, D]`), so
K/V are never repeated and dK/dV sum over the group inside the matmul. A tile holds the whole batch, so the visit ranges are merged
over the batch (`kernels.tiling.merge_batch`). The backward recomputes p from the saved lse.

It is the fallback where Pallas is slow or missing, and the fast path on CPU (the demo trains with
it): XLA's CPU matmuls beat Pallas interpret mode by orders of magnitude.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxrl_entropy.kernels import block_update as bu
from jaxrl_entropy.kernels import tiling

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


def blocks(T: int, S: int, block_q: int | None, block_k: int | None) -> tuple[int, int]:
    """A block covering the whole (short) sequence needs no padding."""
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b is not None and b < 1:
            raise ValueError(f"{name} must be positive, got {b}")
    return min(block_q or DEFAULT_BLOCK_Q, T), min(block_k or DEFAULT_BLOCK_K, S)


def q_rows(x_BxTxHxD: jax.Array, Hkv: int, Tp: int) -> jax.Array:
    """`[B, T, Hq, D]` -> `[B, Hkv, G, Tp, D]` (query head h = hk·G + g), zero-padded on T."""
    B, T, Hq, D = x_BxTxHxD.shape
    x = tiling.pad_axis(x_BxTxHxD, 1, Tp).reshape(B, Tp, Hkv, Hq // Hkv, D)
    return jnp.transpose(x, (0, 2, 3, 1, 4))


def row_stat(x_BxTxH: jax.Array, Hkv: int, Tp: int, value: float) -> jax.Array:
    """`[B, T, Hq]` -> `[B, Hkv, G, Tp, 1]` padded with `value`."""
    B, T, Hq = x_BxTxH.shape
    x = tiling.pad_axis(x_BxTxH, 1, Tp, value).reshape(B, Tp, Hkv, Hq // Hkv)
    return jnp.transpose(x, (0, 2, 3, 1))[..., None]


def kv_heads(x_BxSxKxD: jax.Array, Sp: int) -> jax.Array:
    """`[B, S, Hkv, D]` -> `[B, Hkv, Sp, D]`, zero-padded on S."""
    return jnp.transpose(tiling.pad_axis(x_BxSxKxD, 1, Sp), (0, 2, 1, 3))


def take_rows(x: jax.Array, i, bq: int) -> jax.Array:
    """Query block i of `[B, Hkv, G, Tp, ...]` as rows `[B, Hkv, G·bq, ...]`."""
    blk = lax.dynamic_slice_in_dim(x, i * bq, bq, axis=3)
    return blk.reshape(blk.shape[:2] + (-1,) + blk.shape[4:])


def take_keys(x: jax.Array, j, bk: int) -> jax.Array:
    """Key block j of `[B, Hkv, Sp, D]`."""
    return lax.dynamic_slice_in_dim(x, j * bk, bk, axis=2)


def from_rows(x: jax.Array, g: tiling.Tiling) -> jax.Array:
    """`[nq, B, Hkv, G·bq, X]` (stacked query blocks) -> `[B, T, Hq, X]`."""
    x = x.reshape(g.nq, g.B, g.Hkv, g.G, g.bq, -1)
    return jnp.transpose(x, (1, 0, 4, 2, 3, 5)).reshape(g.B, g.Tp, g.Hq, -1)[:, : g.T]


def logits(q_rows_, kb, sm_scale: float, precision) -> jax.Array:
    """Scaled logits `[B, Hkv, G·bq, bk]` float32 of a row tile against a key block."""
    return jnp.einsum("bhrd,bhkd->bhrk", q_rows_, kb, precision=precision,
                      preferred_element_type=jnp.float32) * sm_scale


class Masks:
    """The masks of (query block, key block) pairs, `[B | 1, 1, G·bq, bk]` bool, and the visit
    ranges (merged over the batch) of the query blocks (`kv`) and of the key blocks (`q`)."""

    def __init__(self, g: tiling.Tiling, segment_ids):
        self.g = g
        self.q_seg = self.k_seg = None
        if segment_ids is not None:
            self.q_seg, self.k_seg = g.padded_segments(segment_ids)
        kinds = tiling.merge_batch(g.block_kinds(segment_ids))
        self.kv = tiling.visit_ranges(kinds)[0]                  # [nq, 4]
        self.q = tiling.visit_ranges(kinds, transpose=True)[0]   # [nk, 4]

    def __call__(self, i, j):
        g = self.g
        q_pos = jnp.tile(i * g.bq + jnp.arange(g.bq) + g.off, g.G)[:, None]
        k_pos = (j * g.bk + jnp.arange(g.bk))[None, :]
        q_seg = k_seg = None
        if self.q_seg is not None:
            qs = lax.dynamic_slice_in_dim(self.q_seg, i * g.bq, g.bq, axis=1)
            q_seg = jnp.tile(qs, (1, g.G))[:, None, :, None]
            k_seg = lax.dynamic_slice_in_dim(self.k_seg, j * g.bk, g.bk, axis=1)[:, None, None, :]
        return bu.tile_mask(q_pos, k_pos, causal=g.causal, kv_len=g.kv_len, q_seg=q_seg, k_seg=k_seg)


def fori_visits(rng, body, carry):
    """`body(j, carry)` over the blocks [lo, hi) of one `visit_ranges` row."""
    return lax.fori_loop(rng[tiling.LO], rng[tiling.HI], body, carry)


def forward(q, k, v, segment_ids, *, causal: bool, sm_scale: float, entropy: bool,
            block_q: int | None = None, block_k: int | None = None):
    """Returns `(out [B, T, Hq, D], entropy [B, T, Hq] f32 or None, lse [B, T, Hq] f32)`.

    `v` None is the statistics-only pass (`kernels.attention_lse`): out is None.
    """
    bq, bk = blocks(q.shape[1], k.shape[1], block_q, block_k)
    g = tiling.Tiling(q.shape, k.shape, causal=causal, has_seg=segment_ids is not None, bq=bq, bk=bk)
    masks = Masks(g, segment_ids)
    prec = bu.matmul_precision(q.dtype)
    q5, k4 = q_rows(q, g.Hkv, g.Tp), kv_heads(k, g.Sp)
    v4 = None if v is None else kv_heads(v, g.Sp)

    def q_block(i):
        rows = take_rows(q5, i, g.bq)  # [B, Hkv, G·bq, D]

        def body(j, state):
            s = logits(rows, take_keys(k4, j, g.bk), sm_scale, prec)
            vb = None if v4 is None else take_keys(v4, j, g.bk)
            return bu.online_softmax_step(state, s, masks(i, j), vb, precision=prec)

        state = bu.init_state((g.B, g.Hkv, g.G * g.bq), 1, None if v is None else g.D, entropy=entropy)
        out, ent, lse = bu.finalize(fori_visits(masks.kv[i], body, state))
        return None if out is None else out.astype(q.dtype), ent, lse

    out, ent, lse = lax.map(q_block, jnp.arange(g.nq))  # leading axis: query block
    return (None if out is None else from_rows(out, g), None if ent is None else from_rows(ent, g)[..., 0],
            from_rows(lse, g)[..., 0])


def backward(q, k, v, segment_ids, do, lse, di, g_ent, *, causal: bool, sm_scale: float,
             block_q: int | None = None, block_k: int | None = None):
    """Flash backward. lse, di (`block_update.row_delta`), g_ent (or None): `[B, T, Hq]` f32.
    Returns `(dq, dk, dv)` in the input dtypes."""
    bq, bk = blocks(q.shape[1], k.shape[1], block_q, block_k)
    g = tiling.Tiling(q.shape, k.shape, causal=causal, has_seg=segment_ids is not None, bq=bq, bk=bk)
    masks = Masks(g, segment_ids)
    prec = bu.matmul_precision(q.dtype)
    q5, do5 = q_rows(q, g.Hkv, g.Tp), q_rows(do.astype(q.dtype), g.Hkv, g.Tp)
    lse5 = row_stat(lse, g.Hkv, g.Tp, bu.EMPTY_ROW_LSE)  # padded rows: probabilities exactly 0
    di5 = row_stat(di, g.Hkv, g.Tp, 0.0)
    ge5 = None if g_ent is None else row_stat(g_ent, g.Hkv, g.Tp, 0.0)
    k4, v4 = kv_heads(k, g.Sp), kv_heads(v, g.Sp)

    def p_ds(i, j, rows, do_rows, kb, vb):
        log_p = bu.log_probs(logits(rows, kb, sm_scale, prec), take_rows(lse5, i, g.bq),
                             masks(i, j))
        p = jnp.exp(log_p)
        dp = jnp.einsum("bhrd,bhkd->bhrk", do_rows, vb, precision=prec, preferred_element_type=jnp.float32)
        ge = None if ge5 is None else take_rows(ge5, i, g.bq)
        return p, bu.softmax_grad(p, dp, take_rows(di5, i, g.bq), g_ent=ge, log_p=log_p)

    def dq_block(i):
        rows, do_rows = take_rows(q5, i, g.bq), take_rows(do5, i, g.bq)

        def body(j, dq):
            kb = take_keys(k4, j, g.bk)
            _, ds = p_ds(i, j, rows, do_rows, kb, take_keys(v4, j, g.bk))
            return dq + jnp.einsum("bhrk,bhkd->bhrd", ds.astype(k.dtype), kb, precision=prec,
                                   preferred_element_type=jnp.float32)

        dq = fori_visits(masks.kv[i], body, jnp.zeros(rows.shape, jnp.float32))
        return (dq * sm_scale).astype(q.dtype)

    def dkv_block(j):
        kb, vb = take_keys(k4, j, g.bk), take_keys(v4, j, g.bk)

        def body(i, carry):
            dk, dv = carry
            rows, do_rows = take_rows(q5, i, g.bq), take_rows(do5, i, g.bq)
            p, ds = p_ds(i, j, rows, do_rows, kb, vb)
            # rows hold all G heads of the group: the contraction sums the GQA gradient
            dv = dv + jnp.einsum("bhrk,bhrd->bhkd", p.astype(do_rows.dtype), do_rows, precision=prec,
                                 preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bhrk,bhrd->bhkd", ds.astype(q.dtype), rows, precision=prec,
                                 preferred_element_type=jnp.float32)
            return dk, dv

        zeros = jnp.zeros(kb.shape, jnp.float32)
        dk, dv = fori_visits(masks.q[j], body, (zeros, zeros))
        return (dk * sm_scale).astype(k.dtype), dv.astype(v.dtype)

    dq = from_rows(lax.map(dq_block, jnp.arange(g.nq)), g)
    dk, dv = lax.map(dkv_block, jnp.arange(g.nk))  # [nk, B, Hkv, bk, D]

    def to_bsd(x):
        return jnp.transpose(x, (1, 0, 3, 2, 4)).reshape(g.B, g.Sp, g.Hkv, g.D)[:, : g.S]

    return dq, to_bsd(dk), to_bsd(dv)
