"""The continuous-batching engine: the same tokens as the dense sampler and HF `generate` (greedy),
the right sampling distribution, tokens independent of scheduling, page accounting."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_entropy.models import engine as eng
from jaxrl_entropy.models import paged_cache, qwen3, sampler

EOS = 5


def _params(model):
    return nnx.to_pure_dict(nnx.state(model))


@pytest.fixture(scope="module")
def tiny():
    """A 2-layer model with sharp (scaled-up) weights, so greedy decoding has no near-ties."""
    cfg = qwen3.Qwen3Config(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = qwen3.init_random(cfg, seed=0)
    nnx.update(model, jax.tree.map(lambda x: x * 6 if x.ndim == 2 else x, _params(model)))
    return cfg, model


def _prompts(B=7, P=11, seed=0, vocab=48):
    """Left-padded prompts of varied lengths (1 .. P), with a repeated prompt (a group)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(6, vocab, (B, P))
    mask = np.ones((B, P), np.int32)
    for b, n in enumerate([11, 3, 7, 7, 1, 9, 5][:B]):
        mask[b, :P - n] = 0
    ids[3] = ids[2]
    ids[mask == 0] = 0
    return ids, mask


def _engine(cfg, *, slots=3, page=4, pages=64, chunk=5, prompt_len=11, prefill_tokens=16):
    spec = eng.EngineSpec(num_slots=slots, page_size=page, num_pages=pages, max_prompt_len=prompt_len,
                          decode_chunk=chunk, prefill_tokens=prefill_tokens)
    return eng.Engine(cfg, spec)


def test_greedy_equals_dense_sampler(tiny):
    cfg, model = tiny
    ids, mask = _prompts()
    sp = sampler.SamplingParams(max_new_tokens=18, temperature=0.0, eos_ids=(EOS,), pad_id=0)
    ref = sampler.generate(model, ids, mask, jax.random.key(0), sp)
    e = _engine(cfg)
    out = e.generate(e.prepare_params(_params(model)), ids, mask, jax.random.key(0), sp)
    np.testing.assert_array_equal(out.tokens, np.asarray(ref.tokens))
    np.testing.assert_array_equal(out.lengths, np.asarray(ref.lengths))
    np.testing.assert_array_equal(out.finished, np.asarray(ref.finished))
    np.testing.assert_allclose(out.logprobs, np.asarray(ref.logprobs), atol=1e-4)
    assert out.finished.any() and not out.finished.all()  # both ways of ending are exercised
    # rows 2 and 3 share a prompt: prefilled once (n − 1 tokens per distinct prompt)
    distinct = {tuple(ids[b][mask[b] == 1]) for b in range(len(ids))}
    assert e.last_stats["prefill_tokens"] == sum(len(p) - 1 for p in distinct)
    assert e.last_stats["pages_free_at_end"] == e.last_stats["pages_capacity"]


def test_greedy_equals_hf_generate(make_hf_qwen3, torch):
    hf_model, path = make_hf_qwen3(scale=0.3, seed=1)
    model = qwen3.from_pretrained(path)
    ids, mask = _prompts(B=5, P=7, seed=3, vocab=101)
    e = _engine(model.config, slots=2, page=4, chunk=4, prompt_len=7)
    params = e.prepare_params(_params(model))
    sp = sampler.SamplingParams(max_new_tokens=12, temperature=0.0, pad_id=0)
    eos = int(np.bincount(e.generate(params, ids, mask, jax.random.key(0), sp).tokens.ravel()).argmax())
    with torch.no_grad():  # a token greedy decoding emits, so the EOS handling is exercised
        ref = hf_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                max_new_tokens=12, eos_token_id=eos, pad_token_id=0)[:, 7:].numpy()
    out = e.generate(params, ids, mask, jax.random.key(0),
                     sampler.SamplingParams(max_new_tokens=12, temperature=0.0, eos_ids=(eos,), pad_id=0))
    np.testing.assert_array_equal(out.tokens[:, :ref.shape[1]], ref)
    assert out.finished.any()


def test_sampling_distribution_matches_softmax(tiny):
    """First-token frequencies of 6000 samples of one prompt against softmax(logits / T) of the
    full forward (an oracle independent of the engine): chi-square p > 1e-4 and every
    |frequency − p| within 4.5 binomial standard deviations (a fixed key: the test cannot flake)."""
    from scipy import stats

    cfg, model = tiny
    # softer weights than `tiny`, so many tokens have visible mass
    soft = qwen3.init_random(cfg, seed=4)
    nnx.update(soft, jax.tree.map(lambda x: x * 2 if x.ndim == 2 else x, _params(soft)))
    prompt = np.array([[7, 8, 9, 10, 11]])
    T, n = 0.8, 6000
    logits = np.asarray(soft(jnp.asarray(prompt)).logits[0, -1], np.float64) / T
    p = np.exp(logits - logits.max())
    p /= p.sum()
    e = _engine(cfg, slots=64, page=4, pages=256, chunk=2, prompt_len=5)
    out = e.generate(e.prepare_params(_params(soft)), np.repeat(prompt, n, 0), np.ones((n, 5), np.int32),
                     jax.random.key(11), sampler.SamplingParams(max_new_tokens=1, temperature=T))
    counts = np.bincount(out.tokens[:, 0], minlength=cfg.vocab_size)
    big = n * p >= 5  # chi-square cells need expected counts >= 5: the rest are pooled
    observed, expected = counts[big], n * p[big]
    if (~big).any():
        observed, expected = np.append(observed, counts[~big].sum()), np.append(expected, n * p[~big].sum())
    assert big.sum() >= 8
    assert stats.chisquare(observed, expected).pvalue > 1e-4
    assert np.all(np.abs(counts / n - p) <= 4.5 * np.sqrt(p * (1 - p) / n) + 1e-12)
    # the returned log-probs are those of the sampled tokens under softmax(logits / T)
    np.testing.assert_allclose(out.logprobs[:, 0], np.log(p[out.tokens[:, 0]]), atol=1e-4)


def test_tokens_do_not_depend_on_scheduling(tiny):
    """Sampling (T = 1) with 2 vs 7 slots, chunk 3 vs 8, and a pool so small that requests are
    preempted and restarted: the same tokens for every row."""
    cfg, model = tiny
    ids, mask = _prompts()
    sp = sampler.SamplingParams(max_new_tokens=16, temperature=1.0, eos_ids=(EOS,), pad_id=0)
    runs, stats = {}, {}
    for name, kw in {"2 slots": dict(slots=2, chunk=3), "7 slots": dict(slots=7, chunk=8),
                     "preempting": dict(slots=7, chunk=3, pages=12)}.items():
        e = _engine(cfg, **kw)
        runs[name] = e.generate(e.prepare_params(_params(model)), ids, mask, jax.random.key(5), sp)
        stats[name] = e.last_stats
    assert stats["preempting"]["preemptions"] > 0
    base = runs["2 slots"]
    for name, out in runs.items():
        np.testing.assert_array_equal(out.tokens, base.tokens, err_msg=name)
        np.testing.assert_array_equal(out.lengths, base.lengths, err_msg=name)
        np.testing.assert_allclose(out.logprobs, base.logprobs, atol=1e-5, err_msg=name)
        assert stats[name]["pages_free_at_end"] == stats[name]["pages_capacity"], name
    # and sampling is not degenerate: rows of the same prompt (2, 3) draw different responses
    assert not np.array_equal(base.tokens[2], base.tokens[3])


def test_request_too_large_for_the_pool(tiny):
    cfg, model = tiny
    ids, mask = _prompts()
    e = _engine(cfg, pages=5)
    with pytest.raises(eng.RequestTooLarge, match="rollout.kv_cache_gib"):
        e.generate(e.prepare_params(_params(model)), ids, mask, jax.random.key(0),
                   sampler.SamplingParams(max_new_tokens=16))


def test_page_pool_accounting():
    pool = paged_cache.PagePool(5)
    a = pool.alloc(3)
    assert paged_cache.NULL_PAGE not in a and pool.num_free == 1
    with pytest.raises(paged_cache.PoolExhausted):
        pool.alloc(2)
    pool.free(a[:1])
    with pytest.raises(ValueError, match="freed twice"):
        pool.free(a[:1])
    pool.free(a[1:])
    assert pool.num_free == pool.capacity == 4


def test_prefill_buckets_and_rows_by_hand():
    spec = eng.EngineSpec(num_slots=4, page_size=32, num_pages=10, max_prompt_len=1024, prefill_tokens=8192)
    assert spec.buckets() == (32, 64, 128, 256, 512, 1024)
    assert spec.bucket_for(33) == 64 and spec.bucket_for(1023) == 1024
    assert [spec.prefill_rows(1024, n) for n in (1, 2, 3, 5, 8, 20)] == [1, 2, 4, 8, 8, 8]
    tpu = eng.EngineSpec(num_slots=4, page_size=32, num_pages=10, max_prompt_len=1000, prefill_multiple=128)
    assert tpu.buckets() == (128, 256, 512, 1024)  # splash attention tiles by 128
    with pytest.raises(ValueError, match="data.max_prompt_len"):
        spec.bucket_for(2000)


def test_write_token_by_hand():
    """Oracle: a numpy loop writing each live row's K/V at (page_table[pos // page], pos % page);
    an idle row writes only the null page; nothing else changes."""
    rng = np.random.default_rng(0)
    K, N, page, D, S = 2, 9, 4, 8, 4
    pool = rng.normal(size=(K, N, page, D)).astype(np.float32)
    table = np.array([[1, 2, 0], [3, 4, 5], [6, 0, 0], [7, 8, 0]], np.int32)
    pos = np.array([5, 10, 0, 3], np.int32)
    live = np.array([True, True, True, False])
    new = rng.normal(size=(S, K, D)).astype(np.float32)
    out = np.asarray(paged_cache.write_token(jnp.asarray(pool), jnp.asarray(new), jnp.asarray(table),
                                             jnp.asarray(pos), jnp.asarray(live)))
    want = pool.copy()
    for s in range(S):
        if live[s]:
            want[:, table[s, pos[s] // page], pos[s] % page] = new[s]
    np.testing.assert_array_equal(out[:, 1:], want[:, 1:])          # every real page
    assert np.array_equal(out[:, 0, 1:], pool[:, 0, 1:])             # the null page: at most slot 0 written


def test_decode_loop_writes_the_pool_in_place_for_tpu(tpu_devices):
    """The real TPU compiler: a decode-style loop that writes tokens with `write_token` into a
    donated pool and reads it keeps no second copy of the pool (a token-sized scatter made XLA
    hold the loop's pool in another layout: temporaries = the pool)."""
    from jax.sharding import SingleDeviceSharding

    sh = SingleDeviceSharding(tpu_devices("v5p:2x2x1")[0])
    K, N, page, D, S, M = 2, 4096, 32, 128, 8, 4

    def loop(pools, table, pos):
        def body(c):
            i, pools, acc = c
            new = jnp.full((S, K, D), i, jnp.float32)
            pools = tuple(paged_cache.write_token(p, new, table, pos + i, jnp.ones(S, bool)) for p in pools)
            return i + 1, pools, acc + sum(jnp.sum(p[:, table[:, 0]].astype(jnp.float32)) for p in pools)
        return jax.lax.while_loop(lambda c: c[0] < 32, body, (0, pools, 0.0))[1:]

    pool = jax.ShapeDtypeStruct((K, N, page, D), jnp.bfloat16, sharding=sh)
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh)
    compiled = jax.jit(loop, donate_argnums=0).trace((pool, pool), ints(S, M), ints(S)).lower().compile()
    pool_bytes = 2 * K * N * page * D * 2
    assert compiled.memory_analysis().temp_size_in_bytes < 0.1 * pool_bytes


def test_row_keys_are_fold_in_of_the_row_id_with_few_compiled_programs():
    base = jax.random.key(7)
    before = eng._fold_in_rows._cache_size()
    for n in (1, 5, 8, 9, 100, 128, 130):
        ids = np.arange(1000, 1000 + n) * 3
        got = eng.row_keys(base, ids)
        want = np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(base, int(i)))) for i in ids])
        np.testing.assert_array_equal(got, want)
    # sizes 1..130 fall in 8, 16, 128, 256: four programs, not one per call size (seven here)
    assert eng._fold_in_rows._cache_size() - before <= 4
