"""Tests for jaxrl_entropy.stats and jaxrl_entropy.rl.entropy_stats.

Oracles (`tests/oracles.py`), none of them the scipy call the code makes: brute-force
enumeration (pass@k, the exact Wilcoxon distribution), exact rational arithmetic, ranks by
counting, textbook Pearson, the partial correlation from the inverse correlation matrix and in
closed form for one covariate, the t distribution's closed-form series (Abramowitz & Stegun
26.7.3/4), and np.quantile on the masked values.
"""

from __future__ import annotations

import itertools
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest

import oracles
from jaxrl_entropy import stats
from jaxrl_entropy.rl import entropy_stats


# ----------------------------------------------------------------------------- oracles


def _pass_at_k_brute(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (the first c correct) that contain a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def _closed_form_partial(x, y, z) -> float:
    """First-order partial correlation (r_xy − r_xz r_yz) / sqrt((1 − r_xz²)(1 − r_yz²))."""
    r = np.corrcoef(np.vstack([x, y, z]))
    rxy, rxz, ryz = r[0, 1], r[0, 2], r[1, 2]
    return (rxy - rxz * ryz) / math.sqrt((1 - rxz**2) * (1 - ryz**2))


# ----------------------------------------------------------------------------- pass@k, mean@k


def test_pass_at_k_matches_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert stats.pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_matches_exact_rationals():
    # C(1000, 100) overflows float64; the product form must still be exact to ~1e-12.
    for n, c, k in [(1000, 3, 100), (1000, 1, 1), (500, 250, 64), (200, 0, 10)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert stats.pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k"):
        stats.pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c"):
        stats.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        stats.pass_at_k(4, 1, 0)


def test_mean_at_k_by_hand():
    correct = np.array([[1, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=bool)
    assert stats.mean_at_k(correct) == pytest.approx((0.75 + 0.25 + 1.0) / 3)
    with pytest.raises(ValueError, match="shape"):
        stats.mean_at_k(np.ones(4))


# ----------------------------------------------------------------------------- correlations


def test_spearman_matches_ranks_by_counting_with_ties_and_nans():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 200).astype(float)  # many ties
    y = x + rng.normal(size=200)
    assert stats.spearman(x, y) == pytest.approx(oracles.spearman(x, y), abs=1e-12)
    x_nan, y_nan = x.copy(), y.copy()
    x_nan[[3, 10]] = np.nan
    y_nan[50] = np.nan
    keep = np.isfinite(x_nan) & np.isfinite(y_nan)
    assert stats.spearman(x_nan, y_nan) == pytest.approx(oracles.spearman(x[keep], y[keep]), abs=1e-12)
    # 2-D inputs are flattened.
    assert stats.spearman(x.reshape(20, 10), y.reshape(20, 10)) == pytest.approx(
        oracles.spearman(x, y), abs=1e-12)


def test_spearman_undefined_cases_are_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy warns on constant input; the NaN policy is ours
        assert math.isnan(stats.spearman([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]))
        assert math.isnan(stats.spearman([1.0, 2.0], [2.0, 1.0]))
        assert math.isnan(stats.spearman([np.nan] * 5, [1.0, 2.0, 3.0, 4.0, 5.0]))
        assert math.isnan(stats.pearson([2.0, 2.0, 2.0, 2.0], [1.0, 2.0, 3.0, 4.0]))
    # Ranks see order only: values 1e-15 apart are distinct, and perfectly ordered.
    assert stats.spearman([1.0, 1.0 + 1e-15, 1.0 + 2e-15], [3.0, 5.0, 9.0]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_pearson_matches_the_textbook_formula():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=100), rng.normal(size=100)
    assert stats.pearson(x, y) == pytest.approx(oracles.pearson(x, y), abs=1e-12)
    x[5] = np.nan
    keep = np.isfinite(x)
    assert stats.pearson(x, y) == pytest.approx(oracles.pearson(x[keep], y[keep]), abs=1e-12)


def test_partial_correlation_matches_the_inverse_correlation_matrix():
    rng = np.random.default_rng(2)
    n = 400
    z = np.column_stack([rng.integers(0, 3000, n), rng.random(n), rng.normal(size=n) * 50])
    x = 0.001 * z[:, 0] + rng.normal(size=n)
    y = 0.5 * x + 2 * z[:, 1] + rng.normal(size=n)
    assert stats.partial_correlation(x, y, z) == pytest.approx(oracles.partial_by_precision(x, y, z), abs=1e-10)


def test_partial_correlation_one_covariate_closed_form():
    rng = np.random.default_rng(3)
    z = rng.normal(size=300)
    x = z + rng.normal(size=300)
    y = 0.3 * x - z + rng.normal(size=300)
    expected = _closed_form_partial(x, y, z)
    assert stats.partial_correlation(x, y, z) == pytest.approx(expected, abs=1e-10)
    assert stats.partial_correlation(x, y, z[:, None]) == pytest.approx(expected, abs=1e-10)


def test_partial_correlation_removes_a_common_cause():
    rng = np.random.default_rng(4)
    n = 5000
    z = rng.normal(size=n)
    x = z + 0.3 * rng.normal(size=n)
    y = z + 0.3 * rng.normal(size=n)
    assert np.corrcoef(x, y)[0, 1] > 0.8
    assert abs(stats.partial_correlation(x, y, z)) < 0.06  # ~ N(0, 1/sqrt(n)) under independence


def test_partial_correlation_collinear_and_constant_covariates():
    rng = np.random.default_rng(5)
    z = rng.normal(size=200)
    x, y = z + rng.normal(size=200), z + rng.normal(size=200)
    single = _closed_form_partial(x, y, z)
    degenerate = np.column_stack([z, 2 * z + 1, np.full(200, 7.0)])  # duplicate + constant
    assert stats.partial_correlation(x, y, degenerate) == pytest.approx(single, abs=1e-10)
    assert math.isnan(stats.partial_correlation(z, y, z))  # x fully explained: zero residual


def test_partial_correlation_with_no_covariates_is_pearson():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert stats.partial_correlation(x, y, np.zeros((50, 0))) == pytest.approx(oracles.pearson(x, y))


# ----------------------------------------------------------------------------- matched subsets


def test_matched_subsets_balance_covariates_and_separate_scores():
    rng = np.random.default_rng(7)
    n = 6000
    position = rng.integers(0, 2000, n).astype(float)
    pred_entropy = rng.gamma(2.0, 0.5, n)
    # The score is confounded with both covariates, so unmatched extremes differ in position.
    score = 0.0004 * position + 0.3 * pred_entropy + rng.normal(scale=0.3, size=n)
    strata = np.column_stack([position, pred_entropy])
    low, high = stats.matched_subsets(score, strata, 0.2, bins=5, seed=0)

    assert low.size == high.size
    assert abs(low.size - 0.2 * n) <= 25  # per-stratum rounding only
    assert np.intersect1d(low, high).size == 0
    assert np.all(np.diff(low) > 0) and np.all(np.diff(high) > 0)

    # Oracle binning, written independently: quintile edges, np.digitize.
    bins = [np.digitize(c, np.quantile(c, [0.2, 0.4, 0.6, 0.8])) for c in strata.T]
    joint = bins[0] * 5 + bins[1]
    np.testing.assert_array_equal(np.bincount(joint[low], minlength=25), np.bincount(joint[high], minlength=25))
    for b in bins:
        np.testing.assert_array_equal(np.bincount(b[low], minlength=5), np.bincount(b[high], minlength=5))
    # Within each stratum, every selected low score is below every selected high score.
    for s in np.unique(joint[low]):
        assert score[low][joint[low] == s].max() <= score[high][joint[high] == s].min()
    assert score[low].mean() < score[high].mean() - 0.3

    # Sanity of the set-up: the *unmatched* bottom/top 20% differ strongly in position.
    q_lo, q_hi = np.quantile(score, [0.2, 0.8])
    assert position[score >= q_hi].mean() - position[score <= q_lo].mean() > 300
    assert abs(position[high].mean() - position[low].mean()) < 100


def test_matched_subsets_ties_nan_and_errors():
    score = np.zeros(100)  # all tied: the seeded tiebreak decides, still disjoint and balanced
    strata = np.repeat(np.arange(4.0), 25)
    a_low, a_high = stats.matched_subsets(score, strata, 0.2, bins=4, seed=1)
    b_low, _ = stats.matched_subsets(score, strata, 0.2, bins=4, seed=1)
    np.testing.assert_array_equal(a_low, b_low)
    assert a_low.size == a_high.size == 20 and np.intersect1d(a_low, a_high).size == 0
    score_nan = np.arange(100.0)
    score_nan[:10] = np.nan
    low, high = stats.matched_subsets(score_nan, strata, 0.2, bins=4)
    assert not np.isin(np.arange(10), np.concatenate([low, high])).any()
    with pytest.raises(ValueError, match="fraction"):
        stats.matched_subsets(score, strata, 0.6)
    with pytest.raises(ValueError, match="strata"):
        stats.matched_subsets(score, strata[:50], 0.2)


# ----------------------------------------------------------------------------- paired test, summary


def test_paired_test_matches_hand_t_and_enumerated_wilcoxon():
    rng = np.random.default_rng(8)
    a = rng.normal(0.45, 0.05, 8)
    b = a - 0.02 + rng.normal(0, 0.01, 8)
    res = stats.paired_test(a, b)
    t, p = oracles.paired_t(a, b)
    assert res["n"] == 8
    assert res["mean_diff"] == pytest.approx(float(np.mean(a - b)))
    assert res["t"] == pytest.approx(t, rel=1e-10)
    assert res["p_t"] == pytest.approx(p, rel=1e-8)
    assert res["p_wilcoxon"] == pytest.approx(oracles.wilcoxon_exact_p(a - b), rel=1e-12)


def test_paired_test_small_and_degenerate():
    res = stats.paired_test([0.5, 0.6, 0.7], [0.4, 0.6, 0.5])
    # d = (0.1, 0, 0.2): mean 0.1, sd 0.1, t = 0.1 / (0.1 / sqrt 3) = sqrt 3; df = 2: p = 1 − t / sqrt(2 + t²)
    assert res["t"] == pytest.approx(math.sqrt(3)) and res["p_t"] == pytest.approx(1 - math.sqrt(3) / math.sqrt(5))
    assert math.isnan(res["p_wilcoxon"])  # n < 6
    # one-sided "a > b" with df = 2: P(T > t) = 1/2 − t / (2 sqrt(2 + t²)); the other way round, 1 − that
    upper = 0.5 - math.sqrt(3) / (2 * math.sqrt(5))
    assert res["p_greater"] == pytest.approx(upper)
    assert stats.paired_test([0.4, 0.6, 0.5], [0.5, 0.6, 0.7])["p_greater"] == pytest.approx(1 - upper)
    res = stats.paired_test([1.0, np.nan, 2.0], [0.0, 5.0, 1.5])
    assert res["n"] == 2 and res["mean_diff"] == pytest.approx(0.75)
    same = stats.paired_test([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6])
    assert same["mean_diff"] == 0 and math.isnan(same["t"]) and math.isnan(same["p_wilcoxon"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # a constant shift (up to rounding): zero variance, so no t (scipy would say ±inf)
        shift = stats.paired_test([1.1, 2.1, 3.1, 4.1], [1.0, 2.0, 3.0, 4.0])
    assert shift["mean_diff"] == pytest.approx(0.1) and math.isnan(shift["t"]) and math.isnan(shift["p_t"])
    with pytest.raises(ValueError, match="pair"):
        stats.paired_test([1, 2], [1, 2, 3])


def test_summarize_by_hand():
    s = stats.summarize([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert s["n"] == 4 and s["mean"] == pytest.approx(2.5)
    assert s["std"] == pytest.approx(math.sqrt(5 / 3))
    assert s["sem"] == pytest.approx(math.sqrt(5 / 3) / 2)
    one = stats.summarize([0.7])
    assert one["n"] == 1 and one["mean"] == 0.7 and math.isnan(one["std"]) and math.isnan(one["sem"])
    assert stats.summarize([])["n"] == 0


# ----------------------------------------------------------------------------- entropy_dynamics


def _batch(seed=0, b=6, t=40):
    rng = np.random.default_rng(seed)
    lens = rng.integers(5, t + 1, b)
    mask = np.arange(t)[None, :] < lens[:, None]
    pos = np.broadcast_to(np.arange(t, dtype=float), (b, t)).copy()
    pred = rng.gamma(2.0, 0.5, (b, t))
    hnorm = np.clip(0.5 + 0.005 * pos - 0.1 * pred + rng.normal(0, 0.1, (b, t)), 0, 1)
    hnorm[~mask] = 99.0  # padding garbage must be ignored
    return hnorm, pred, pos, mask, lens


def test_entropy_dynamics_matches_numpy_on_masked_values():
    hnorm, pred, pos, mask, lens = _batch()
    out = entropy_stats.entropy_dynamics(hnorm, pred, pos, mask, fraction=0.2, response_len_B=lens)
    h, p, s = hnorm[mask], pred[mask], pos[mask]
    ln = np.broadcast_to(lens[:, None], mask.shape)[mask].astype(float)
    assert out["entropy/num_tokens"] == mask.sum()
    for q in (10, 25, 50, 75, 90):
        assert out[f"entropy/q{q}"] == pytest.approx(np.quantile(h, q / 100), abs=1e-12)
    assert out["entropy/anchor_threshold"] == pytest.approx(np.quantile(h, 0.2), abs=1e-12)
    assert out["entropy/explorer_threshold"] == pytest.approx(np.quantile(h, 0.8), abs=1e-12)
    assert out["entropy/mean"] == pytest.approx(h.mean())
    assert out["entropy/spearman_pred"] == pytest.approx(oracles.spearman(h, p), abs=1e-12)
    assert out["entropy/spearman_pos"] == pytest.approx(oracles.spearman(h, s), abs=1e-12)
    assert out["entropy/spearman_len"] == pytest.approx(oracles.spearman(h, ln), abs=1e-12)
    assert out["controls/partial_corr_pred"] == pytest.approx(
        oracles.partial_by_precision(h, p, np.column_stack([s, ln])), abs=1e-10)
    assert out["controls/partial_corr_pos"] == pytest.approx(
        oracles.partial_by_precision(h, s, np.column_stack([p, ln])), abs=1e-10)
    lo, hi = np.quantile(h, [0.2, 0.8])
    assert out["entropy/anchor_pred_entropy"] == pytest.approx(p[h <= lo].mean())
    assert out["entropy/explorer_position"] == pytest.approx(s[h >= hi].mean())


def test_entropy_dynamics_optional_inputs_and_empty_batch():
    hnorm, pred, pos, mask, _ = _batch(1)
    out = entropy_stats.entropy_dynamics(hnorm, None, None, mask)
    assert "entropy/spearman_pred" not in out and "controls/partial_corr_pred" not in out
    assert out["entropy/q50"] == pytest.approx(np.median(hnorm[mask]))
    empty = entropy_stats.entropy_dynamics(hnorm, pred, pos, np.zeros_like(mask))
    assert empty["entropy/num_tokens"] == 0 and math.isnan(empty["entropy/q50"])
    with pytest.raises(ValueError, match="mask"):
        entropy_stats.entropy_dynamics(hnorm, pred, pos, mask[:, :5])


def test_entropy_dynamics_subsamples_deterministically():
    rng = np.random.default_rng(9)
    hnorm = rng.random((50, 400))
    mask = np.ones_like(hnorm, dtype=bool)
    a = entropy_stats.entropy_dynamics(hnorm, None, None, mask, max_tokens=2000, seed=3)
    b = entropy_stats.entropy_dynamics(hnorm, None, None, mask, max_tokens=2000, seed=3)
    c = entropy_stats.entropy_dynamics(hnorm, None, None, mask, max_tokens=2000, seed=4)
    assert a == b and a["entropy/q50"] != c["entropy/q50"]
    assert a["entropy/num_tokens"] == 20000
    for q in (10, 50, 90):  # uniform(0,1): quantile estimates from 2000 samples are within ~0.03
        assert a[f"entropy/q{q}"] == pytest.approx(q / 100, abs=0.04)


def test_control_correlations_separate_confounded_and_real_links():
    rng = np.random.default_rng(10)
    b, t = 40, 100
    pos = np.broadcast_to(np.arange(t, dtype=float), (b, t))
    pred = rng.gamma(2.0, 0.5, (b, t))
    lens = rng.integers(20, t + 1, b)
    hnorm = 0.01 * pos + 0.15 * rng.normal(size=(b, t))
    mask = pos < lens[:, None]
    # A target driven by position only: the raw link with hnorm is strong, the partial one vanishes.
    confounded = 0.01 * pos + 0.15 * rng.normal(size=(b, t))
    out = entropy_stats.control_correlations(hnorm, confounded, pos, pred, lens, mask=mask)
    assert out["controls/raw_corr"] > 0.5 and abs(out["controls/partial_corr"]) < 0.06
    assert out["controls/n"] == mask.sum()
    # A target that depends on hnorm itself keeps its link after the controls.
    real = hnorm + 0.3 * rng.normal(size=(b, t))
    out = entropy_stats.control_correlations(hnorm, real, pos, pred, lens, mask=mask, prefix="ga/")
    h, y = hnorm[mask], real[mask]
    z = np.column_stack([pos[mask], pred[mask], np.broadcast_to(lens[:, None], mask.shape)[mask]])
    assert out["ga/partial_corr"] == pytest.approx(oracles.partial_by_precision(h, y, z), abs=1e-10)
    assert out["ga/raw_corr"] == pytest.approx(oracles.pearson(h, y), abs=1e-12)
    assert out["ga/raw_spearman"] == pytest.approx(oracles.spearman(h, y), abs=1e-12)
    rz = np.column_stack([oracles.average_ranks(c) for c in z.T])
    assert out["ga/partial_spearman"] == pytest.approx(
        oracles.partial_by_precision(oracles.average_ranks(h), oracles.average_ranks(y), rz), abs=1e-10)
    assert out["ga/partial_corr"] > 0.4


def test_complement_cosine_against_the_gradients_themselves():
    # per-token "gradients" with a shared direction and per-token scales; S = the largest ones
    rng = np.random.default_rng(3)
    shared = rng.normal(size=50)
    g_T = rng.normal(size=(40, 50)) * rng.uniform(0.2, 3.0, size=(40, 1)) + 0.3 * shared
    sel = np.argsort(-np.linalg.norm(g_T, axis=1))[:8]
    rest = np.setdiff1d(np.arange(40), sel)
    g_s, g_r, g = g_T[sel].mean(0), g_T[rest].mean(0), g_T.mean(0)
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    proj = float(g_s @ g / np.linalg.norm(g))
    cos_rest, share = stats.complement_cosine(np.linalg.norm(g_s), proj, np.linalg.norm(g), 8, 40)
    assert float(cos_rest) == pytest.approx(cos(g_s, g_r), rel=1e-9)
    assert float(share) == pytest.approx(8 / 40 * np.linalg.norm(g_s) / np.linalg.norm(g), rel=1e-12)
    # the decomposition of cos_full it states
    assert cos(g_s, g) == pytest.approx(
        float(share) + 32 / 40 * np.linalg.norm(g_r) / np.linalg.norm(g) * cos(g_s, g_r), rel=1e-9)
    # no other tokens: undefined
    assert np.isnan(stats.complement_cosine(1.0, 1.0, 1.0, 40, 40)[0])
