"""The maths of flash attention with row entropy, written once for every shell.

Every shell (Mosaic TPU, Pallas Triton GPU, blockwise XLA) is a thin wrapper that loads tiles and
calls these pure functions. They work on any leading batch shape and on two layouts of the per-row
statistics `m, l, t`:

- `[..., R, 1]` (GPU / XLA): broadcasts against `[..., R, K]` tiles by the usual rules;
- `[..., R, 128]` lane-replicated (TPU): Mosaic keeps row statistics as full (8, 128) vreg tiles,
  so a statistic is widened to a `K`-wide tile with `jnp.tile`, never with a 1-D broadcast.

Forward block update (centred online entropy; DESIGN.md §2), for scaled logits `s` of one tile:
```
m' = max(m, rowmax(s));  α = exp(m − m')
p  = where(mask, exp(s − m'), 0)
l' = α·l + Σ p
t' = α·(t + (m − m')·l) + Σ p·(s − m')
acc' = α·acc + p @ v
H  = log l − t / l   (0 for a row with no visible key)
```
`t` is the p-weighted sum of logits centred on the running max, so it stays bounded even when the
first blocks of a row are fully masked (the raw Σ p·s form overflows to NaN there).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Finite "minus infinity": masked logits and the initial running max. exp(MASK_VALUE - m) is exactly
# 0 for any real m, and (MASK_VALUE - m') * 0 stays finite (with -inf it would be NaN).
MASK_VALUE = -1e30
# log-sum-exp reported for a row that sees no key. Large and finite: exp(s - lse) is exactly 0 for
# every logit, so a consumer that forgets to mask such rows still reads probability 0, never NaN.
EMPTY_ROW_LSE = 1e30


class RowState(NamedTuple):
    """Running state of one tile of query rows.

    m, l, t: `[..., R, W]` float32 (W = 1, or 128 lane-replicated on TPU); acc: `[..., R, D]` f32.
    """
    m: jax.Array
    l: jax.Array
    t: jax.Array
    acc: jax.Array


def widen(x: jax.Array, n: int) -> jax.Array:
    """Make a row statistic `[..., R, W]` usable against an `[..., R, n]` tile.

    W == 1 broadcasts implicitly; a lane-replicated W = 128 statistic is tiled (n a multiple of
    128) or cut (n < 128, e.g. head_dim 64): the operations Mosaic lowers without relayout.
    """
    w = x.shape[-1]
    if w == 1 or w == n:
        return x
    if n % w == 0:
        return jnp.tile(x, (1,) * (x.ndim - 1) + (n // w,))
    if n < w:
        return x[..., :n]
    raise ValueError(f"cannot widen a row statistic of width {w} to {n}: use a multiple of {w}")


def init_state(rows_shape: tuple[int, ...], width: int, head_dim: int) -> RowState:
    """Fresh state: m = MASK_VALUE (finite), l = t = acc = 0. `rows_shape` is `(..., R)`."""
    stat = jnp.full(rows_shape + (width,), MASK_VALUE, jnp.float32)
    zero = jnp.zeros(rows_shape + (width,), jnp.float32)
    return RowState(stat, zero, zero, jnp.zeros(rows_shape + (head_dim,), jnp.float32))


def tile_mask(
    q_pos: jax.Array | None,
    k_pos: jax.Array | None,
    *,
    causal: bool,
    kv_len: int | None = None,
    q_seg: jax.Array | None = None,
    k_seg: jax.Array | None = None,
) -> jax.Array | None:
    """Which keys each query row of a tile sees (the rule of `kernels.masking.visible_mask`).

    Args:
      q_pos: `[..., R, 1]` int32 key-aligned query positions (query t of T sits at key position
        t + S - T), or None when not causal.
      k_pos: `[..., 1, K]` int32 key positions.
      causal: key j is visible to query position i iff j <= i.
      kv_len: true number of keys S; keys at positions >= S are padding added to fill a block.
      q_seg, k_seg: segment ids broadcastable to `[..., R, K]` (0 = padding), or None.

    Returns:
      bool `[..., R, K]`, or None when everything is visible.
    """
    mask = None

    def _and(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if causal:
        mask = _and(mask, k_pos <= q_pos)
    if kv_len is not None:
        mask = _and(mask, k_pos < kv_len)
    if q_seg is not None:
        mask = _and(mask, jnp.logical_and(q_seg == k_seg, k_seg != 0))
    return mask


def online_softmax_step(
    state: RowState,
    s: jax.Array,
    mask: jax.Array | None,
    v: jax.Array,
    *,
    entropy: bool = True,
    precision=None,
) -> RowState:
    """Fold one key tile into the running state.

    Args:
      state: running `RowState` of the rows.
      s: `[..., R, K]` float32 scaled logits of the tile (not yet masked).
      mask: bool `[..., R, K]` visibility, or None (all visible).
      v: `[..., K, D]` values of the tile (any float dtype; p is cast to it for the matmul).
      entropy: also update t (static; off for plain flash attention).
      precision: matmul precision for p @ v.
    """
    m, l, t, acc = state
    K, D = s.shape[-1], v.shape[-1]
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
    m_wide = widen(m_new, K)
    p = jnp.exp(s - m_wide)
    if mask is not None:
        # a row fully masked so far has m' = MASK_VALUE and exp(s - m') = 1 on masked keys
        p = jnp.where(mask, p, 0.0)
    alpha = jnp.exp(m - m_new)
    l_new = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
    if entropy:
        # masked entries: p = 0 and (s - m') is finite, so they add exactly 0
        t = alpha * (t + (m - m_new) * l) + jnp.sum(p * (s - m_wide), axis=-1, keepdims=True)
    pv = jnp.matmul(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=precision)
    acc = widen(alpha, D) * acc + pv
    return RowState(m_new, l_new, t, acc)


def finalize(state: RowState, *, entropy: bool = True):
    """Turn a final state into `(out [..., R, D] f32, entropy [..., R, W] f32, lse [..., R, W] f32)`.

    Rows with no visible key (l = 0): out 0, entropy 0, lse `EMPTY_ROW_LSE`. With `entropy=False`
    the entropy slot is None.
    """
    m, l, t, acc = state
    visible = l > 0.0
    l_safe = jnp.where(visible, l, 1.0)
    inv_l = 1.0 / l_safe
    out = acc * widen(inv_l, acc.shape[-1])
    log_l = jnp.log(l_safe)
    lse = jnp.where(visible, m + log_l, EMPTY_ROW_LSE)
    ent = None
    if entropy:
        # H >= 0 exactly; rounding can leave -1e-7 on one-key rows
        ent = jnp.where(visible, jnp.maximum(log_l - t * inv_l, 0.0), 0.0)
    return out, ent, lse


def combine_splits(states: RowState, axis: int = 0) -> RowState:
    """Merge states computed on disjoint key ranges (split-K / decode), stacked along `axis`.

    With M = max mᵢ and wᵢ = exp(mᵢ − M): L = Σ wᵢ lᵢ, T = Σ wᵢ (tᵢ + (mᵢ − M) lᵢ),
    acc = Σ wᵢ accᵢ; `finalize` of the result equals attention over all keys.
    """
    m, l, t, acc = states
    m_all = jnp.max(m, axis=axis, keepdims=True)
    w = jnp.exp(m - m_all)
    l_all = jnp.sum(w * l, axis=axis)
    t_all = jnp.sum(w * (t + (m - m_all) * l), axis=axis)
    acc_all = jnp.sum(widen(w, acc.shape[-1]) * acc, axis=axis)
    return RowState(jnp.squeeze(m_all, axis), l_all, t_all, acc_all)


def recompute_probs(s: jax.Array, lse: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Backward: probabilities `[..., R, K]` from scaled logits and the saved row lse `[..., R, W]`.

    Masked logits go to MASK_VALUE first, so exp underflows to exactly 0 (also for empty rows,
    whose lse is EMPTY_ROW_LSE); no inf ever appears.
    """
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    return jnp.exp(s - widen(lse, s.shape[-1]))


def softmax_grad(p: jax.Array, dp: jax.Array, di: jax.Array) -> jax.Array:
    """dS = p ⊙ (dP − di), di = Σ_d o·do per row `[..., R, W]` (the flash backward identity)."""
    return p * (dp - widen(di, dp.shape[-1]))


# ---------------------------------------------------------------------------------------------
# Tiling helpers shared by the shells (not maths, but every shell needs the same ones).


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def floordiv(a, b: int, lowest: int):
    """floor(a / b) for a traced int32 `a >= lowest` (static bound).

    Kernels' integer division truncates toward zero, and `//` lowers through `sign`, which Mosaic
    only lowers on a real TPU; shifting `a` to be non-negative first needs neither.
    """
    shift = max(0, -(lowest // b))
    return jax.lax.div(a + shift * b, b) - shift


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """Pad `x` with `value` at the end of `axis` up to `size` (no-op when already that long)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def matmul_precision(dtype) -> jax.lax.Precision:
    """HIGHEST for float32 operands (GPUs would otherwise round to TF32, TPUs to bf16 passes);
    DEFAULT for bf16/f16, whose products are exact in the f32 accumulator anyway."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


class Tiling:
    """Static sizes of a blocked attention problem, shared by the shells: shapes, block sizes,
    padded lengths, block counts and the causal offset (query t sits at key position t + off)."""

    def __init__(self, q, k, segment_ids, causal: bool, bq: int, bk: int):
        self.B, self.T, self.Hq, self.D = q.shape
        self.S, self.Hkv = k.shape[1], k.shape[2]
        self.G = self.Hq // self.Hkv
        self.bq, self.bk = bq, bk
        self.Tp, self.Sp = round_up(self.T, bq), round_up(self.S, bk)
        self.nq, self.nk = self.Tp // bq, self.Sp // bk
        self.off = self.S - self.T
        self.causal = causal
        # causal already hides padded keys from real queries, and segment ids mark them 0; only a
        # non-causal unsegmented problem needs an explicit key-length bound
        self.kv_len = self.S if (self.Sp > self.S and not causal and segment_ids is None) else None
