"""Plain-XLA attention that materialises the probabilities: the oracle for the fused kernels.

Also the analysis path: it can return the full per-head probabilities `[B, Hq, T, S]`, which is
only sensible for short sequences.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_entropy.kernels.block_update import MASK_VALUE
from jaxrl_entropy.kernels.masking import visible_mask

NEG_INF = MASK_VALUE  # the one finite "minus infinity" (`kernels.block_update`), under its old name


def reference_attention(
    q_BxTxHxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    return_probs: bool = False,
):
    """Attention with per-row entropy, computed the direct way.

    Args:
      q_BxTxHxD: queries `[B, T, Hq, D]`.
      k_BxSxKxD, v_BxSxKxD: keys / values `[B, S, Hkv, D]`, Hq a multiple of Hkv (GQA).
      causal: query i sees keys j <= i + (S - T) (queries aligned to the end of the keys).
      segment_ids: `[B, T]` int32, 0 = padding; needs S == T. Keys of another segment and
        padding keys are invisible; a padding query sees nothing.
      sm_scale: logit scale, default 1/sqrt(D).
      return_probs: also return the probabilities `[B, Hq, T, S]` float32.

    Returns:
      `(out [B, T, Hq, D] like q, entropy [B, T, Hq] float32)` and, with `return_probs`,
      `probs [B, Hq, T, S]`. Rows with no visible key have out 0, entropy 0, probs 0.
      Plain jnp throughout, so out, entropy and probs are all differentiable (the oracle for the
      fused kernel's gradients, entropy included); rows with no visible key get zero gradient.
    """
    B, T, Hq, D = q_BxTxHxD.shape
    S, Hkv = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    G = Hq // Hkv
    scale = D**-0.5 if sm_scale is None else sm_scale
    q = q_BxTxHxD.astype(jnp.float32).reshape(B, T, Hkv, G, D)
    k = k_BxSxKxD.astype(jnp.float32)
    v = v_BxSxKxD.astype(jnp.float32)
    s_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q, k, precision="highest") * scale
    mask_BxTxS = visible_mask(B, T, S, causal=causal, segment_ids=segment_ids)
    mask = mask_BxTxS[:, None, None]
    s = jnp.where(mask, s_BxKxGxTxS, NEG_INF)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    probs = p / jnp.where(l > 0, l, 1.0)
    logp = jnp.where(mask, s - m - jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)
    ent_BxKxGxT = -jnp.sum(probs * logp, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, precision="highest").reshape(B, T, Hq, v.shape[-1])
    entropy_BxTxH = jnp.transpose(ent_BxKxGxT, (0, 3, 1, 2)).reshape(B, T, Hq)
    result = (out.astype(q_BxTxHxD.dtype), entropy_BxTxH)
    if return_probs:
        result += (probs.reshape(B, Hq, T, S),)
    return result


def mixture_entropy_from_probs(probs_BxHxTxS: jax.Array) -> jax.Array:
    """Entropy `[B, T]` (nats) of the head-averaged distribution ā = mean_h a^h of given probabilities."""
    pbar_BxTxS = jnp.mean(probs_BxHxTxS.astype(jnp.float32), axis=1)
    safe = jnp.where(pbar_BxTxS > 0, pbar_BxTxS, 1.0)
    return -jnp.sum(pbar_BxTxS * jnp.log(safe), axis=-1)


def reference_head_mixture_entropy(
    q_BxTxHxD: jax.Array,
    k_BxSxKxD: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """Entropy `[B, T]` (nats) of the head-averaged attention distribution ā = mean_h a^h."""
    v = jnp.zeros(k_BxSxKxD.shape[:3] + (1,), jnp.float32)
    _, _, probs_BxHxTxS = reference_attention(
        q_BxTxHxD, k_BxSxKxD, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
        return_probs=True)
    return mixture_entropy_from_probs(probs_BxHxTxS)
