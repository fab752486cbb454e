"""Token weights: selection rules vs brute-force numpy, soft weights vs hand formulas, and the check
that every mode really changes which tokens carry gradient."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy.stats import rankdata

from jaxrl_entropy.rl.loss import loss_denominator, policy_loss
from jaxrl_entropy.rl import token_weights as tw
from jaxrl_entropy.rl.token_weights import MODES, SoftConfig, normalized_entropy, soft_schedule

# Jitted once per module: one compile per shape instead of one per eager primitive.
select_fraction = jax.jit(tw.select_fraction, static_argnames="highest")
rank_uniform = jax.jit(tw.rank_uniform)
masked_quantile = jax.jit(tw.masked_quantile)
token_weights = jax.jit(tw.token_weights, static_argnames=("mode", "soft", "fraction"))


# ---------------------------------------------------------------- numpy oracles
def np_k(fraction, n):
    k = int(round(fraction * n))
    if n > 0 and fraction > 0:
        k = max(k, 1)
    return min(k, n)


def np_select(score, mask, fraction, highest):
    """Brute force: sort the valid flat indices by (score, index); take the first k."""
    flat_s = np.asarray(score, np.float64).ravel()
    valid = np.flatnonzero(np.asarray(mask).ravel())
    key = -flat_s[valid] if highest else flat_s[valid]
    order = valid[np.lexsort((valid, key))]
    sel = np.zeros(flat_s.size, bool)
    sel[order[:np_k(fraction, len(valid))]] = True
    return sel.reshape(np.shape(score))


def np_rank_u(score, mask):
    u = np.zeros(np.shape(score))
    m = np.asarray(mask, bool)
    n = m.sum()
    if n == 1:
        u[m] = 0.5
    elif n > 1:
        u[m] = (rankdata(np.asarray(score)[m], method="average") - 1) / (n - 1)
    return u


def make_batch(seed, b=4, t=9, n_levels=None):
    rng = np.random.default_rng(seed)
    if n_levels:  # few distinct values → many ties
        score = rng.integers(0, n_levels, (b, t)).astype(np.float32)
    else:
        score = rng.random((b, t)).astype(np.float32)
    lengths = rng.integers(1, t + 1, b)
    mask = np.arange(t)[None, :] < lengths[:, None]   # right padding
    return score, mask


# ---------------------------------------------------------------- basics
def test_normalized_entropy():
    n = np.array([[0, 1, 2, 10, 100]], np.float32)
    h = np.array([[0.3, 0.3, math.log(2), 1.0, 10.0]], np.float32)
    got = np.asarray(normalized_entropy(h, n))
    np.testing.assert_allclose(got, [[0, 0, 1.0, 1.0 / math.log(10), 1.0]], rtol=1e-6)


@pytest.mark.parametrize("n_valid,fraction,k", [
    (10, 0.2, 2), (7, 0.2, 1), (8, 0.2, 2), (3, 0.1, 1), (0, 0.2, 0), (6, 0.0, 0),
    (5, 0.5, 2), (7, 0.5, 4), (9, 1.0, 9), (13, 0.2, 3)])
def test_k_rounding_by_hand(n_valid, fraction, k):
    score = np.arange(16, dtype=np.float32).reshape(2, 8)[:, ::-1]
    mask = (np.arange(16) < n_valid).reshape(2, 8)
    sel = np.asarray(select_fraction(score, mask, fraction, highest=False))
    assert sel.sum() == k and not (sel & ~mask).any()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.2, 0.37, 0.5, 1.0])
@pytest.mark.parametrize("highest", [False, True])
def test_select_fraction_matches_brute_force(seed, fraction, highest):
    score, mask = make_batch(seed, n_levels=3 if seed % 2 else None)
    got = np.asarray(select_fraction(score, mask, fraction, highest=highest))
    np.testing.assert_array_equal(got, np_select(score, mask, fraction, highest))


def test_ties_broken_by_flat_index_and_padding_never_selected():
    score = np.array([[1.0, 0.0, 0.0, -5.0], [0.0, 0.0, 1.0, 1.0]], np.float32)
    mask = np.array([[True, True, True, False], [True, True, True, True]])
    # 7 valid, fraction 3/7 → k = 3 lowest: the four zeros tie; the first three in flat order.
    low = np.asarray(select_fraction(score, mask, 3 / 7, highest=False))
    np.testing.assert_array_equal(low, [[False, True, True, False], [True, False, False, False]])
    high = np.asarray(select_fraction(score, mask, 2 / 7, highest=True))
    np.testing.assert_array_equal(high, [[True, False, False, False], [False, False, True, False]])


def test_rank_uniform_matches_scipy():
    for seed in range(3):
        score, mask = make_batch(seed, n_levels=4)
        np.testing.assert_allclose(np.asarray(rank_uniform(score, mask)), np_rank_u(score, mask),
                                   atol=1e-6)
    one = np.zeros((2, 3), bool)
    one[1, 2] = True
    np.testing.assert_allclose(np.asarray(rank_uniform(np.ones((2, 3)), one)), np_rank_u(
        np.ones((2, 3)), one))


def test_masked_quantile_matches_numpy():
    score, mask = make_batch(5, b=3, t=11)
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        np.testing.assert_allclose(float(masked_quantile(score, mask, q)),
                                   np.quantile(score[mask], q), rtol=1e-6)
    assert float(masked_quantile(score, np.zeros_like(mask), 0.2)) == 0.0


def test_selection_is_global_on_sharded_arrays():
    """Under jit with the batch sharded over 8 devices, the fraction is over the whole batch."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    score, mask = make_batch(11, b=8, t=6)
    sh = NamedSharding(mesh, P("data", None))
    f = jax.jit(lambda s, m: tw.token_weights("explorer", mask_BxT=m, attn_entropy_BxT=s),
                in_shardings=(sh, sh))
    w, aux = f(jax.device_put(score, sh), jax.device_put(mask, sh))
    np.testing.assert_array_equal(np.asarray(w) > 0, np_select(score, mask, 0.2, True))
    np.testing.assert_allclose(float(aux["explorer_threshold"]), np.quantile(score[mask], 0.8),
                               rtol=1e-6)


# ---------------------------------------------------------------- modes
def _inputs(seed=3):
    rng = np.random.default_rng(seed)
    attn, mask = make_batch(seed, b=4, t=10)
    pred = rng.random(attn.shape).astype(np.float32)
    return attn, pred, mask


@pytest.mark.parametrize("mode,source,highest", [
    ("anchor", "attn", False), ("explorer", "attn", True),
    ("pred_entropy_low", "pred", False), ("pred_entropy_high", "pred", True),
    ("position_early", "pos", False), ("position_late", "pos", True)])
def test_hard_modes_select_expected_tokens(mode, source, highest):
    attn, pred, mask = _inputs()
    pos = np.where(mask, np.cumsum(mask, axis=1) - 1, 0)
    score = {"attn": attn, "pred": pred, "pos": pos}[source]
    w, aux = token_weights(mode, mask_BxT=mask, attn_entropy_BxT=attn, pred_entropy_BxT=pred,
                           fraction=0.3)
    expected = np_select(score, mask, 0.3, highest)
    np.testing.assert_array_equal(np.asarray(w), expected.astype(np.float32))
    k, n = expected.sum(), mask.sum()
    np.testing.assert_allclose(float(aux["selected_frac"]), k / n, rtol=1e-6)
    np.testing.assert_allclose(float(aux["weight_mean"]), k / n, rtol=1e-6)
    np.testing.assert_allclose(float(aux["anchor_threshold"]), np.quantile(attn[mask], 0.3),
                               rtol=1e-6)
    np.testing.assert_allclose(float(aux["explorer_threshold"]), np.quantile(attn[mask], 0.7),
                               rtol=1e-6)


def test_explicit_positions_are_used():
    attn, _, mask = _inputs()
    positions = np.tile(np.arange(10)[::-1], (4, 1))  # reversed: "early" = the end of each row
    w, _ = token_weights("position_early", mask_BxT=mask, attn_entropy_BxT=attn,
                         positions_BxT=positions)
    np.testing.assert_array_equal(np.asarray(w) > 0, np_select(positions, mask, 0.2, False))


def test_full_and_random():
    attn, _, mask = _inputs()
    w, _ = token_weights("full", mask_BxT=mask, attn_entropy_BxT=attn)
    np.testing.assert_array_equal(np.asarray(w), mask.astype(np.float32))
    picks = []
    for seed in (0, 0, 1):
        w, aux = token_weights("random", mask_BxT=mask, attn_entropy_BxT=attn,
                               rng=jax.random.key(seed), fraction=0.25)
        sel = np.asarray(w) > 0
        assert sel.sum() == np_k(0.25, mask.sum()) and not (sel & ~mask).any()
        assert set(np.unique(np.asarray(w))) <= {0.0, 1.0}
        picks.append(sel)
    np.testing.assert_array_equal(picks[0], picks[1])
    assert (picks[0] != picks[2]).any()
    with pytest.raises(ValueError, match="rng"):
        token_weights("random", mask_BxT=mask, attn_entropy_BxT=attn)


def test_random_is_uniform_over_valid_tokens():
    """Every valid token is picked with probability ≈ k / n over many keys."""
    attn, _, mask = _inputs()
    f = jax.jit(jax.vmap(lambda key: tw.token_weights(
        "random", mask_BxT=mask, attn_entropy_BxT=attn, rng=key)[0]))
    freq = np.asarray(f(jax.random.split(jax.random.key(7), 2000))).mean(0)
    p = np_k(0.2, mask.sum()) / mask.sum()
    np.testing.assert_allclose(freq[mask], p, atol=0.05)   # ~5 sigma for 2000 draws
    assert (freq[~mask] == 0).all()


def test_unknown_mode_and_bad_config():
    attn, _, mask = _inputs()
    with pytest.raises(ValueError, match="pred_entropy_low"):
        token_weights("anchors", mask_BxT=mask, attn_entropy_BxT=attn)
    with pytest.raises(ValueError, match="pred_entropy_BxT"):
        token_weights("pred_entropy_low", mask_BxT=mask, attn_entropy_BxT=attn)
    with pytest.raises(ValueError, match="SoftConfig.alpha"):
        SoftConfig(alpha=1.5)
    with pytest.raises(ValueError, match="SoftConfig.hard_mode"):
        SoftConfig(hard_mode="soft")


# ---------------------------------------------------------------- soft
@pytest.mark.parametrize("kind,step,expected", [
    ("linear", 0, 0.0), ("linear", 10, 0.0), ("linear", 15, 0.5), ("linear", 18, 0.8),
    ("linear", 20, 1.0), ("linear", 99, 1.0),
    ("cosine", 5, 0.0), ("cosine", 15, 0.5), ("cosine", 12.5, 0.5 * (1 - math.cos(math.pi / 4))),
    ("cosine", 25, 1.0)])
def test_soft_schedule_by_hand(kind, step, expected):
    got = float(soft_schedule(step, kind=kind, start_step=10, end_step=20))
    assert got == pytest.approx(expected, abs=1e-6)


def test_soft_schedule_starts_after_hard_phase():
    # Ramp 0 → 100 declared, hard phase of 20 steps: the ramp runs 20 → 100.
    assert float(soft_schedule(20, start_step=0, end_step=100, hard_steps=20)) == 0.0
    assert float(soft_schedule(60, start_step=0, end_step=100, hard_steps=20)) == pytest.approx(0.5)


@pytest.mark.parametrize("shape", ["linear_tilt", "gaussian"])
@pytest.mark.parametrize("lam_step", [0, 50, 100])
def test_soft_weights_match_formula(shape, lam_step):
    attn, _, mask = _inputs(4)
    attn = np.round(attn * 4) / 4   # ties
    cfg = SoftConfig(shape=shape, alpha=0.6, sigma=0.3, floor=0.2, start_step=0, end_step=100)
    w, aux = token_weights("soft", mask_BxT=mask, attn_entropy_BxT=attn, step=lam_step, soft=cfg)
    w = np.asarray(w)
    lam = lam_step / 100
    u = np_rank_u(attn, mask)
    if shape == "linear_tilt":
        expected = 1 + 0.6 * (1 - 2 * lam) * (1 - 2 * u)
    else:
        g = 0.2 + 0.8 * np.exp(-(u - lam) ** 2 / (2 * 0.3**2))
        expected = g / g[mask].mean()
    expected = np.where(mask, expected, 0.0)
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)
    assert w[mask].mean() == pytest.approx(1.0, abs=1e-5)
    assert float(aux["weight_mean"]) == pytest.approx(1.0, abs=1e-5)
    assert float(aux["lambda"]) == pytest.approx(lam)
    # Direction: low entropy favoured at λ=0, high entropy at λ=1.
    if lam_step != 50:
        corr = np.corrcoef(attn[mask], w[mask])[0, 1]
        assert corr < -0.5 if lam_step == 0 else corr > 0.5


def test_soft_hard_phase_uses_hard_mode():
    attn, _, mask = _inputs()
    cfg = SoftConfig(hard_steps=5, hard_mode="anchor", end_step=50)
    f = jax.jit(lambda step: tw.token_weights("soft", mask_BxT=mask, attn_entropy_BxT=attn,
                                           step=step, soft=cfg)[0])
    np.testing.assert_array_equal(np.asarray(f(4)), np_select(attn, mask, 0.2, False))
    after = np.asarray(f(5))
    assert (after[mask] > 0).all() and after[mask].mean() == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- gradient really masked
@pytest.mark.parametrize("mode", MODES)
def test_mode_changes_which_tokens_carry_gradient(mode):
    """jax.grad of the policy loss w.r.t. per-token log-probs is nonzero exactly where the
    mode's expected weights are, and proportional to them (a fork once never applied its mask)."""
    attn, pred, mask = _inputs(8)
    b, t = mask.shape
    adv = np.array([1.0, -0.5, 2.0, -1.5], np.float32)
    step = 30
    soft = SoftConfig(end_step=100)
    w, _ = token_weights(mode, mask_BxT=mask, attn_entropy_BxT=attn, pred_entropy_BxT=pred,
                         rng=jax.random.key(3), step=step, soft=soft)

    # Independent expectation of the weights.
    if mode == "full":
        expected = mask.astype(float)
    elif mode == "random":
        # the documented draw (uniform scores from the key), then the brute-force selection rule
        scores = np.asarray(jax.random.uniform(jax.random.key(3), mask.shape))
        expected = np_select(scores, mask, 0.2, False).astype(float)
        assert expected.sum() == np_k(0.2, mask.sum())
    elif mode == "soft":
        expected = np.where(mask, 1 + 0.5 * (1 - 2 * 0.3) * (1 - 2 * np_rank_u(attn, mask)), 0)
    else:
        score = {"anchor": attn, "explorer": attn, "pred_entropy_low": pred,
                 "pred_entropy_high": pred}.get(mode, np.cumsum(mask, axis=1) - 1)
        expected = np_select(score, mask, 0.2, mode.endswith(("explorer", "high", "late")))
        expected = expected.astype(float)

    z = jnp.asarray(np.random.default_rng(0).normal(size=(b, t)).astype(np.float32))
    g = np.asarray(_grad_wrt_logp(z, w, adv, mask))
    np.testing.assert_array_equal(g != 0, expected != 0)
    ref = -adv[:, None] * expected / expected.sum()
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-7)


@jax.jit
def _grad_wrt_logp(logp, w, adv, mask):
    def loss(lp):
        # old_logp = logp: ratio 1, no clipping, so d loss / d logp_t = −A·w_t / denom.
        denom = loss_denominator(w, mask, "selected")
        return policy_loss(lp, jax.lax.stop_gradient(lp), adv, mask, w, denom=denom)[0]
    return jax.grad(loss)(logp)
