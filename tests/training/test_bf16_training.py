"""`model.param_dtype=bfloat16` in the trainer: the optimiser keeps a float32 master copy of the
parameters (sharded like them, checkpointed with the run) and float32 moments; the bf16
parameters are the master rounded after each update. Oracle: the float32 run's parameter delta
from the same start."""
import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp

from conftest import tiny_config
from jaxrl_entropy import chips
from jaxrl_entropy.aot import dryrun
from jaxrl_entropy.rl import master_weights as mw
from jaxrl_entropy.rl import train_step as ts
from jaxrl_entropy.training import engine_setup, model_setup, step_programs
from jaxrl_entropy.training.program import Program

UPDATES = 3


def _cfg(param_dtype, **overrides):
    return tiny_config(**{"model.param_dtype": param_dtype, "optim.lr": 1e-6, "optim.warmup_steps": 0,
                          "parallel.data": 2, "parallel.fsdp": 2, "parallel.tensor": 2, **overrides})


@pytest.fixture(scope="module")
def tokenizer():
    from jaxrl_entropy.training import data_setup
    return data_setup.tokenizer_for(_cfg("float32"))


def _rollout(cfg, vocab, seed=0):
    """A rollout of the config's shapes: random tokens, some prompts left-padded, responses of
    random lengths, random advantages, every valid token weighted 1."""
    sh = step_programs.step_shapes(cfg)
    rng = np.random.default_rng(seed)
    M, P, N = sh.mini, sh.prompt_len, sh.response_len
    prompt = rng.integers(3, vocab, (M, P))
    pmask = np.ones((M, P), np.int32)
    for i in range(M):
        pmask[i, :rng.integers(0, P // 2)] = 0
    seqs = ts.build_sequences(prompt * pmask, pmask, rng.integers(3, vocab, (M, N)), rng.integers(1, N + 1, M))
    seqs["advantage"] = np.broadcast_to(rng.normal(size=(M, 1)), (M, N)).astype(np.float32)
    seqs["weights"] = seqs["response_mask"].astype(np.float32)
    return seqs


def _updates(cfg, prog, policy, params, seqs, old_logp):
    data = dict(seqs, old_logp=old_logp)
    data = {k: data[k] for k in step_programs.UPDATE_KEYS}
    opt = prog.init_opt_state(params)
    for _ in range(UPDATES):
        params, opt, _, skipped, _ = step_programs.apply_updates(
            prog, params, opt, data, mini_batch_rows=data["input_ids"].shape[0],
            micro_batch_size=cfg.rl.micro_batch_size // 2)   # two micro-batches: accumulation too
        assert skipped == 0
    return params, opt


def _rel_err(new, start, oracle_delta):
    f32 = lambda t: [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]
    num = sum(np.sum((n - s - o) ** 2) for n, s, o in zip(f32(new), f32(start), oracle_delta))
    return float(np.sqrt(num / sum(np.sum(o ** 2) for o in oracle_delta)))


@pytest.mark.slow  # three update programs compiled on 8 devices (the maths alone: tests/rl/test_master_weights.py)
def test_bf16_updates_at_lr_1e_6_move_the_parameters_as_float32_does(tokenizer):
    cfg16, cfg32 = _cfg("bfloat16"), _cfg("float32")
    mesh = model_setup.build_mesh(cfg16.parallel)
    pol16 = model_setup.load_policy(cfg16, mesh, tokenizer)
    pol32 = model_setup.load_policy(cfg32, mesh, tokenizer)
    start16 = pol16.params
    start32 = jax.device_put(jax.tree.map(lambda x: x.astype(jnp.float32), start16), pol32.shardings)  # same point
    seqs = _rollout(cfg16, len(tokenizer))

    prog32 = step_programs.build(cfg32, pol32, step_programs.optimizer_from_config(cfg32))
    batch = {k: jax.device_put(seqs[k], prog32.batch_sharding) for k in step_programs.ROLLOUT_KEYS}
    old_logp = prog32.rollout_stats(start32, batch)["old_logp"]
    new32, _ = _updates(cfg32, prog32, pol32, start32, seqs, old_logp)
    oracle = [np.asarray(n, np.float64) - np.asarray(s, np.float64)
              for n, s in zip(jax.tree.leaves(new32), jax.tree.leaves(start32))]

    tx16 = step_programs.optimizer_from_config(cfg16)
    prog16 = step_programs.build(cfg16, pol16, tx16)
    new16, opt16 = _updates(cfg16, prog16, pol16, start16, seqs, old_logp)
    assert isinstance(opt16, mw.MasterWeightsState)
    # the old behaviour: AdamW on the bf16 parameters themselves, its moments in bf16
    naive_tx = ts.make_optimizer(1e-6, b1=0.9, b2=0.999, weight_decay=0.1, warmup_steps=0, grad_clip=1.0)
    naive, naive_opt = _updates(cfg16, step_programs.build(cfg16, pol16, naive_tx), pol16, start16, seqs, old_logp)
    assert {x.dtype for x in jax.tree.leaves(naive_opt) if x.ndim} == {jnp.dtype(jnp.bfloat16)}

    err_master = _rel_err(opt16.master, start16, oracle)
    err_naive = _rel_err(naive, start16, oracle)
    print(f"relative parameter-delta error vs float32 after {UPDATES} updates at lr 1e-6: master {err_master:.2e}, "
          f"naive bf16 {err_naive:.2e}")
    # what is left of the error is the gradients' (taken through the bf16 weights), not the optimiser's
    assert err_master < 0.1
    assert err_naive > 0.8          # the update rounds away

    # the model computes with bf16 parameters: the master rounded; master and moments are float32,
    # sharded like the parameters (one rules table)
    for p, m in zip(jax.tree.leaves(new16), jax.tree.leaves(opt16.master)):
        assert p.dtype == jnp.bfloat16 and m.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(p), np.asarray(m.astype(jnp.bfloat16)))
    for m, sh in zip(jax.tree.leaves(opt16.master), jax.tree.leaves(pol16.shardings)):
        assert m.sharding == sh
    mu = opt16.inner[1][0].mu
    for m, sh in zip(jax.tree.leaves(mu), jax.tree.leaves(pol16.shardings)):
        assert m.dtype == jnp.float32 and m.sharding == sh
    assert any(len(set(sh.spec) - {None}) for sh in jax.tree.leaves(pol16.shardings))  # something is sharded


def test_memory_estimates_count_the_master_copy(tokenizer):
    """bf16 parameters: 2 bytes + 4 (master) + 8 (moments) per parameter; float32: 4 + 8. The
    count is the optimiser state's real size (`tx.init`'s shapes); `dryrun`'s GPU estimate and the
    engine's KV budget use it."""
    topo = chips.resolve("h100x8")
    totals = {}
    for dtype, param_bytes, opt_bytes in (("float32", 4, 8), ("bfloat16", 2, 12)):
        cfg = _cfg(dtype)
        assert step_programs.optimizer_bytes_per_param(cfg.model) == opt_bytes
        policy = model_setup.abstract_policy(cfg, model_setup.build_mesh(cfg.parallel),
                                             model_setup.architecture(cfg.model, tokenizer))
        n = sum(x.size for x in jax.tree.leaves(policy.params))
        state = jax.eval_shape(step_programs.optimizer_from_config(cfg).init, policy.params)
        assert sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if x.ndim) == opt_bytes * n
        assert engine_setup.training_bytes_per_device(cfg, n, 8) == (param_bytes + opt_bytes) * n / 8
        rep = dryrun.estimate_gpu(cfg, policy, Program("update", None, ()), topo)
        parts = dict(part.rsplit(" ", 2)[:2] for part in rep.estimate.split(": ", 1)[1].split(", "))
        assert float(parts["optimiser"]) == pytest.approx(opt_bytes * n / 8 / 2**30, abs=0.006)
        totals[dtype] = rep.total_bytes
    # bf16 parameters now cost 2 bytes per parameter more than float32 ones (14 vs 12), not half
    n = sum(x.size for x in jax.tree.leaves(policy.params))
    assert totals["bfloat16"] - totals["float32"] == pytest.approx(2 * n / 8)


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow  # whole trainers
def test_master_copy_is_checkpointed_resumed_bit_identically_and_old_checkpoints_load(tmp_path, caplog):
    from jaxrl_entropy.training.trainer import Trainer
    cfg = lambda steps: tiny_config(**{"model.param_dtype": "bfloat16", "train.steps": steps, "eval.every": 0,
                                       "train.checkpoint_every": 1})
    first = Trainer(cfg(2), str(tmp_path))
    first.run()
    assert isinstance(first.opt_state, mw.MasterWeightsState)
    saved = {"params": first.params, "opt_state": first.opt_state}
    first.close()

    resumed = Trainer(cfg(3), str(tmp_path))   # what a resumed run starts from: the same bits
    assert resumed.step == 2
    _leaves_equal({"params": resumed.params, "opt_state": resumed.opt_state}, saved)
    moved = sum(int(np.sum(np.asarray(m) != np.asarray(p, np.float32)))
                for m, p in zip(jax.tree.leaves(resumed.opt_state.master), jax.tree.leaves(resumed.params)))
    assert moved > 0   # the master holds what the bf16 parameters cannot: it is not their copy

    # a checkpoint of a run from before master weights: bf16 parameters, bf16 moments, no master
    legacy = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, resumed.opt_state.inner)
    resumed.checkpointer.save(3, {"params": resumed.params, "opt_state": legacy}, {"step": 3, "sft_done": True})
    params3 = resumed.params
    resumed.close()
    with caplog.at_level("WARNING", logger="jaxrl_entropy"):
        upgraded = Trainer(cfg(4), str(tmp_path))
    assert upgraded.step == 3
    assert any("without a float32 master copy" in r.getMessage() for r in caplog.records)
    _leaves_equal(upgraded.opt_state.master, jax.tree.map(lambda x: x.astype(jnp.float32), params3))
    _leaves_equal(upgraded.opt_state.inner, jax.tree.map(
        lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, legacy))
    for m, sh in zip(jax.tree.leaves(upgraded.opt_state.master), jax.tree.leaves(upgraded.policy.shardings)):
        assert m.sharding == sh
    upgraded.run()        # and trains on, saving the new layout
    assert upgraded.step == 4
    upgraded.close()
    again = Trainer(cfg(4), str(tmp_path))
    assert again.step == 4 and isinstance(again.opt_state, mw.MasterWeightsState)
    again.close()


def test_a_checkpoint_that_does_not_fit_is_still_refused_naming_the_mismatch(tmp_path):
    """The fallback to the layout without a master copy only reads that layout: a checkpoint of
    another model is refused with orbax's own account of the mismatch."""
    from jaxrl_entropy.rundir.checkpoint import Checkpointer, CheckpointMismatchError
    tx = ts.make_optimizer(1e-6, b1=0.9, b2=0.999, weight_decay=0.1, warmup_steps=0, grad_clip=1.0,
                           param_dtype=jnp.bfloat16)
    other = {"w": jnp.zeros((4, 3), jnp.bfloat16)}
    ck = Checkpointer(str(tmp_path / "ck"))
    ck.save(1, {"params": other, "opt_state": tx.init(other)}, {"step": 1})
    params = {"w": jnp.zeros((4, 5), jnp.bfloat16)}
    with pytest.raises(CheckpointMismatchError, match="does not fit this run's model"):
        step_programs.restore_latest(ck, {"params": params, "opt_state": tx.init(params)}, on_corrupt="fail")
    ck.close()


def test_the_warmup_optimiser_keeps_a_master_copy_too():
    from jaxrl_entropy.training import warmup
    params = {"w": jnp.full((4, 4), 0.02, jnp.bfloat16)}
    cfg = tiny_config(**{"model.param_dtype": "bfloat16", "train.sft_lr": 1e-6})
    state = warmup.init_opt_state(cfg, params)
    assert isinstance(state, mw.MasterWeightsState) and state.master["w"].dtype == jnp.float32
    updates, state = warmup.optimizer(cfg).update({"w": jnp.ones((4, 4), jnp.bfloat16)}, state, params)
    start = float(params["w"][0, 0])
    assert float(state.master["w"][0, 0]) == pytest.approx(start - 1e-6, abs=2e-9)  # AdamW's first step: lr
    new = optax.apply_updates(params, updates)["w"]
    assert new.dtype == jnp.bfloat16 and float(new[0, 0]) == start        # a bf16 step is 1.2e-4 here
