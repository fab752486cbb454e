"""Per-token weights of the policy-gradient term: which response tokens carry gradient, how much.

Every function here works on *global* ``[B, T]`` arrays: under ``jax.jit`` with sharded inputs a
sort over the flattened array is a global sort, so fractions and quantiles are taken over all
valid response tokens of the whole batch (never per sequence, never per device).

Modes (``MODES``):
  ``full``               every valid token, weight 1 (plain DAPO).
  ``random``             exactly k = round(fraction · n_valid) valid tokens, uniformly (``rng``).
  ``anchor``             the k valid tokens of lowest attention entropy.
  ``explorer``           the k valid tokens of highest attention entropy.
  ``pred_entropy_low``   / ``pred_entropy_high``: the same rule on *predictive* entropy (control).
  ``position_early``     / ``position_late``: the same rule on the position within the response.
  ``soft``               Low2High soft re-weighting (:class:`SoftConfig`); mean weight 1.
Hard modes give weight 1 on the selected tokens and 0 elsewhere; padding always gets 0.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "MODES",
    "HARD_MODES",
    "SoftConfig",
    "normalized_entropy",
    "select_fraction",
    "rank_uniform",
    "masked_quantile",
    "soft_schedule",
    "token_weights",
]

MODES = ("full", "random", "anchor", "explorer", "pred_entropy_low", "pred_entropy_high",
         "position_early", "position_late", "soft")
HARD_MODES = tuple(m for m in MODES if m != "soft")
# the paper's subsets, which need nothing but attention entropy: what the supervised warm-up's token
# loss can be restricted to (`train.sft_weights`)
SFT_WEIGHT_MODES = ("full", "random", "anchor", "explorer")
SOFT_SHAPES = ("linear_tilt", "gaussian")
SCHEDULES = ("linear", "cosine")


@dataclasses.dataclass(frozen=True)
class SoftConfig:
    """Low2High soft re-weighting (our reading of the paper; its exact formula was not available).

    With ``u`` the token's attention-entropy rank in the batch (0 = lowest, 1 = highest) and
    ``λ = soft_schedule(step)`` moving from 0 to 1 over training:
      ``linear_tilt``: ``w = 1 + alpha · (1 − 2λ) · (1 − 2u)``  (mean 1 by construction).
      ``gaussian``:    ``w ∝ floor + (1 − floor) · exp(−(u − λ)² / (2 sigma²))``, renormalised to
                       mean 1 over valid tokens (``floor`` keeps every token some weight).
    For ``step < hard_steps`` the weights of ``hard_mode`` are used instead.
    """

    shape: str = "linear_tilt"
    alpha: float = 0.5
    sigma: float = 0.25
    floor: float = 0.1
    schedule: str = "linear"
    start_step: int = 0
    end_step: int = 100
    hard_steps: int = 0
    hard_mode: str = "anchor"

    def __post_init__(self):
        def bad(field: str, why: str):
            raise ValueError(f"SoftConfig.{field}={getattr(self, field)!r}: {why}.")

        if self.shape not in SOFT_SHAPES:
            bad("shape", f"must be one of {SOFT_SHAPES}")
        if not 0.0 <= self.alpha < 1.0:
            bad("alpha", "must be in [0, 1) so every weight stays positive")
        if not self.sigma > 0.0:
            bad("sigma", "must be > 0")
        if not 0.0 <= self.floor <= 1.0:
            bad("floor", "must be in [0, 1]")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"must be one of {SCHEDULES}")
        if self.start_step < 0:
            bad("start_step", "must be >= 0")
        if self.end_step < self.start_step:
            bad("end_step", f"must be >= start_step={self.start_step}")
        if self.hard_steps < 0:
            bad("hard_steps", "must be >= 0")
        if self.hard_mode not in HARD_MODES:
            bad("hard_mode", f"must be one of the hard modes {HARD_MODES}")


def normalized_entropy(entropy_BxT: jax.Array, n_visible_BxT: jax.Array) -> jax.Array:
    """``H / log(n)`` in [0, 1]: entropy over n visible keys relative to the uniform maximum.

    Removes the mechanical growth of attention entropy with context length.  ``n <= 1`` → 0.
    Args: entropy ``[B, T]`` (nats), number of visible keys ``[B, T]``. Returns ``[B, T]`` f32.
    """
    h = jnp.asarray(entropy_BxT, jnp.float32)
    n = jnp.asarray(n_visible_BxT, jnp.float32)
    safe_log = jnp.log(jnp.maximum(n, 2.0))  # keeps the unused branch finite (no 0/0)
    return jnp.where(n > 1.0, jnp.clip(h / safe_log, 0.0, 1.0), 0.0)


def _check_same_shape(name: str, x: jax.Array, mask: jax.Array) -> None:
    if x.shape != mask.shape:
        raise ValueError(f"{name} has shape {x.shape} but mask_BxT has {mask.shape}; both must be "
                         "[B, T] over the same response tokens.")


def _sorted_tokens(score_BxT: jax.Array, mask_BxT: jax.Array, highest: bool):
    """Global order of all B·T tokens: valid first, then by score, ties by flat index.

    Returns (sorted score keys [B·T], sorted invalid flags [B·T], order [B·T] (flat indices)).
    """
    key_N = jnp.asarray(score_BxT, jnp.float32).reshape(-1)
    if highest:
        key_N = -key_N
    invalid_N = jnp.logical_not(mask_BxT.reshape(-1)).astype(jnp.int32)
    idx_N = lax.iota(jnp.int32, key_N.shape[0])
    # The flat index as the last key makes the order a total one: deterministic tie-breaking
    # that does not rely on sort stability.
    invalid_N, key_N, order_N = lax.sort((invalid_N, key_N, idx_N), num_keys=3)
    return key_N, invalid_N, order_N


def _inverse_permutation(order_N: jax.Array) -> jax.Array:
    n = order_N.shape[0]
    return jnp.zeros((n,), jnp.int32).at[order_N].set(lax.iota(jnp.int32, n))


def _num_selected(fraction, n_valid: jax.Array) -> jax.Array:
    """k = round(fraction · n_valid) (half to even), at least 1 when n_valid > 0 and fraction > 0.

    Computed in float32 (no x64 on TPU): exact for n_valid < 2**24 tokens; beyond that k may
    differ from exact rounding by a few tokens.
    """
    if isinstance(fraction, (int, float)) and not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must be in [0, 1] (the share of valid tokens kept).")
    f = jnp.asarray(fraction, jnp.float32)
    n = n_valid.astype(jnp.int32)
    k = jnp.round(f * n.astype(jnp.float32)).astype(jnp.int32)
    k = jnp.where((n > 0) & (f > 0), jnp.maximum(k, 1), k)
    return jnp.minimum(k, n)


def select_fraction(score_BxT: jax.Array, mask_BxT: jax.Array, fraction, *,
                    highest: bool) -> jax.Array:
    """Selects exactly k = round(fraction · n_valid) valid tokens of lowest (or highest) score.

    k is at least 1 when there is a valid token and fraction > 0; rounding is half-to-even
    (as Python's ``round``).  Ties are broken by flat index (``b * T + t``), smaller first, for
    both directions; padding is never selected.
    Args: score ``[B, T]``, mask ``[B, T]`` (bool or 0/1), fraction in [0, 1].
    Returns: bool ``[B, T]``.
    """
    mask = jnp.asarray(mask_BxT).astype(bool)
    _check_same_shape("score_BxT", jnp.asarray(score_BxT), mask)
    _, _, order_N = _sorted_tokens(score_BxT, mask, highest)
    rank_N = _inverse_permutation(order_N)
    k = _num_selected(fraction, mask.sum())
    return (rank_N < k).reshape(mask.shape) & mask


def rank_uniform(score_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Rank of each valid token's score in [0, 1]: ``rank / (n_valid − 1)``, lowest = 0.

    Tied scores share their average rank (so weights do not depend on token order, and the
    mean of u over valid tokens is exactly 1/2).  A single valid token gets 0.5; padding 0.
    Args: score ``[B, T]``, mask ``[B, T]``. Returns ``[B, T]`` f32.
    """
    mask = jnp.asarray(mask_BxT).astype(bool)
    _check_same_shape("score_BxT", jnp.asarray(score_BxT), mask)
    key_N, invalid_N, order_N = _sorted_tokens(score_BxT, mask, highest=False)
    size = key_N.shape[0]
    pos_N = lax.iota(jnp.int32, size)
    differs_N = (key_N[1:] != key_N[:-1]) | (invalid_N[1:] != invalid_N[:-1])
    starts_N = jnp.concatenate([jnp.ones((1,), bool), differs_N])
    ends_N = jnp.concatenate([differs_N, jnp.ones((1,), bool)])
    run_start_N = lax.cummax(jnp.where(starts_N, pos_N, 0), axis=0)
    run_end_N = lax.cummin(jnp.where(ends_N, pos_N, size - 1), axis=0, reverse=True)
    avg_rank_N = 0.5 * (run_start_N + run_end_N).astype(jnp.float32)
    n_valid = mask.sum().astype(jnp.float32)
    u_sorted_N = jnp.where(n_valid > 1, avg_rank_N / jnp.maximum(n_valid - 1.0, 1.0), 0.5)
    u_N = jnp.zeros((size,), jnp.float32).at[order_N].set(u_sorted_N)
    return jnp.where(mask, u_N.reshape(mask.shape), 0.0)


def masked_quantile(x_BxT: jax.Array, mask_BxT: jax.Array, q) -> jax.Array:
    """The q-quantile of ``x`` over valid tokens (numpy's default 'linear' method); 0 if none."""
    mask = jnp.asarray(mask_BxT).astype(bool)
    key_N, _, _ = _sorted_tokens(x_BxT, mask, highest=False)
    n = mask.sum().astype(jnp.int32)
    pos = jnp.asarray(q, jnp.float32) * jnp.maximum(n - 1, 0).astype(jnp.float32)
    lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, jnp.maximum(n - 1, 0))
    hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
    frac = pos - lo.astype(jnp.float32)
    value = key_N[lo] + frac * (key_N[hi] - key_N[lo])
    return jnp.where(n > 0, value, 0.0)


def soft_schedule(step, *, kind: str = "linear", start_step: int = 0, end_step: int = 100,
                  hard_steps: int = 0) -> jax.Array:
    """λ(step) in [0, 1]: 0 up to the start, 1 from ``end_step`` on.

    The ramp starts at ``max(start_step, hard_steps)`` so that the soft phase begins at λ = 0
    when a hard phase ends.  ``linear``: progress p; ``cosine``: ``(1 − cos(π p)) / 2``.
    ``step`` may be a traced scalar.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"soft_schedule: kind={kind!r} must be one of {SCHEDULES}.")
    if end_step < start_step:
        raise ValueError(f"soft_schedule: end_step={end_step} < start_step={start_step}.")
    start = max(start_step, hard_steps)
    s = jnp.asarray(step, jnp.float32)
    if end_step > start:
        p = jnp.clip((s - start) / float(end_step - start), 0.0, 1.0)
    else:  # empty ramp: a step function at end_step
        p = (s >= end_step).astype(jnp.float32)
    if kind == "cosine":
        p = 0.5 * (1.0 - jnp.cos(math.pi * p))
    return p


def _soft_weights(u_BxT: jax.Array, mask: jax.Array, lam: jax.Array, cfg: SoftConfig) -> jax.Array:
    if cfg.shape == "linear_tilt":
        w = 1.0 + cfg.alpha * (1.0 - 2.0 * lam) * (1.0 - 2.0 * u_BxT)
    else:
        g = cfg.floor + (1.0 - cfg.floor) * jnp.exp(-((u_BxT - lam) ** 2) / (2.0 * cfg.sigma**2))
        g = jnp.where(mask, g, 0.0)
        w = g * mask.sum() / jnp.maximum(g.sum(), 1e-30)
    return jnp.where(mask, w, 0.0)


def _hard_weights(mode: str, mask: jax.Array, fraction, *, attn, pred, positions, rng):
    if mode == "full":
        return mask.astype(jnp.float32)
    if mode == "random":
        if rng is None:
            raise ValueError("token_weights(mode='random') needs rng (a jax.random key).")
        score, highest = jax.random.uniform(rng, mask.shape), False
    elif mode in ("anchor", "explorer"):
        score, highest = attn, mode == "explorer"
    elif mode in ("pred_entropy_low", "pred_entropy_high"):
        if pred is None:
            raise ValueError(f"token_weights(mode={mode!r}) needs pred_entropy_BxT (the "
                             "predictive entropy of the policy at each response token).")
        score, highest = pred, mode == "pred_entropy_high"
    else:  # position_early / position_late
        if positions is None:
            # Index of the token among the valid tokens of its response (right padding → t).
            positions = jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1
        score, highest = positions, mode == "position_late"
    _check_same_shape(f"the score of mode {mode!r}", jnp.asarray(score), mask)
    return select_fraction(score, mask, fraction, highest=highest).astype(jnp.float32)


def token_weights(mode: str, *, mask_BxT: jax.Array, attn_entropy_BxT: jax.Array,
                  pred_entropy_BxT: jax.Array | None = None,
                  positions_BxT: jax.Array | None = None, fraction=0.2,
                  rng: jax.Array | None = None, step=0,
                  soft: SoftConfig | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token weights ``[B, T]`` (float32, no gradient) for one batch, and diagnostics.

    Args:
      mode: one of ``MODES`` (static).
      mask_BxT: valid response tokens (bool or 0/1).
      attn_entropy_BxT: normalised attention entropy (``normalized_entropy``) of each token.
      pred_entropy_BxT: predictive entropy, for the ``pred_entropy_*`` controls.
      positions_BxT: position within the response, for ``position_*``; default: the index among
        the row's valid tokens.
      fraction: share of valid tokens selected by hard modes (default 0.2).
      rng: key for ``random`` (also when it is ``soft.hard_mode``).
      step: training step (may be traced), for ``soft``.
      soft: :class:`SoftConfig` for ``soft`` (default ``SoftConfig()``).
    Returns:
      (weights_BxT, aux) with aux ``anchor_threshold`` / ``explorer_threshold`` (the fraction
      and 1 − fraction quantiles of attention entropy over valid tokens), ``selected_frac``
      (share of valid tokens with weight > 0), ``weight_mean`` (over valid tokens) and, for
      ``soft``, ``lambda``.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown token-weight mode {mode!r}; expected one of {MODES}.")
    mask = jnp.asarray(mask_BxT).astype(bool)
    attn = jnp.asarray(attn_entropy_BxT, jnp.float32)
    _check_same_shape("attn_entropy_BxT", attn, mask)
    pred = None if pred_entropy_BxT is None else jnp.asarray(pred_entropy_BxT, jnp.float32)
    hard = dict(attn=attn, pred=pred, positions=positions_BxT, rng=rng)

    aux: dict[str, jax.Array] = {
        "anchor_threshold": masked_quantile(attn, mask, fraction),
        "explorer_threshold": masked_quantile(attn, mask, 1.0 - jnp.asarray(fraction)),
    }
    if mode == "soft":
        cfg = soft if soft is not None else SoftConfig()
        lam = soft_schedule(step, kind=cfg.schedule, start_step=cfg.start_step,
                            end_step=cfg.end_step, hard_steps=cfg.hard_steps)
        weights = _soft_weights(rank_uniform(attn, mask), mask, lam, cfg)
        if cfg.hard_steps > 0:
            w_hard = _hard_weights(cfg.hard_mode, mask, fraction, **hard)
            weights = jnp.where(jnp.asarray(step) < cfg.hard_steps, w_hard, weights)
        aux["lambda"] = lam
    else:
        weights = _hard_weights(mode, mask, fraction, **hard)

    weights = lax.stop_gradient(weights)
    n_valid = jnp.maximum(mask.sum(), 1).astype(jnp.float32)
    aux["selected_frac"] = jnp.sum((weights > 0) & mask) / n_valid
    aux["weight_mean"] = jnp.sum(jnp.where(mask, weights, 0.0)) / n_valid
    return weights, aux
