"""Gradient geometry vs separate jax.grad of each masked loss and numpy norms / cosines."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracles  # tests/oracles.py
from jaxrl_entropy import parallel
from jaxrl_entropy.rl import diagnostics
from jaxrl_entropy.rl.diagnostics import (GeometryTracker, GradientSketch, cosine_tree,
                                          gradient_geometry, policy_subset_loss, tree_norm)

geometry_subsets = jax.jit(diagnostics.geometry_subsets, static_argnames="fraction")


def _flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _np_cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_tree_norm_and_cosine_match_numpy():
    rng = np.random.default_rng(0)
    a = {"w": rng.normal(size=(3, 4)), "b": [rng.normal(size=5), rng.normal(size=())]}
    b = jax.tree.map(lambda x: x + rng.normal(size=np.shape(x)), a)
    a_j = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), a)
    b_j = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), b)   # mixed dtypes are fine
    fa, fb = _flat(a), _flat(jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16),
                                                               np.float64), b))
    assert float(tree_norm(a_j)) == pytest.approx(np.linalg.norm(fa), rel=1e-6)
    assert float(cosine_tree(a_j, b_j)) == pytest.approx(_np_cos(fa, fb), rel=1e-5)
    zero = jax.tree.map(jnp.zeros_like, a_j)
    assert float(cosine_tree(a_j, zero)) == 0.0


# ---------------------------------------------------------------- toy policy
B, T, D, V = 4, 6, 3, 5


def _toy(seed=0):
    rng = np.random.default_rng(seed)
    params = {"W": jnp.asarray(rng.normal(size=(D, V)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(V,)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)))

    def logp_fn(p):
        lp = jax.nn.log_softmax(x @ p["W"] + p["b"], axis=-1)
        return jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]

    old = logp_fn(jax.tree.map(lambda a: a + 0.3, params))
    adv = jnp.asarray(rng.normal(size=(B,)), jnp.float32)
    mask = jnp.asarray(np.arange(T)[None, :] < np.array([6, 3, 5, 4])[:, None])
    attn = jnp.asarray(rng.random((B, T)), jnp.float32)
    return params, logp_fn, old, adv, mask, attn


def _oracle_grad(params, logp_fn, old, adv, mask, w):
    """Independent masked loss: selected-token mean of DAPO's clipped surrogate."""
    def loss(p):
        rho = jnp.exp(logp_fn(p) - old)
        a = adv[:, None]
        surrogate = jnp.maximum(-a * rho, -a * jnp.clip(rho, 0.8, 1.28))
        surrogate = jnp.where(a < 0, jnp.minimum(surrogate, -a * 10.0), surrogate)
        wm = w * mask
        return jnp.sum(wm * surrogate) / jnp.sum(wm)
    return _flat(jax.grad(loss)(params))


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_gradient_geometry_matches_separate_grads(method):
    params, logp_fn, old, adv, mask, attn = _toy()
    subsets = geometry_subsets(mask, attn, fraction=0.3, rng=jax.random.key(0))
    assert set(subsets) == {"full", "anchor", "explorer", "random"}
    loss_fn = policy_subset_loss(logp_fn, old_logp=old, adv=adv, mask=mask)
    got = jax.jit(lambda p, s: gradient_geometry(loss_fn, p, s, method=method))(params, subsets)

    grads = {n: _oracle_grad(params, logp_fn, old, adv, mask, w) for n, w in subsets.items()}
    g_full = grads["full"]
    for name, g in grads.items():
        assert float(got[f"{name}/norm"]) == pytest.approx(np.linalg.norm(g), rel=1e-4)
        assert float(got[f"{name}/cos_full"]) == pytest.approx(_np_cos(g, g_full), abs=1e-5)
        proj = g @ g_full / np.linalg.norm(g_full)
        assert float(got[f"{name}/proj_full"]) == pytest.approx(proj, rel=1e-4, abs=1e-7)
    assert float(got["full/cos_full"]) == pytest.approx(1.0, abs=1e-6)
    # The subsets really differ (otherwise the comparison above proves little).
    assert _np_cos(grads["anchor"], grads["explorer"]) < 0.999


def test_layer_entropies_add_their_own_anchors_and_explorers():
    # hand oracle: on 2 rows × 5 valid tokens with distinct entropies, fraction 0.2 keeps the
    # 2 lowest (anchors) and the 2 highest (explorers) of the 10 valid tokens of each entropy
    mask = jnp.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]], bool)
    base = jnp.linspace(0.1, 0.9, 12).reshape(2, 6)
    other = jnp.array([[0.9, 0.1, 0.5, 0.6, 0.7, 0.0], [0.2, 0.8, 0.55, 0.65, 0.3, 1.0]])
    subsets = geometry_subsets(mask, base, fraction=0.2, rng=jax.random.key(0), layer_entropy={"L0": other})
    assert set(subsets) == {"full", "anchor", "explorer", "random", "anchor@L0", "explorer@L0"}
    np.testing.assert_array_equal(np.argwhere(np.asarray(subsets["anchor@L0"]) > 0), [[0, 1], [1, 0]])
    np.testing.assert_array_equal(np.argwhere(np.asarray(subsets["explorer@L0"]) > 0), [[0, 0], [1, 1]])
    np.testing.assert_array_equal(np.argwhere(np.asarray(subsets["anchor"]) > 0), [[0, 0], [0, 1]])


def test_missing_full_subset_is_an_error():
    params, logp_fn, old, adv, mask, attn = _toy()
    loss_fn = policy_subset_loss(logp_fn, old_logp=old, adv=adv, mask=mask)
    with pytest.raises(KeyError, match="full"):
        gradient_geometry(loss_fn, params, {"anchor": mask.astype(jnp.float32)})


@pytest.mark.parametrize("projection_dim", [None, 1 << 14])
def test_tracker_cos_prev(projection_dim):
    params, logp_fn, old, adv, mask, attn = _toy()
    subsets = geometry_subsets(mask, attn, fraction=0.3, rng=jax.random.key(1))
    loss_fn = policy_subset_loss(logp_fn, old_logp=old, adv=adv, mask=mask)
    tracker = GeometryTracker(projection_dim=projection_dim)
    steps = [params, jax.tree.map(lambda a: a * 0.7 + 0.2, params),
             jax.tree.map(lambda a: -0.5 * a + 0.1, params)]
    first = tracker.step(loss_fn, steps[0], subsets)
    assert not any(k.endswith("/cos_prev") for k in first)
    # ~35 parameters in 2**14 buckets: the sketch is (nearly) collision-free here.
    tol = 1e-5 if projection_dim is None else 2e-2
    for prev, cur in zip(steps[:-1], steps[1:]):
        got = tracker.step(loss_fn, cur, subsets, method="loop")
        for name, w in subsets.items():
            g_prev = _oracle_grad(prev, logp_fn, old, adv, mask, w)
            g_cur = _oracle_grad(cur, logp_fn, old, adv, mask, w)
            assert float(got[f"{name}/cos_prev"]) == pytest.approx(_np_cos(g_prev, g_cur),
                                                                   abs=tol)


def test_sketch_preserves_inner_products_approximately():
    rng = np.random.default_rng(3)
    a = {"x": rng.normal(size=(100, 120)), "y": rng.normal(size=8000)}
    noise = jax.tree.map(lambda v: rng.normal(size=v.shape), a)
    b = jax.tree.map(lambda u, n: 0.75 * u + 0.66 * n, a, noise)      # true cosine ≈ 0.75
    a_j = jax.tree.map(jnp.asarray, a)
    b_j = jax.tree.map(jnp.asarray, b)
    sketch = GradientSketch(dim=1 << 12, seed=5)
    sa, sb = sketch(a_j), sketch(b_j)
    assert sa.shape == (4096,)
    true_cos = _np_cos(_flat(a), _flat(b))
    # Count-sketch cosine error ~ 1/sqrt(dim) ≈ 0.016; allow 4 sigma.
    assert float(cosine_tree(sa, sb)) == pytest.approx(true_cos, abs=0.065)
    assert float(jnp.linalg.norm(sa)) == pytest.approx(np.linalg.norm(_flat(a)), rel=0.065)
    # Linear, and fixed across calls.
    s_sum = sketch(jax.tree.map(jnp.add, a_j, b_j))
    np.testing.assert_allclose(np.asarray(s_sum), np.asarray(sa + sb), rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(sketch(a_j)), np.asarray(sa))
    with pytest.raises(ValueError, match="power of two"):
        GradientSketch(dim=1000)


def test_sketch_equals_count_sketch_from_its_definition_on_sharded_leaves():
    """Oracle: the count sketch written in numpy (tests/oracles.py). Leaves sharded over 8 devices
    give the same sketch as on one device (the hashes follow each element's global flat index)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    rng = np.random.default_rng(7)
    tree = {"emb": rng.normal(size=(64, 24)), "norm": rng.normal(size=(24,)), "qkv": rng.normal(size=(8, 3, 16))}
    sketch = GradientSketch(dim=1 << 8, seed=11)
    want = oracles.count_sketch(jax.tree.leaves(tree), 1 << 8, 11)
    mesh = parallel.make_mesh(data=2, fsdp=4)   # the trainer's mesh
    specs = {"emb": P("fsdp", None), "norm": P(), "qkv": P(None, None, ("data", "fsdp"))}
    for placed in (jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree),
                   {k: jax.device_put(jnp.asarray(v, jnp.float32), NamedSharding(mesh, specs[k]))
                    for k, v in tree.items()}):
        np.testing.assert_allclose(np.asarray(sketch(placed)), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(jax.jit(sketch)(placed)), want, rtol=1e-5, atol=1e-5)


def test_token_projections_equal_explicit_per_token_gradients():
    """Oracle: each token's gradient taken separately with jax.grad, dotted with d in numpy."""
    import numpy as np
    from jaxrl_entropy.rl.diagnostics import token_projections

    key = jax.random.key(0)
    params = {"w": jax.random.normal(key, (3, 4)), "b": jnp.arange(4.0) / 10}
    x = jax.random.normal(jax.random.key(1), (2, 5, 3))

    def per_token(p):                                    # [B, T] per-token losses
        return jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2, axis=-1)

    direction = {"w": jax.random.normal(jax.random.key(2), (3, 4)), "b": jnp.ones(4)}
    got = np.asarray(token_projections(per_token, params, direction))
    d_flat = np.concatenate([np.ravel(direction["b"]), np.ravel(direction["w"])])
    for b in range(2):
        for t in range(5):
            g = jax.grad(lambda p: per_token(p)[b, t])(params)
            g_flat = np.concatenate([np.ravel(g["b"]), np.ravel(g["w"])])
            assert got[b, t] == pytest.approx(g_flat @ d_flat / np.linalg.norm(d_flat), rel=1e-4, abs=1e-6)


# ------------------------------------------------- volatility within a batch, the token-count curve
def _linear_loss(x_BxTxD):
    """loss(p, w) = Σ w·(x·p) / Σ w: its gradient is Σ w x / Σ w, by hand."""
    def loss_fn(params, w_BxT):
        per_token = jnp.einsum("btd,d->bt", x_BxTxD, params["p"])
        return jnp.sum(w_BxT * per_token) / jnp.maximum(jnp.sum(w_BxT), 1e-9)
    return loss_fn


def test_split_halves_are_disjoint_row_halves_that_add_up():
    w = jnp.asarray(np.random.RandomState(0).rand(6, 5) > 0.4, jnp.float32)
    halves = diagnostics.split_halves({"anchor": w})
    a, b = (np.asarray(halves["anchor" + h]) for h in (diagnostics.HALF_A, diagnostics.HALF_B))
    np.testing.assert_array_equal(a + b, np.asarray(w))
    assert not a[3:].any() and not b[:3].any()


def test_cos_halves_is_the_cosine_of_the_two_halves_gradients_by_hand():
    rng = np.random.RandomState(1)
    x = rng.randn(4, 6, 3).astype(np.float32)
    mask = np.ones((4, 6), bool)
    subsets = diagnostics.geometry_subsets(jnp.asarray(mask), jnp.asarray(rng.rand(4, 6), jnp.float32),
                                           fraction=0.5, rng=jax.random.key(0), halves=True)
    metrics, sketches = diagnostics.geometry_and_sketches(_linear_loss(jnp.asarray(x)), {"p": jnp.zeros(3)},
                                                          subsets, method="loop", sketch=lambda g: g)
    metrics, sketches = diagnostics.split_half_metrics(metrics, sketches)
    assert set(sketches) == {"full", "anchor", "explorer", "random"}
    assert not any("#" in k for k in metrics)
    for name in sketches:
        w = np.asarray(subsets[name])
        grads = [np.einsum("bt,btd->d", w[rows], x[rows]) / w[rows].sum() for rows in (slice(0, 2), slice(2, 4))]
        want = grads[0] @ grads[1] / np.linalg.norm(grads[0]) / np.linalg.norm(grads[1])
        assert float(metrics[f"{name}/cos_halves"]) == pytest.approx(want, abs=1e-5), name


def test_random_fractions_add_random_subsets_of_those_sizes():
    mask = np.zeros((4, 50), bool)
    mask[:, :40] = True                       # 160 response tokens
    subsets = diagnostics.geometry_subsets(jnp.asarray(mask), jnp.zeros((4, 50)), fraction=0.2,
                                           rng=jax.random.key(3), random_fractions=(0.05, 0.5))
    assert diagnostics.random_subset_name(0.05) == "random@0.05"
    for f in (0.05, 0.5):
        w = np.asarray(subsets[f"random@{f:g}"])
        assert abs(int((w > 0).sum()) - f * 160) <= 1 and not w[~mask].any()
    assert not np.array_equal(np.asarray(subsets["random"]) > 0, np.asarray(subsets["random@0.5"]) > 0)
