"""Per-step entropy-dynamics metrics, computed on the host from one batch's response tokens.

These are *logged* numbers (how the attention-entropy distribution moves over training and how
it relates to predictive entropy and position); the token weights themselves are computed on
device from exact batch quantiles (`jaxrl_entropy.rl` weights). To keep the cost bounded on large
batches, the valid tokens are subsampled (seeded, without replacement) to at most `max_tokens`
before any statistic is taken, so quantiles here are estimates whenever the batch is larger.

All functions take numpy (or jax, converted with `np.asarray`) arrays and return
`dict[str, float]` keyed by metric name, ready for a metrics writer.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from jaxrl_entropy import stats

__all__ = ["entropy_dynamics", "control_correlations", "QUANTILES"]

#: Quantiles of normalised attention entropy logged as `entropy/q10` ... `entropy/q90`.
QUANTILES: tuple[int, ...] = (10, 25, 50, 75, 90)

_NAN = float("nan")


def _check_shape(name: str, arr: np.ndarray | None, shape: tuple[int, ...], fn: str) -> None:
    if arr is not None and arr.shape != shape:
        raise ValueError(f"{fn}: {name} has shape {arr.shape}, expected {shape} (the shape of hnorm)")


def _subsample(n: int, max_tokens: int, seed: int) -> np.ndarray | None:
    """Indices of a seeded subsample of size `max_tokens` from n, or None to keep all."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if n <= max_tokens:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=max_tokens, replace=False))


def entropy_dynamics(
    hnorm_BxT,
    pred_entropy_BxT,
    positions_BxT,
    mask_BxT,
    *,
    fraction: float = 0.2,
    response_len_B=None,
    max_tokens: int = 65536,
    seed: int = 0,
) -> dict[str, float]:
    """Distribution of normalised attention entropy over a batch's valid response tokens.

    Args:
      hnorm_BxT: [B, T] normalised attention entropy Hnorm in [0, 1].
      pred_entropy_BxT: [B, T] predictive (next-token distribution) entropy, or None.
      positions_BxT: [B, T] token position (e.g. index within the response), or None.
      mask_BxT: [B, T] valid response tokens (bool or 0/1).
      fraction: anchor / explorer share f; thresholds are the f and 1 − f quantiles.
      response_len_B: [B] response lengths, or None; when given, length becomes a control.
      max_tokens: subsample size cap (seeded, without replacement).
      seed: subsampling seed.

    Returns:
      `entropy/num_tokens` (valid tokens before subsampling), `entropy/q10` … `entropy/q90`,
      `entropy/mean`, `entropy/std`, `entropy/anchor_threshold` (f quantile),
      `entropy/explorer_threshold` (1 − f quantile); with predictive entropy:
      `entropy/spearman_pred`, `entropy/anchor_pred_entropy`, `entropy/explorer_pred_entropy`
      (mean predictive entropy of the tokens at/below and at/above the thresholds); with
      positions: `entropy/spearman_pos`, `entropy/anchor_position`, `entropy/explorer_position`;
      with lengths: `entropy/spearman_len`; with both predictive entropy and positions:
      `controls/partial_corr_pred` (Hnorm vs predictive entropy, controlling position and
      length when given) and `controls/partial_corr_pos` (Hnorm vs position, controlling
      predictive entropy and length). NaN where a statistic is undefined (no valid tokens).
    """
    hv, pv, sv, lv, n_valid = _valid_token_columns(hnorm_BxT, pred_entropy_BxT, positions_BxT, mask_BxT,
                                                   fraction=fraction, response_len_B=response_len_B,
                                                   max_tokens=max_tokens, seed=seed)
    out: dict[str, float] = {"entropy/num_tokens": float(n_valid)}
    qs = [q / 100 for q in QUANTILES] + [fraction, 1.0 - fraction]
    qv = np.quantile(hv, qs) if hv.size else np.full(len(qs), _NAN)
    for q, v in zip(QUANTILES, qv):
        out[f"entropy/q{q}"] = float(v)
    lo, hi = float(qv[-2]), float(qv[-1])
    out["entropy/mean"] = float(hv.mean()) if hv.size else _NAN
    out["entropy/std"] = float(hv.std()) if hv.size else _NAN
    out["entropy/anchor_threshold"] = lo
    out["entropy/explorer_threshold"] = hi
    out.update(_split_statistics(hv, pv, sv, lv, anchors=hv <= lo, explorers=hv >= hi))
    return out


def _valid_token_columns(hnorm_BxT, pred_entropy_BxT, positions_BxT, mask_BxT, *, fraction: float,
                         response_len_B, max_tokens: int, seed: int):
    """`entropy_dynamics`' inputs checked and flattened to the valid tokens `[N]` (subsampled to at
    most `max_tokens`): (Hnorm, predictive entropy, position, response length, the number of valid
    tokens before subsampling); an absent input stays None."""
    fn = "entropy_dynamics"
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"{fn}: fraction must be in (0, 1), got {fraction}")
    h = np.asarray(hnorm_BxT, dtype=np.float64)
    if h.ndim != 2:
        raise ValueError(f"{fn}: hnorm must be [B, T], got shape {h.shape}")
    mask = np.asarray(mask_BxT)
    _check_shape("mask", mask, h.shape, fn)
    pred = None if pred_entropy_BxT is None else np.asarray(pred_entropy_BxT, dtype=np.float64)
    pos = None if positions_BxT is None else np.asarray(positions_BxT, dtype=np.float64)
    _check_shape("pred_entropy", pred, h.shape, fn)
    _check_shape("positions", pos, h.shape, fn)
    length = None
    if response_len_B is not None:
        rl = np.asarray(response_len_B, dtype=np.float64).reshape(-1)
        if rl.shape != (h.shape[0],):
            raise ValueError(f"{fn}: response_len has shape {rl.shape}, expected ({h.shape[0]},)")
        length = np.broadcast_to(rl[:, None], h.shape)

    valid = (mask > 0) & np.isfinite(h)
    idx = _subsample(int(valid.sum()), max_tokens, seed)
    columns = [None if x is None else (x[valid] if idx is None else x[valid][idx]) for x in (h, pred, pos, length)]
    return (*columns, int(valid.sum()))


def _split_statistics(hv, pv, sv, lv, *, anchors, explorers) -> dict[str, float]:
    """How attention entropy relates to predictive entropy, position and length over the valid
    tokens `[N]`, and the anchors' / explorers' means of each (`entropy_dynamics`' Returns)."""
    def subset_mean(v: np.ndarray, sel: np.ndarray) -> float:
        return float(v[sel].mean()) if sel.any() else _NAN

    out: dict[str, float] = {}
    if pv is not None:
        out["entropy/spearman_pred"] = stats.spearman(hv, pv)
        out["entropy/anchor_pred_entropy"] = subset_mean(pv, anchors)
        out["entropy/explorer_pred_entropy"] = subset_mean(pv, explorers)
    if sv is not None:
        out["entropy/spearman_pos"] = stats.spearman(hv, sv)
        out["entropy/anchor_position"] = subset_mean(sv, anchors)
        out["entropy/explorer_position"] = subset_mean(sv, explorers)
    if lv is not None:
        out["entropy/spearman_len"] = stats.spearman(hv, lv)
    if pv is not None and sv is not None:
        extra = [] if lv is None else [lv]
        out["controls/partial_corr_pred"] = stats.partial_correlation(hv, pv, np.stack([sv, *extra], axis=1))
        out["controls/partial_corr_pos"] = stats.partial_correlation(hv, sv, np.stack([pv, *extra], axis=1))
    return out


def control_correlations(
    hnorm,
    target,
    position=None,
    pred_entropy=None,
    resp_len=None,
    *,
    mask=None,
    prefix: str = "controls/",
    max_tokens: int = 65536,
    seed: int = 0,
) -> dict[str, float]:
    """Association of attention entropy with a per-token target, with and without confounders.

    The target is any per-token quantity (e.g. the alignment of a token's gradient with the
    full-batch gradient). The partial correlation regresses position, predictive entropy and
    response length (those given) out of both Hnorm and the target, so a relation that survives
    is not carried by those covariates.

    Args:
      hnorm, target: per-token arrays of one shape (e.g. [B, T] or [N]).
      position, pred_entropy: same shape as hnorm, or None to leave out.
      resp_len: same shape as hnorm (per token), or [B] (broadcast over T for [B, T] inputs),
        or None.
      mask: same shape as hnorm; tokens with mask <= 0 are ignored. Default: all tokens.
      prefix: prepended to every key.
      max_tokens, seed: seeded subsample cap, as in `entropy_dynamics`.

    Returns:
      `{prefix}raw_corr` (Pearson), `{prefix}raw_spearman`, `{prefix}partial_corr` (Pearson of
      the residuals), `{prefix}partial_spearman` (the same on ranks), `{prefix}n` (tokens used).
      With no covariate given, the partial values equal the raw ones.
    """
    fn = "control_correlations"
    h = np.asarray(hnorm, dtype=np.float64)
    tgt = np.asarray(target, dtype=np.float64)
    _check_shape("target", tgt, h.shape, fn)
    covs = []
    for name, c in (("position", position), ("pred_entropy", pred_entropy), ("resp_len", resp_len)):
        if c is None:
            continue
        c = np.asarray(c, dtype=np.float64)
        if name == "resp_len" and h.ndim == 2 and c.shape == (h.shape[0],):
            c = np.broadcast_to(c[:, None], h.shape)
        _check_shape(name, c, h.shape, fn)
        covs.append(c)
    keep = np.ones(h.shape, dtype=bool) if mask is None else np.asarray(mask) > 0
    _check_shape("mask", keep, h.shape, fn)
    hv, tv = h[keep], tgt[keep]
    cv = [c[keep] for c in covs]
    idx = _subsample(hv.size, max_tokens, seed)
    if idx is not None:
        hv, tv, cv = hv[idx], tv[idx], [c[idx] for c in cv]
    # Drop incomplete rows once, so raw and partial values use the same tokens and the ranks
    # of the Spearman variants are taken over exactly those tokens.
    z = np.stack(cv, axis=1) if cv else np.zeros((hv.size, 0))
    ok = np.isfinite(hv) & np.isfinite(tv) & np.isfinite(z).all(axis=1)
    hv, tv, z = hv[ok], tv[ok], z[ok]
    zr = np.stack([rankdata(c) for c in z.T], axis=1) if z.shape[1] else z
    return {
        f"{prefix}raw_corr": stats.pearson(hv, tv),
        f"{prefix}raw_spearman": stats.spearman(hv, tv),
        f"{prefix}partial_corr": stats.partial_correlation(hv, tv, z),
        f"{prefix}partial_spearman": stats.partial_correlation(rankdata(hv), rankdata(tv), zr),
        f"{prefix}n": float(hv.size),
    }
