"""Statistics for evaluation and analysis: pass@k / mean@k, rank and partial correlations,
covariate-matched token subsets, paired tests and run summaries.

Pure numpy/scipy functions on host arrays. They are used by the evaluator (pass@k, mean@k),
by the per-step entropy diagnostics (`jaxrl_entropy.rl.entropy_stats`) and by `analyze`
(summaries and paired tests across seeds). The statistics themselves are scipy's (hypergeometric
tail, pearsonr, spearmanr, ttest_rel, wilcoxon); what is written here is the policy around them
(NaN rows dropped, undefined cases as NaN, no warnings) and what scipy lacks: the partial
correlation and covariate-matched subsets.

Conventions shared by the correlation functions: rows where any input is NaN (or ±inf) are
dropped first; if fewer than 3 rows remain, or an input (or a residual) has zero variance, the
correlation is undefined and NaN is returned rather than 0, so an undefined value is never
mistaken for "no association".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import scipy.stats

__all__ = [
    "pass_at_k",
    "mean_at_k",
    "pearson",
    "spearman",
    "partial_correlation",
    "matched_subsets",
    "paired_test",
    "summarize",
]

# Relative tolerance below which a centred vector counts as constant (zero variance).
_ZERO_VAR_RTOL = 1e-12
# Wilcoxon's exact two-sided p-value is at least 2 / 2^n: n = 5 gives 1/16 > 0.05.
_MIN_WILCOXON_PAIRS = 6


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from n samples of which c are correct.

    pass@k = 1 − C(n−c, k) / C(n, k), the probability that a random k-subset of the n samples
    contains at least one correct sample (Chen et al. 2021): the hypergeometric tail P(X ≥ 1) for
    k draws without replacement from n items of which c are marked, which scipy evaluates without
    forming the huge binomials.

    Raises:
      ValueError: unless 0 ≤ c ≤ n and 1 ≤ k ≤ n.
    """
    n, c, k = int(n), int(c), int(k)
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(
            f"pass_at_k: need 1 <= k <= n (k samples drawn from n), got k={k}, n={n}; "
            "sample more responses per problem or lower k"
        )
    return float(scipy.stats.hypergeom.sf(0, n, c, k))


def _as_correct_matrix(correct: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(correct, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(
            f"{name}: expected a non-empty [problems, samples] array of 0/1 correctness, "
            f"got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: correctness array contains NaN or inf")
    return arr


def mean_at_k(correct_PxK: np.ndarray) -> float:
    """Mean accuracy over k samples per problem (mean@k), averaged over problems.

    Args:
      correct_PxK: [P, K] correctness (bool or scores in [0, 1]) of K samples for P problems.
    """
    arr = _as_correct_matrix(correct_PxK, "mean_at_k")
    return float(arr.mean(axis=1).mean())


def _finite_rows(*arrays: np.ndarray) -> np.ndarray:
    keep = np.ones(arrays[0].shape[0], dtype=bool)
    for a in arrays:
        keep &= np.isfinite(a) if a.ndim == 1 else np.isfinite(a).all(axis=1)
    return keep


def _flat_pair(x, y, fn: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"{fn}: x and y must have the same number of elements, got {x.size} and {y.size}")
    keep = _finite_rows(x, y)
    return x[keep], y[keep]


def _negligible(v: np.ndarray, scale: float) -> bool:
    """Whether centred (or residual) `v` is zero up to rounding, relative to the data's magnitude
    `scale` (so a variance of 1e-20 in data of size 1e-9 still counts, but not in data of size 1)."""
    return bool(np.linalg.norm(v) <= _ZERO_VAR_RTOL * math.sqrt(v.size) * max(scale, 1e-300))


def _is_constant(v: np.ndarray) -> bool:
    return _negligible(v - v.mean(), float(np.abs(v).max()))


def pearson(x, y) -> float:
    """Pearson correlation of x and y (any shapes with the same size, flattened).

    NaN-safe: pairs with a NaN are dropped; NaN when < 3 pairs remain or either side is constant.
    """
    x, y = _flat_pair(x, y, "pearson")
    if x.size < 3 or _is_constant(x) or _is_constant(y):
        return float("nan")
    return float(scipy.stats.pearsonr(x, y).statistic)


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson correlation of the average ranks (ties share a rank).

    NaN-safe: pairs with a NaN are dropped; NaN when < 3 pairs remain or either side is constant
    (a constant variable has no ordering, so the rank correlation is undefined, not 0).
    """
    x, y = _flat_pair(x, y, "spearman")
    # Ranks see only the order, so "constant" is exact equality here, not a tolerance.
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(scipy.stats.spearmanr(x, y).statistic)


def _design(covariates_NxC: np.ndarray) -> np.ndarray:
    """[N, 1 + C'] intercept and standardised non-constant covariate columns.

    Standardising does not change the span (the intercept is in it) but keeps covariates on very
    different scales (position in the thousands, entropy below 1) from making lstsq's rank
    decision scale-dependent; constant columns are dropped, the intercept already spans them.
    """
    cols = [np.ones(covariates_NxC.shape[0])]
    for c in covariates_NxC.T:
        centred = c - c.mean()
        if not _negligible(centred, float(np.abs(c).max())):
            cols.append(centred / np.linalg.norm(centred))
    return np.stack(cols, axis=1)


def partial_correlation(x, y, covariates_NxC) -> float:
    """Correlation of x and y after removing what the covariates explain linearly.

    The Pearson correlation of the least-squares residuals of x and of y on [1, covariates].
    Used to show that an association with attention entropy is not carried by position,
    predictive entropy or response length. (scipy has no partial correlation.)

    Args:
      x, y: [N] variables.
      covariates_NxC: [N, C] (or [N] for one covariate). Collinear or constant covariates are
        allowed (the least-squares fit is rank-revealing).

    Returns:
      The partial correlation in [−1, 1]; NaN when fewer than C + 3 complete rows remain or a
      residual is (numerically) zero.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    z = np.asarray(covariates_NxC, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or not (x.shape[0] == y.shape[0] == z.shape[0]):
        raise ValueError(
            "partial_correlation: expected x [N], y [N], covariates [N, C]; got "
            f"x {x.shape}, y {y.shape}, covariates {np.shape(covariates_NxC)}"
        )
    keep = _finite_rows(x, y, z)
    x, y, z = x[keep], y[keep], z[keep]
    if x.size < z.shape[1] + 3:
        return float("nan")
    design_NxP = _design(z)
    xy_Nx2 = np.stack([x, y], axis=1)
    coef_Px2 = np.linalg.lstsq(design_NxP, xy_Nx2, rcond=None)[0]
    rx, ry = (xy_Nx2 - design_NxP @ coef_Px2).T
    if _negligible(rx, float(np.abs(x).max())) or _negligible(ry, float(np.abs(y).max())):
        return float("nan")
    return float(scipy.stats.pearsonr(rx, ry).statistic)


def _quantile_bins(col: np.ndarray, bins: int) -> np.ndarray:
    """Bin index in [0, bins) from the empirical quantiles of `col` (ties stay in one bin)."""
    edges = np.quantile(col, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    return np.searchsorted(edges, col, side="right")


def matched_subsets(
    score,
    strata_NxC,
    fraction: float,
    *,
    bins: int = 5,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Low- and high-score token subsets with identical covariate distributions.

    Each covariate column is cut into `bins` quantile bins; the joint bin tuple is a stratum.
    Within every stratum of size n_s, the m_s = min(round(fraction·n_s), ⌊n_s/2⌋) lowest-score
    and the m_s highest-score tokens are taken. Both subsets therefore hold exactly the same
    number of tokens from every stratum, so a difference between them cannot come from the
    (binned) covariates — e.g. anchors vs explorers matched on position and predictive entropy.

    Args:
      score: [N] the score to contrast (e.g. normalised attention entropy).
      strata_NxC: [N, C] (or [N]) covariates to match on.
      fraction: share of each stratum per subset, in (0, 0.5].
      bins: quantile bins per covariate.
      seed: breaks score ties at random (reproducibly), so ties don't favour low indices.

    Returns:
      (low_idx, high_idx): sorted int64 indices into the N rows, disjoint, of equal size.
      Rows with a NaN score or covariate are never selected.
    """
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    z = np.asarray(strata_NxC, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or z.shape[0] != score.shape[0]:
        raise ValueError(
            f"matched_subsets: expected score [N] and strata [N, C], got {score.shape} and "
            f"{np.shape(strata_NxC)}"
        )
    if not 0.0 < fraction <= 0.5:
        raise ValueError(
            f"matched_subsets: fraction must be in (0, 0.5] so the two subsets can be disjoint, got {fraction}"
        )
    if bins < 1:
        raise ValueError(f"matched_subsets: bins must be >= 1, got {bins}")
    valid = np.flatnonzero(_finite_rows(score, z))
    empty = np.zeros(0, dtype=np.int64)
    if valid.size == 0:
        return empty, empty
    s, zv = score[valid], z[valid]
    bin_NxC = np.stack([_quantile_bins(zv[:, j], bins) for j in range(zv.shape[1])], axis=1)
    _, stratum = np.unique(bin_NxC, axis=0, return_inverse=True)
    stratum = stratum.reshape(-1)
    tiebreak = np.random.default_rng(seed).random(valid.size)
    # Sort by (stratum, score, random tiebreak): each stratum becomes a contiguous run in score order.
    order = np.lexsort((tiebreak, s, stratum))
    starts = np.flatnonzero(np.r_[True, np.diff(stratum[order]) != 0])
    ends = np.r_[starts[1:], order.size]
    low, high = [], []
    for a, b in zip(starts, ends):
        n_s = int(b - a)
        m = min(int(math.floor(fraction * n_s + 0.5)), n_s // 2)
        if m:
            low.append(order[a : a + m])
            high.append(order[b - m : b])
    if not low:
        return empty, empty
    return np.sort(valid[np.concatenate(low)]), np.sort(valid[np.concatenate(high)])


def complement_cosine(norm_s, proj_s, norm_full, tokens_s, tokens_full) -> tuple[np.ndarray, np.ndarray]:
    """(cos_rest, self_share) of a token subset S's gradient from what the gradient probe logs.

    With per-token gradients ∇ℓ_t, the subset's gradient is g_S = mean over S and the full one
    g = mean over all N tokens, so N·g = |S|·g_S + |R|·g_R exactly, R the other tokens. Hence

        cos(g_S, g) = self_share + (|R|/N)·(‖g_R‖/‖g‖)·cos_rest,   self_share = (|S|/N)·‖g_S‖/‖g‖,

    where self_share is the subset's own part of the full gradient (a subset of large per-token
    gradients is "aligned" with a sum it dominates) and cos_rest = cos(g_S, g_R) its alignment with
    every other token. Inputs (arrays of one shape): ‖g_S‖ (`norm`), the projection of g_S on g's
    direction (`proj_full`), ‖g‖, |S| and N (`tokens`). NaN where R is empty or a norm is 0."""
    ns, ps, nf = (np.asarray(x, dtype=np.float64) for x in (norm_s, proj_s, norm_full))
    s, n = np.asarray(tokens_s, dtype=np.float64), np.asarray(tokens_full, dtype=np.float64)
    r = n - s
    with np.errstate(divide="ignore", invalid="ignore"):
        dot_full = ps * nf                                          # <g_S, g>
        dot_rest = (n * dot_full - s * ns**2) / r                   # <g_S, g_R>
        norm_rest = np.sqrt(np.maximum(n**2 * nf**2 - 2 * n * s * dot_full + s**2 * ns**2, 0.0)) / r
        cos_rest = dot_rest / (ns * norm_rest)
        share = s / n * ns / nf
    bad = (r <= 0) | (ns <= 0) | ~(norm_rest > 0)
    return np.where(bad, np.nan, cos_rest), np.where(nf > 0, share, np.nan)


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired comparison of two conditions measured on the same units (e.g. seeds).

    Returns a dict with
      mean_diff: mean of a − b;
      t, p_t: paired t statistic (n − 1 degrees of freedom) and its two-sided p-value
        (`scipy.stats.ttest_rel`);
      p_greater: the one-sided p-value of the same t-test for "a > b" (a pre-registered
        directional hypothesis, e.g. "soft beats full"): p_t / 2 when t > 0, 1 − p_t / 2 otherwise;
      p_wilcoxon: two-sided Wilcoxon signed-rank p-value (`scipy.stats.wilcoxon`) when n ≥ 6
        (with fewer pairs the exact two-sided p is at least 1/16, so it cannot reach conventional
        significance; NaN), NaN also when all differences are 0;
      n: number of complete pairs (pairs with a NaN are dropped).
    t and p_t are NaN when n < 2 or the differences have zero variance (scipy would give ±inf
    or NaN with a warning).
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired_test: a and b must pair up, got {a.size} and {b.size} values")
    keep = _finite_rows(a, b)
    a, b = a[keep], b[keep]
    d = a - b
    n = int(d.size)
    nan = float("nan")
    out = {"mean_diff": float(d.mean()) if n else nan, "t": nan, "p_t": nan, "p_greater": nan, "p_wilcoxon": nan,
           "n": n}
    if n >= 2 and not _is_constant(d):
        res = scipy.stats.ttest_rel(a, b)
        out["t"], out["p_t"] = float(res.statistic), float(res.pvalue)
        out["p_greater"] = float(res.pvalue / 2 if res.statistic > 0 else 1 - res.pvalue / 2)
    if n >= _MIN_WILCOXON_PAIRS and np.any(d != 0):
        out["p_wilcoxon"] = float(scipy.stats.wilcoxon(d).pvalue)
    return out


def summarize(values: Iterable[float]) -> dict[str, float]:
    """mean, std (ddof=1), n and standard error of the finite values (NaN/inf are dropped).

    std and sem are NaN for a single value (a spread needs two runs); mean is NaN when n = 0.
    """
    v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    v = v.reshape(-1)
    v = v[np.isfinite(v)]
    n = int(v.size)
    nan = float("nan")
    mean = float(v.mean()) if n else nan
    std = float(v.std(ddof=1)) if n >= 2 else nan
    sem = std / math.sqrt(n) if n >= 2 else nan
    return {"mean": mean, "std": std, "n": n, "sem": sem}
