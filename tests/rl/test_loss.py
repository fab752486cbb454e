"""Policy loss vs a branch-by-branch numpy oracle; normalisations; gradient accumulation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_entropy.rl.loss import (finalize_metrics, loss_denominator, policy_loss,
                                   ppo_token_loss)
from jaxrl_entropy.rl.token_weights import token_weights

EL, EH, C = 0.2, 0.28, 10.0


def np_token_loss(logp, old, adv, el=EL, eh=EH, c=C):
    """Written per case rather than as max/min of surrogates:
    A > 0: L = −A·min(ρ, 1+eh);  A < 0: L = |A|·min(max(ρ, 1−el), c);  A = 0: 0."""
    logp, old = np.asarray(logp, np.float64), np.asarray(old, np.float64)
    adv = np.broadcast_to(np.asarray(adv, np.float64).reshape(len(logp), -1), logp.shape)
    rho = np.exp(np.clip(logp - old, -20, 20))
    loss = np.zeros_like(rho)
    grad = np.zeros_like(rho)            # d L / d logp
    low = np.zeros(rho.shape, bool)
    high = np.zeros(rho.shape, bool)
    dual = np.zeros(rho.shape, bool)
    in_clamp = np.abs(logp - old) < 20
    for idx in np.ndindex(rho.shape):
        a, r = adv[idx], rho[idx]
        if a > 0:
            loss[idx] = -a * min(r, 1 + eh)
            high[idx] = r > 1 + eh
            grad[idx] = -a * r if (r < 1 + eh and in_clamp[idx]) else 0.0
        elif a < 0:
            loss[idx] = -a * min(max(r, 1 - el), c)
            low[idx] = r < 1 - el
            dual[idx] = max(r, 1 - el) > c
            grad[idx] = -a * r if (1 - el < r < c and in_clamp[idx]) else 0.0
    return loss, grad, dict(clipped_low=low, clipped_high=high, dual_clipped=dual, ratio=rho)


# Ratios covering every branch: far below 1−ε_low, inside, above 1+ε_high, above c, clamped.
RHO = np.array([0.05, 0.5, 0.79, 0.81, 1.0, 1.2, 1.27, 1.29, 3.0, 9.0, 11.0, 50.0, np.exp(25.0)])


def _branch_batch():
    t = len(RHO)
    old = np.linspace(-3, -0.1, t)[None, :].repeat(3, 0)
    logp = old + np.log(RHO)[None, :]
    adv = np.array([1.3, -0.7, 0.0])
    return logp.astype(np.float32), old.astype(np.float32), adv.astype(np.float32)


def test_token_loss_all_branches():
    logp, old, adv = _branch_batch()
    loss, stats = ppo_token_loss(logp, old, adv, eps_low=EL, eps_high=EH, clip_c=C)
    ref, _, ref_stats = np_token_loss(logp, old, adv)
    np.testing.assert_allclose(np.asarray(loss), ref, rtol=1e-5, atol=1e-6)
    for key in ("clipped_low", "clipped_high", "dual_clipped"):
        np.testing.assert_array_equal(np.asarray(stats[key]), ref_stats[key], err_msg=key)
    np.testing.assert_allclose(np.asarray(stats["ratio"]), ref_stats["ratio"], rtol=1e-5)
    # The cases exist: positive A above 1+ε_high, negative A below 1−ε_low, dual clip.
    assert ref_stats["clipped_high"][0].sum() >= 3 and ref_stats["clipped_low"][1].sum() >= 3
    assert ref_stats["dual_clipped"][1].sum() >= 3 and not ref_stats["dual_clipped"][0].any()


def test_token_loss_gradient_per_branch():
    logp, old, adv = _branch_batch()
    grad = jax.grad(lambda lp: ppo_token_loss(lp, old, adv)[0].sum())(jnp.asarray(logp))
    _, ref_grad, _ = np_token_loss(logp, old, adv)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-4, atol=1e-6)


def test_per_token_advantages_and_no_dual_clip():
    logp, old, _ = _branch_batch()
    adv_BxT = np.random.default_rng(0).normal(size=logp.shape).astype(np.float32)
    loss, _ = ppo_token_loss(logp, old, adv_BxT)
    np.testing.assert_allclose(np.asarray(loss), np_token_loss(logp, old, adv_BxT)[0],
                               rtol=1e-5, atol=1e-6)
    loss, stats = ppo_token_loss(logp, old, adv_BxT, clip_c=None)
    no_dual = np_token_loss(logp, old, adv_BxT, c=np.inf)[0]
    np.testing.assert_allclose(np.asarray(loss), no_dual, rtol=1e-5, atol=1e-6)
    assert not np.asarray(stats["dual_clipped"]).any()
    with pytest.raises(ValueError, match="clip_c"):
        ppo_token_loss(logp, old, adv_BxT, clip_c=0.5)


def test_loss_denominator():
    w = np.array([[0.5, 2.0, 1.0], [1.0, 0.0, 3.0]], np.float32)
    mask = np.array([[1, 1, 0], [1, 1, 0]], bool)
    assert float(loss_denominator(w, mask, "selected")) == pytest.approx(3.5)
    assert float(loss_denominator(w, mask, "all")) == pytest.approx(4.0)
    assert float(loss_denominator(w, np.zeros_like(mask), "all")) == 1.0
    assert float(loss_denominator(np.zeros_like(w), mask, "selected")) == 1.0
    with pytest.raises(ValueError, match="normalization"):
        loss_denominator(w, mask, "token-mean")


def test_policy_loss_matches_numpy_with_kl_and_entropy():
    rng = np.random.default_rng(1)
    b, t = 3, 7
    old = rng.normal(-2, 0.5, (b, t)).astype(np.float32)
    logp = (old + rng.normal(0, 0.4, (b, t))).astype(np.float32)
    ref = (old + rng.normal(0, 0.3, (b, t))).astype(np.float32)
    ent = rng.random((b, t)).astype(np.float32)
    adv = np.array([1.0, -2.0, 0.5], np.float32)
    mask = np.arange(t)[None, :] < np.array([7, 4, 5])[:, None]
    w = (rng.random((b, t)) > 0.4).astype(np.float32)
    denom = float(loss_denominator(w, mask, "selected"))
    loss, metrics = policy_loss(logp, old, adv, mask, w, denom=denom, ref_logp=ref, kl_coef=0.1,
                                pred_entropy=ent, entropy_coef=0.01)

    per_tok, _, st = np_token_loss(logp, old, adv)
    m = mask.astype(np.float64)
    pg = (w * m * per_tok).sum() / (w * m).sum()
    d = ref.astype(np.float64) - logp
    kl = ((np.exp(d) - d - 1) * m).sum() / m.sum()
    h = (ent * m).sum() / m.sum()
    assert float(loss) == pytest.approx(pg + 0.1 * kl - 0.01 * h, rel=1e-5)
    assert float(metrics["pg_loss"]) == pytest.approx(pg, rel=1e-5)
    assert float(metrics["kl_loss"]) == pytest.approx(kl, rel=1e-5)
    fin = finalize_metrics(metrics)
    assert float(fin["clip_low"]) == pytest.approx((st["clipped_low"] & mask).sum() / m.sum())
    assert float(fin["clip_high"]) == pytest.approx((st["clipped_high"] & mask).sum() / m.sum())
    assert float(fin["approx_kl"]) == pytest.approx(((old - logp) * m).sum() / m.sum(), rel=1e-5)
    assert float(fin["ratio"]) == pytest.approx((st["ratio"] * m).sum() / m.sum(), rel=1e-5)


def test_padding_is_ignored_even_if_nonfinite():
    logp = np.array([[-1.0, -2.0, np.nan]], np.float32)
    old = np.array([[-1.1, -2.0, -np.inf]], np.float32)
    mask = np.array([[True, True, False]])
    w = mask.astype(np.float32)
    g = jax.grad(lambda lp: policy_loss(lp, old, np.array([1.0]), mask, w, denom=2.0)[0])(
        jnp.asarray(logp))
    assert np.isfinite(np.asarray(g)).all() and np.asarray(g)[0, 2] == 0


# ---------------------------------------------------------------- gradient accumulation
def _toy_logp(p, x_BxTxD, targets_BxT):
    lp = jax.nn.log_softmax(x_BxTxD @ p["W"] + p["b"], axis=-1)
    return jnp.take_along_axis(lp, targets_BxT[..., None], axis=-1)[..., 0]


def _toy_batch(seed=0, b=6, t=5, d=4, v=7):
    rng = np.random.default_rng(seed)
    params = {"W": jnp.asarray(rng.normal(size=(d, v)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(v,)), jnp.float32)}
    old_params = jax.tree.map(
        lambda a: a + 0.4 * jnp.asarray(rng.normal(size=a.shape), jnp.float32), params)
    x = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)))
    batch = dict(x=x, targets=targets, old=_toy_logp(old_params, x, targets),
                 adv=jnp.asarray(rng.normal(size=(b,)), jnp.float32),
                 mask=jnp.asarray(np.arange(t)[None, :] < rng.integers(1, t + 1, b)[:, None]))
    return params, batch, rng.random((b, t)).astype(np.float32)


@jax.jit
def _grad_and_metrics(params, mb, denom, n_tok):
    """Gradient and metrics of one micro-batch ``mb`` under the given (global) denominators."""
    def loss(p):
        return policy_loss(_toy_logp(p, mb["x"], mb["targets"]), mb["old"], mb["adv"],
                           mb["mask"], mb["w"], denom=denom, ref_logp=mb["old"], kl_coef=0.05,
                           token_denom=n_tok)
    return jax.grad(loss, has_aux=True)(params)


@pytest.mark.parametrize("normalization", ["selected", "all"])
@pytest.mark.parametrize("mode", ["anchor", "soft"])
def test_gradient_accumulation_equals_one_batch(normalization, mode):
    params, batch, attn = _toy_batch()
    w, _ = jax.jit(token_weights, static_argnames="mode")(
        mode, mask_BxT=batch["mask"], attn_entropy_BxT=attn, fraction=0.4, step=10)
    batch["w"] = w
    denom = loss_denominator(w, batch["mask"], normalization)   # once, over the global batch
    n_tok = jnp.sum(batch["mask"]).astype(jnp.float32)
    full_grad, full_metrics = _grad_and_metrics(params, batch, denom, n_tok)

    micro = [slice(0, 3), slice(3, 6)]  # equal sizes: one compile; their Σw still differ
    parts = [_grad_and_metrics(params, {k: v[r] for k, v in batch.items()}, denom, n_tok)
             for r in micro]
    acc_grad, acc_metrics = jax.tree.map(lambda *xs: sum(xs), *parts)
    for key in params:
        np.testing.assert_allclose(np.asarray(acc_grad[key]), np.asarray(full_grad[key]),
                                   rtol=2e-5, atol=1e-7)
    for key, value in full_metrics.items():
        np.testing.assert_allclose(float(acc_metrics[key]), float(value), rtol=1e-5, atol=1e-7,
                                   err_msg=key)

    # Sensitivity check: per-micro-batch denominators (verl#5625) give a different gradient.
    naive = [_grad_and_metrics(params, {k: v[r] for k, v in batch.items()},
                               loss_denominator(w[r], batch["mask"][r], normalization),
                               jnp.sum(batch["mask"][r]).astype(jnp.float32))[0]
             for r in micro]
    naive_w = sum(g["W"] for g in naive) / len(micro)
    assert not np.allclose(np.asarray(naive_w), np.asarray(full_grad["W"]), rtol=1e-3)


def test_step_metrics_keep_the_public_names_users_read():
    # metrics.jsonl / TensorBoard names are an interface: these are the ones the docs list
    from jaxrl_entropy.rl.loss import step_metrics
    means = {"loss": 0.5, "pg_loss": 0.4, "grad_norm": 2.0, "clip_low": 0.01, "clip_high": 0.03,
             "dual_clip": 0.002, "approx_kl": 1e-3, "token_count": 100.0}
    out = step_metrics(means)
    assert out == {"loss": 0.5, "pg_loss": 0.4, "grad_norm": 2.0, "clip_frac": 0.04, "clip_frac/low": 0.01,
                   "clip_frac/high": 0.03, "clip_frac/dual": 0.002, "approx_kl": 1e-3}
