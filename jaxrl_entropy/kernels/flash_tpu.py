"""Mosaic (TPU) shell of flash attention with row entropy, forward and backward.

Mosaic rules this shell follows:
- the last two dims of every block are multiples of (8, 128) or the full array extent: sequence
  blocks are multiples of 128, head_dim is a full extent; q/k/v/out stay `[B, T, H·D]` (a free
  reshape, block `(bq, D)` at lane offset h·D) when D is a multiple of 128, else they are moved to
  `[B, H, T, D]` (block `(bq, D)` with D the full extent);
- per-row statistics m, l, t live in VMEM scratch as `(bq, 128)` lane-replicated tiles; rows
  leave the kernel transposed, as `(8, bq)` tiles of a `[B, H, 8, T]` array (lane-dense, 8x the
  size of a row instead of 128x), and come back to the backward as `(1, bq)` rows;
- grid (B, Hq, Tq/bq, Tk/bk) with the K/V axis "arbitrary": scratch zeroed at kv == 0, output
  written at the last kv block;
- which blocks a query block visits comes from `kernels.tiling.visit_ranges`, scalar-prefetched
  into SMEM: blocks outside [lo, hi) are skipped with `pl.when` and their index_map points at the
  nearest block actually used, so the pipeline issues no DMA for them; blocks in
  [full_lo, full_hi) run without building a mask;
- GQA through the K/V index_map (`h // G`), never repeating K/V in memory; dK/dV run on a grid
  (B, Hkv, Tk/bk, G·Tq/bq) so the group's gradient is summed in the VMEM accumulator, on the
  transposed tile sᵀ = k qᵀ (so lse / di are consumed as rows and no tile is transposed);
- segment ids come in the layouts Mosaic broadcasts cheaply: `[B, T, 128]` (column, lane-
  replicated) and `[B, 8, T]` (row, sublane-replicated).
On CPU it runs in TPU interpret mode (`interpret=True` -> `pltpu.InterpretParams()`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxrl_entropy.kernels import block_update as bu
from jaxrl_entropy.kernels import tiling

LANES = 128
SUBLANES = 8
# 512 x 512 tiles: large enough to keep the MXU busy (128-wide tiles reach a few % of peak on v5e),
# small enough that the forward (~5 MiB) and the dK/dV backward (~7 MiB) fit the default scoped
# VMEM of every TPU generation with double buffering.
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


def blocks(T: int, S: int, block_q: int | None, block_k: int | None,
           default_q: int = DEFAULT_BLOCK_Q, default_k: int = DEFAULT_BLOCK_K) -> tuple[int, int]:
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b is not None and b % LANES:
            raise ValueError(f"{name}={b} is not allowed on the TPU (Mosaic) backend: sequence blocks "
                             f"must be multiples of {LANES} (they are the lane dim of score tiles)")
    bq = min(block_q or default_q, tiling.round_up(T, LANES))
    bk = min(block_k or default_k, tiling.round_up(S, LANES))
    return bq, bk


def interpret_params(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


def grid_spec(grid, in_specs, out_specs, scratch_shapes=()):
    """Grid with one scalar-prefetched operand (the flattened visit ranges, in SMEM)."""
    return pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                        out_specs=out_specs, scratch_shapes=list(scratch_shapes))


def compiler_params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


class Layout:
    """Where a `[B, T, H, D]` operand lives in HBM and the BlockSpec of its (blk, D) tiles."""

    def __init__(self, D: int):
        self.flat = D % LANES == 0  # [B, T, H·D]: no transpose, head h at lane block h

    def arrange(self, x_BxTxHxD):
        B, T, H, D = x_BxTxHxD.shape
        return x_BxTxHxD.reshape(B, T, H * D) if self.flat else jnp.transpose(x_BxTxHxD, (0, 2, 1, 3))

    def restore(self, x, H: int, D: int):
        if self.flat:
            B, T, _ = x.shape
            return x.reshape(B, T, H, D)
        return jnp.transpose(x, (0, 2, 1, 3))

    def spec(self, blk: int, D: int, index):
        """`index(*grid, ranges_ref) -> (b, h, t_block)`."""
        if self.flat:
            def flat_index(*a):
                b, h, t = index(*a)
                return b, t, h
            return pl.BlockSpec((None, blk, D), flat_index)
        return pl.BlockSpec((None, None, blk, D), lambda *a: (*index(*a), 0))


def seg_column(seg_BxT):
    """`[B, T, 128]`: a (blk, 128) tile per block, lane-replicated."""
    return jnp.broadcast_to(seg_BxT[:, :, None], seg_BxT.shape + (LANES,))


def seg_row(seg_BxT):
    """`[B, 8, T]`: an (8, blk) tile per block, sublane-replicated."""
    return jnp.broadcast_to(seg_BxT[:, None, :], (seg_BxT.shape[0], SUBLANES, seg_BxT.shape[1]))


def flat_ranges(kinds, *, transpose: bool = False) -> jax.Array:
    """Visit ranges `[B, N, 4]` flattened to 1-D for SMEM (2-D SMEM arrays pad to 128 lanes)."""
    return tiling.visit_ranges(kinds, transpose=transpose).reshape(-1)


def read_range(ranges_ref, b, n, count: int):
    """(lo, full_lo, full_hi, hi) of block row n of batch b from the flattened ranges."""
    base = (b * count + n) * 4
    return tuple(ranges_ref[base + c] for c in range(4))


def clamp_block(n, rng):
    """The block to load at grid step n: the nearest one in [lo, hi) (no DMA while skipping)."""
    lo, _, _, hi = rng
    return jnp.clip(n, lo, jnp.maximum(hi - 1, lo))


def run_visit(g: tiling.Tiling, n, rng, step):
    """Call `step(masked)` at grid step n when the block is visited (static `masked`)."""
    lo, full_lo, full_hi, hi = rng
    full = jnp.logical_and(n >= full_lo, n < full_hi)
    if g.needs_mask:
        pl.when(jnp.logical_and(jnp.logical_and(n >= lo, n < hi), jnp.logical_not(full)))(
            lambda: step(True))
    pl.when(full)(lambda: step(False))


def tile_mask(g: tiling.Tiling, i, j, qseg_ref, kseg_ref, *, transposed: bool = False):
    """Mask of the (bq, bk) tile of query block i and key block j ((bk, bq) with `transposed`)."""
    shape = (g.bk, g.bq) if transposed else (g.bq, g.bk)
    q_pos = i * g.bq + g.off + lax.broadcasted_iota(jnp.int32, shape, 1 if transposed else 0)
    k_pos = j * g.bk + lax.broadcasted_iota(jnp.int32, shape, 0 if transposed else 1)
    q_seg = k_seg = None
    if g.has_seg:
        if transposed:  # q seg as an (8, bq) row tile, k seg as a (bk, 128) column tile
            q_seg, k_seg = qseg_ref[0:1, :], bu.widen(kseg_ref[...], g.bq)
        else:
            q_seg, k_seg = bu.widen(qseg_ref[...], g.bk), kseg_ref[0:1, :]
    return bu.tile_mask(q_pos, k_pos, causal=g.causal, kv_len=g.kv_len, q_seg=q_seg, k_seg=k_seg)


def to_rows(stat_BQx128):
    """(bq, 128) lane-replicated column -> (8, bq) lane-dense rows."""
    return jnp.transpose(stat_BQx128)[:SUBLANES, :]


# ------------------------------------------------------------------------------------- forward


def _fwd_kernel(rng_ref, q_ref, k_ref, *refs, g: tiling.Tiling, scale, values, entropy, precision):
    v_ref, *refs = refs if values else (None, *refs)
    qseg_ref, kseg_ref, *refs = refs if g.has_seg else (None, None, *refs)
    o_ref, *refs = refs if values else (None, *refs)
    lse_ref, *refs = refs
    ent_ref, *refs = refs if entropy else (None, *refs)
    m_sc, l_sc, *refs = refs
    acc_sc, *refs = refs if values else (None, *refs)
    t_sc = refs[0] if entropy else None
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, bu.MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        if values:
            acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
        if entropy:
            t_sc[...] = jnp.zeros(t_sc.shape, jnp.float32)

    def state():
        return bu.RowState(m_sc[...], l_sc[...], t_sc[...] if entropy else None,
                           acc_sc[...] if values else None)

    def step(masked: bool):
        s = bu.dot(q_ref[...], k_ref[...], bu.NT, precision) * scale
        mask = tile_mask(g, i, j, qseg_ref, kseg_ref) if masked else None
        m, l, t, acc = bu.online_softmax_step(state(), s, mask, v_ref[...] if values else None,
                                              precision=precision)
        m_sc[...], l_sc[...] = m, l
        if values:
            acc_sc[...] = acc
        if entropy:
            t_sc[...] = t

    run_visit(g, j, read_range(rng_ref, b, i, g.nq), step)

    @pl.when(j == g.nk - 1)
    def _finish():
        out, ent, lse = bu.finalize(state())
        if values:
            o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = to_rows(lse)
        if entropy:
            ent_ref[...] = to_rows(ent)


def forward(q, k, v, segment_ids, *, causal: bool, sm_scale: float, entropy: bool,
            block_q: int | None = None, block_k: int | None = None, interpret: bool = False):
    """Returns `(out [B, T, Hq, D], entropy [B, T, Hq] f32 or None, lse [B, T, Hq] f32)`.

    `v` None is the statistics-only pass (`kernels.attention_lse`): out is None.
    """
    bq, bk = blocks(q.shape[1], k.shape[1], block_q, block_k)
    g = tiling.Tiling(q.shape, k.shape, causal=causal, has_seg=segment_ids is not None, bq=bq, bk=bk)
    lay, G, D, values = Layout(g.D), g.G, g.D, v is not None

    def kv_blk(b, i, j, rng_ref):
        return j if not g.needs_mask else clamp_block(j, read_range(rng_ref, b, i, g.nq))

    q_spec = lay.spec(g.bq, D, lambda b, h, i, j, r: (b, h, i))
    kv_spec = lay.spec(g.bk, D, lambda b, h, i, j, r: (b, lax.div(h, G), kv_blk(b, i, j, r)))
    in_specs = [q_spec, kv_spec] + ([kv_spec] if values else [])
    args = [lay.arrange(tiling.pad_axis(q, 1, g.Tp)), lay.arrange(tiling.pad_axis(k, 1, g.Sp))]
    if values:
        args.append(lay.arrange(tiling.pad_axis(v, 1, g.Sp)))
    if g.has_seg:
        q_seg, k_seg = g.padded_segments(segment_ids)
        in_specs += [pl.BlockSpec((None, g.bq, LANES), lambda b, h, i, j, r: (b, i, 0)),
                     pl.BlockSpec((None, SUBLANES, g.bk), lambda b, h, i, j, r: (b, 0, kv_blk(b, i, j, r)))]
        args += [seg_column(q_seg), seg_row(k_seg)]
    row_spec = pl.BlockSpec((None, None, SUBLANES, g.bq), lambda b, h, i, j, r: (b, h, 0, i))
    row_shape = jax.ShapeDtypeStruct((g.B, g.Hq, SUBLANES, g.Tp), jnp.float32)
    out_shape = ([jax.ShapeDtypeStruct(args[0].shape, q.dtype)] if values else []) + [row_shape] + \
        ([row_shape] if entropy else [])
    out_specs = ([q_spec] if values else []) + [row_spec] + ([row_spec] if entropy else [])
    stat = pltpu.VMEM((g.bq, LANES), jnp.float32)
    scratch = [stat, stat] + ([pltpu.VMEM((g.bq, D), jnp.float32)] if values else []) + \
        ([stat] if entropy else [])
    res = pl.pallas_call(
        functools.partial(_fwd_kernel, g=g, scale=sm_scale, values=values, entropy=entropy,
                          precision=bu.matmul_precision(q.dtype)),
        grid_spec=grid_spec((g.B, g.Hq, g.nq, g.nk), in_specs, out_specs, scratch),
        out_shape=out_shape,
        compiler_params=compiler_params(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY),
        interpret=interpret_params(interpret),
        name="entropy_flash_fwd" if entropy else ("flash_fwd" if values else "attention_lse"),
    )(flat_ranges(g.block_kinds(segment_ids)), *args)
    res = list(res)
    out = lay.restore(res.pop(0), g.Hq, D)[:, : g.T] if values else None

    def rows(x):  # [B, Hq, 8, Tp] -> [B, T, Hq]
        return jnp.transpose(x[:, :, 0, : g.T], (0, 2, 1))

    return out, (rows(res[1]) if entropy else None), rows(res[0])


# ------------------------------------------------------------------------------------ backward


def _dq_kernel(rng_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, g: tiling.Tiling, scale,
               entropy_grad, precision):
    ge_ref, *refs = refs if entropy_grad else (None, *refs)
    qseg_ref, kseg_ref, dq_ref, dq_sc = refs if g.has_seg else (None, None, *refs)
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def step(masked: bool):
        k = k_ref[...]
        # (1, bq) rows -> (bq, 1) columns
        lse, di = lse_ref[0][:, None], di_ref[0][:, None]
        ge = ge_ref[0][:, None] if entropy_grad else None
        mask = tile_mask(g, i, j, qseg_ref, kseg_ref) if masked else None
        log_p = bu.log_probs(bu.dot(q_ref[...], k, bu.NT, precision) * scale, lse, mask)
        p = jnp.exp(log_p)
        dp = bu.dot(do_ref[...], v_ref[...], bu.NT, precision)
        ds = bu.softmax_grad(p, dp, di, g_ent=ge, log_p=log_p)
        dq_sc[...] += bu.dot(ds.astype(k.dtype), k, bu.NN, precision)

    run_visit(g, j, read_range(rng_ref, b, i, g.nq), step)

    @pl.when(j == g.nk - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(rng_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, g: tiling.Tiling, scale,
                entropy_grad, precision):
    ge_ref, *refs = refs if entropy_grad else (None, *refs)
    qseg_ref, kseg_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs if g.has_seg else (None, None, *refs)
    b, j, r = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    i = lax.rem(r, g.nq)  # query block; r // nq is the head within the group

    @pl.when(r == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(masked: bool):
        q, k, do = q_ref[...], k_ref[...], do_ref[...]
        lse, di = lse_ref[...], di_ref[...]  # (1, bq) rows
        ge = ge_ref[...] if entropy_grad else None
        mask_t = tile_mask(g, i, j, qseg_ref, kseg_ref, transposed=True) if masked else None
        log_p_t = bu.log_probs(bu.dot(k, q, bu.NT, precision) * scale, lse, mask_t)  # [bk, bq]
        p_t = jnp.exp(log_p_t)
        dv_sc[...] += bu.dot(p_t.astype(do.dtype), do, bu.NN, precision)
        ds_t = bu.softmax_grad(p_t, bu.dot(v_ref[...], do, bu.NT, precision), di, g_ent=ge, log_p=log_p_t)
        dk_sc[...] += bu.dot(ds_t.astype(q.dtype), q, bu.NN, precision)

    run_visit(g, i, read_range(rng_ref, b, j, g.nk), step)

    @pl.when(r == g.G * g.nq - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(q, k, v, segment_ids, do, lse, di, g_ent, *, causal: bool, sm_scale: float,
             block_q: int | None = None, block_k: int | None = None, interpret: bool = False):
    """Flash backward. lse, di (`block_update.row_delta`), g_ent (or None): `[B, T, Hq]` f32.
    Returns `(dq, dk, dv)` in the input dtypes."""
    bq, bk = blocks(q.shape[1], k.shape[1], block_q, block_k)
    g = tiling.Tiling(q.shape, k.shape, causal=causal, has_seg=segment_ids is not None, bq=bq, bk=bk)
    lay, G, D, nq = Layout(g.D), g.G, g.D, g.nq
    kinds = g.block_kinds(segment_ids)
    prec = bu.matmul_precision(q.dtype)
    qa = lay.arrange(tiling.pad_axis(q, 1, g.Tp))
    doa = lay.arrange(tiling.pad_axis(do.astype(q.dtype), 1, g.Tp))
    ka, va = lay.arrange(tiling.pad_axis(k, 1, g.Sp)), lay.arrange(tiling.pad_axis(v, 1, g.Sp))

    def row_layout(x_BxTxH, fill):  # -> [B, Hq, 1, Tp]
        x = jnp.transpose(x_BxTxH, (0, 2, 1)).astype(jnp.float32)
        return tiling.pad_axis(x, 2, g.Tp, fill)[:, :, None, :]

    # padded rows: lse makes their probabilities exactly 0
    rows = [row_layout(lse, bu.EMPTY_ROW_LSE), row_layout(di, 0.0)]
    if g_ent is not None:
        rows.append(row_layout(g_ent, 0.0))
    seg = g.padded_segments(segment_ids) if g.has_seg else None
    kernel_kw = dict(g=g, scale=sm_scale, entropy_grad=g_ent is not None, precision=prec)
    semantics = compiler_params(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY)

    # dQ: like the forward, grid (B, Hq, nq, nk)
    def kv_blk(b, i, j, rng_ref):
        return j if not g.needs_mask else clamp_block(j, read_range(rng_ref, b, i, nq))

    q_spec = lay.spec(g.bq, D, lambda b, h, i, j, r: (b, h, i))
    kv_spec = lay.spec(g.bk, D, lambda b, h, i, j, r: (b, lax.div(h, G), kv_blk(b, i, j, r)))
    row_spec = pl.BlockSpec((None, None, 1, g.bq), lambda b, h, i, j, r: (b, h, 0, i))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec] + [row_spec] * len(rows)
    args = [qa, ka, va, doa, *rows]
    if g.has_seg:
        in_specs += [pl.BlockSpec((None, g.bq, LANES), lambda b, h, i, j, r: (b, i, 0)),
                     pl.BlockSpec((None, SUBLANES, g.bk), lambda b, h, i, j, r: (b, 0, kv_blk(b, i, j, r)))]
        args += [seg_column(seg[0]), seg_row(seg[1])]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **kernel_kw),
        grid_spec=grid_spec((g.B, g.Hq, nq, g.nk), in_specs, q_spec,
                            [pltpu.VMEM((g.bq, D), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(qa.shape, q.dtype), compiler_params=semantics,
        interpret=interpret_params(interpret), name="entropy_flash_bwd_dq",
    )(flat_ranges(kinds), *args)

    # dK/dV: grid (B, Hkv, nk, G·nq); axis 3 walks the group's heads and their query blocks
    def q_blk(b, j, r, rng_ref):
        i = lax.rem(r, nq)
        return i if not g.needs_mask else clamp_block(i, read_range(rng_ref, b, j, g.nk))

    q_spec = lay.spec(g.bq, D, lambda b, h, j, r, rr: (b, h * G + lax.div(r, nq), q_blk(b, j, r, rr)))
    kv_spec = lay.spec(g.bk, D, lambda b, h, j, r, rr: (b, h, j))
    row_spec = pl.BlockSpec((None, None, 1, g.bq),
                            lambda b, h, j, r, rr: (b, h * G + lax.div(r, nq), 0, q_blk(b, j, r, rr)))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec] + [row_spec] * len(rows)
    args = [qa, ka, va, doa, *rows]
    if g.has_seg:
        in_specs += [pl.BlockSpec((None, SUBLANES, g.bq), lambda b, h, j, r, rr: (b, 0, q_blk(b, j, r, rr))),
                     pl.BlockSpec((None, g.bk, LANES), lambda b, h, j, r, rr: (b, j, 0))]
        args += [seg_row(seg[0]), seg_column(seg[1])]
    acc = pltpu.VMEM((g.bk, D), jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **kernel_kw),
        grid_spec=grid_spec((g.B, g.Hkv, g.nk, G * nq), in_specs, [kv_spec, kv_spec], [acc, acc]),
        out_shape=[jax.ShapeDtypeStruct(ka.shape, k.dtype), jax.ShapeDtypeStruct(va.shape, v.dtype)],
        compiler_params=semantics, interpret=interpret_params(interpret), name="entropy_flash_bwd_dkv",
    )(flat_ranges(kinds, transpose=True), *args)
    return (lay.restore(dq, g.Hq, D)[:, : g.T], lay.restore(dk, g.Hkv, D)[:, : g.S],
            lay.restore(dv, g.Hkv, D)[:, : g.S])
