"""Mosaic (TPU) head-mixture entropy and attention probabilities, from each head's lse.

Follows the rules of `kernels.flash_tpu` (whose layouts, segment tiles, scalar-prefetched visit
ranges and masks it reuses). Head mixture: grid (B, Tq/bq, Tk/bk) with the key axis "arbitrary";
one program holds the query tiles of *all* heads (`(bq, Hq·D)` in the flat layout, each head a
static lane slice) and the key tiles of all K/V heads, unrolls the heads statically (so each
head's lse is a static lane slice of the `(bq, Hq)` lse tile), sums their probabilities into ā
for the key tile and accumulates −ā log ā in a `(bq, 128)` VMEM tile. Probabilities: grid
(B, Hq, Tq/bq, Tk/bk), one `(bq, bk)` tile per program, always masked (it writes every tile).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxrl_entropy.kernels import block_update as bu
from jaxrl_entropy.kernels import flash_tpu as ft
from jaxrl_entropy.kernels import tiling

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 512
# every head's query tile sits in VMEM (double-buffered): wide models get a shorter query block
WIDE_BLOCK_Q = 128
WIDE_ROW_BYTES = 8192  # Hq·D·itemsize above which a query row counts as wide


def blocks(T, S, block_q, block_k, row_bytes: int = 0):
    """(bq, bk) under the rules of `kernels.flash_tpu.blocks` (multiples of 128)."""
    default_q = WIDE_BLOCK_Q if row_bytes > WIDE_ROW_BYTES else DEFAULT_BLOCK_Q
    return ft.blocks(T, S, block_q, block_k, default_q, DEFAULT_BLOCK_K)


def _head(ref, h: int, lay: ft.Layout, D: int):
    """Head h's tile of a block holding every head: a static lane slice (flat) or a leading index."""
    return ref[:, h * D:(h + 1) * D] if lay.flat else ref[h]


def _all_heads_spec(lay: ft.Layout, H: int, blk: int, D: int, index):
    """BlockSpec of the tiles of all H heads; `index(*grid, ranges_ref) -> (b, t_block)`."""
    if lay.flat:
        return pl.BlockSpec((None, blk, H * D), lambda *a: (*index(*a), 0))
    return pl.BlockSpec((None, H, blk, D), lambda *a: (index(*a)[0], 0, index(*a)[1], 0))


def _mixture_kernel(rng_ref, q_ref, k_ref, lse_ref, *refs, g: tiling.Tiling, lay: ft.Layout, scale,
                    precision):
    qseg_ref, kseg_ref, out_ref, acc_sc = refs if g.has_seg else (None, None, *refs)
    b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step(masked: bool):
        mask = ft.tile_mask(g, i, j, qseg_ref, kseg_ref) if masked else None
        lse_all = lse_ref[...]  # (bq, Hq)
        psum = jnp.zeros((g.bq, g.bk), jnp.float32)
        for hk in range(g.Hkv):
            k = _head(k_ref, hk, lay, g.D)
            for h in range(hk * g.G, (hk + 1) * g.G):
                s = bu.dot(_head(q_ref, h, lay, g.D), k, bu.NT, precision) * scale
                psum = psum + bu.recompute_probs(s, lse_all[:, h:h + 1], mask)
        acc_sc[...] += bu.mixture_entropy_term(psum, g.Hq)  # (bq, 1) -> (bq, 128)

    ft.run_visit(g, j, ft.read_range(rng_ref, b, i, g.nq), step)

    @pl.when(j == g.nk - 1)
    def _finish():
        out_ref[...] = ft.to_rows(acc_sc[...])


def mixture(q, k, segment_ids, lse, *, causal: bool, sm_scale: float, block_q=None, block_k=None,
            interpret: bool = False):
    """Head-mixture entropy `[B, T]` float32; lse `[B, T, Hq]` f32 (finite)."""
    row_bytes = q.shape[2] * q.shape[3] * jnp.dtype(q.dtype).itemsize
    bq, bk = blocks(q.shape[1], k.shape[1], block_q, block_k, row_bytes)
    g = tiling.Tiling(q.shape, k.shape, causal=causal, has_seg=segment_ids is not None, bq=bq, bk=bk)
    lay = ft.Layout(g.D)

    def kv_blk(b, i, j, rng_ref):
        return j if not g.needs_mask else ft.clamp_block(j, ft.read_range(rng_ref, b, i, g.nq))

    in_specs = [_all_heads_spec(lay, g.Hq, g.bq, g.D, lambda b, i, j, r: (b, i)),
                _all_heads_spec(lay, g.Hkv, g.bk, g.D, lambda b, i, j, r: (b, kv_blk(b, i, j, r))),
                pl.BlockSpec((None, g.bq, g.Hq), lambda b, i, j, r: (b, i, 0))]
    args = [lay.arrange(tiling.pad_axis(q, 1, g.Tp)), lay.arrange(tiling.pad_axis(k, 1, g.Sp)),
            tiling.pad_axis(lse.astype(jnp.float32), 1, g.Tp, bu.EMPTY_ROW_LSE)]
    if g.has_seg:
        q_seg, k_seg = g.padded_segments(segment_ids)
        in_specs += [pl.BlockSpec((None, g.bq, ft.LANES), lambda b, i, j, r: (b, i, 0)),
                     pl.BlockSpec((None, ft.SUBLANES, g.bk), lambda b, i, j, r: (b, 0, kv_blk(b, i, j, r)))]
        args += [ft.seg_column(q_seg), ft.seg_row(k_seg)]
    out = pl.pallas_call(
        functools.partial(_mixture_kernel, g=g, lay=lay, scale=sm_scale,
                          precision=bu.matmul_precision(q.dtype)),
        grid_spec=ft.grid_spec((g.B, g.nq, g.nk), in_specs,
                               pl.BlockSpec((None, ft.SUBLANES, g.bq), lambda b, i, j, r: (b, 0, i)),
                               [pltpu.VMEM((g.bq, ft.LANES), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((g.B, ft.SUBLANES, g.Tp), jnp.float32),
        compiler_params=ft.compiler_params(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY),
        interpret=ft.interpret_params(interpret), name="head_mixture_entropy",
    )(ft.flat_ranges(g.block_kinds(segment_ids)), *args)
    return out[:, 0, : g.T]


def _probs_kernel(q_ref, k_ref, lse_ref, *refs, g: tiling.Tiling, scale, precision):
    qseg_ref, kseg_ref, out_ref = refs if g.has_seg else (None, None, *refs)
    i, j = pl.program_id(2), pl.program_id(3)
    s = bu.dot(q_ref[...], k_ref[...], bu.NT, precision) * scale
    mask = ft.tile_mask(g, i, j, qseg_ref, kseg_ref)
    out_ref[...] = bu.recompute_probs(s, lse_ref[0][:, None], mask)  # (1, bq) row -> column


def probs(q, k, segment_ids, lse, *, causal: bool, sm_scale: float, block_q=None, block_k=None,
          interpret: bool = False):
    """Per-head probabilities `[B, Hq, T, S]` float32."""
    bq, bk = ft.blocks(q.shape[1], k.shape[1], block_q, block_k)
    g = tiling.Tiling(q.shape, k.shape, causal=causal, has_seg=segment_ids is not None, bq=bq, bk=bk)
    lay, G = ft.Layout(g.D), g.G
    in_specs = [lay.spec(g.bq, g.D, lambda b, h, i, j: (b, h, i)),
                lay.spec(g.bk, g.D, lambda b, h, i, j: (b, lax.div(h, G), j)),
                pl.BlockSpec((None, None, 1, g.bq), lambda b, h, i, j: (b, h, 0, i))]
    lse_rows = tiling.pad_axis(jnp.transpose(lse, (0, 2, 1)).astype(jnp.float32), 2, g.Tp, bu.EMPTY_ROW_LSE)
    args = [lay.arrange(tiling.pad_axis(q, 1, g.Tp)), lay.arrange(tiling.pad_axis(k, 1, g.Sp)),
            lse_rows[:, :, None, :]]
    if g.has_seg:
        q_seg, k_seg = g.padded_segments(segment_ids)
        in_specs += [pl.BlockSpec((None, g.bq, ft.LANES), lambda b, h, i, j: (b, i, 0)),
                     pl.BlockSpec((None, ft.SUBLANES, g.bk), lambda b, h, i, j: (b, 0, j))]
        args += [ft.seg_column(q_seg), ft.seg_row(k_seg)]
    p = pl.pallas_call(
        functools.partial(_probs_kernel, g=g, scale=sm_scale, precision=bu.matmul_precision(q.dtype)),
        grid=(g.B, g.Hq, g.nq, g.nk), in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, g.bq, g.bk), lambda b, h, i, j: (b, h, i, j)),
        out_shape=jax.ShapeDtypeStruct((g.B, g.Hq, g.Tp, g.Sp), jnp.float32),
        compiler_params=ft.compiler_params(*[pltpu.PARALLEL] * 4),
        interpret=ft.interpret_params(interpret), name="attention_probs",
    )(*args)
    return p[:, :, : g.T, : g.S]
