"""KV-cache sampler against HF `generate` (greedy) and hand-checkable sampling properties."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxrl_entropy.models import qwen3, sampler

EOS = 5


@pytest.fixture(scope="module")
def models(make_hf_qwen3):
    # larger weights: sharper distributions, so greedy has no near-ties
    hf_model, path = make_hf_qwen3(scale=0.3, seed=1)
    return hf_model, qwen3.from_pretrained(path)


def _prompts():
    rng = np.random.RandomState(0)
    ids = rng.randint(6, 101, (3, 7))
    mask = np.ones((3, 7), np.int64)
    mask[1, :3] = 0
    mask[2, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


def test_greedy_equals_hf_generate(models, torch):
    hf_model, model = models
    ids, mask = _prompts()
    eos = int(np.argmax(np.bincount(np.asarray(sampler.generate(
        model, ids, mask, jax.random.key(0), sampler.SamplingParams(max_new_tokens=12, temperature=0.0)
    ).tokens).ravel())))  # a token greedy decoding actually emits, so EOS handling is exercised
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                max_new_tokens=12, eos_token_id=eos, pad_token_id=0)[:, 7:].numpy()
    out = sampler.generate(model, ids, mask, jax.random.key(0),
                           sampler.SamplingParams(max_new_tokens=12, temperature=0.0, eos_ids=(eos,), pad_id=0))
    tokens = np.asarray(out.tokens)[:, :ref.shape[1]]
    np.testing.assert_array_equal(tokens, ref)
    for row, length in zip(np.asarray(out.tokens), np.asarray(out.lengths)):
        hits = np.flatnonzero(row == eos)
        assert length == (hits[0] + 1 if len(hits) else 12)
        assert np.all(row[length:] == 0)


def test_sampling_reproducible_and_key_dependent(models):
    _, model = models
    ids, mask = _prompts()
    p = sampler.SamplingParams(max_new_tokens=10, temperature=1.0, eos_ids=(EOS,))
    a = sampler.generate(model, ids, mask, jax.random.key(3), p)
    b = sampler.generate(model, ids, mask, jax.random.key(3), p)
    c = sampler.generate(model, ids, mask, jax.random.key(4), p)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_logprobs_match_teacher_forced_forward(models):
    _, model = models
    ids, mask = _prompts()
    out = sampler.generate(model, ids, mask, jax.random.key(7),
                           sampler.SamplingParams(max_new_tokens=8, temperature=0.7))
    full = np.concatenate([ids, np.asarray(out.tokens)], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(np.asarray(out.tokens))], axis=1)
    logits = np.asarray(model(jnp.asarray(full), attention_mask=jnp.asarray(full_mask)).logits, np.float64)
    logits = logits[:, 6:-1] / 0.7
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ref = np.take_along_axis(logits, np.asarray(out.tokens)[..., None], -1)[..., 0] - logz
    np.testing.assert_allclose(np.asarray(out.logprobs), ref, atol=2e-4)


def test_top_k_one_is_greedy(models):
    _, model = models
    ids, mask = _prompts()
    greedy = sampler.generate(model, ids, mask, jax.random.key(0), sampler.SamplingParams(8, temperature=0.0))
    topk1 = sampler.generate(model, ids, mask, jax.random.key(5), sampler.SamplingParams(8, temperature=1.3, top_k=1))
    np.testing.assert_array_equal(greedy.tokens, topk1.tokens)


def test_filter_logits_against_numpy():
    rng = np.random.RandomState(0)
    logits = rng.randn(4, 30).astype(np.float32)
    for top_p in (0.3, 0.9):
        got = np.isfinite(np.asarray(sampler.filter_logits(jnp.asarray(logits), top_k=0, top_p=top_p)))
        for row, keep in zip(logits, got):
            order = np.argsort(-row)
            p = np.exp(row[order] - row.max())
            p /= p.sum()
            n = int(np.searchsorted(np.cumsum(p), top_p) + 1)  # smallest prefix reaching top_p
            assert set(np.flatnonzero(keep)) == set(order[:n])
    got = np.isfinite(np.asarray(sampler.filter_logits(jnp.asarray(logits), top_k=5, top_p=1.0)))
    for row, keep in zip(logits, got):
        assert set(np.flatnonzero(keep)) == set(np.argsort(-row)[:5])


def _nucleus_oracle(row: np.ndarray, top_k: int, top_p: float) -> set:
    """The kept token ids by hand: the top k (ties at the k-th value kept), then the smallest prefix
    of the rest, sorted descending in float64, whose renormalised mass reaches top_p."""
    row = row.astype(np.float64)
    if 0 < top_k < len(row):
        row = np.where(row < np.sort(row)[::-1][top_k - 1], -np.inf, row)
    order = np.argsort(-row, kind="stable")
    p = np.exp(row[order] - row.max())
    p /= p.sum()
    before = np.cumsum(p) - p
    keep = (p > 0) & ((before < top_p) if top_p < 1.0 else True)
    return set(order[keep].tolist())


@pytest.mark.parametrize("top_k", [0, 3, 1500])
def test_nucleus_at_a_vocabulary_past_the_candidate_count(top_k):
    # V > NUCLEUS_CANDIDATES: peaked rows find their nucleus among the candidates; a near-uniform row
    # (its top candidates hold ~V_c / V of the mass) needs the full sort; a batch mixing both takes the
    # full sort for every row. Each must keep exactly the hand-computed set.
    V = 3 * sampler.NUCLEUS_CANDIDATES
    rng = np.random.RandomState(top_k)
    peaked = rng.randn(3, V).astype(np.float32) * 4.0
    flat = rng.randn(2, V).astype(np.float32) * 0.01
    for logits in (peaked, flat, np.concatenate([peaked, flat])):
        for top_p in (0.5, 0.95):
            got = np.isfinite(np.asarray(sampler.filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p)))
            for row, keep in zip(logits, got):
                assert set(np.flatnonzero(keep).tolist()) == _nucleus_oracle(row, top_k, top_p), (top_p, top_k)


def test_top_p_does_not_sort_the_vocabulary_when_the_candidates_suffice():
    # the compiled program sorts the whole vocabulary only inside the fallback branch of a cond
    V = 4 * sampler.NUCLEUS_CANDIDATES
    hlo = jax.jit(lambda x: sampler.filter_logits(x, top_k=0, top_p=0.7)).lower(
        jax.ShapeDtypeStruct((2, V), jnp.float32)).as_text()
    assert "conditional" in hlo or "case" in hlo


def test_top_k_minus_one_is_off_as_in_vllm():
    assert sampler.SamplingParams(4, top_k=-1).top_k == 0
    with pytest.raises(ValueError, match="top_k"):
        sampler.SamplingParams(4, top_k=-2)


def test_behaviour_logprobs_by_hand():
    rng = np.random.RandomState(3)
    logits = jnp.asarray(rng.randn(6, 40).astype(np.float32) * 2)
    for top_k, top_p in ((0, 1.0), (4, 1.0), (0, 0.6), (7, 0.8)):
        params = sampler.SamplingParams(4, temperature=0.7, top_k=top_k, top_p=top_p)
        tok, logp, behaviour = (np.asarray(x) for x in sampler.sample_token(logits, jax.random.key(1), params))
        for b, row in enumerate(np.asarray(logits, np.float64) / 0.7):
            full = row - np.log(np.sum(np.exp(row)))
            kept = sorted(_nucleus_oracle(row, top_k, top_p))
            assert tok[b] in kept
            assert logp[b] == pytest.approx(full[tok[b]], abs=1e-5)
            assert behaviour[b] == pytest.approx(full[tok[b]] - np.log(np.sum(np.exp(full[kept]))), abs=1e-5)


def test_behaviour_logprobs_of_top_k_one_are_zero_in_both_samplers(models):
    # top-k 1 is a deterministic choice: log 1 = 0 under the behaviour policy, while `logprobs`
    # stays the full softmax's (< 0), in the dense sampler and in the paged engine alike
    from jaxrl_entropy.models import engine as eng

    _, model = models
    ids, mask = _prompts()
    sp = sampler.SamplingParams(6, temperature=1.3, top_k=1)
    dense = sampler.generate(model, ids, mask, jax.random.key(5), sp)
    spec = eng.EngineSpec(num_slots=2, page_size=4, max_prompt_len=7, decode_chunk=3, num_pages=16, prefill_tokens=32)
    e = eng.Engine(model.config, spec)
    from flax import nnx
    paged = e.generate(e.prepare_params(nnx.to_pure_dict(nnx.state(model))), ids, mask, jax.random.key(5), sp)
    for out in (dense, paged):
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(dense.tokens))
        resp = np.arange(6)[None] < np.asarray(out.lengths)[:, None]
        assert np.all(np.asarray(out.behaviour_logprobs)[resp] == 0.0)
        assert np.all(np.asarray(out.logprobs)[resp] < 0.0)


def test_eos_stops_rows_and_pads():
    # Zero attention/MLP outputs and positive embeddings: the final hidden state is positive, so a
    # head that only scores token 7 makes 7 the greedy choice at every step; 7 is an EOS id.
    cfg = qwen3.Qwen3Config(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    model = qwen3.init_random(cfg, seed=0)
    model.embed_tokens[...] = jnp.abs(model.embed_tokens[...]) + 0.1
    model.layers[0].self_attn.o_proj.kernel[...] = jnp.zeros((8, 8))
    model.layers[0].mlp.down_proj.kernel[...] = jnp.zeros((8, 8))
    kernel = np.zeros((8, 16), np.float32)
    kernel[:, 7] = 1.0
    model.lm_head.kernel[...] = jnp.asarray(kernel)
    ids = np.array([[1, 2, 3], [0, 4, 5]])
    mask = np.array([[1, 1, 1], [0, 1, 1]])
    stop = sampler.generate(model, ids, mask, jax.random.key(0),
                            sampler.SamplingParams(max_new_tokens=6, temperature=0.0, eos_ids=(EOS, 7), pad_id=9))
    assert np.asarray(stop.tokens).tolist() == [[7, 9, 9, 9, 9, 9]] * 2
    assert np.asarray(stop.lengths).tolist() == [1, 1] and np.asarray(stop.finished).all()
    assert np.all(np.asarray(stop.logprobs)[:, 1:] == 0)
    run = sampler.generate(model, ids, mask, jax.random.key(0),
                           sampler.SamplingParams(max_new_tokens=6, temperature=0.0, eos_ids=(EOS,), pad_id=9))
    assert np.asarray(run.tokens).tolist() == [[7] * 6] * 2
    assert np.asarray(run.lengths).tolist() == [6, 6] and not np.asarray(run.finished).any()


def test_bad_sampling_params():
    with pytest.raises(ValueError, match="top_p"):
        sampler.SamplingParams(4, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampler.SamplingParams(0)


@pytest.mark.parametrize("top_k, top_p", [(0, 0.5), (0, 0.95), (3, 0.9), (1500, 0.8), (7, 1.0)])
def test_filter_per_vocabulary_shard_keeps_what_the_whole_vocabulary_keeps(top_k, top_p):
    # inside a shard_map over 4 devices, each holding a quarter of the vocabulary: the thresholds
    # come from the shards' candidates and a psum; peaked rows, flat rows (the fallback) and both
    from jax.sharding import Mesh, PartitionSpec as P

    V = 4 * sampler.NUCLEUS_CANDIDATES
    mesh = Mesh(np.array(jax.devices()[:4]), ("tensor",))
    split = jax.jit(jax.shard_map(lambda x: sampler.filter_logits(x, top_k=top_k, top_p=top_p, axis_name="tensor"),
                                  mesh=mesh, in_specs=(P(None, "tensor"),), out_specs=P(None, "tensor"),
                                  check_vma=False))
    rng = np.random.RandomState(top_k + 1)
    peaked, flat = rng.randn(3, V).astype(np.float32) * 4.0, rng.randn(2, V).astype(np.float32) * 0.01
    for logits in (peaked, flat, np.concatenate([peaked, flat])):
        got = np.isfinite(np.asarray(split(jnp.asarray(logits))))
        for row, keep in zip(logits, got):
            assert set(np.flatnonzero(keep).tolist()) == _nucleus_oracle(row, top_k, top_p), (top_k, top_p)
