"""bf16 parameters with a float32 master copy in the optimiser state (`rl/master_weights.py`).

Oracle: the same AdamW run on float32 parameters from the same start. At lr 1e-6 naive bf16
AdamW (the optimiser stepping the bf16 parameters, its moments in bf16) loses the update to
rounding; with the master copy the parameters move as the float32 run's do."""
import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp

from jaxrl_entropy.rl import master_weights as mw
from jaxrl_entropy.rl import train_step as ts

LR, STEPS = 1e-6, 200


def _adamw(param_dtype):
    return ts.make_optimizer(LR, b1=0.9, b2=0.999, weight_decay=0.1, warmup_steps=0, grad_clip=1.0,
                             param_dtype=param_dtype)


def _problem(seed=0):
    """Weights of an initialised layer (std 0.02), bf16-representable so every run starts at the
    same point, and a quadratic loss pulling them to a target, with per-step gradient noise."""
    rng = np.random.default_rng(seed)
    shapes = {"kernel": (128, 64), "bias": (64,)}
    p0 = {k: jnp.asarray(rng.normal(0, 0.02, s), jnp.bfloat16).astype(jnp.float32) for k, s in shapes.items()}
    target = {k: jnp.asarray(rng.normal(0, 0.02, s), jnp.float32) for k, s in shapes.items()}
    noise = {k: jnp.asarray(rng.normal(0, 0.01, (STEPS, *s)), jnp.float32) for k, s in shapes.items()}
    return p0, target, noise


def _run(tx, params, target, noise):
    """STEPS updates; the gradient is taken at the parameters the model computes with (for a bf16
    run, the bf16 ones) and comes in their dtype, as `jax.grad` gives it."""
    def step(carry, t):
        p, state = carry
        g = jax.tree.map(lambda x, y, n: (x.astype(jnp.float32) - y + n[t]).astype(x.dtype), p, target, noise)
        updates, state = tx.update(g, state, p)
        return (optax.apply_updates(p, updates), state), None

    (p, state), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(STEPS))
    return p, state


def _rel_err(delta, oracle):
    num = sum(float(jnp.sum((delta[k] - oracle[k]) ** 2)) for k in oracle)
    den = sum(float(jnp.sum(oracle[k] ** 2)) for k in oracle)
    return (num / den) ** 0.5


def test_bf16_with_master_moves_as_float32_where_naive_bf16_loses_the_update():
    p0, target, noise = _problem()
    f32, _ = jax.jit(lambda p: _run(_adamw(jnp.float32), p, target, noise))(p0)
    oracle = jax.tree.map(jnp.subtract, f32, p0)
    p0_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p0)
    bf16, state = jax.jit(lambda p: _run(_adamw(jnp.bfloat16), p, target, noise))(p0_bf16)
    # the old behaviour: AdamW straight on the bf16 parameters (a transformation without the master)
    naive, naive_state = jax.jit(lambda p: _run(_adamw(jnp.float32), p, target, noise))(p0_bf16)

    assert isinstance(state, mw.MasterWeightsState) and not isinstance(naive_state, mw.MasterWeightsState)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.master))
    mu = state.inner[1][0].mu
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(mu))          # float32 moments
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16))       # what the model computes with

    err_master = _rel_err(jax.tree.map(jnp.subtract, state.master, p0), oracle)
    err_naive = _rel_err(jax.tree.map(lambda p, q: p.astype(jnp.float32) - q, naive, p0), oracle)
    # the bf16 parameters themselves: the master rounded, so within half a bf16 step of it
    err_bf16 = _rel_err(jax.tree.map(lambda p, q: p.astype(jnp.float32) - q, bf16, p0), oracle)
    print(f"relative parameter-delta error vs float32 after {STEPS} AdamW steps at lr {LR}: "
          f"master {err_master:.2e}, bf16 parameters (master rounded) {err_bf16:.2e}, naive bf16 {err_naive:.2e}")
    assert err_master < 1e-2
    assert err_naive > 0.8                          # most of the update rounded away
    assert err_bf16 < err_naive / 2
    for p, m in zip(jax.tree.leaves(bf16), jax.tree.leaves(state.master)):
        np.testing.assert_array_equal(np.asarray(p), np.asarray(m.astype(jnp.bfloat16)))


def test_apply_updates_lands_exactly_on_the_master_rounded():
    """Whatever the move (tiny, large, across zero, to zero), `optax.apply_updates(params, updates)`
    is the new master rounded to bf16, bit for bit."""
    rng = np.random.default_rng(1)
    n = 200_000
    p = jnp.asarray(rng.normal(0, 0.02, n), jnp.bfloat16).at[:100].set(0)
    scale = 10.0 ** rng.uniform(-10, 0, n)
    new_master = jnp.asarray(np.asarray(p, np.float32) + rng.normal(0, 1, n) * scale, jnp.float32).at[100:200].set(0)

    class Jump:  # an inner transformation that moves the master to `new_master`
        @staticmethod
        def init(params):
            return optax.EmptyState()

        @staticmethod
        def update(grads, state, params):
            return new_master - params, state

    tx = mw.wrap(optax.GradientTransformation(Jump.init, Jump.update))
    state = tx.init(p)
    np.testing.assert_array_equal(np.asarray(state.master), np.asarray(p, np.float32))
    updates, state = tx.update(jnp.zeros_like(p), state, p)
    new = optax.apply_updates(p, updates)
    assert new.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(state.master), np.asarray(new_master), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(new), np.asarray(state.master.astype(jnp.bfloat16)))


@pytest.mark.parametrize("dtype,master,opt_bytes", [(jnp.float32, None, 8), (jnp.bfloat16, np.float32, 12),
                                                    (jnp.float16, np.float32, 12)])
def test_master_only_for_narrow_parameters_and_its_bytes(dtype, master, opt_bytes):
    assert mw.master_dtype(dtype) == (None if master is None else np.dtype(master))
    assert mw.optimizer_bytes_per_param(dtype) == opt_bytes
    # the count is the optimiser state's own size per parameter
    params = {"w": jax.ShapeDtypeStruct((64, 32), dtype), "b": jax.ShapeDtypeStruct((32,), dtype)}
    state = jax.eval_shape(_adamw(dtype).init, params)
    n = 64 * 32 + 32
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if x.ndim)
    assert state_bytes == opt_bytes * n


def test_a_state_saved_without_master_is_widened_exactly():
    params = {"w": jnp.asarray(np.random.default_rng(2).normal(0, 0.02, (8, 4)), jnp.bfloat16)}
    tx = _adamw(jnp.bfloat16)
    state = tx.init(params)
    legacy_abstract = mw.legacy_layout(state, jnp.bfloat16)
    old = _adamw(jnp.float32).init(params)  # what a run saved before master weights: bf16 moments
    assert jax.tree.structure(legacy_abstract) == jax.tree.structure(old)
    assert [x.dtype for x in jax.tree.leaves(legacy_abstract)] == [x.dtype for x in jax.tree.leaves(old)]
    old = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.bfloat16 else x, old)
    up = mw.from_legacy(old, params)
    assert jax.tree.structure(up) == jax.tree.structure(state)
    np.testing.assert_array_equal(np.asarray(up.master["w"]), np.asarray(params["w"], np.float32))
    assert up.inner[1][0].mu["w"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(up.inner[1][0].mu["w"]), np.ones((8, 4), np.float32))
