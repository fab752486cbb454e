"""The static tiling of a blocked attention problem, and which blocks each tile has to visit.

Every shell cuts queries into blocks of `bq` rows and keys into blocks of `bk` and pads the ends.
A (query block, key block) pair is one of three kinds:

- SKIP: no row of the query block sees any key of the key block (above the causal diagonal, or
  only other segments / padding): never computed and, on TPU, never even loaded;
- FULL: every row sees every key (below the diagonal, inside one segment, no padding): computed
  without building a mask at all;
- MASKED: the rest (the diagonal, segment boundaries, padding): computed with `tile_mask`.

`block_kinds` classifies all pairs in XLA from per-block segment summaries (O(T + nq·nk), any
segment layout), and `visit_ranges` turns each query block's row of kinds into four key-block
indices `lo <= full_lo <= full_hi <= hi`: visit [lo, full_lo) masked, [full_lo, full_hi) unmasked,
[full_hi, hi) masked. A key block inside [lo, hi) that is really SKIP (a layout with holes) is
still visited with its mask, which gives exactly zero: the ranges may over-visit, never
under-visit. Left padding thus costs nothing: its key blocks lie before `lo`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

SKIP, MASKED, FULL = 0, 1, 2
# columns of a `visit_ranges` row
LO, FULL_LO, FULL_HI, HI = 0, 1, 2, 3


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """Pad `x` with `value` at the end of `axis` up to `size` (no-op when already that long)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


class Tiling:
    """Static sizes of a blocked attention problem, shared by the shells: shapes, block sizes,
    padded lengths, block counts and the causal offset (query t sits at key position t + off).

    Args:
      q_shape: `(B, T, Hq, D)`; k_shape: `(B, S, Hkv, D)`.
      causal, has_seg: the masking rules in force.
      bq, bk: query / key block sizes (already legal for the shell).
    """

    def __init__(self, q_shape, k_shape, *, causal: bool, has_seg: bool, bq: int, bk: int):
        self.B, self.T, self.Hq, self.D = q_shape
        self.S, self.Hkv = k_shape[1], k_shape[2]
        self.G = self.Hq // self.Hkv
        self.bq, self.bk = bq, bk
        self.Tp, self.Sp = round_up(self.T, bq), round_up(self.S, bk)
        self.nq, self.nk = self.Tp // bq, self.Sp // bk
        self.off = self.S - self.T
        self.causal = causal
        self.has_seg = has_seg
        # causal already hides padded keys from real queries, and segment ids mark them 0; only a
        # non-causal unsegmented problem needs an explicit key-length bound
        self.kv_len = self.S if (self.Sp > self.S and not causal and not has_seg) else None

    @property
    def needs_mask(self) -> bool:
        """Whether any tile can need a mask at all."""
        return self.causal or self.has_seg or self.kv_len is not None

    def padded_segments(self, segment_ids):
        """`(q_seg [B, Tp], k_seg [B, Sp])` int32, padding rows and keys in segment 0."""
        seg = segment_ids.astype(jnp.int32)
        return pad_axis(seg, 1, self.Tp), pad_axis(seg, 1, self.Sp)

    def block_kinds(self, segment_ids) -> jax.Array:
        """SKIP / MASKED / FULL of every (query block, key block) pair: int32 `[B, nq, nk]`."""
        i = jnp.arange(self.nq)[:, None]
        j = jnp.arange(self.nk)[None, :]
        q_first, q_last = i * self.bq + self.off, i * self.bq + self.bq - 1 + self.off
        k_first, k_last = j * self.bk, j * self.bk + self.bk - 1
        seen = jnp.ones((self.nq, self.nk), bool)
        full = jnp.ones((self.nq, self.nk), bool)
        if self.causal:
            seen = k_first <= q_last     # the block's last row sees the block's first key
            full = k_last <= q_first     # the block's first row sees the block's last key
        if self.kv_len is not None:
            full = full & (k_last < self.kv_len)
        seen, full = seen[None], full[None]
        if segment_ids is not None:
            q_seg, k_seg = self.padded_segments(segment_ids)
            q_lo, q_hi, q_one = _segment_summary(q_seg.reshape(self.B, self.nq, self.bq))
            k_lo, k_hi, k_one = _segment_summary(k_seg.reshape(self.B, self.nk, self.bk))
            # some row and key share a non-zero id only if the blocks' id ranges overlap
            overlap = (jnp.maximum(q_lo[:, :, None], k_lo[:, None, :])
                       <= jnp.minimum(q_hi[:, :, None], k_hi[:, None, :]))
            # every row sees every key: both blocks hold one and the same non-zero id
            same = (q_one[:, :, None] & k_one[:, None, :]
                    & (q_lo[:, :, None] == k_lo[:, None, :]))
            seen, full = seen & overlap, full & same
        kinds = jnp.where(seen, jnp.where(full, FULL, MASKED), SKIP).astype(jnp.int32)
        return jnp.broadcast_to(kinds, (self.B, self.nq, self.nk))


def _segment_summary(seg_BxNxL):
    """Per block: smallest and largest non-zero id (BIG / -1 when none) and whether every entry
    holds the same non-zero id."""
    big = jnp.iinfo(jnp.int32).max
    nonzero = seg_BxNxL != 0
    lo = jnp.min(jnp.where(nonzero, seg_BxNxL, big), axis=-1)
    hi = jnp.max(jnp.where(nonzero, seg_BxNxL, -1), axis=-1)
    one = jnp.all(nonzero, axis=-1) & (lo == hi)
    return lo, hi, one


def merge_batch(kinds_BxNxM: jax.Array) -> jax.Array:
    """Kinds `[1, N, M]` valid for every batch row at once (for shells whose tiles hold the whole
    batch): SKIP only if SKIP everywhere, FULL only if FULL everywhere."""
    skip = jnp.all(kinds_BxNxM == SKIP, axis=0, keepdims=True)
    full = jnp.all(kinds_BxNxM == FULL, axis=0, keepdims=True)
    return jnp.where(skip, SKIP, jnp.where(full, FULL, MASKED)).astype(jnp.int32)


def visit_ranges(kinds: jax.Array, *, transpose: bool = False) -> jax.Array:
    """`(lo, full_lo, full_hi, hi)` per block row: int32 `[..., N, 4]`.

    `kinds` `[..., N, M]` (query blocks × key blocks). Ranges are over the last axis (key blocks
    of each query block), or over query blocks of each key block with `transpose` (dK/dV).
    A row with nothing to visit gets (0, 0, 0, 0).
    """
    if transpose:
        kinds = jnp.swapaxes(kinds, -1, -2)
    n = kinds.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)
    seen, full = kinds != SKIP, kinds == FULL
    hi = jnp.max(jnp.where(seen, idx + 1, 0), axis=-1)
    lo = jnp.minimum(jnp.min(jnp.where(seen, idx, n), axis=-1), hi)
    # the first run of FULL blocks; FULL blocks after a masked one are visited with their mask
    full_lo = jnp.min(jnp.where(full, idx, n), axis=-1)
    after = jnp.where(~full & (idx > full_lo[..., None]), idx, n)
    full_hi = jnp.minimum(jnp.min(after, axis=-1), hi)
    full_lo = jnp.minimum(full_lo, full_hi)
    return jnp.stack([lo, full_lo, full_hi, hi], axis=-1).astype(jnp.int32)


def fori_ranges(rng, body, carry):
    """Run `body(j, carry, masked)` over the three ranges of one `visit_ranges` row `rng`
    (an int32 `[4]` array or ref): [lo, full_lo) and [full_hi, hi) with `masked=True`,
    [full_lo, full_hi) with `masked=False` (static, so the unmasked body builds no mask)."""
    lo, full_lo, full_hi, hi = rng[LO], rng[FULL_LO], rng[FULL_HI], rng[HI]
    carry = lax.fori_loop(lo, full_lo, lambda j, c: body(j, c, True), carry)
    carry = lax.fori_loop(full_lo, full_hi, lambda j, c: body(j, c, False), carry)
    return lax.fori_loop(full_hi, hi, lambda j, c: body(j, c, True), carry)
