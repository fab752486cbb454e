"""The engine behind the trainer: sizing from the config, the inference copy of the weights,
tensor-parallel generation, `PolicySampler` on the engine, the rollout/training log-prob metric."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import tiny_config
from jaxrl_entropy.training import engine_setup, model_setup
from jaxrl_entropy import parallel
from jaxrl_entropy.config import ConfigError
from jaxrl_entropy.models import engine as eng
from jaxrl_entropy.models import paged_cache, sampler
from jaxrl_entropy.training.rollout import PolicySampler, behaviour_gap_metrics, logp_diff_metrics


@pytest.fixture(scope="module")
def setup():
    from jaxrl_entropy.training import data_setup
    cfg = tiny_config()
    tok = data_setup.tokenizer_for(cfg)
    mesh = model_setup.build_mesh(cfg.parallel)  # 8 fake devices, data-parallel
    policy = model_setup.load_policy(cfg, mesh, tok)
    return cfg, tok, policy


def _batch(tok, B=8, G=4, seed=0):
    rng = np.random.default_rng(seed)
    P = 12
    ids = np.zeros((B // G, P), np.int32)
    mask = np.zeros((B // G, P), np.int32)
    for i, n in enumerate(rng.integers(3, P + 1, B // G)):
        ids[i, P - n:] = rng.integers(3, len(tok), n)
        mask[i, P - n:] = 1
    return np.repeat(ids, G, 0), np.repeat(mask, G, 0)


def test_plan_sizes_slots_and_pages(setup):
    cfg, _, policy = setup
    cfg = cfg.copy_and_resolve_references()
    cfg.rollout.max_slots = 0  # automatic (the demo sets 32)
    arch, cpu = policy.arch, jax.devices()[0]
    per_token = paged_cache.bytes_per_token(arch, jnp.float32)
    P, N, page = cfg.data.max_prompt_len, cfg.rollout.max_new_tokens, cfg.rollout.page_size
    per_request = -(-(N + page) // page)
    per_prompt = -(-P // page)
    budget_pages = 1 + 10 * (per_request + per_prompt)
    spec = engine_setup.plan(cfg, arch, tp=1, budget_bytes=budget_pages * page * per_token, rows=1000, device=cpu)
    # by hand: prompts shared by a group of 4 → each request costs per_request + per_prompt / 4 pages
    assert spec.num_slots == (budget_pages - 1) // (per_request + per_prompt / 4)
    assert spec.num_pages == min(budget_pages, 1 + spec.num_slots * (per_request + per_prompt))
    assert engine_setup.plan(cfg, arch, tp=1, budget_bytes=1e9, rows=6, device=cpu).num_slots == 6  # ≤ rows
    with pytest.raises(ConfigError, match="rollout.kv_cache_gib"):
        engine_setup.plan(cfg, arch, tp=1, budget_bytes=per_token * page, rows=8, device=cpu)
    # room for a request's own pages and a quarter of its prompt's (a group of 4 shares them) but
    # not the whole prompt it holds when alone: refused here, not at the first rollout
    cfg.rollout.page_size = page = 8
    per_request, per_prompt = -(-(N + page) // page), -(-P // page)
    short = 1 + per_request + per_prompt - 1
    assert per_prompt >= 2 and (short - 1) // (per_request + per_prompt / 4) >= 1
    with pytest.raises(ConfigError, match="rollout.kv_cache_gib"):
        engine_setup.plan(cfg, arch, tp=1, budget_bytes=short * page * per_token, rows=8, device=cpu)
    spec = engine_setup.plan(cfg, arch, tp=1, budget_bytes=(short + 1) * page * per_token, rows=8, device=cpu)
    assert max(eng.request_pages(n, N, page) for n in range(1, P + 1)) <= spec.num_pages - 1


def test_inference_params_tensor_parallel_and_greedy_tokens(setup):
    """Weights gathered from the 8-device data-parallel mesh onto a 2-device tensor-parallel engine:
    the same values, heads split; its greedy tokens equal the dense sampler's."""
    cfg, tok, policy = setup
    spec = eng.EngineSpec(num_slots=3, page_size=4, num_pages=64, max_prompt_len=12, decode_chunk=4,
                          prefill_tokens=16)
    devices = engine_setup.host_devices(jax.local_devices())
    engine = eng.Engine(policy.arch, spec, engine_setup.engine_mesh(devices, 2))
    params = engine_setup.inference_params(engine, policy.params, policy.mesh)
    q = params["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "tensor") and len(q.sharding.device_set) == 2
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, policy.params)
    ids, mask = _batch(tok)
    sp = sampler.SamplingParams(max_new_tokens=10, temperature=0.0, eos_ids=(tok.eos_token_id,),
                                pad_id=tok.pad_token_id)
    out = engine.generate(params, ids, mask, jax.random.key(0), sp)
    ref = sampler.generate(policy.module(), ids, mask, jax.random.key(0), sp)
    np.testing.assert_array_equal(out.tokens, np.asarray(ref.tokens))
    np.testing.assert_allclose(out.logprobs, np.asarray(ref.logprobs), atol=1e-4)
    # top-k / top-p on the 2-way split vocabulary (filtered per shard) samples what one device does
    assert policy.arch.vocab_size % 2 == 0   # else the engine filters the whole row, untested here
    one = eng.Engine(policy.arch, spec, engine_setup.engine_mesh(devices, 1))
    one_params = engine_setup.inference_params(one, policy.params, policy.mesh)
    for top_k, top_p in ((0, 0.8), (5, 0.9)):
        sp = sampler.SamplingParams(max_new_tokens=10, temperature=1.0, top_k=top_k, top_p=top_p,
                                    eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
        split, whole = (e.generate(p, ids, mask, jax.random.key(3), sp) for e, p in ((engine, params), (one, one_params)))
        np.testing.assert_array_equal(split.tokens, whole.tokens)
        np.testing.assert_allclose(split.behaviour_logprobs, whole.behaviour_logprobs, atol=1e-4)
        assert np.any(split.behaviour_logprobs > split.logprobs + 1e-3)   # the truncation was real


def test_policy_sampler_uses_the_engine(setup):
    cfg, tok, policy = setup
    paged = PolicySampler(policy, cfg)
    dense = PolicySampler(policy, tiny_config(**{"rollout.engine": "dense"}))
    assert paged.engine is not None and dense.engine is None
    ids, mask = _batch(tok, seed=1)
    sp = sampler.SamplingParams(max_new_tokens=8, temperature=0.0, eos_ids=(tok.eos_token_id,),
                                pad_id=tok.pad_token_id)
    a = paged(policy.params, ids, mask, jax.random.key(0), sp)
    b = dense(policy.params, ids, mask, jax.random.key(0), sp)
    np.testing.assert_array_equal(parallel.to_host(a.tokens), parallel.to_host(b.tokens))
    first = paged.inference_params(policy.params)
    assert paged.inference_params(policy.params) is first  # resharded once per parameter set
    paged.release()
    assert paged._inference is None


def test_logp_diff_metrics_by_hand():
    rollout = np.array([[-1.0, -2.0, -9.0], [-0.5, -0.1, -0.3]])
    old = np.array([[-1.5, -2.0, 0.0], [-0.4, -0.1, -7.0]])
    mask = np.array([[1, 1, 0], [1, 1, 1]], bool)
    m = logp_diff_metrics(rollout, old, mask)
    diffs = [0.5, 0.0, 0.1, 0.0, 6.7]  # masked-out |−9 − 0| excluded
    assert m["rollout/logp_diff_max"] == pytest.approx(6.7)
    assert m["rollout/logp_diff_mean"] == pytest.approx(np.mean(diffs))
    assert logp_diff_metrics(rollout, old, np.zeros_like(mask))["rollout/logp_diff_max"] == 0.0


def test_behaviour_gap_metrics_by_hand():
    full = np.log(np.array([[0.5, 0.2, 0.1], [0.6, 0.3, 0.9]]))
    kept_mass = np.array([[0.8, 0.5, 1.0], [0.9, 0.9, 0.2]])
    behaviour = full - np.log(kept_mass)
    mask = np.array([[1, 1, 0], [1, 1, 0]], bool)
    m = behaviour_gap_metrics(behaviour, full, mask)
    gaps = -np.log([0.8, 0.5, 0.9, 0.9])   # the masked-out 1.0 and 0.2 excluded
    assert m["rollout/behaviour_logp_gap_mean"] == pytest.approx(gaps.mean())
    assert m["rollout/behaviour_logp_gap_max"] == pytest.approx(-np.log(0.5))


def test_engine_programs_compile_for_tpu(tpu_devices):
    """The engine's prefill and decode programs compile with the real TPU compiler (Mosaic paged
    attention under tensor parallelism) for a v5p host, from abstract arguments."""
    import jaxrl_entropy.kernels.paged_attention as pa

    if not pa.tpu_kernel_available():
        pytest.skip("this jax has no TPU paged-attention kernel")
    cfg = tiny_config(**{"rollout.kv_cache_gib": 0.01, "rollout.max_slots": 8, "rollout.page_size": 16,
                         "model.dtype": "bfloat16", "model.attention": "kernel"})
    devices = tpu_devices("v5p:2x2x1")
    mesh = model_setup.build_mesh(cfg.parallel, devices=devices)
    from jaxrl_entropy.models import qwen3
    arch = qwen3.Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=128)
    programs = engine_setup.aot_programs(cfg, model_setup.abstract_policy(cfg, mesh, arch), mesh)
    assert [p.name for p in programs] == ["rollout/prefill", "rollout/decode"]
    for p in programs:
        compiled = p.fn.trace(*p.args).lower().compile()
        assert compiled.memory_analysis().argument_size_in_bytes > 0
        assert "tpu_custom_call" in compiled.as_text()  # Mosaic: the paged kernel / the flash kernel
