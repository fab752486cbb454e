"""Pallas GPU (Triton lowering) shell of flash attention with row entropy.

Triton rules this shell follows:
- no scratch buffers: each program keeps its accumulators in registers and loops over the key
  (or query) blocks in its body with `lax.fori_loop`; the looped-over operand has a full-length
  BlockSpec and is sliced with `pl.ds`;
- every tile dimension is a power of two and every matmul dimension is >= 16 (blocks >= 16,
  head_dim zero-padded to a power of two >= 16);
- per-row statistics are `[bq, 1]` register tensors, written out as `[bq]` rows.
Grids: forward and dQ over (Tq/bq, B, Hq); dK/dV over (Tk/bk, B, Hkv) with a loop over the G query
heads of the group, so the GQA gradient is summed in registers and K/V are never repeated. Each
program reads its four visit bounds (`kernels.tiling.visit_ranges`: an int32 `[4]` block) and
loops only over the blocks it needs, building a mask only on diagonal / boundary blocks. The
dK/dV kernel works on the transposed tile sᵀ = k qᵀ so no in-kernel transpose is needed.
Runs with `interpret=True` on CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxrl_entropy.kernels import block_update as bu
from jaxrl_entropy.kernels import tiling

# Forward: a 128-row query tile amortises the K/V loads; 64-key tiles keep s and p in registers
# next to a 128-wide accumulator (FlashAttention-2 Triton's choice for head_dim 128).
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 64
# Backward: dQ and dK/dV tiles of 64 x 64 keep the five live tiles (q, k, v, do, ds) in registers.
DEFAULT_BLOCK_Q_BWD = 64
DEFAULT_BLOCK_K_BWD = 64
MIN_BLOCK = 16


def pow2_at_least(n: int, floor: int = MIN_BLOCK) -> int:
    return max(floor, 1 << max(0, (n - 1).bit_length()))


def blocks(T, S, block_q, block_k, default_q=DEFAULT_BLOCK_Q, default_k=DEFAULT_BLOCK_K):
    """Legal (bq, bk): powers of two >= 16, no larger than the padded sequence."""
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b is not None and (b < MIN_BLOCK or b & (b - 1)):
            raise ValueError(f"{name}={b} is not allowed on the Pallas GPU (Triton) backend: use a "
                             f"power of two >= {MIN_BLOCK} (Triton tiles are powers of two, matmuls "
                             f"need >= 16)")
    # a block bigger than the (padded) sequence only adds padding work
    return min(block_q or default_q, pow2_at_least(T)), min(block_k or default_k, pow2_at_least(S))


def compiler_params(D: int, interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=4 if D <= 64 else 8, num_stages=2)


def pad_heads(x_BxTxHxD: jax.Array, L: int) -> jax.Array:
    """Pad the sequence to `L` and head_dim to a power of two (zeros change no logit)."""
    return tiling.pad_axis(tiling.pad_axis(x_BxTxHxD, 3, pow2_at_least(x_BxTxHxD.shape[3])), 1, L)


def rows_BxHxT(x_BxTxH: jax.Array, Tp: int, fill: float) -> jax.Array:
    """`[B, T, Hq]` -> `[B, Hq, Tp]` float32 rows, padded with `fill`."""
    return tiling.pad_axis(jnp.transpose(x_BxTxH, (0, 2, 1)).astype(jnp.float32), 2, Tp, fill)


def ranges_spec(index):
    """BlockSpec of one `[4]` visit-range row of a `[B, N, 4]` array; `index(*grid) -> (b, n)`."""
    return pl.BlockSpec((None, None, 4), lambda *grid: (*index(*grid), 0))


def tile_mask(g: tiling.Tiling, q_start, k_start, qseg_ref, kseg_ref, *, transposed: bool = False):
    """Mask of the tile whose queries start at q_start and keys at k_start: `[bq, bk]`, or
    `[bk, bq]` (rows are keys) with `transposed`. Segment refs hold the whole padded sequence."""
    q_shape, k_shape = ((1, g.bq), (g.bk, 1)) if transposed else ((g.bq, 1), (1, g.bk))
    q_pos = q_start + g.off + lax.broadcasted_iota(jnp.int32, q_shape, int(transposed))
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, k_shape, int(not transposed))
    q_seg = k_seg = None
    if g.has_seg:
        q_seg = qseg_ref[pl.ds(q_start, g.bq)].reshape(q_shape)
        k_seg = kseg_ref[pl.ds(k_start, g.bk)].reshape(k_shape)
    return bu.tile_mask(q_pos, k_pos, causal=g.causal, kv_len=g.kv_len, q_seg=q_seg, k_seg=k_seg)


def seg_inputs(g: tiling.Tiling, segment_ids, batch_index):
    """Specs and arrays of the padded query / key segment ids (whole rows; `batch_index(*grid)`
    -> b), or empty lists."""
    if segment_ids is None:
        return [], []
    q_seg, k_seg = g.padded_segments(segment_ids)
    return ([pl.BlockSpec((None, g.Tp), lambda *grid: (batch_index(*grid), 0)),
             pl.BlockSpec((None, g.Sp), lambda *grid: (batch_index(*grid), 0))], [q_seg, k_seg])


# ------------------------------------------------------------------------------------- forward


def _fwd_kernel(rng_ref, q_ref, k_ref, *refs, g: tiling.Tiling, scale, values, entropy, precision):
    v_ref = refs[0] if values else None
    refs = refs[1:] if values else refs
    qseg_ref, kseg_ref, *refs = refs if g.has_seg else (None, None, *refs)
    o_ref = refs[0] if values else None
    lse_ref = refs[1] if values else refs[0]
    ent_ref = refs[-1] if entropy else None

    i = pl.program_id(0)
    q = q_ref[...]

    def body(j, state, masked):
        start = pl.multiple_of(j * g.bk, g.bk)
        s = bu.dot(q, k_ref[pl.ds(start, g.bk), :], bu.NT, precision) * scale
        mask = tile_mask(g, i * g.bq, start, qseg_ref, kseg_ref) if masked else None
        v = v_ref[pl.ds(start, g.bk), :] if values else None
        return bu.online_softmax_step(state, s, mask, v, precision=precision)

    state = bu.init_state((g.bq,), 1, q.shape[-1] if values else None, entropy=entropy)
    out, ent, lse = bu.finalize(tiling.fori_ranges(rng_ref, body, state))
    if values:
        o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse.reshape(g.bq)
    if entropy:
        ent_ref[...] = ent.reshape(g.bq)


def forward(q, k, v, segment_ids, *, causal: bool, sm_scale: float, entropy: bool,
            block_q: int | None = None, block_k: int | None = None, interpret: bool = False):
    """Returns `(out [B, T, Hq, D], entropy [B, T, Hq] f32 or None, lse [B, T, Hq] f32)`.

    `v` None is the statistics-only pass (`kernels.attention_lse`): out is None.
    """
    bq, bk = blocks(q.shape[1], k.shape[1], block_q, block_k)
    g = tiling.Tiling(q.shape, k.shape, causal=causal, has_seg=segment_ids is not None, bq=bq, bk=bk)
    rng = tiling.visit_ranges(g.block_kinds(segment_ids))  # [B, nq, 4]
    qp, kp = pad_heads(q, g.Tp), pad_heads(k, g.Sp)
    Dp, G, values = qp.shape[-1], g.G, v is not None
    q_spec = pl.BlockSpec((None, g.bq, None, Dp), lambda i, b, h: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, g.Sp, None, Dp), lambda i, b, h: (b, 0, lax.div(h, G), 0))  # GQA
    in_specs = [ranges_spec(lambda i, b, h: (b, i)), q_spec, kv_spec] + ([kv_spec] if values else [])
    args = [rng, qp, kp] + ([pad_heads(v, g.Sp)] if values else [])
    seg_specs, seg_args = seg_inputs(g, segment_ids, lambda i, b, h: b)
    row_spec = pl.BlockSpec((None, None, g.bq), lambda i, b, h: (b, h, i))
    row_shape = jax.ShapeDtypeStruct((g.B, g.Hq, g.Tp), jnp.float32)
    out_shape = ([jax.ShapeDtypeStruct(qp.shape, q.dtype)] if values else []) + [row_shape] + \
        ([row_shape] if entropy else [])
    out_specs = ([q_spec] if values else []) + [row_spec] + ([row_spec] if entropy else [])
    res = pl.pallas_call(
        functools.partial(_fwd_kernel, g=g, scale=sm_scale, values=values, entropy=entropy,
                          precision=bu.matmul_precision(q.dtype)),
        grid=(g.nq, g.B, g.Hq), in_specs=in_specs + seg_specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=compiler_params(Dp, interpret), interpret=interpret,
        name="entropy_flash_fwd" if entropy else ("flash_fwd" if values else "attention_lse"),
    )(*args, *seg_args)
    res = list(res)
    out = res.pop(0)[:, : g.T, :, : g.D] if values else None
    lse = jnp.transpose(res[0][:, :, : g.T], (0, 2, 1))
    ent = jnp.transpose(res[1][:, :, : g.T], (0, 2, 1)) if entropy else None
    return out, ent, lse


# ------------------------------------------------------------------------------------ backward


def _dq_kernel(rng_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, g: tiling.Tiling, scale,
               entropy_grad, precision):
    ge_ref, *refs = refs if entropy_grad else (None, *refs)
    qseg_ref, kseg_ref, dq_ref = refs if g.has_seg else (None, None, *refs)
    i = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, di = lse_ref[...].reshape(g.bq, 1), di_ref[...].reshape(g.bq, 1)
    ge = ge_ref[...].reshape(g.bq, 1) if entropy_grad else None

    def body(j, dq, masked):
        start = pl.multiple_of(j * g.bk, g.bk)
        k, v = k_ref[pl.ds(start, g.bk), :], v_ref[pl.ds(start, g.bk), :]
        mask = tile_mask(g, i * g.bq, start, qseg_ref, kseg_ref) if masked else None
        log_p = bu.log_probs(bu.dot(q, k, bu.NT, precision) * scale, lse, mask)
        p = jnp.exp(log_p)
        ds = bu.softmax_grad(p, bu.dot(do, v, bu.NT, precision), di, g_ent=ge, log_p=log_p)
        return dq + bu.dot(ds.astype(k.dtype), k, bu.NN, precision)

    dq = tiling.fori_ranges(rng_ref, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(rng_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, g: tiling.Tiling, scale,
                entropy_grad, precision):
    ge_ref, *refs = refs if entropy_grad else (None, *refs)
    qseg_ref, kseg_ref, dk_ref, dv_ref = refs if g.has_seg else (None, None, *refs)
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]

    def body(h, i, carry, masked):
        dk, dv = carry
        start = pl.multiple_of(i * g.bq, g.bq)
        q, do = q_ref[pl.ds(start, g.bq), h, :], do_ref[pl.ds(start, g.bq), h, :]
        # transposed tile: rows are keys, columns queries, so lse / di are rows [1, bq]
        lse = lse_ref[h, pl.ds(start, g.bq)].reshape(1, g.bq)
        di = di_ref[h, pl.ds(start, g.bq)].reshape(1, g.bq)
        ge = ge_ref[h, pl.ds(start, g.bq)].reshape(1, g.bq) if entropy_grad else None
        mask_t = (tile_mask(g, start, j * g.bk, qseg_ref, kseg_ref, transposed=True)
                  if masked else None)
        log_p_t = bu.log_probs(bu.dot(k, q, bu.NT, precision) * scale, lse, mask_t)  # [bk, bq]
        p_t = jnp.exp(log_p_t)
        dv = dv + bu.dot(p_t.astype(do.dtype), do, bu.NN, precision)
        ds_t = bu.softmax_grad(p_t, bu.dot(v, do, bu.NT, precision), di, g_ent=ge, log_p=log_p_t)
        dk = dk + bu.dot(ds_t.astype(q.dtype), q, bu.NN, precision)
        return dk, dv

    def head(h, carry):
        return tiling.fori_ranges(rng_ref, functools.partial(body, h), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, g.G, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, segment_ids, do, lse, di, g_ent, *, causal: bool, sm_scale: float,
             block_q: int | None = None, block_k: int | None = None, interpret: bool = False):
    """Flash backward. lse, di (`block_update.row_delta`), g_ent (or None): `[B, T, Hq]` f32.
    Returns `(dq, dk, dv)` in the input dtypes."""
    bq, bk = blocks(q.shape[1], k.shape[1], block_q, block_k, DEFAULT_BLOCK_Q_BWD, DEFAULT_BLOCK_K_BWD)
    g = tiling.Tiling(q.shape, k.shape, causal=causal, has_seg=segment_ids is not None, bq=bq, bk=bk)
    kinds = g.block_kinds(segment_ids)
    qp, kp, vp = pad_heads(q, g.Tp), pad_heads(k, g.Sp), pad_heads(v, g.Sp)
    dop = pad_heads(do.astype(q.dtype), g.Tp)
    Dp, G = qp.shape[-1], g.G
    # padded query rows get an lse that zeroes their probabilities
    rows = [rows_BxHxT(lse, g.Tp, bu.EMPTY_ROW_LSE), rows_BxHxT(di, g.Tp, 0.0)]
    if g_ent is not None:
        rows.append(rows_BxHxT(g_ent, g.Tp, 0.0))
    common = dict(g=g, scale=sm_scale, entropy_grad=g_ent is not None,
                  precision=bu.matmul_precision(q.dtype))
    params = compiler_params(Dp, interpret)

    # dQ: grid over query blocks, loop over key blocks
    q_blk = pl.BlockSpec((None, g.bq, None, Dp), lambda i, b, h: (b, i, h, 0))
    kv_full = pl.BlockSpec((None, g.Sp, None, Dp), lambda i, b, h: (b, 0, lax.div(h, G), 0))
    row_blk = pl.BlockSpec((None, None, g.bq), lambda i, b, h: (b, h, i))
    seg_specs, seg_args = seg_inputs(g, segment_ids, lambda i, b, h: b)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common),
        grid=(g.nq, g.B, g.Hq),
        in_specs=[ranges_spec(lambda i, b, h: (b, i)), q_blk, kv_full, kv_full, q_blk]
        + [row_blk] * len(rows) + seg_specs,
        out_specs=q_blk, out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=params, interpret=interpret, name="entropy_flash_bwd_dq",
    )(tiling.visit_ranges(kinds), qp, kp, vp, dop, *rows, *seg_args)

    # dK/dV: grid over key blocks of each K/V head, loop over the group's query heads and blocks
    kv_blk = pl.BlockSpec((None, g.bk, None, Dp), lambda j, b, h: (b, j, h, 0))
    q_grp = pl.BlockSpec((None, g.Tp, G, Dp), lambda j, b, h: (b, 0, h, 0))  # heads h·G .. h·G+G-1
    row_grp = pl.BlockSpec((None, G, g.Tp), lambda j, b, h: (b, h, 0))
    seg_specs, seg_args = seg_inputs(g, segment_ids, lambda j, b, h: b)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **common),
        grid=(g.nk, g.B, g.Hkv),
        in_specs=[ranges_spec(lambda j, b, h: (b, j)), q_grp, kv_blk, kv_blk, q_grp]
        + [row_grp] * len(rows) + seg_specs,
        out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype), jax.ShapeDtypeStruct(vp.shape, v.dtype)],
        compiler_params=params, interpret=interpret, name="entropy_flash_bwd_dkv",
    )(tiling.visit_ranges(kinds, transpose=True), qp, kp, vp, dop, *rows, *seg_args)
    return dq[:, : g.T, :, : g.D], dk[:, : g.S, :, : g.D], dv[:, : g.S, :, : g.D]
