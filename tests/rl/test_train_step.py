"""The jitted train step: token alignment, sharded = single-device, accumulation, non-finite skip."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_entropy import parallel
from jaxrl_entropy.models import qwen3
from jaxrl_entropy.rl import train_step as ts

CFG = qwen3.Qwen3Config(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8)
P, N, M = 6, 5, 16


def _batch(seed=0):
    rng = np.random.RandomState(seed)
    prompt = rng.randint(1, 40, (M, P))
    pmask = np.ones((M, P), np.int32)
    for i in range(M):
        pmask[i, :rng.randint(0, P - 1)] = 0          # left padding of varying length
    prompt[pmask == 0] = 0
    resp = rng.randint(1, 40, (M, N))
    lengths = rng.randint(1, N + 1, M)
    return ts.build_sequences(prompt, pmask, resp, lengths)


def _model(seed=0):
    return qwen3.init_random(CFG, qwen3.RuntimeOptions(logits_chunk=4), seed=seed)


SPEC = ts.StepSpec(prompt_len=P, response_len=N, probe_layers=(1,), aggregation="head_mixture")


def _entropy(p):
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def test_rollout_stats_read_the_decision_row():
    """old log-prob of response token r = log softmax of the logits at position P + r − 1; its
    Hnorm = entropy of the head-averaged attention of that row / log(number of visible keys)."""
    model = _model()
    graphdef, state = nnx.split(model)
    b = _batch()
    st = ts.rollout_stats(graphdef, nnx.to_pure_dict(state), {k: jnp.asarray(b[k]) for k in
                                                              ("input_ids", "attention_mask", "response")},
                          SPEC, chunk=8)
    out = model(jnp.asarray(b["input_ids"]), attention_mask=jnp.asarray(b["attention_mask"]),
                probe_layers=(1,), return_probs=True)
    logits = np.asarray(out.logits, np.float64)
    probs = np.asarray(out.probs[1], np.float64)                    # [M, H, T, T]
    mask = b["attention_mask"].astype(bool)
    for i in range(M):
        for r in range(int(b["response_mask"][i].sum())):
            row = P + r - 1
            lg = logits[i, row]
            ref_logp = lg[b["response"][i, r]] - (np.log(np.exp(lg - lg.max()).sum()) + lg.max())
            assert st["old_logp"][i, r] == pytest.approx(ref_logp, abs=1e-4)
            visible = int(mask[i, :row + 1].sum())                  # prompt tokens + earlier response
            h = _entropy(probs[i, :, row].mean(0))
            ref = h / np.log(visible) if visible > 1 else 0.0
            assert st["hnorm"][i, r] == pytest.approx(ref, abs=1e-4)


def _minibatch(b, st, adv, weights, n_micro):
    data = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "response": b["response"],
            "response_mask": b["response_mask"], "old_logp": np.asarray(st["old_logp"]),
            "advantage": np.broadcast_to(adv[:, None], (M, N)).astype(np.float32), "weights": weights}
    return {k: np.asarray(v).reshape(n_micro, M // n_micro, *np.shape(v)[1:]) for k, v in data.items()}


def _setup(seed=0):
    model = _model(seed)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    b = _batch(seed)
    # old policy = a slightly different model, so ratios are not all 1 and clipping can act
    old = jax.tree.map(lambda x: x * 1.05, params)
    st_old = ts.rollout_stats(graphdef, old, {k: jnp.asarray(b[k]) for k in
                                              ("input_ids", "attention_mask", "response")}, SPEC, chunk=8)
    adv = np.random.RandomState(seed).randn(M).astype(np.float32)
    weights = (np.random.RandomState(seed + 1).rand(M, N) > 0.4).astype(np.float32) * b["response_mask"]
    tx = ts.make_optimizer(1e-2, b1=0.9, b2=0.999, weight_decay=0.1, warmup_steps=0, grad_clip=1.0)
    return graphdef, params, tx, b, st_old, adv, weights


def test_accumulation_equals_one_batch():
    graphdef, params, tx, b, st, adv, w = _setup()
    opt = tx.init(params)
    step = jax.jit(lambda p, o, mb: ts.update(graphdef, p, o, mb, SPEC, tx, "selected"))
    p1, _, m1 = step(params, opt, _minibatch(b, st, adv, w, 1))
    p4, _, m4 = step(params, opt, _minibatch(b, st, adv, w, 4))
    assert float(m1["loss"]) == pytest.approx(float(m4["loss"]), rel=1e-5)
    assert float(m1["grad_norm"]) == pytest.approx(float(m4["grad_norm"]), rel=1e-4)
    # the gradients agree to float32 round-off; after Adam (which divides by sqrt(v)) the
    # parameters agree to a small fraction of one update (lr = 1e-2)
    mask = b["response_mask"]
    denom = float(np.sum(w * mask))
    tok = float(mask.sum())
    acc = jax.jit(lambda mb: ts.accumulate_grads(graphdef, params, mb, SPEC, denom, tok)[0])
    grads = lambda n: acc(jax.tree.map(jnp.asarray, _minibatch(b, st, adv, w, n)))
    for a, c in zip(jax.tree.leaves(grads(1)), jax.tree.leaves(grads(4))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-7)
    for a, c in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-4)
    assert float(m1["loss"]) != 0.0 and not np.allclose(np.asarray(jax.tree.leaves(p1)[0]),
                                                       np.asarray(jax.tree.leaves(params)[0]))


def test_sharded_update_equals_single_device():
    assert jax.device_count() == 8, "tests/conftest.py forces 8 fake CPU devices"
    graphdef, params, tx, b, st, adv, w = _setup(seed=1)
    mb = _minibatch(b, st, adv, w, 2)
    single = jax.jit(lambda p, o, m: ts.update(graphdef, p, o, m, SPEC, tx, "all"))
    p_ref, _, m_ref = single(params, tx.init(params), mb)

    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    p_sh = parallel.param_shardings(params, mesh)
    params_sharded = jax.device_put(params, p_sh)
    o_sh = parallel.opt_state_shardings(jax.eval_shape(tx.init, params), p_sh, mesh)
    opt = jax.jit(tx.init, out_shardings=o_sh)(params_sharded)
    micro_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
    sharded = jax.jit(lambda p, o, m: ts.update(graphdef, p, o, m, SPEC, tx, "all"),
                      in_shardings=(p_sh, o_sh, micro_sh), out_shardings=(p_sh, o_sh, None))
    p_new, _, m_new = sharded(params_sharded, opt, jax.device_put(mb, micro_sh))
    q = p_new["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert float(m_new["loss"]) == pytest.approx(float(m_ref["loss"]), rel=1e-5)
    assert float(m_new["grad_norm"]) == pytest.approx(float(m_ref["grad_norm"]), rel=1e-5)
    for a, c in zip(jax.tree.leaves(p_new), jax.tree.leaves(p_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-4)


def test_non_finite_loss_skips_the_update():
    graphdef, params, tx, b, st, adv, w = _setup()
    adv = adv.copy()
    adv[3] = np.nan
    opt = tx.init(params)
    p_new, o_new, m = jax.jit(lambda p, o, mb: ts.update(graphdef, p, o, mb, SPEC, tx, "selected"))(
        params, opt, _minibatch(b, st, adv, w, 2))
    assert int(m["skipped"]) == 1
    for a, c in zip(jax.tree.leaves(p_new), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    for a, c in zip(jax.tree.leaves(o_new), jax.tree.leaves(opt)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_geometry_programs_equal_separate_gradients_of_each_subset():
    """Oracle: DAPO's clipped surrogate written by hand on the model's log-softmax, normalised by each
    subset's own token count, differentiated per subset by jax.grad; norms, cosines and projections in
    float64 numpy; every token's own gradient (jax.jacrev) for the projections; the sketch from its
    numpy definition. Over a data × fsdp × tensor mesh, where each gradient comes back sharded like
    the parameters (the host loop never holds a replicated copy)."""
    import oracles
    from jaxrl_entropy.training import step_programs
    from jaxrl_entropy.rl import diagnostics
    graphdef, params, _, b, st, adv, w = _setup(seed=2)
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    p_sh = parallel.param_shardings(params, mesh)
    rows_sh = parallel.batch_sharding(mesh, 2)
    sketch = diagnostics.GradientSketch(dim=1 << 10, seed=3)
    prog = step_programs.geometry_programs(graphdef, SPEC, sketch, params_sharding=p_sh, rows_sharding=rows_sh)
    n = 8
    part_np = {k: v[0] for k, v in _minibatch(b, st, adv, w, M // n).items()}
    part = jax.device_put({k: jnp.asarray(v) for k, v in part_np.items()}, rows_sh)
    subsets = diagnostics.geometry_subsets(jnp.asarray(part_np["response_mask"]), st["hnorm"][:n], fraction=0.3,
                                           rng=jax.random.key(4))
    metrics, sketches, align = prog(jax.device_put(params, p_sh), part, subsets)

    mask = part_np["response_mask"].astype(bool)

    def surrogate(p):  # [n, N] each token's clipped loss
        logits = qwen3.merge_for_compute(graphdef, p)(jnp.asarray(part_np["input_ids"]),
                                                      attention_mask=jnp.asarray(part_np["attention_mask"])).logits
        logp_all = jax.nn.log_softmax(logits[:, P - 1:P + N - 1].astype(jnp.float32), axis=-1)
        logp = jnp.take_along_axis(logp_all, jnp.asarray(part_np["response"])[..., None], axis=-1)[..., 0]
        rho = jnp.exp(logp - part_np["old_logp"])
        a = jnp.asarray(part_np["advantage"])
        s = jnp.maximum(-a * rho, -a * jnp.clip(rho, 0.8, 1.28))
        return jnp.where(mask, jnp.where(a < 0, jnp.minimum(s, -a * 10.0), s), 0.0)

    def flat(tree):
        return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])

    subset_grad = jax.jit(jax.grad(lambda p, wk: jnp.sum(wk * surrogate(p)) / jnp.sum(wk * mask)))
    grads = {k: subset_grad(params, wk) for k, wk in subsets.items()}
    g_full = flat(grads["full"])
    for k, g in grads.items():
        g = flat(g)
        assert float(metrics[f"{k}/norm"]) == pytest.approx(np.linalg.norm(g), rel=1e-4)
        assert float(metrics[f"{k}/cos_full"]) == pytest.approx(
            g @ g_full / np.linalg.norm(g) / np.linalg.norm(g_full), rel=1e-4, abs=1e-5)
        assert float(metrics[f"{k}/proj_full"]) == pytest.approx(g @ g_full / np.linalg.norm(g_full), rel=1e-4)
        want = oracles.count_sketch(jax.tree.leaves(grads[k]), 1 << 10, 3)
        np.testing.assert_allclose(np.asarray(sketches[k]), want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    g = prog.gradient(jax.device_put(params, p_sh), part, subsets["anchor"])
    assert g["layers"][0]["self_attn"]["q_proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # every token's own gradient, [n, N, ...] per leaf. Eager on purpose: under jax 0.10.2 on CPU,
    # jit(jacrev(surrogate)) gave rows up to 16 % off both the eager jacrev and single-token
    # jax.grad (which agree to 1e-7); jit(vmap(grad)) over weights and jit(grad) are exact.
    jac = jax.jacrev(surrogate)(params)
    per_token = np.concatenate([np.asarray(x, np.float64).reshape(n, N, -1) for x in jax.tree.leaves(jac)], axis=-1)
    want = per_token @ g_full / np.linalg.norm(g_full)
    np.testing.assert_allclose(np.asarray(align), np.where(mask, want, 0.0), rtol=1e-3, atol=1e-6)
