"""Pallas GPU (Triton lowering) shell of flash attention with row entropy.

Triton rules this shell follows:
- no scratch buffers: each program keeps its accumulators in registers and loops over the key
  (or query) blocks in its body with `lax.fori_loop`; the looped-over operand has a full-length
  BlockSpec and is sliced with `pl.ds`;
- every tile dimension is a power of two and every matmul dimension is >= 16 (blocks >= 16,
  head_dim zero-padded to a power of two >= 16);
- per-row statistics are `[bq, 1]` register tensors, written out as `[bq]` rows.
Grids: forward and dQ over (Tq/bq, B, Hq), the causal loop bound skipping key blocks above the
diagonal, and blocks fully below it running without a mask; dK/dV over (Tk/bk, B, Hkv) with a
loop over the G query heads of the group and the query blocks from the diagonal down, so the GQA
gradient is summed in registers and K/V are never repeated. The dK/dV kernel works on the
transposed tile sᵀ = k qᵀ so no in-kernel transpose is needed. Runs with `interpret=True` on CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import block_update as bu

# Forward: a 128-row query tile amortises the K/V loads; 64-key tiles keep s and p in registers
# next to a 128-wide accumulator (FlashAttention-2 Triton's choice for head_dim 128).
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 64
# Backward: dQ and dK/dV tiles of 64 x 64 keep the five live tiles (q, k, v, do, ds) in registers.
DEFAULT_BLOCK_Q_BWD = 64
DEFAULT_BLOCK_K_BWD = 64
_MIN_BLOCK = 16

_NT = (((1,), (1,)), ((), ()))  # a @ bᵀ
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _pow2_at_least(n: int, floor: int = _MIN_BLOCK) -> int:
    return max(floor, 1 << max(0, (n - 1).bit_length()))


def _check_pow2(name: str, b: int):
    if b < _MIN_BLOCK or b & (b - 1):
        raise ValueError(f"{name}={b} is not allowed on the Pallas GPU (Triton) backend: use a power "
                         f"of two >= {_MIN_BLOCK} (Triton tiles are powers of two, matmuls need >= 16)")


def _blocks(T, S, block_q, block_k, default_q, default_k):
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b is not None:
            _check_pow2(name, b)
    # a block bigger than the (padded) sequence only adds padding work
    bq = min(block_q or default_q, _pow2_at_least(T))
    bk = min(block_k or default_k, _pow2_at_least(S))
    return bq, bk


def _compiler_params(D: int):
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=4 if D <= 64 else 8, num_stages=2)


def _dot(a, b, dims, precision):
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _prepare(q, k, v, segment_ids, bq, bk):
    """Pad T, S to the blocks and D to a power of two (zeros change no logit)."""
    B, T, Hq, D = q.shape
    S = k.shape[1]
    Dp = _pow2_at_least(D)
    Tp, Sp = bu.round_up(T, bq), bu.round_up(S, bk)
    qp = bu.pad_axis(bu.pad_axis(q, 3, Dp), 1, Tp)
    kp = bu.pad_axis(bu.pad_axis(k, 3, Dp), 1, Sp)
    vp = bu.pad_axis(bu.pad_axis(v, 3, Dp), 1, Sp)
    if segment_ids is None:
        return qp, kp, vp, None, None, Tp, Sp, Dp
    seg = segment_ids.astype(jnp.int32)
    return qp, kp, vp, bu.pad_axis(seg, 1, Tp), bu.pad_axis(seg, 1, Sp), Tp, Sp, Dp


def _kv_len(S, Sp, causal, has_seg):
    # causal already hides padded keys from every real query; padded keys have segment 0
    return S if (Sp > S and not causal and not has_seg) else None


# ------------------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, causal, scale, bq, bk, nk, off, kv_len, has_seg,
                entropy, precision):
    if has_seg:
        qseg_ref, kseg_ref, *refs = refs
    o_ref, lse_ref, *refs = refs
    ent_ref = refs[0] if entropy else None

    i = pl.program_id(0)
    q = q_ref[...]
    D = q.shape[-1]
    q_pos = i * bq + off + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    q_seg = qseg_ref[...].reshape(bq, 1) if has_seg else None

    def make_body(masked: bool):
        def body(j, state):
            start = pl.multiple_of(j * bk, bk)
            k = k_ref[pl.ds(start, bk), :]
            v = v_ref[pl.ds(start, bk), :]
            s = _dot(q, k, _NT, precision) * scale
            mask = None
            if masked:
                k_pos = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
                k_seg = kseg_ref[pl.ds(start, bk)].reshape(1, bk) if has_seg else None
                mask = bu.tile_mask(q_pos, k_pos, causal=causal, kv_len=kv_len, q_seg=q_seg, k_seg=k_seg)
            return bu.online_softmax_step(state, s, mask, v, entropy=entropy, precision=precision)
        return body

    state = bu.init_state((bq,), 1, D)
    if causal:
        # key blocks [0, n_full) are visible to every row of this tile and skip the mask;
        # [n_full, hi) straddle the diagonal (with segment ids every block is masked);
        # blocks >= hi lie above the diagonal and are never loaded
        hi = jnp.clip(bu.floordiv(i * bq + bq - 1 + off, bk, off) + 1, 0, nk)
        n_full = 0
        if not has_seg:
            n_full = jnp.clip(bu.floordiv(i * bq + off + 1, bk, off), 0, hi)
            state = lax.fori_loop(0, n_full, make_body(False), state)
        state = lax.fori_loop(n_full, hi, make_body(True), state)
    else:
        state = lax.fori_loop(0, nk, make_body(has_seg or kv_len is not None), state)

    out, ent, lse = bu.finalize(state, entropy=entropy)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse.reshape(bq)
    if entropy:
        ent_ref[...] = ent.reshape(bq)


def forward(q, k, v, segment_ids, *, causal: bool, sm_scale: float, entropy: bool,
            block_q: int | None = None, block_k: int | None = None, interpret: bool = False):
    """Returns `(out [B, T, Hq, D], entropy [B, T, Hq] f32 or None, lse [B, T, Hq] f32)`."""
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bq, bk = _blocks(T, S, block_q, block_k, DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K)
    qp, kp, vp, qseg, kseg, Tp, Sp, Dp = _prepare(q, k, v, segment_ids, bq, bk)
    has_seg = segment_ids is not None
    kernel = functools.partial(
        _fwd_kernel, causal=causal, scale=sm_scale, bq=bq, bk=bk, nk=Sp // bk, off=S - T,
        kv_len=_kv_len(S, Sp, causal, has_seg), has_seg=has_seg, entropy=entropy,
        precision=bu.matmul_precision(q.dtype))
    in_specs = [
        pl.BlockSpec((None, bq, None, Dp), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, Sp, None, Dp), lambda i, b, h: (b, 0, lax.div(h, G), 0)),  # GQA: no repeat
        pl.BlockSpec((None, Sp, None, Dp), lambda i, b, h: (b, 0, lax.div(h, G), 0)),
    ]
    args = [qp, kp, vp]
    if has_seg:
        in_specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                     pl.BlockSpec((None, Sp), lambda i, b, h: (b, 0))]
        args += [qseg, kseg]
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    row_shape = jax.ShapeDtypeStruct((B, Hq, Tp), jnp.float32)
    out_shape = [jax.ShapeDtypeStruct(qp.shape, q.dtype), row_shape] + ([row_shape] if entropy else [])
    out_specs = [pl.BlockSpec((None, bq, None, Dp), lambda i, b, h: (b, i, h, 0)), row_spec] + \
        ([row_spec] if entropy else [])
    res = pl.pallas_call(
        kernel, grid=(Tp // bq, B, Hq), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=None if interpret else _compiler_params(Dp), interpret=interpret,
        name="entropy_flash_fwd" if entropy else "flash_fwd",
    )(*args)
    out = res[0][:, :T, :, :D]
    lse = jnp.transpose(res[1][:, :, :T], (0, 2, 1))
    ent = jnp.transpose(res[2][:, :, :T], (0, 2, 1)) if entropy else None
    return out, ent, lse


# ------------------------------------------------------------------------------------ backward


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, causal, scale, bq, bk, nk, off,
               kv_len, has_seg, precision):
    if has_seg:
        qseg_ref, kseg_ref, dq_ref = refs
    else:
        (dq_ref,) = refs
    i = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse = lse_ref[...].reshape(bq, 1)
    di = di_ref[...].reshape(bq, 1)
    q_pos = i * bq + off + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    q_seg = qseg_ref[...].reshape(bq, 1) if has_seg else None

    def body(j, dq):
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        k_pos = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        k_seg = kseg_ref[pl.ds(start, bk)].reshape(1, bk) if has_seg else None
        mask = bu.tile_mask(q_pos, k_pos, causal=causal, kv_len=kv_len, q_seg=q_seg, k_seg=k_seg)
        p = bu.recompute_probs(_dot(q, k, _NT, precision) * scale, lse, mask)
        ds = bu.softmax_grad(p, _dot(do, v, _NT, precision), di)
        return dq + _dot(ds.astype(k.dtype), k, _NN, precision)

    hi = jnp.clip(bu.floordiv(i * bq + bq - 1 + off, bk, off) + 1, 0, nk) if causal else nk
    dq = lax.fori_loop(0, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, causal, scale, bq, bk, nq, G,
                off, kv_len, has_seg, precision):
    if has_seg:
        qseg_ref, kseg_ref, dk_ref, dv_ref = refs
    else:
        dk_ref, dv_ref = refs
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    # transposed tile: rows are keys, columns queries, so lse / di are used as rows [1, bq]
    k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
    k_seg = kseg_ref[...].reshape(bk, 1) if has_seg else None

    def body(g, i, carry):
        dk, dv = carry
        start = pl.multiple_of(i * bq, bq)
        q = q_ref[pl.ds(start, bq), g, :]
        do = do_ref[pl.ds(start, bq), g, :]
        lse = lse_ref[g, pl.ds(start, bq)].reshape(1, bq)
        di = di_ref[g, pl.ds(start, bq)].reshape(1, bq)
        q_pos = start + off + lax.broadcasted_iota(jnp.int32, (1, bq), 1)
        q_seg = qseg_ref[pl.ds(start, bq)].reshape(1, bq) if has_seg else None
        mask_t = bu.tile_mask(q_pos, k_pos, causal=causal, kv_len=kv_len, q_seg=q_seg, k_seg=k_seg)
        p_t = bu.recompute_probs(_dot(k, q, _NT, precision) * scale, lse, mask_t)  # [bk, bq]
        dv = dv + _dot(p_t.astype(do.dtype), do, _NN, precision)
        ds_t = bu.softmax_grad(p_t, _dot(v, do, _NT, precision), di)
        dk = dk + _dot(ds_t.astype(q.dtype), q, _NN, precision)
        return dk, dv

    lo = jnp.clip(bu.floordiv(j * bk - off, bq, -off), 0, nq) if causal else 0

    def head(g, carry):
        return lax.fori_loop(lo, nq, functools.partial(body, g), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, G, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, segment_ids, do, lse, di, *, causal: bool, sm_scale: float,
             block_q: int | None = None, block_k: int | None = None, interpret: bool = False):
    """Flash backward. lse, di: `[B, T, Hq]` f32. Returns `(dq, dk, dv)` in the input dtypes."""
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bq, bk = _blocks(T, S, block_q, block_k, DEFAULT_BLOCK_Q_BWD, DEFAULT_BLOCK_K_BWD)
    qp, kp, vp, qseg, kseg, Tp, Sp, Dp = _prepare(q, k, v, segment_ids, bq, bk)
    dop = bu.pad_axis(bu.pad_axis(do.astype(q.dtype), 3, Dp), 1, Tp)
    # rows [B, Hq, Tp]; padded query rows get an lse that zeroes their probabilities
    lse_r = bu.pad_axis(jnp.transpose(lse, (0, 2, 1)), 2, Tp, bu.EMPTY_ROW_LSE)
    di_r = bu.pad_axis(jnp.transpose(di, (0, 2, 1)).astype(jnp.float32), 2, Tp)
    has_seg = segment_ids is not None
    common = dict(causal=causal, scale=sm_scale, bq=bq, bk=bk, off=S - T,
                  kv_len=_kv_len(S, Sp, causal, has_seg), has_seg=has_seg,
                  precision=bu.matmul_precision(q.dtype))
    params = None if interpret else _compiler_params(Dp)

    # dQ: grid over query blocks, loop over key blocks
    q_blk = pl.BlockSpec((None, bq, None, Dp), lambda i, b, h: (b, i, h, 0))
    kv_full = pl.BlockSpec((None, Sp, None, Dp), lambda i, b, h: (b, 0, lax.div(h, G), 0))
    row_blk = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    in_specs = [q_blk, kv_full, kv_full, q_blk, row_blk, row_blk]
    args = [qp, kp, vp, dop, lse_r, di_r]
    if has_seg:
        in_specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                     pl.BlockSpec((None, Sp), lambda i, b, h: (b, 0))]
        args += [qseg, kseg]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, nk=Sp // bk, **common),
        grid=(Tp // bq, B, Hq), in_specs=in_specs, out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=params, interpret=interpret, name="entropy_flash_bwd_dq",
    )(*args)

    # dK/dV: grid over key blocks of each K/V head, loop over the group's query heads and blocks
    kv_blk = pl.BlockSpec((None, bk, None, Dp), lambda j, b, h: (b, j, h, 0))
    q_grp = pl.BlockSpec((None, Tp, G, Dp), lambda j, b, h: (b, 0, h, 0))  # heads h·G .. h·G+G-1
    row_grp = pl.BlockSpec((None, G, Tp), lambda j, b, h: (b, h, 0))
    in_specs = [q_grp, kv_blk, kv_blk, q_grp, row_grp, row_grp]
    args = [qp, kp, vp, dop, lse_r, di_r]
    if has_seg:
        in_specs += [pl.BlockSpec((None, Tp), lambda j, b, h: (b, 0)),
                     pl.BlockSpec((None, bk), lambda j, b, h: (b, j))]
        args += [qseg, kseg]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, nq=Tp // bq, G=G, **common),
        grid=(Sp // bk, B, Hkv), in_specs=in_specs, out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype), jax.ShapeDtypeStruct(vp.shape, v.dtype)],
        compiler_params=params, interpret=interpret, name="entropy_flash_bwd_dkv",
    )(*args)
    return dq[:, :T, :, :D], dk[:, :S, :, :D], dv[:, :S, :, :D]
