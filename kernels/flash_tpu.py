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
  written at the last kv block; causal blocks above the diagonal are skipped with `pl.when` and
  their index_map points at the last block actually used, so the pipeline issues no DMA for them;
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

from kernels import block_update as bu

LANES = 128
SUBLANES = 8
# 512 x 512 tiles: large enough to keep the MXU busy (128-wide tiles reach a few % of peak on v5e),
# small enough that the forward (~5 MiB) and the dK/dV backward (~7 MiB) fit the default scoped
# VMEM of every TPU generation with double buffering.
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512

_NT = (((1,), (1,)), ((), ()))  # a @ bᵀ
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _blocks(T: int, S: int, block_q: int | None, block_k: int | None) -> tuple[int, int]:
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b is not None and b % LANES:
            raise ValueError(f"{name}={b} is not allowed on the TPU (Mosaic) backend: sequence blocks "
                             f"must be multiples of {LANES} (they are the lane dim of score tiles)")
    bq = min(block_q or DEFAULT_BLOCK_Q, bu.round_up(T, LANES))
    bk = min(block_k or DEFAULT_BLOCK_K, bu.round_up(S, LANES))
    return bq, bk


def _dot(a, b, dims, precision):
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _interpret(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


def _params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


class _Layout:
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
        """`index(*grid) -> (b, h, t_block)`."""
        if self.flat:
            return pl.BlockSpec((None, blk, D), lambda *grid: _pick(index(*grid), (0, 2, 1)))
        return pl.BlockSpec((None, None, blk, D), lambda *grid: _pick(index(*grid), (0, 1, 2)) + (0,))


def _pick(idx, order):
    return tuple(idx[o] for o in order)


def _seg_column(seg_BxT, T):
    """`[B, T, 128]`: a (blk, 128) tile per block, lane-replicated."""
    return jnp.broadcast_to(seg_BxT[:, :T, None], (seg_BxT.shape[0], T, LANES))


def _seg_row(seg_BxT, T):
    """`[B, 8, T]`: an (8, blk) tile per block, sublane-replicated."""
    return jnp.broadcast_to(seg_BxT[:, None, :T], (seg_BxT.shape[0], SUBLANES, T))


class _Geometry(bu.Tiling):
    def __init__(self, q, k, segment_ids, causal, block_q, block_k):
        super().__init__(q, k, segment_ids, causal, *_blocks(q.shape[1], k.shape[1], block_q, block_k))
        self.has_seg = segment_ids is not None
        self.seg = None
        if self.has_seg:
            seg = segment_ids.astype(jnp.int32)
            n = max(self.Tp, self.Sp)
            self.seg = bu.pad_axis(seg, 1, n)  # padding -> segment 0 -> invisible

    # causal geometry (static sizes, traced block indices)
    def kv_last(self, i):
        """Last key block that query block i needs."""
        last = bu.floordiv((i + 1) * self.bq - 1 + self.off, self.bk, self.off)
        return jnp.clip(last, 0, self.nk - 1)

    def q_first(self, j):
        """First query block that sees key block j."""
        return jnp.clip(bu.floordiv(j * self.bk - self.off, self.bq, -self.off), 0, self.nq - 1)

    def visible(self, i, j):
        """Does query block i see anything of key block j (causal)?"""
        return j * self.bk <= (i + 1) * self.bq - 1 + self.off


def _tile_mask_fwd(g: _Geometry, i, j, qseg_ref, kseg_ref):
    """Mask of the (bq, bk) tile; rows are queries. None when nothing is masked."""
    if not (g.causal or g.has_seg or g.kv_len is not None):
        return None
    q_pos = i * g.bq + g.off + lax.broadcasted_iota(jnp.int32, (g.bq, g.bk), 0)
    k_pos = j * g.bk + lax.broadcasted_iota(jnp.int32, (g.bq, g.bk), 1)
    q_seg = bu.widen(qseg_ref[...], g.bk) if g.has_seg else None
    k_seg = kseg_ref[0:1, :] if g.has_seg else None
    return bu.tile_mask(q_pos, k_pos, causal=g.causal, kv_len=g.kv_len, q_seg=q_seg, k_seg=k_seg)


def _to_rows(stat_BQx128):
    """(bq, 128) lane-replicated column -> (8, bq) lane-dense rows."""
    return jnp.transpose(stat_BQx128)[:SUBLANES, :]


# ------------------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, g: _Geometry, scale, entropy, precision):
    if g.has_seg:
        qseg_ref, kseg_ref, *refs = refs
    else:
        qseg_ref = kseg_ref = None
    if entropy:
        o_ref, lse_ref, ent_ref, m_sc, l_sc, acc_sc, t_sc = refs
    else:
        o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
        ent_ref = t_sc = None
    i, j = pl.program_id(2), pl.program_id(3)

    def _state():
        return bu.RowState(m_sc[...], l_sc[...], t_sc[...] if entropy else None, acc_sc[...])

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, bu.MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
        if entropy:
            t_sc[...] = jnp.zeros(t_sc.shape, jnp.float32)

    def _step():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = _dot(q, k, _NT, precision) * scale
        mask = _tile_mask_fwd(g, i, j, qseg_ref, kseg_ref)
        m, l, t, acc = bu.online_softmax_step(_state(), s, mask, v, entropy=entropy, precision=precision)
        m_sc[...], l_sc[...], acc_sc[...] = m, l, acc
        if entropy:
            t_sc[...] = t

    if g.causal:
        pl.when(g.visible(i, j))(_step)
    else:
        _step()

    @pl.when(j == g.nk - 1)
    def _finish():
        out, ent, lse = bu.finalize(_state(), entropy=entropy)
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = _to_rows(lse)
        if entropy:
            ent_ref[...] = _to_rows(ent)


def forward(q, k, v, segment_ids, *, causal: bool, sm_scale: float, entropy: bool,
            block_q: int | None = None, block_k: int | None = None, interpret: bool = False):
    """Returns `(out [B, T, Hq, D], entropy [B, T, Hq] f32 or None, lse [B, T, Hq] f32)`."""
    g = _Geometry(q, k, segment_ids, causal, block_q, block_k)
    lay = _Layout(g.D)
    G, D = g.G, g.D

    def kv_blk(i, j):
        return jnp.minimum(j, g.kv_last(i)) if causal else j  # skipped -> already-loaded block

    q_spec = lay.spec(g.bq, D, lambda b, h, i, j: (b, h, i))
    kv_spec = lay.spec(g.bk, D, lambda b, h, i, j: (b, lax.div(h, G), kv_blk(i, j)))
    in_specs = [q_spec, kv_spec, kv_spec]
    args = [lay.arrange(bu.pad_axis(q, 1, g.Tp)), lay.arrange(bu.pad_axis(k, 1, g.Sp)),
            lay.arrange(bu.pad_axis(v, 1, g.Sp))]
    if g.has_seg:
        in_specs += [pl.BlockSpec((None, g.bq, LANES), lambda b, h, i, j: (b, i, 0)),
                     pl.BlockSpec((None, SUBLANES, g.bk), lambda b, h, i, j: (b, 0, kv_blk(i, j)))]
        args += [_seg_column(g.seg, g.Tp), _seg_row(g.seg, g.Sp)]
    row_spec = pl.BlockSpec((None, None, SUBLANES, g.bq), lambda b, h, i, j: (b, h, 0, i))
    row_shape = jax.ShapeDtypeStruct((g.B, g.Hq, SUBLANES, g.Tp), jnp.float32)
    out_shape = [jax.ShapeDtypeStruct(args[0].shape, q.dtype), row_shape] + ([row_shape] if entropy else [])
    out_specs = [q_spec, row_spec] + ([row_spec] if entropy else [])
    stat = pltpu.VMEM((g.bq, LANES), jnp.float32)
    res = pl.pallas_call(
        functools.partial(_fwd_kernel, g=g, scale=sm_scale, entropy=entropy,
                          precision=bu.matmul_precision(q.dtype)),
        grid=(g.B, g.Hq, g.nq, g.nk), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[stat, stat, pltpu.VMEM((g.bq, D), jnp.float32)] + ([stat] if entropy else []),
        compiler_params=_params(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY),
        interpret=_interpret(interpret), name="entropy_flash_fwd" if entropy else "flash_fwd",
    )(*args)
    out = lay.restore(res[0], g.Hq, D)[:, : g.T]

    def rows(x):  # [B, Hq, 8, Tp] -> [B, T, Hq]
        return jnp.transpose(x[:, :, 0, : g.T], (0, 2, 1))

    return out, (rows(res[2]) if entropy else None), rows(res[1])


# ------------------------------------------------------------------------------------ backward


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, g: _Geometry, scale, precision):
    if g.has_seg:
        qseg_ref, kseg_ref, dq_ref, dq_sc = refs
    else:
        qseg_ref = kseg_ref = None
        dq_ref, dq_sc = refs
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        lse = lse_ref[0][:, None]  # (1, bq) row -> (bq, 1) column
        di = di_ref[0][:, None]
        mask = _tile_mask_fwd(g, i, j, qseg_ref, kseg_ref)
        p = bu.recompute_probs(_dot(q, k, _NT, precision) * scale, lse, mask)
        ds = bu.softmax_grad(p, _dot(do, v, _NT, precision), di)
        dq_sc[...] += _dot(ds.astype(k.dtype), k, _NN, precision)

    if g.causal:
        pl.when(g.visible(i, j))(_step)
    else:
        _step()

    @pl.when(j == g.nk - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, g: _Geometry, scale, precision):
    if g.has_seg:
        qseg_ref, kseg_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
    else:
        dk_ref, dv_ref, dk_sc, dv_sc = refs
    j, r = pl.program_id(2), pl.program_id(3)
    i = lax.rem(r, g.nq)  # query block; r // nq is the head within the group

    @pl.when(r == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        lse, di = lse_ref[...], di_ref[...]  # (1, bq) rows
        mask_t = None
        if g.causal or g.has_seg or g.kv_len is not None:
            k_pos = j * g.bk + lax.broadcasted_iota(jnp.int32, (g.bk, g.bq), 0)
            q_pos = i * g.bq + g.off + lax.broadcasted_iota(jnp.int32, (g.bk, g.bq), 1)
            q_seg = qseg_ref[0:1, :] if g.has_seg else None
            k_seg = bu.widen(kseg_ref[...], g.bq) if g.has_seg else None
            mask_t = bu.tile_mask(q_pos, k_pos, causal=g.causal, kv_len=g.kv_len,
                                  q_seg=q_seg, k_seg=k_seg)
        p_t = bu.recompute_probs(_dot(k, q, _NT, precision) * scale, lse, mask_t)  # [bk, bq]
        dv_sc[...] += _dot(p_t.astype(do.dtype), do, _NN, precision)
        ds_t = bu.softmax_grad(p_t, _dot(v, do, _NT, precision), di)
        dk_sc[...] += _dot(ds_t.astype(q.dtype), q, _NN, precision)

    if g.causal:
        pl.when(g.visible(i, j))(_step)
    else:
        _step()

    @pl.when(r == g.G * g.nq - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(q, k, v, segment_ids, do, lse, di, *, causal: bool, sm_scale: float,
             block_q: int | None = None, block_k: int | None = None, interpret: bool = False):
    """Flash backward. lse, di: `[B, T, Hq]` f32. Returns `(dq, dk, dv)` in the input dtypes."""
    g = _Geometry(q, k, segment_ids, causal, block_q, block_k)
    lay = _Layout(g.D)
    G, D, nq = g.G, g.D, g.nq
    prec = bu.matmul_precision(q.dtype)
    qa, doa = lay.arrange(bu.pad_axis(q, 1, g.Tp)), lay.arrange(bu.pad_axis(do.astype(q.dtype), 1, g.Tp))
    ka, va = lay.arrange(bu.pad_axis(k, 1, g.Sp)), lay.arrange(bu.pad_axis(v, 1, g.Sp))

    def row_layout(x_BxTxH, fill):  # -> [B, Hq, 1, Tp]
        return bu.pad_axis(jnp.transpose(x_BxTxH, (0, 2, 1)), 2, g.Tp, fill)[:, :, None, :]

    lse_r = row_layout(lse, bu.EMPTY_ROW_LSE)  # padded rows: probabilities exactly 0
    di_r = row_layout(di.astype(jnp.float32), 0.0)

    # dQ: like the forward, grid (B, Hq, nq, nk)
    def kv_blk(i, j):
        return jnp.minimum(j, g.kv_last(i)) if causal else j

    q_spec = lay.spec(g.bq, D, lambda b, h, i, j: (b, h, i))
    kv_spec = lay.spec(g.bk, D, lambda b, h, i, j: (b, lax.div(h, G), kv_blk(i, j)))
    row_spec = pl.BlockSpec((None, None, 1, g.bq), lambda b, h, i, j: (b, h, 0, i))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    args = [qa, ka, va, doa, lse_r, di_r]
    if g.has_seg:
        in_specs += [pl.BlockSpec((None, g.bq, LANES), lambda b, h, i, j: (b, i, 0)),
                     pl.BlockSpec((None, SUBLANES, g.bk), lambda b, h, i, j: (b, 0, kv_blk(i, j)))]
        args += [_seg_column(g.seg, g.Tp), _seg_row(g.seg, g.Sp)]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, g=g, scale=sm_scale, precision=prec),
        grid=(g.B, g.Hq, nq, g.nk), in_specs=in_specs, out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(qa.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((g.bq, D), jnp.float32)],
        compiler_params=_params(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY),
        interpret=_interpret(interpret), name="entropy_flash_bwd_dq",
    )(*args)

    # dK/dV: grid (B, Hkv, nk, G·nq); axis 3 walks the group's heads and their query blocks
    def q_blk(j, r):
        i = lax.rem(r, nq)
        return jnp.maximum(i, g.q_first(j)) if causal else i  # skipped -> next block used

    q_spec = lay.spec(g.bq, D, lambda b, h, j, r: (b, h * G + lax.div(r, nq), q_blk(j, r)))
    kv_spec = lay.spec(g.bk, D, lambda b, h, j, r: (b, h, j))
    row_spec = pl.BlockSpec((None, None, 1, g.bq),
                            lambda b, h, j, r: (b, h * G + lax.div(r, nq), 0, q_blk(j, r)))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    args = [qa, ka, va, doa, lse_r, di_r]
    if g.has_seg:
        in_specs += [pl.BlockSpec((None, SUBLANES, g.bq), lambda b, h, j, r: (b, 0, q_blk(j, r))),
                     pl.BlockSpec((None, g.bk, LANES), lambda b, h, j, r: (b, j, 0))]
        args += [_seg_row(g.seg, g.Tp), _seg_column(g.seg, g.Sp)]
    acc = pltpu.VMEM((g.bk, D), jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, g=g, scale=sm_scale, precision=prec),
        grid=(g.B, g.Hkv, g.nk, G * nq), in_specs=in_specs, out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(ka.shape, k.dtype), jax.ShapeDtypeStruct(va.shape, v.dtype)],
        scratch_shapes=[acc, acc],
        compiler_params=_params(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY),
        interpret=_interpret(interpret), name="entropy_flash_bwd_dkv",
    )(*args)
    return (lay.restore(dq, g.Hq, D)[:, : g.T], lay.restore(dk, g.Hkv, D)[:, : g.S],
            lay.restore(dv, g.Hkv, D)[:, : g.S])
