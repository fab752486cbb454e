"""The maths of flash attention with row entropy, written once for every shell.

Every shell (Mosaic TPU, Pallas Triton GPU, blockwise XLA) is a thin wrapper that loads tiles and
calls these pure functions. They work on any leading batch shape and on two layouts of the per-row
statistics `m, l, t`:

- `[..., R, 1]` (GPU / XLA): broadcasts against `[..., R, K]` tiles by the usual rules;
- `[..., R, 128]` lane-replicated (TPU): Mosaic keeps row statistics as full (8, 128) vreg tiles,
  so a statistic is widened to a `K`-wide tile with `jnp.tile`, never with a 1-D broadcast.

Forward block update (centred online entropy; docs/design-notes.md), for scaled logits `s` of one
tile:
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

Backward, for cotangents g_out (→ dp = g_out·vᵀ), g_H of the entropy and g_lse of the lse:
```
dS = p ⊙ (dp − Δ + g_lse − g_H·(log p + H)),   Δ = Σ_d out·g_out,   log p = s − lse
```
(∂lse/∂s = p and ∂H/∂s = −p ⊙ (log p + H)). The row constants fold into one
`di = Δ − g_lse + g_H·H` (`row_delta`, computed in XLA), leaving `p ⊙ (dp − di) − g_H·p·log p`
per tile (`softmax_grad`).

The head-mixture pass (`mixture_entropy_term`) reads the same probabilities p = exp(s − lse).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Finite "minus infinity": masked logits and the initial running max. exp(MASK_VALUE - m) is exactly
# 0 for any real m, and (MASK_VALUE - m') * 0 stays finite (with -inf it would be NaN).
MASK_VALUE = -1e30
# log-sum-exp reported for a row that sees no key. Large and finite: exp(s - lse) is exactly 0 for
# every logit, so a consumer that forgets to mask such rows still reads probability 0, never NaN.
EMPTY_ROW_LSE = 1e30

NT = (((1,), (1,)), ((), ()))  # dot_general dims of a @ bᵀ on 2-D tiles
NN = (((1,), (0,)), ((), ()))  # a @ b


def dot(a: jax.Array, b: jax.Array, dims, precision) -> jax.Array:
    """2-D tile matmul with a float32 accumulator (`dims` = `NT` or `NN`)."""
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def matmul_precision(dtype) -> lax.Precision:
    """HIGHEST for float32 operands (GPUs would otherwise round to TF32, TPUs to bf16 passes);
    DEFAULT for bf16/f16, whose products are exact in the f32 accumulator anyway. Every matmul of
    every kernel (forward, backward, head mixture, probabilities) takes its precision from here."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


class RowState(NamedTuple):
    """Running state of one tile of query rows.

    m, l: `[..., R, W]` float32 (W = 1, or 128 lane-replicated on TPU); t: like m, or None when the
    entropy is off; acc: `[..., R, D]` float32, or None for a statistics-only pass (no values).
    """
    m: jax.Array
    l: jax.Array
    t: jax.Array | None
    acc: jax.Array | None


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


def init_state(rows_shape: tuple[int, ...], width: int, head_dim: int | None, *,
               entropy: bool = True) -> RowState:
    """Fresh state: m = MASK_VALUE (finite), l = t = acc = 0. `rows_shape` is `(..., R)`;
    `head_dim` None gives a statistics-only state (no accumulator)."""
    stat = jnp.full(rows_shape + (width,), MASK_VALUE, jnp.float32)
    zero = jnp.zeros(rows_shape + (width,), jnp.float32)
    acc = None if head_dim is None else jnp.zeros(rows_shape + (head_dim,), jnp.float32)
    return RowState(stat, zero, zero if entropy else None, acc)


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
    v: jax.Array | None,
    *,
    precision=None,
) -> RowState:
    """Fold one key tile into the running state.

    Args:
      state: running `RowState` of the rows (its `t` / `acc` being None switches the entropy /
        the value accumulator off).
      s: `[..., R, K]` float32 scaled logits of the tile (not yet masked).
      mask: bool `[..., R, K]` visibility, or None (all visible: the shells pass None for blocks
        that no mask cuts, see `kernels.tiling`).
      v: `[..., K, D]` values of the tile (any float dtype; p is cast to it for the matmul), or
        None for a statistics-only pass.
      precision: matmul precision for p @ v.
    """
    m, l, t, acc = state
    K = s.shape[-1]
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
    if t is not None:
        # masked entries: p = 0 and (s - m') is finite, so they add exactly 0
        t = alpha * (t + (m - m_new) * l) + jnp.sum(p * (s - m_wide), axis=-1, keepdims=True)
    if acc is not None:
        pv = jnp.matmul(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=precision)
        acc = widen(alpha, acc.shape[-1]) * acc + pv
    return RowState(m_new, l_new, t, acc)


def finalize(state: RowState):
    """Turn a final state into `(out [..., R, D] f32, entropy [..., R, W] f32, lse [..., R, W] f32)`.

    Rows with no visible key (l = 0): out 0, entropy 0, lse `EMPTY_ROW_LSE`. out / entropy are None
    when the state has no accumulator / no entropy.
    """
    m, l, t, acc = state
    visible = l > 0.0
    l_safe = jnp.where(visible, l, 1.0)
    inv_l = 1.0 / l_safe
    out = None if acc is None else acc * widen(inv_l, acc.shape[-1])
    log_l = jnp.log(l_safe)
    lse = jnp.where(visible, m + log_l, EMPTY_ROW_LSE)
    ent = None
    if t is not None:
        # H >= 0 exactly; rounding can leave -1e-7 on one-key rows
        ent = jnp.where(visible, jnp.maximum(log_l - t * inv_l, 0.0), 0.0)
    return out, ent, lse


def log_probs(s: jax.Array, lse: jax.Array, mask: jax.Array | None) -> jax.Array:
    """log p = s − lse `[..., R, K]` from scaled logits and the saved row lse `[..., R, W]`.

    Masked logits go to MASK_VALUE first, so exp(log p) underflows to exactly 0 (also on empty
    rows, whose lse is EMPTY_ROW_LSE) and log p stays finite (≥ −2e30): no inf ever appears.
    """
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    return s - widen(lse, s.shape[-1])


def recompute_probs(s: jax.Array, lse: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Probabilities p = exp(s − lse) `[..., R, K]`, exactly 0 on masked keys."""
    return jnp.exp(log_probs(s, lse, mask))


def row_delta(out: jax.Array, g_out: jax.Array, ent: jax.Array | None, g_ent: jax.Array | None,
              g_lse: jax.Array | None) -> jax.Array:
    """The per-row constant of the backward, `di = Σ_d out·g_out − g_lse + g_H·H`, `[B, T, Hq]` f32.

    out, g_out: `[B, T, Hq, D]`; ent, g_ent, g_lse: `[B, T, Hq]` or None (zero cotangent).
    """
    di = jnp.sum(out.astype(jnp.float32) * g_out.astype(jnp.float32), axis=-1)
    if g_lse is not None:
        di = di - g_lse.astype(jnp.float32)
    if g_ent is not None:
        di = di + g_ent.astype(jnp.float32) * ent
    return di


def softmax_grad(p: jax.Array, dp: jax.Array, di: jax.Array, *, g_ent: jax.Array | None = None,
                 log_p: jax.Array | None = None) -> jax.Array:
    """dS = p ⊙ (dP − di) − g_H · p ⊙ log p: the gradient w.r.t. the scaled logits of one tile.

    p, dp, log_p: `[..., R, K]`; di (from `row_delta`), g_ent: `[..., R, W]`. With `g_ent` None the
    entropy carries no cotangent and the last term is skipped (the plain flash backward).
    """
    ds = p * (dp - widen(di, dp.shape[-1]))
    if g_ent is not None:
        # p·log p first: bounded by 1/e, and exactly 0 on masked keys (p = 0, log p finite)
        ds = ds - widen(g_ent, dp.shape[-1]) * (p * log_p)
    return ds


def mixture_entropy_term(psum: jax.Array, num_heads: int) -> jax.Array:
    """−Σ_j ā_j log ā_j over one key tile, ā = psum / Hq (psum `[..., R, K]` = Σ_h p_h);
    `[..., R, 1]` float32. 0·log 0 counts as 0."""
    a = psum * (1.0 / num_heads)
    pos = a > 0.0
    return -jnp.sum(jnp.where(pos, a * jnp.log(jnp.where(pos, a, 1.0)), 0.0), axis=-1, keepdims=True)
