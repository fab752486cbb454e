"""The one definition of which keys a query may see (causal, segments, padding)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def visible_mask(B: int, T: int, S: int, *, causal: bool, segment_ids: jax.Array | None) -> jax.Array:
    """Boolean `[B, T, S]`: may query row t see key s.

    Causal alignment puts the T queries at the end of the S keys (query t is key position
    t + S - T). `segment_ids` `[B, T]` (0 = padding) requires S == T: a key is visible only to
    queries of its own non-zero segment.
    """
    mask = jnp.ones((B, T, S), bool)
    if causal:
        qpos = jnp.arange(T)[:, None] + (S - T)
        kpos = jnp.arange(S)[None, :]
        mask = mask & (kpos <= qpos)[None]
    if segment_ids is not None:
        if segment_ids.shape != (B, T) or S != T:
            raise ValueError(
                f"segment_ids must be [B, T] = {(B, T)} with S == T (got {segment_ids.shape}, S={S})")
        seg = segment_ids.astype(jnp.int32)
        mask = mask & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    return mask


def visible_count(segment_ids: jax.Array | None, B: int, T: int, *, causal: bool = True) -> jax.Array:
    """Number of keys `[B, T]` int32 each query row sees in self-attention (S == T).

    O(T), never `[T, T]`: segments are contiguous runs (left/right padding, packing), so a causal
    row sees the tokens from the start of its run up to itself. Padding rows see 0.
    """
    if segment_ids is None:
        n = jnp.arange(1, T + 1) if causal else jnp.full((T,), T)
        return jnp.broadcast_to(n, (B, T)).astype(jnp.int32)
    seg = segment_ids.astype(jnp.int32)
    if not causal:
        same = seg[:, :, None] == seg[:, None, :]
        return jnp.where(seg != 0, jnp.sum(same, axis=-1), 0).astype(jnp.int32)
    idx = jnp.broadcast_to(jnp.arange(T), (B, T))
    starts = jnp.concatenate([jnp.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    run_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return jnp.where(seg != 0, idx - run_start + 1, 0).astype(jnp.int32)
