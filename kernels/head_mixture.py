"""Head-mixture attention entropy and per-head attention probabilities, from each head's lse.

The head-mixture entropy of query row t (DESIGN.md §3) is the entropy of the head-averaged
attention distribution

    ā_{t,j} = (1/Hq) Σ_h exp(s_{t,j}^h − lse_t^h),      H_t = −Σ_j ā_{t,j} log ā_{t,j},

which does not decompose into per-head statistics. It therefore needs a second pass over the keys
that uses every head's log-sum-exp (`lse`, from the fused forward or from `attention_lse` here):
for one query block, one kernel program loops over *all* heads, sums their probabilities for a
key tile (ā for a key is complete only once every head is added), then accumulates −ā log ā.
The T×S matrix is never materialised. `attention_probs` is the same lse-based pass writing
p = exp(s − lse) tile by tile into a `[B, Hq, T, S]` output (analysis of short sequences).

Shells (`backend`, see `kernels.platform.resolve_backend`):
  "tpu" / "interpret_tpu": Mosaic-legal blocks (last two dims multiples of (8, 128) or the full
      extent), row statistics kept as (bq, 128) lane-replicated tiles, heads unrolled statically.
  "gpu" / "interpret_gpu": Triton-lowering-legal (power-of-two blocks ≥ 16, no scratch buffers,
      `fori_loop` over K blocks and heads inside the program).
  "xla": blockwise pure XLA (`lax.map` over query blocks, `fori_loop` over key blocks).
All three shells compute `attention_lse`, `head_mixture_entropy` and `attention_probs`.

Everything here is a measurement: inputs pass through `stop_gradient`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from kernels.platform import resolve_backend

NEG_INF = -1e30  # finite "minus infinity": exp(NEG_INF - m) is 0 and (NEG_INF - NEG_INF) is 0, not NaN
LANES = 128      # TPU lane width: row statistics live in (bq, LANES) tiles
SUBLANES = 8     # TPU sublane count: key segment ids live in (SUBLANES, bk) tiles

# (block_q, block_k) per shell family when the caller names none.
_DEFAULT_BLOCKS = {"tpu": (256, 512), "gpu": (64, 64), "xla": (512, 512)}


# ---------------------------------------------------------------------------------------------
# Tile maths shared by every shell.
# ---------------------------------------------------------------------------------------------

def _tile_logits(q_QxD: jax.Array, k_KxD: jax.Array, scale: float) -> jax.Array:
    """Scaled logits `[bq, bk]` float32 of one (query tile, key tile) pair: scale·q kᵀ."""
    s = lax.dot_general(q_QxD, k_KxD, (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32)
    return s * scale


def _tile_mask(qpos, kpos, qseg, kseg, *, causal: bool) -> jax.Array:
    """Visibility of a tile, the same rule as `kernels.masking.visible_mask`.

    `qpos`/`qseg` broadcast along keys, `kpos`/`kseg` along queries. Query positions already
    include the causal offset S − T. Segment 0 is padding (and the block padding added here).
    """
    mask = (qseg == kseg) & (kseg != 0)
    if causal:
        mask = mask & (kpos <= qpos)
    return mask


def _tile_probs(s_QxK: jax.Array, lse_Qx1: jax.Array, mask_QxK: jax.Array) -> jax.Array:
    """p = exp(s − lse) on visible keys, exactly 0 elsewhere (also where lse is meaningless)."""
    return jnp.where(mask_QxK, jnp.exp(s_QxK - lse_Qx1), 0.0)


def _mixture_entropy_term(psum_QxK: jax.Array, num_heads: int) -> jax.Array:
    """−Σ_j ā log ā over one key tile, ā = psum / Hq; `[bq, 1]` float32. 0·log 0 counts as 0."""
    a = psum_QxK * (1.0 / num_heads)
    pos = a > 0
    return -jnp.sum(jnp.where(pos, a * jnp.log(jnp.where(pos, a, 1.0)), 0.0), axis=1, keepdims=True)


def _online_lse_update(m_prev, l_prev, s_QxK, mask_QxK):
    """One step of the online log-sum-exp: returns (m', l') with l' = α·l + Σ exp(s − m')."""
    s_masked = jnp.where(mask_QxK, s_QxK, NEG_INF)
    m_next = jnp.maximum(m_prev, jnp.max(s_masked, axis=1, keepdims=True))
    p = jnp.where(mask_QxK, jnp.exp(s_QxK - m_next), 0.0)
    l_next = jnp.exp(m_prev - m_next) * l_prev + jnp.sum(p, axis=1, keepdims=True)
    return m_next, l_next


def _finish_lse(m, l):
    # Rows with no visible key get 0: a placeholder that every consumer masks away.
    return jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)


def _last_visible_block(q_start, block_q: int, block_k: int, offset: int):
    """Index of the last key block a causal query block [q_start, q_start + bq) can see (≥ 0)."""
    last_qpos = jnp.maximum(q_start + (block_q - 1 + offset), 0)
    return lax.div(last_qpos, block_k)


# ---------------------------------------------------------------------------------------------
# Argument checking, block choice, padding.
# ---------------------------------------------------------------------------------------------

def _family(backend: str) -> str:
    return {"tpu": "tpu", "interpret_tpu": "tpu", "gpu": "gpu", "interpret_gpu": "gpu"}.get(backend, "xla")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _choose_blocks(family: str, T: int, S: int, block_q: int | None, block_k: int | None,
                   head_bytes: int = 0):
    """Clamp the (default or given) blocks to the sequence and check the shell's legality rules.

    `head_bytes` = Hq·D·itemsize: the TPU mixture kernel holds every head's query tile in VMEM
    (double-buffered), so wide models get a shorter default query block.
    """
    bq0, bk0 = _DEFAULT_BLOCKS[family]
    if family == "tpu" and head_bytes > 8192:
        bq0 = 128
    bq = bq0 if block_q is None else block_q
    bk = bk0 if block_k is None else block_k
    # Check what the caller asked for, then clamp to the sequence (clamping keeps legality).
    if family == "tpu":
        if bq % SUBLANES or bk % LANES:
            raise ValueError(
                f"TPU blocks must be block_q % {SUBLANES} == 0 and block_k % {LANES} == 0 "
                f"(got block_q={bq}, block_k={bk}); pass block_q/block_k that satisfy Mosaic's tiling")
        bq = min(bq, _round_up(T, SUBLANES))
        bk = min(bk, _round_up(S, LANES))
    elif family == "gpu":
        for name, b in (("block_q", bq), ("block_k", bk)):
            if b < 16 or b & (b - 1):
                raise ValueError(f"GPU (Triton) {name} must be a power of two >= 16 (got {b})")
        bq = min(bq, max(16, pl.next_power_of_2(T)))
        bk = min(bk, max(16, pl.next_power_of_2(S)))
    else:
        if bq < 1 or bk < 1:
            raise ValueError(f"block sizes must be positive (got block_q={bq}, block_k={bk})")
        bq, bk = min(bq, T), min(bk, S)
    return bq, bk


def _check_inputs(q, k, segment_ids, lse, where: str):
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"{where}: q must be [B, T, Hq, D] and k [B, S, Hkv, D] "
                         f"(got q {q.shape}, k {k.shape})")
    B, T, Hq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{where}: q {q.shape} and k {k.shape} disagree on batch or head dim")
    S, Hkv = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"{where}: query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if segment_ids is not None and (segment_ids.shape != (B, T) or S != T):
        raise ValueError(f"{where}: segment_ids must be [B, T] = {(B, T)} with S == T "
                         f"(got {segment_ids.shape}, S={S})")
    if lse is not None and lse.shape != (B, T, Hq):
        raise ValueError(f"{where}: lse must be [B, T, Hq] = {(B, T, Hq)} (got {lse.shape})")


class _Padded:
    """Inputs laid out head-major and padded to whole blocks; padding carries segment id 0."""

    def __init__(self, q, k, segment_ids, *, family: str, bq: int, bk: int):
        B, T, Hq, D = q.shape
        S, Hkv = k.shape[1], k.shape[2]
        self.B, self.T, self.S, self.Hq, self.Hkv, self.D = B, T, S, Hq, Hkv, D
        self.bq, self.bk = bq, bk
        self.Tp, self.Sp = _round_up(T, bq), _round_up(S, bk)
        # Triton wants power-of-two tensor dims; zero columns leave q·k unchanged.
        Dp = max(16, pl.next_power_of_2(D)) if family == "gpu" else D
        dt = jnp.promote_types(q.dtype, k.dtype)  # one dtype per dot (bf16 stays bf16)
        q = jnp.transpose(q.astype(dt), (0, 2, 1, 3))  # [B, Hq, T, D]
        k = jnp.transpose(k.astype(dt), (0, 2, 1, 3))  # [B, Hkv, S, D]
        self.q_BxHxTxD = jnp.pad(q, ((0, 0), (0, 0), (0, self.Tp - T), (0, Dp - D)))
        self.k_BxKxSxD = jnp.pad(k, ((0, 0), (0, 0), (0, self.Sp - S), (0, Dp - D)))
        if segment_ids is None:
            qseg = jnp.ones((B, T), jnp.int32)
            kseg = jnp.ones((B, S), jnp.int32)
        else:
            qseg = kseg = segment_ids.astype(jnp.int32)
        self.qseg_BxT = jnp.pad(qseg, ((0, 0), (0, self.Tp - T)))
        self.kseg_BxS = jnp.pad(kseg, ((0, 0), (0, self.Sp - S)))

    @property
    def nq(self) -> int:
        return self.Tp // self.bq

    @property
    def nk(self) -> int:
        return self.Sp // self.bk

    @property
    def group(self) -> int:
        return self.Hq // self.Hkv

    def pad_lse(self, lse_BxTxH: jax.Array) -> jax.Array:
        """`[B, T, Hq]` -> `[B, Tp, Hq]` float32 (padding rows 0: they are masked)."""
        lse = jnp.nan_to_num(lse_BxTxH.astype(jnp.float32), nan=0.0, posinf=0.0, neginf=0.0)
        return jnp.pad(lse, ((0, 0), (0, self.Tp - self.T), (0, 0)))


def _tpu_params(backend: str, semantics):
    interpret = pltpu.InterpretParams() if backend == "interpret_tpu" else False
    return dict(interpret=interpret,
                compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))


def _gpu_params(backend: str):
    return dict(interpret=backend == "interpret_gpu",
                compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2))


# ---------------------------------------------------------------------------------------------
# Pass 1: per-head log-sum-exp (online max / sum, no V).
# ---------------------------------------------------------------------------------------------

def _lse_kernel_tpu(q_ref, k_ref, qseg_ref, kseg_ref, lse_ref, m_ref, l_ref, *,
                    scale, causal, offset, bq, bk, nk):
    """Grid (B, Hq, nq, nk). q (bq, D), k (bk, D), qseg (bq, 128), kseg (8, bk); out (bq, 128)."""
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

    def _step():
        qpos = i * bq + offset + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        kpos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        mask = _tile_mask(qpos, kpos, qseg_ref[:, 0:1], kseg_ref[0:1, :], causal=causal)
        s = _tile_logits(q_ref[...], k_ref[...], scale)
        m_prev, l_prev = m_ref[...], l_ref[...]  # (bq, 128), all lanes equal
        m_next, l_next = _online_lse_update(m_prev[:, 0:1], l_prev[:, 0:1], s, mask)
        m_ref[...] = jnp.broadcast_to(m_next, m_ref.shape)
        l_ref[...] = jnp.broadcast_to(l_next, l_ref.shape)

    if causal:
        pl.when(j <= _last_visible_block(i * bq, bq, bk, offset))(_step)
    else:
        _step()

    @pl.when(j == nk - 1)
    def _write():
        lse_ref[...] = _finish_lse(m_ref[...], l_ref[...])


def _lse_tpu(x: _Padded, *, scale, causal, backend) -> jax.Array:
    bq, bk, G, offset = x.bq, x.bk, x.group, x.S - x.T

    def kv_map(b, h, i, j):
        if causal:  # blocks past the diagonal repeat the last needed block: no wasted DMA
            j = jnp.minimum(j, _last_visible_block(i * bq, bq, bk, offset))
        return b, lax.div(h, G), j, 0

    def kseg_map(b, h, i, j):
        return kv_map(b, h, i, j)[0], 0, kv_map(b, h, i, j)[2]

    qseg = jnp.broadcast_to(x.qseg_BxT[:, :, None], (x.B, x.Tp, LANES))
    kseg = jnp.broadcast_to(x.kseg_BxS[:, None, :], (x.B, SUBLANES, x.Sp))
    kernel = functools.partial(_lse_kernel_tpu, scale=scale, causal=causal, offset=offset,
                               bq=bq, bk=bk, nk=x.nk)
    Dq = x.q_BxHxTxD.shape[-1]
    out = pl.pallas_call(
        kernel,
        grid=(x.B, x.Hq, x.nq, x.nk),
        in_specs=[
            pl.BlockSpec((None, None, bq, Dq), lambda b, h, i, j: (b, h, i, 0)),
            pl.BlockSpec((None, None, bk, Dq), kv_map),
            pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
            pl.BlockSpec((None, SUBLANES, bk), kseg_map),
        ],
        out_specs=pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j: (b, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct((x.B, x.Hq, x.Tp, LANES), jnp.float32),
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32)],
        name="head_lse_tpu",
        **_tpu_params(backend, ("parallel", "parallel", "parallel", "arbitrary")),
    )(x.q_BxHxTxD, x.k_BxKxSxD, qseg, kseg)
    return jnp.transpose(out[..., 0], (0, 2, 1))  # [B, Tp, Hq]


def _lse_kernel_gpu(q_ref, k_ref, qseg_ref, kseg_ref, lse_ref, *, scale, causal, offset, bq, bk, nk):
    """Grid (nq, B, Hq). q (bq, D), k (Sp, D), qseg (bq,), kseg (Sp,); out (bq,)."""
    i = pl.program_id(0)
    q = q_ref[...]
    qpos = (i * bq + offset + jnp.arange(bq))[:, None]
    qseg = qseg_ref[...][:, None]

    def body(j, carry):
        m, l = carry
        ks = pl.ds(j * bk, bk)
        kpos = (j * bk + jnp.arange(bk))[None, :]
        mask = _tile_mask(qpos, kpos, qseg, kseg_ref[ks][None, :], causal=causal)
        s = _tile_logits(q, k_ref[ks, :], scale)
        return _online_lse_update(m, l, s, mask)

    hi = jnp.minimum(_last_visible_block(i * bq, bq, bk, offset) + 1, nk) if causal else nk
    m0 = jnp.full((bq, 1), NEG_INF, jnp.float32)
    m, l = lax.fori_loop(0, hi, body, (m0, jnp.zeros((bq, 1), jnp.float32)))
    lse_ref[...] = _finish_lse(m, l)[:, 0]


def _lse_gpu(x: _Padded, *, scale, causal, backend) -> jax.Array:
    G, Dq = x.group, x.q_BxHxTxD.shape[-1]
    kernel = functools.partial(_lse_kernel_gpu, scale=scale, causal=causal, offset=x.S - x.T,
                               bq=x.bq, bk=x.bk, nk=x.nk)
    out = pl.pallas_call(
        kernel,
        grid=(x.nq, x.B, x.Hq),
        in_specs=[
            pl.BlockSpec((None, None, x.bq, Dq), lambda i, b, h: (b, h, i, 0)),
            pl.BlockSpec((None, None, x.Sp, Dq), lambda i, b, h: (b, lax.div(h, G), 0, 0)),
            pl.BlockSpec((None, x.bq), lambda i, b, h: (b, i)),
            pl.BlockSpec((None, x.Sp), lambda i, b, h: (b, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, x.bq), lambda i, b, h: (b, h, i)),
        out_shape=jax.ShapeDtypeStruct((x.B, x.Hq, x.Tp), jnp.float32),
        name="head_lse_gpu",
        **_gpu_params(backend),
    )(x.q_BxHxTxD, x.k_BxKxSxD, x.qseg_BxT, x.kseg_BxS)
    return jnp.transpose(out, (0, 2, 1))  # [B, Tp, Hq]


def _xla_blocks(x: _Padded):
    """Query blocks `[nq, B, Hkv, G, bq, D]` and their segment ids `[nq, B, bq]` for `lax.map`."""
    q = x.q_BxHxTxD.reshape(x.B, x.Hkv, x.group, x.nq, x.bq, -1)
    q_blocks = jnp.moveaxis(q, 3, 0)
    qseg_blocks = jnp.moveaxis(x.qseg_BxT.reshape(x.B, x.nq, x.bq), 1, 0)
    return q_blocks, qseg_blocks


def _xla_tile(x: _Padded, q_BxKxGxQxD, qseg_BxQ, i, j, *, scale, causal):
    """Logits `[B, Hkv, G, bq, bk]` and mask `[B, 1, 1, bq, bk]` of query block i, key block j."""
    k = lax.dynamic_slice_in_dim(x.k_BxKxSxD, j * x.bk, x.bk, axis=2)
    kseg = lax.dynamic_slice_in_dim(x.kseg_BxS, j * x.bk, x.bk, axis=1)
    precision = lax.Precision.HIGHEST if q_BxKxGxQxD.dtype == jnp.float32 else None
    s = jnp.einsum("bkgqd,bksd->bkgqs", q_BxKxGxQxD, k, precision=precision,
                   preferred_element_type=jnp.float32) * scale
    qpos = (i * x.bq + (x.S - x.T) + jnp.arange(x.bq))[:, None]
    kpos = (j * x.bk + jnp.arange(x.bk))[None, :]
    mask = _tile_mask(qpos, kpos, qseg_BxQ[:, :, None], kseg[:, None, :], causal=causal)
    return s, mask[:, None, None]


def _xla_hi(x: _Padded, i, causal: bool):
    if not causal:
        return x.nk
    return jnp.minimum(_last_visible_block(i * x.bq, x.bq, x.bk, x.S - x.T) + 1, x.nk)


def _lse_xla(x: _Padded, *, scale, causal) -> jax.Array:
    q_blocks, qseg_blocks = _xla_blocks(x)

    def one_q_block(args):
        i, q, qseg = args
        stat_shape = (x.B, x.Hkv, x.group, x.bq, 1)

        def body(j, carry):
            m, l = carry
            s, mask = _xla_tile(x, q, qseg, i, j, scale=scale, causal=causal)
            s_masked = jnp.where(mask, s, NEG_INF)
            m_next = jnp.maximum(m, jnp.max(s_masked, axis=-1, keepdims=True))
            p = jnp.where(mask, jnp.exp(s - m_next), 0.0)
            return m_next, jnp.exp(m - m_next) * l + jnp.sum(p, axis=-1, keepdims=True)

        m, l = lax.fori_loop(0, _xla_hi(x, i, causal), body,
                             (jnp.full(stat_shape, NEG_INF, jnp.float32), jnp.zeros(stat_shape, jnp.float32)))
        return _finish_lse(m, l)[..., 0].reshape(x.B, x.Hq, x.bq)

    lse = lax.map(one_q_block, (jnp.arange(x.nq), q_blocks, qseg_blocks))  # [nq, B, Hq, bq]
    return jnp.transpose(lse, (1, 0, 3, 2)).reshape(x.B, x.Tp, x.Hq)


def _lse_padded(x: _Padded, *, scale, causal, backend) -> jax.Array:
    """Per-head natural-log lse `[B, Tp, Hq]` float32 (0 on rows with no visible key)."""
    fam = _family(backend)
    if fam == "tpu":
        return _lse_tpu(x, scale=scale, causal=causal, backend=backend)
    if fam == "gpu":
        return _lse_gpu(x, scale=scale, causal=causal, backend=backend)
    return _lse_xla(x, scale=scale, causal=causal)


# ---------------------------------------------------------------------------------------------
# Pass 2a: head-mixture entropy (all heads of a query block in one program).
# ---------------------------------------------------------------------------------------------

def _mixture_kernel_tpu(q_ref, k_ref, lse_ref, qseg_ref, kseg_ref, out_ref, acc_ref, *,
                        scale, causal, offset, bq, bk, nk, num_heads, group):
    """Grid (B, nq, nk). q (Hq, bq, D), k (Hkv, bk, D), lse (bq, Hq), qseg (bq, 128), kseg (8, bk).

    Heads are unrolled statically so each head's lse is a static lane slice of the (bq, Hq) tile.
    """
    i, j = pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def _step():
        qpos = i * bq + offset + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        kpos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        mask = _tile_mask(qpos, kpos, qseg_ref[:, 0:1], kseg_ref[0:1, :], causal=causal)
        lse_all = lse_ref[...]
        psum = jnp.zeros((bq, bk), jnp.float32)
        for hk in range(num_heads // group):
            k = k_ref[hk]
            for g in range(group):
                h = hk * group + g
                s = _tile_logits(q_ref[h], k, scale)
                psum = psum + _tile_probs(s, lse_all[:, h:h + 1], mask)
        acc_ref[...] += _mixture_entropy_term(psum, num_heads)  # (bq, 1) -> (bq, 128)

    if causal:
        pl.when(j <= _last_visible_block(i * bq, bq, bk, offset))(_step)
    else:
        _step()

    @pl.when(j == nk - 1)
    def _write():
        out_ref[...] = acc_ref[...]


def _mixture_tpu(x: _Padded, lse_BxTpxH, *, scale, causal, backend) -> jax.Array:
    bq, bk, offset = x.bq, x.bk, x.S - x.T
    Dq = x.q_BxHxTxD.shape[-1]

    def kv_block(b, i, j):
        if causal:
            j = jnp.minimum(j, _last_visible_block(i * bq, bq, bk, offset))
        return b, j

    qseg = jnp.broadcast_to(x.qseg_BxT[:, :, None], (x.B, x.Tp, LANES))
    kseg = jnp.broadcast_to(x.kseg_BxS[:, None, :], (x.B, SUBLANES, x.Sp))
    kernel = functools.partial(_mixture_kernel_tpu, scale=scale, causal=causal, offset=offset,
                               bq=bq, bk=bk, nk=x.nk, num_heads=x.Hq, group=x.group)
    out = pl.pallas_call(
        kernel,
        grid=(x.B, x.nq, x.nk),
        in_specs=[
            pl.BlockSpec((None, x.Hq, bq, Dq), lambda b, i, j: (b, 0, i, 0)),
            pl.BlockSpec((None, x.Hkv, bk, Dq), lambda b, i, j: (kv_block(b, i, j)[0], 0, kv_block(b, i, j)[1], 0)),
            pl.BlockSpec((None, bq, x.Hq), lambda b, i, j: (b, i, 0)),
            pl.BlockSpec((None, bq, LANES), lambda b, i, j: (b, i, 0)),
            pl.BlockSpec((None, SUBLANES, bk), lambda b, i, j: (kv_block(b, i, j)[0], 0, kv_block(b, i, j)[1])),
        ],
        out_specs=pl.BlockSpec((None, bq, LANES), lambda b, i, j: (b, i, 0)),
        out_shape=jax.ShapeDtypeStruct((x.B, x.Tp, LANES), jnp.float32),
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32)],
        name="head_mixture_entropy_tpu",
        **_tpu_params(backend, ("parallel", "parallel", "arbitrary")),
    )(x.q_BxHxTxD, x.k_BxKxSxD, lse_BxTpxH, qseg, kseg)
    return out[..., 0]


def _mixture_kernel_gpu(q_ref, k_ref, lse_ref, qseg_ref, kseg_ref, out_ref, *,
                        scale, causal, offset, bq, bk, nk, num_heads, group):
    """Grid (nq, B). q (Hq, bq, D), k (Hkv, Sp, D), lse (Hq, bq), qseg (bq,), kseg (Sp,); out (bq,)."""
    i = pl.program_id(0)
    qpos = (i * bq + offset + jnp.arange(bq))[:, None]
    qseg = qseg_ref[...][:, None]

    def key_block(j, ent):
        ks = pl.ds(j * bk, bk)
        kpos = (j * bk + jnp.arange(bk))[None, :]
        mask = _tile_mask(qpos, kpos, qseg, kseg_ref[ks][None, :], causal=causal)

        def head(h, psum):
            s = _tile_logits(q_ref[h, :, :], k_ref[lax.div(h, group), ks, :], scale)
            return psum + _tile_probs(s, lse_ref[h, :][:, None], mask)

        psum = lax.fori_loop(0, num_heads, head, jnp.zeros((bq, bk), jnp.float32))
        return ent + _mixture_entropy_term(psum, num_heads)

    hi = jnp.minimum(_last_visible_block(i * bq, bq, bk, offset) + 1, nk) if causal else nk
    ent = lax.fori_loop(0, hi, key_block, jnp.zeros((bq, 1), jnp.float32))
    out_ref[...] = ent[:, 0]


def _mixture_gpu(x: _Padded, lse_BxTpxH, *, scale, causal, backend) -> jax.Array:
    Dq = x.q_BxHxTxD.shape[-1]
    kernel = functools.partial(_mixture_kernel_gpu, scale=scale, causal=causal, offset=x.S - x.T,
                               bq=x.bq, bk=x.bk, nk=x.nk, num_heads=x.Hq, group=x.group)
    return pl.pallas_call(
        kernel,
        grid=(x.nq, x.B),
        in_specs=[
            pl.BlockSpec((None, x.Hq, x.bq, Dq), lambda i, b: (b, 0, i, 0)),
            pl.BlockSpec((None, x.Hkv, x.Sp, Dq), lambda i, b: (b, 0, 0, 0)),
            pl.BlockSpec((None, x.Hq, x.bq), lambda i, b: (b, 0, i)),
            pl.BlockSpec((None, x.bq), lambda i, b: (b, i)),
            pl.BlockSpec((None, x.Sp), lambda i, b: (b, 0)),
        ],
        out_specs=pl.BlockSpec((None, x.bq), lambda i, b: (b, i)),
        out_shape=jax.ShapeDtypeStruct((x.B, x.Tp), jnp.float32),
        name="head_mixture_entropy_gpu",
        **_gpu_params(backend),
    )(x.q_BxHxTxD, x.k_BxKxSxD, jnp.transpose(lse_BxTpxH, (0, 2, 1)), x.qseg_BxT, x.kseg_BxS)


def _mixture_xla(x: _Padded, lse_BxTpxH, *, scale, causal) -> jax.Array:
    q_blocks, qseg_blocks = _xla_blocks(x)
    lse = jnp.transpose(lse_BxTpxH, (0, 2, 1)).reshape(x.B, x.Hkv, x.group, x.nq, x.bq)
    lse_blocks = jnp.moveaxis(lse, 3, 0)[..., None]  # [nq, B, Hkv, G, bq, 1]

    def one_q_block(args):
        i, q, qseg, lse_i = args

        def body(j, ent):
            s, mask = _xla_tile(x, q, qseg, i, j, scale=scale, causal=causal)
            psum = jnp.sum(_tile_probs(s, lse_i, mask), axis=(1, 2))  # [B, bq, bk]
            a = psum * (1.0 / x.Hq)
            pos = a > 0
            return ent - jnp.sum(jnp.where(pos, a * jnp.log(jnp.where(pos, a, 1.0)), 0.0), axis=-1)

        return lax.fori_loop(0, _xla_hi(x, i, causal), body, jnp.zeros((x.B, x.bq), jnp.float32))

    ent = lax.map(one_q_block, (jnp.arange(x.nq), q_blocks, qseg_blocks, lse_blocks))  # [nq, B, bq]
    return jnp.moveaxis(ent, 0, 1).reshape(x.B, x.Tp)


# ---------------------------------------------------------------------------------------------
# Pass 2b: per-head probabilities written tile by tile.
# ---------------------------------------------------------------------------------------------

def _probs_kernel(q_ref, k_ref, lse_ref, qseg_ref, kseg_ref, out_ref, *, scale, causal, offset, bq, bk, tpu):
    """Grid (B, Hq, nq, nk): one (bq, bk) tile of p = exp(s − lse) per program.

    TPU: lse (bq, 128), qseg (bq, 128), kseg (8, bk). GPU: lse (bq,), qseg (bq,), kseg (bk,).
    """
    i, j = pl.program_id(2), pl.program_id(3)
    if tpu:
        qpos = i * bq + offset + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        kpos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        qseg, kseg, lse = qseg_ref[:, 0:1], kseg_ref[0:1, :], lse_ref[:, 0:1]
    else:
        qpos = (i * bq + offset + jnp.arange(bq))[:, None]
        kpos = (j * bk + jnp.arange(bk))[None, :]
        qseg, kseg, lse = qseg_ref[...][:, None], kseg_ref[...][None, :], lse_ref[...][:, None]
    mask = _tile_mask(qpos, kpos, qseg, kseg, causal=causal)
    out_ref[...] = _tile_probs(_tile_logits(q_ref[...], k_ref[...], scale), lse, mask)


def _probs_pallas(x: _Padded, lse_BxTpxH, *, scale, causal, backend) -> jax.Array:
    bq, bk, G = x.bq, x.bk, x.group
    Dq = x.q_BxHxTxD.shape[-1]
    tpu = _family(backend) == "tpu"
    lse_BxHxT = jnp.transpose(lse_BxTpxH, (0, 2, 1))
    if tpu:
        lse_in = jnp.broadcast_to(lse_BxHxT[..., None], lse_BxHxT.shape + (LANES,))
        qseg = jnp.broadcast_to(x.qseg_BxT[:, :, None], (x.B, x.Tp, LANES))
        kseg = jnp.broadcast_to(x.kseg_BxS[:, None, :], (x.B, SUBLANES, x.Sp))
        stat_specs = [
            pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j: (b, h, i, 0)),
            pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
            pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j: (b, 0, j)),
        ]
        params = _tpu_params(backend, ("parallel",) * 4)
    else:
        lse_in, qseg, kseg = lse_BxHxT, x.qseg_BxT, x.kseg_BxS
        stat_specs = [
            pl.BlockSpec((None, None, bq), lambda b, h, i, j: (b, h, i)),
            pl.BlockSpec((None, bq), lambda b, h, i, j: (b, i)),
            pl.BlockSpec((None, bk), lambda b, h, i, j: (b, j)),
        ]
        params = _gpu_params(backend)
    kernel = functools.partial(_probs_kernel, scale=scale, causal=causal, offset=x.S - x.T,
                               bq=bq, bk=bk, tpu=tpu)
    return pl.pallas_call(
        kernel,
        grid=(x.B, x.Hq, x.nq, x.nk),
        in_specs=[
            pl.BlockSpec((None, None, bq, Dq), lambda b, h, i, j: (b, h, i, 0)),
            pl.BlockSpec((None, None, bk, Dq), lambda b, h, i, j: (b, lax.div(h, G), j, 0)),
            *stat_specs,
        ],
        out_specs=pl.BlockSpec((None, None, bq, bk), lambda b, h, i, j: (b, h, i, j)),
        out_shape=jax.ShapeDtypeStruct((x.B, x.Hq, x.Tp, x.Sp), jnp.float32),
        name="attention_probs_" + ("tpu" if tpu else "gpu"),
        **params,
    )(x.q_BxHxTxD, x.k_BxKxSxD, lse_in, qseg, kseg)


def _probs_xla(x: _Padded, lse_BxTpxH, *, scale, causal) -> jax.Array:
    q_blocks, qseg_blocks = _xla_blocks(x)
    lse = jnp.transpose(lse_BxTpxH, (0, 2, 1)).reshape(x.B, x.Hkv, x.group, x.nq, x.bq)
    lse_blocks = jnp.moveaxis(lse, 3, 0)[..., None]

    def one_q_block(args):
        i, q, qseg, lse_i = args

        def one_k_block(j):
            s, mask = _xla_tile(x, q, qseg, i, j, scale=scale, causal=causal)
            return _tile_probs(s, lse_i, mask)  # [B, Hkv, G, bq, bk]

        p = lax.map(one_k_block, jnp.arange(x.nk))  # [nk, B, Hkv, G, bq, bk]
        return jnp.moveaxis(p, 0, -2).reshape(x.B, x.Hq, x.bq, x.Sp)

    p = lax.map(one_q_block, (jnp.arange(x.nq), q_blocks, qseg_blocks, lse_blocks))  # [nq, B, Hq, bq, Sp]
    return jnp.moveaxis(p, 0, 2).reshape(x.B, x.Hq, x.Tp, x.Sp)


# ---------------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------------

def _prepare(q, k, segment_ids, lse, sm_scale, backend, block_q, block_k, where):
    _check_inputs(q, k, segment_ids, lse, where)
    backend = resolve_backend(backend)
    T, S = q.shape[1], k.shape[1]
    head_bytes = q.shape[2] * q.shape[3] * jnp.dtype(q.dtype).itemsize
    bq, bk = _choose_blocks(_family(backend), T, S, block_q, block_k, head_bytes)
    scale = float(q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)
    return backend, scale, bq, bk


@functools.partial(jax.jit, static_argnames=("causal", "scale", "backend", "bq", "bk"))
def _lse_jit(q, k, segment_ids, *, causal, scale, backend, bq, bk):
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    x = _Padded(q, k, segment_ids, family=_family(backend), bq=bq, bk=bk)
    return _lse_padded(x, scale=scale, causal=causal, backend=backend)[:, :x.T]


@functools.partial(jax.jit, static_argnames=("causal", "scale", "backend", "bq", "bk"))
def _mixture_jit(q, k, segment_ids, lse, *, causal, scale, backend, bq, bk):
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    x = _Padded(q, k, segment_ids, family=_family(backend), bq=bq, bk=bk)
    if lse is None:
        lse_p = _lse_padded(x, scale=scale, causal=causal, backend=backend)
    else:
        lse_p = x.pad_lse(lax.stop_gradient(lse))
    fam = _family(backend)
    if fam == "tpu":
        ent = _mixture_tpu(x, lse_p, scale=scale, causal=causal, backend=backend)
    elif fam == "gpu":
        ent = _mixture_gpu(x, lse_p, scale=scale, causal=causal, backend=backend)
    else:
        ent = _mixture_xla(x, lse_p, scale=scale, causal=causal)
    return ent[:, :x.T]


@functools.partial(jax.jit, static_argnames=("causal", "scale", "backend", "bq", "bk"))
def _probs_jit(q, k, segment_ids, lse, *, causal, scale, backend, bq, bk):
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    x = _Padded(q, k, segment_ids, family=_family(backend), bq=bq, bk=bk)
    if lse is None:
        lse_p = _lse_padded(x, scale=scale, causal=causal, backend=backend)
    else:
        lse_p = x.pad_lse(lax.stop_gradient(lse))
    if _family(backend) == "xla":
        p = _probs_xla(x, lse_p, scale=scale, causal=causal)
    else:
        p = _probs_pallas(x, lse_p, scale=scale, causal=causal, backend=backend)
    return p[:, :, :x.T, :x.S]


def attention_lse(
    q: jax.Array,
    k: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    backend: str | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """Per-head natural-log log-sum-exp of the scaled logits over the visible keys.

    Args:
      q: `[B, T, Hq, D]`; k: `[B, S, Hkv, D]` (Hq a multiple of Hkv).
      causal, segment_ids, sm_scale: as in `kernels.reference_attention`.
      backend: "tpu", "gpu", "xla", "interpret_tpu", "interpret_gpu" or None (by platform).
      block_q, block_k: tile sizes (clamped to the sequence; checked against the shell's rules).

    Returns:
      `[B, T, Hq]` float32; rows with no visible key hold a placeholder (0) to be masked.
    """
    backend, scale, bq, bk = _prepare(q, k, segment_ids, None, sm_scale, backend, block_q, block_k,
                                      "kernels.head_mixture.attention_lse")
    return _lse_jit(q, k, segment_ids, causal=causal, scale=scale, backend=backend, bq=bq, bk=bk)


def head_mixture_entropy(
    q: jax.Array,
    k: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    lse: jax.Array | None = None,
    backend: str | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """Entropy (nats) of the head-averaged attention distribution, per query row.

    H_t = −Σ_j ā_{t,j} log ā_{t,j} with ā_{t,j} = (1/Hq) Σ_h exp(s_{t,j}^h − lse_t^h); GQA head h
    reads key head h // (Hq / Hkv). Computed blockwise without materialising T×S.

    Args:
      q: `[B, T, Hq, D]`; k: `[B, S, Hkv, D]`.
      causal: query t sees keys j <= t + (S − T).
      segment_ids: `[B, T]` int32, 0 = padding (needs S == T).
      sm_scale: logit scale, default 1/sqrt(D).
      lse: `[B, T, Hq]` float32 per-head log-sum-exp of the scaled logits (e.g. the fused
        forward's `return_lse=True`); computed here with a blockwise pass when None.
      backend: "tpu", "gpu", "xla", "interpret_tpu", "interpret_gpu" or None (by platform).
      block_q, block_k: tile sizes; None picks per shell.

    Returns:
      `[B, T]` float32; 0 for rows with no visible key. No gradient (a measurement).
    """
    backend, scale, bq, bk = _prepare(q, k, segment_ids, lse, sm_scale, backend, block_q, block_k,
                                      "kernels.head_mixture_entropy")
    return _mixture_jit(q, k, segment_ids, lse, causal=causal, scale=scale, backend=backend, bq=bq, bk=bk)


def attention_probs(
    q: jax.Array,
    k: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    lse: jax.Array | None = None,
    backend: str | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """Per-head attention probabilities p = exp(s − lse), written tile by tile.

    Same arguments as `head_mixture_entropy`. Meant for analysis of short sequences: the output
    is `[B, Hq, T, S]` float32 (0 on invisible keys and on rows with no visible key).
    """
    backend, scale, bq, bk = _prepare(q, k, segment_ids, lse, sm_scale, backend, block_q, block_k,
                                      "kernels.attention_probs")
    return _probs_jit(q, k, segment_ids, lse, causal=causal, scale=scale, backend=backend, bq=bq, bk=bk)


__all__ = ["attention_lse", "attention_probs", "head_mixture_entropy"]
