"""The policy loss: DAPO's clipped surrogate per token, token-weighted, globally normalised.

Aggregation is ``token-mean`` over the *global* mini-batch: ``Σ w·mask·L / denom`` where
``denom = loss_denominator(weights, mask, ...)`` is computed once over the whole mini-batch and
passed to every micro-batch.  Summing the micro-batch losses (and gradients) then equals the
loss (and gradient) of the whole mini-batch exactly, unlike a per-micro-batch mean (verl#5625).

Metric convention (``policy_loss``'s second output): every entry is *additive* over
micro-batches.  Loss terms are already divided by global denominators; token statistics are
reported as ``*_sum`` over valid tokens plus ``token_count``.  Sum the dicts of all micro-batches
(of all devices: under jit on global arrays they already are global), then call
:func:`finalize_metrics` to turn ``*_sum`` into means.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["ppo_token_loss", "loss_denominator", "policy_loss", "finalize_metrics",
           "NORMALIZATIONS"]

NORMALIZATIONS = ("selected", "all")
_LOG_RATIO_CLAMP = 20.0  # as verl: exp(±20) bounds the ratio and keeps its gradient finite


def ppo_token_loss(logp_BxT: jax.Array, old_logp_BxT: jax.Array, adv_B_or_BxT: jax.Array, *,
                   eps_low: float = 0.2, eps_high: float = 0.28,
                   clip_c: float | None = 10.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DAPO's per-token clipped surrogate (decoupled clip range + dual clip).

    ``ρ = exp(clamp(logp − old_logp, −20, 20))``,
    ``L = max(−A·ρ, −A·clip(ρ, 1 − eps_low, 1 + eps_high))``; for ``A < 0`` also
    ``L = min(L, −A·clip_c)`` (dual clip; ``clip_c=None`` disables it).
    Args:
      logp_BxT: log-probs of the sampled tokens under the current policy (carries gradient).
      old_logp_BxT: the same under the behaviour policy (no gradient is taken through it).
      adv_B_or_BxT: advantages per sequence ``[B]`` (broadcast over tokens) or per token.
    Returns:
      (loss_BxT float32, stats) with bool ``[B, T]`` ``clipped_low`` (A < 0 and ρ < 1 − eps_low),
      ``clipped_high`` (A > 0 and ρ > 1 + eps_high), ``dual_clipped`` (A < 0 and −A·ρ-branch
      above −A·c), and ``ratio`` ``[B, T]``.
    """
    if clip_c is not None and not clip_c > 1.0:
        raise ValueError(f"ppo_token_loss: clip_c={clip_c} must be > 1 (or None to disable the "
                         "dual clip).")
    logp = jnp.asarray(logp_BxT, jnp.float32)
    old = jax.lax.stop_gradient(jnp.asarray(old_logp_BxT, jnp.float32))
    adv = jnp.asarray(adv_B_or_BxT, jnp.float32)
    if adv.ndim == 1:
        adv = adv[:, None]
    adv_BxT = jnp.broadcast_to(adv, logp.shape)

    ratio = jnp.exp(jnp.clip(logp - old, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    pg_unclipped = -adv_BxT * ratio
    pg_clipped = -adv_BxT * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(pg_unclipped, pg_clipped)
    clip_active = pg_clipped > pg_unclipped
    if clip_c is not None:
        pg_dual = -adv_BxT * clip_c
        negative = adv_BxT < 0
        dual_clipped = negative & (loss > pg_dual)
        loss = jnp.where(negative, jnp.minimum(loss, pg_dual), loss)
    else:
        dual_clipped = jnp.zeros(logp.shape, bool)
    stats = {
        "clipped_low": clip_active & (ratio < 1.0),
        "clipped_high": clip_active & (ratio > 1.0),
        "dual_clipped": dual_clipped,
        "ratio": ratio,
    }
    return loss, stats


def loss_denominator(weights_BxT: jax.Array, mask_BxT: jax.Array,
                     normalization: str = "selected") -> jax.Array:
    """The global normaliser of the token-mean, computed once per mini-batch.

    ``selected``: ``Σ w·mask`` (selected-token mean: a subset's loss is the mean over the subset).
    ``all``: ``Σ mask`` (all-token mean: a subset's loss is scaled down by its size).
    An empty sum gives 1 (the loss is then 0, not NaN).
    """
    mask = jnp.asarray(mask_BxT).astype(jnp.float32)
    if normalization == "selected":
        total = jnp.sum(jnp.asarray(weights_BxT, jnp.float32) * mask)
    elif normalization == "all":
        total = jnp.sum(mask)
    else:
        raise ValueError(f"loss_denominator: normalization={normalization!r} must be one of "
                         f"{NORMALIZATIONS}.")
    return jnp.where(total > 0, total, 1.0)


def policy_loss(logp: jax.Array, old_logp: jax.Array, adv: jax.Array, mask: jax.Array,
                weights: jax.Array, *, denom: jax.Array, eps_low: float = 0.2,
                eps_high: float = 0.28, clip_c: float | None = 10.0,
                ref_logp: jax.Array | None = None, kl_coef: float = 0.0,
                pred_entropy: jax.Array | None = None, entropy_coef: float = 0.0,
                token_denom: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-weighted policy loss of one (micro-)batch, normalised by global denominators.

    ``loss = Σ w·mask·L / denom
             + kl_coef · Σ mask·k3 / token_denom          (if ref_logp is given)
             − entropy_coef · Σ mask·H / token_denom      (if pred_entropy is given)``
    with ``k3 = exp(ref − logp) − (ref − logp) − 1`` (Schulman's unbiased, positive KL estimate;
    ``ref − logp`` clamped to ±20).  ``denom`` comes from :func:`loss_denominator` over the whole
    global mini-batch; ``token_denom`` is ``Σ mask`` over the same (default: this call's own
    ``Σ mask``, which is right only when the call sees the whole mini-batch).  The KL and entropy
    terms are not token-weighted.

    Returns (scalar loss, metrics); metrics follow the additive convention of this module:
    ``loss``, ``pg_loss``, ``kl_loss``, ``entropy_bonus`` (already normalised) and
    ``token_count``, ``clip_low_sum``, ``clip_high_sum``, ``dual_clip_sum``, ``approx_kl_sum``
    (``Σ old − logp``), ``ratio_sum``, ``weight_sum`` over valid tokens.
    """
    mask = jnp.asarray(mask).astype(bool)
    maskf = mask.astype(jnp.float32)

    def valid_only(x):
        # Zero the padding *before* any maths: a NaN/-inf there would otherwise turn into NaN
        # gradients (0 · ∂NaN) even though the sum masks it out.
        return None if x is None else jnp.where(mask, jnp.asarray(x, jnp.float32), 0.0)

    logp, old_logp, weights = valid_only(logp), valid_only(old_logp), valid_only(weights)
    ref_logp, pred_entropy = valid_only(ref_logp), valid_only(pred_entropy)
    per_token, stats = ppo_token_loss(logp, old_logp, adv, eps_low=eps_low,
                                      eps_high=eps_high, clip_c=clip_c)
    pg_loss = jnp.sum(jnp.where(mask, weights * per_token, 0.0)) / denom
    count = jnp.sum(maskf)
    if token_denom is None:
        token_denom = jnp.maximum(count, 1.0)

    loss = pg_loss
    kl_loss = jnp.zeros((), jnp.float32)
    if ref_logp is not None:
        d = jnp.clip(ref_logp - logp, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        k3 = jnp.exp(d) - d - 1.0
        kl_loss = jnp.sum(jnp.where(mask, k3, 0.0)) / token_denom
        loss = loss + kl_coef * kl_loss
    entropy_bonus = jnp.zeros((), jnp.float32)
    if pred_entropy is not None:
        entropy_bonus = jnp.sum(pred_entropy) / token_denom
        loss = loss - entropy_coef * entropy_bonus

    logp_ng = jax.lax.stop_gradient(logp)

    def vsum(x):
        return jax.lax.stop_gradient(jnp.sum(jnp.where(mask, x, 0.0)))

    metrics = {
        "loss": jax.lax.stop_gradient(loss),
        "pg_loss": jax.lax.stop_gradient(pg_loss),
        "kl_loss": jax.lax.stop_gradient(kl_loss),
        "entropy_bonus": jax.lax.stop_gradient(entropy_bonus),
        "token_count": count,
        "clip_low_sum": vsum(stats["clipped_low"].astype(jnp.float32)),
        "clip_high_sum": vsum(stats["clipped_high"].astype(jnp.float32)),
        "dual_clip_sum": vsum(stats["dual_clipped"].astype(jnp.float32)),
        "approx_kl_sum": vsum(old_logp - logp_ng),
        "ratio_sum": vsum(stats["ratio"]),
        "weight_sum": vsum(weights),
    }
    return loss, metrics


def finalize_metrics(summed: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Turns summed metric dicts into logged values: each ``X_sum`` becomes ``X`` = sum / count
    (``clip_low`` etc. are fractions of valid tokens); other entries pass through."""
    count = jnp.maximum(jnp.asarray(summed["token_count"], jnp.float32), 1.0)
    out = {}
    for key, value in summed.items():
        if key.endswith("_sum"):
            out[key[:-4]] = value / count
        else:
            out[key] = value
    return out


def step_metrics(update_means: dict[str, float]) -> dict[str, float]:
    """The public names (`metrics.jsonl`, TensorBoard) of an RL step's update metrics, from the mean
    over its optimiser updates of `finalize_metrics` plus `grad_norm`: the one place those names
    are written, since users' scripts read them."""
    m = update_means
    return {"loss": m["loss"], "pg_loss": m["pg_loss"], "grad_norm": m["grad_norm"],
            "clip_frac": m["clip_low"] + m["clip_high"], "clip_frac/low": m["clip_low"],
            "clip_frac/high": m["clip_high"], "clip_frac/dual": m["dual_clip"], "approx_kl": m["approx_kl"]}
