"""The continuous-batching engine: the same tokens as the dense sampler and HF `generate` (greedy),
the right sampling distribution, tokens independent of scheduling, page accounting."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_entropy.models import engine as eng
from jaxrl_entropy.models import engine_scheduler
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
    before = engine_scheduler._fold_in_rows._cache_size()
    for n in (1, 5, 8, 9, 100, 128, 130):
        ids = np.arange(1000, 1000 + n) * 3
        got = eng.row_keys(base, ids)
        want = np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(base, int(i)))) for i in ids])
        np.testing.assert_array_equal(got, want)
    # sizes 1..130 fall in 8, 16, 128, 256: four programs, not one per call size (seven here)
    assert engine_scheduler._fold_in_rows._cache_size() - before <= 4


# ------------------------------------------------------------------ scheduling: progress and fit
def _hand_pages(n: int, new_tokens: int, page: int) -> int:
    """Pages one request holds at its longest, counted from the positions it covers: the prompt's
    first n − 1 tokens (prefilled, kept while a sample runs) and the sample's positions
    n − 1 .. n + new_tokens − 2 (its first page a private copy when the prompt's last page is partial)."""
    prompt = {i // page for i in range(n - 1)}
    sample = {i // page for i in range(n - 1, n - 1 + new_tokens)}
    return len(prompt) + len(sample)


def _call_with_timeout(fn, seconds: float):
    """`fn()` in a daemon thread: its result or exception, or a test failure (not a hung suite)
    when it does not return in time."""
    import threading

    box = {}

    def target():
        try:
            box["out"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["err"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"generate() did not return within {seconds} s (livelock)")
    if "err" in box:
        raise box["err"]
    return box["out"]


def test_hand_page_counts_match_the_engine_and_are_not_monotone():
    # the example: page 4, 6 new tokens: a 9-token prompt needs 4 pages, an 8-token one 5
    assert _hand_pages(9, 6, 4) == eng.request_pages(9, 6, 4) == 4
    assert _hand_pages(8, 6, 4) == eng.request_pages(8, 6, 4) == 5
    for page in (1, 2, 3, 4, 8):
        for n in range(1, 30):
            for N in range(1, 20):
                assert eng.request_pages(n, N, page) == _hand_pages(n, N, page), (n, N, page)


def test_request_that_cannot_fit_alone_is_refused_not_livelocked(tiny):
    """The issue's reproduction: a 9-token and an 8-token prompt, page 4, 6 new tokens, a pool of 4
    pages (+ null). Sizing only the longest prompt (4 pages) accepted it and the 8-token request (5
    pages) preempted itself forever; now it is refused up front, naming it and the setting."""
    cfg, model = tiny
    ids = np.zeros((2, 9), np.int32)
    mask = np.zeros((2, 9), np.int32)
    ids[0], mask[0] = np.arange(10, 19), 1
    ids[1, 1:], mask[1, 1:] = np.arange(20, 28), 1
    e = _engine(cfg, slots=2, page=4, pages=5, chunk=2, prompt_len=9)
    params = e.prepare_params(_params(model))
    sp = sampler.SamplingParams(max_new_tokens=6, temperature=1.0, pad_id=0)
    with pytest.raises(eng.RequestTooLarge, match=r"row 1 \(8 tokens\).*needs 5 KV pages.*holds 4.*rollout\.kv_cache_gib"):
        _call_with_timeout(lambda: e.generate(params, ids, mask, jax.random.key(0), sp), 120)
    assert issubclass(eng.RequestTooLarge, ValueError)


class _HostRun(eng.HostScheduler):
    """The engine's host scheduler (`HostScheduler`, unchanged) over a host model of its device programs,
    no compilation: the KV pool holds token ids, the prefill writes a prompt's first n − 1 tokens
    into its pages, the decode copies pending pages, then per live slot and step writes the current
    token at its position, checks that the slot's page table reads back exactly its prompt + the
    tokens so far (so a page handed out twice, freed early, not reserved or not copied shows up),
    and emits the row's next token from a fixed script (`want`)."""

    MAX_CALLS = 5000  # the test's own guard: a livelocked scheduler fails, it does not hang

    def __init__(self, spec, ids, mask, sp, want):
        engine = type("FakeEngine", (), {"spec": spec, "last_stats": {}})()
        super().__init__(engine, None, ids, np.asarray(mask, bool), jax.random.key(0), sp, np.arange(len(ids)))
        self.want, self.calls = want, 0

    def _new_cache(self):
        return np.full((self.spec.num_pages, self.page), -1, np.int64)

    def _run_prefills(self, kv):
        for j in self.to_prefill:
            p = self.prompts[j]
            pages = p.shared + ([p.partial] if p.partial is not None else [])
            assert len(pages) == -(-(p.n - 1) // self.page) and self.pool._used[pages].all()
            for i in range(p.n - 1):
                kv[pages[i // self.page], i % self.page] = p.tokens[i]
        self.to_prefill = []
        return kv

    def _decode(self, kv, live_S):
        self.calls += 1
        assert self.calls < self.MAX_CALLS, f"{self.calls} decode calls: the scheduler does not progress"
        for src, dst in self.copies:
            assert self.pool._used[src] and self.pool._used[dst]
            kv[dst] = kv[src]
        self.copies = []
        owned = [pg for s in np.flatnonzero(self.slot_req >= 0) for pg in self.private[s]]
        assert len(owned) == len(set(owned)), "a private page belongs to two slots"
        S, C, N = self.spec.num_slots, self.spec.decode_chunk, self.sp.max_new_tokens
        out_t = np.full((S, C), self.sp.pad_id, np.int32)
        stp, live_out = self.stp.copy(), live_S.copy()
        for s in np.flatnonzero(live_S):
            r = int(self.slot_req[s])
            prompt = self.prompts[self.row_prompt[r]].tokens
            pos, tok = int(self.pos[s]), int(self.tok[s])
            for c in range(C):
                if not live_out[s]:
                    break
                page = self.table[s, pos // self.page]
                assert page in self.private[s], f"slot {s} writes position {pos} into page {page}, not its own"
                kv[page, pos % self.page] = tok
                pages = self.table[s, :pos // self.page + 1]
                assert self.pool._used[pages].all()
                np.testing.assert_array_equal(kv[pages].ravel()[:pos + 1],
                                              np.concatenate([prompt, self.want[r, :stp[s]]]))
                tok = int(self.want[r, stp[s]])
                out_t[s, c] = tok
                stp[s] += 1
                pos += 1
                live_out[s] = tok not in self.sp.eos_ids and stp[s] < N
        return kv, out_t, np.zeros((S, C), np.float32), np.zeros((S, C), np.float32), stp, live_out


def _random_case(rng):
    """A batch (groups of repeated prompts, lengths 1..17), engine geometry and a pool size near
    the largest single request's need, so both refusals and heavy preemption occur."""
    page, chunk = int(rng.choice([1, 2, 3, 4, 8])), int(rng.integers(1, 9))
    N, slots = int(rng.integers(1, 13)), int(rng.integers(1, 7))
    lens = rng.integers(1, 18, int(rng.integers(1, 6)))
    group = int(rng.integers(1, 4))
    rows = np.repeat(lens, group)
    B, P = len(rows), 17
    ids = np.zeros((B, P), np.int32)
    mask = np.zeros((B, P), np.int32)
    prompts = {n: rng.integers(6, 48, n) for n in set(lens.tolist())}
    for b, n in enumerate(rows):
        ids[b, P - n:], mask[b, P - n:] = prompts[n], 1
    worst = max(_hand_pages(int(n), N, page) for n in lens)
    # a third of the pools at the boundary (the largest request just fits / just does not), the
    # rest up to about two requests
    capacity = [worst - 1, worst, max(1, worst + int(rng.integers(-3, worst + 3)))][int(rng.integers(0, 3))]
    capacity = max(1, capacity)
    spec = eng.EngineSpec(num_slots=slots, page_size=page, num_pages=capacity + 1, max_prompt_len=P,
                          decode_chunk=chunk)
    # each row's script: tokens 6..47, EOS (5) at a random step or never
    want = rng.integers(6, 48, (B, N)).astype(np.int32)
    eos_at = rng.integers(0, 2 * N, B)
    want[eos_at < N, eos_at[eos_at < N]] = EOS
    sp = sampler.SamplingParams(max_new_tokens=N, eos_ids=(EOS,), pad_id=0)
    return spec, ids, mask, sp, want, eos_at, worst > capacity


def test_scheduler_always_finishes_or_refuses_property():
    """Random prompt lengths, groups, pool, page and chunk sizes through the real host scheduler
    (device programs modelled on the host): either every row ends (EOS or its length limit) with
    exactly its scripted tokens and every page returned, or — exactly when some request's
    hand-counted pages exceed the pool — RequestTooLarge is raised before anything runs."""
    rng = np.random.default_rng(23)
    refused = preempted = waited = 0
    for case in range(300):
        spec, ids, mask, sp, want, eos_at, too_large = _random_case(rng)
        where = f"case {case}: {spec}, N={sp.max_new_tokens}, lengths {mask.sum(1).tolist()}"
        if too_large:
            with pytest.raises(eng.RequestTooLarge, match="rollout.kv_cache_gib"):
                _HostRun(spec, ids, mask, sp, want)
            refused += 1
            continue
        run = _HostRun(spec, ids, mask, sp, want)
        out = run.execute()
        N = sp.max_new_tokens
        lengths = np.where(eos_at < N, eos_at + 1, N)
        np.testing.assert_array_equal(out.lengths, lengths, err_msg=where)
        np.testing.assert_array_equal(out.finished, eos_at < N, err_msg=where)
        for b in range(len(ids)):
            np.testing.assert_array_equal(out.tokens[b, :lengths[b]], want[b, :lengths[b]], err_msg=where)
            assert np.all(out.tokens[b, lengths[b]:] == sp.pad_id), where
        assert run.pool.num_free == run.pool.capacity, where
        preempted += run.stats["preemptions"] > 0
        waited += run.stats["waits"] > 0
    # the cases exercise every path: refusals, preemption, requests waiting for pages
    assert refused >= 20 and preempted >= 20 and waited >= 10, (refused, preempted, waited)


def test_a_request_never_preempts_itself_or_an_older_one():
    """Two samples of one 8-token prompt, page 4, 6 new tokens, chunk 1, a pool of 5: the prompt
    holds 2 pages (one full, one partial) and each sample grows to 3 of its own, so both start but
    cannot both finish. By hand: the younger waits (keeping its tokens) while the older grows, is
    preempted once, when the older needs its third page, and restarts after it. It never preempts
    itself (it used to, then was re-admitted, every chunk: one preemption per chunk)."""
    spec = eng.EngineSpec(num_slots=2, page_size=4, num_pages=6, max_prompt_len=8, decode_chunk=1)
    ids, mask = np.tile(np.arange(10, 18, dtype=np.int32), (2, 1)), np.ones((2, 8), np.int32)
    sp = sampler.SamplingParams(max_new_tokens=6, eos_ids=(EOS,), pad_id=0)
    want = np.array([[7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18]], np.int32)
    victims = []

    class Watched(_HostRun):
        def _preempt(self, s):
            running = np.flatnonzero(self.slot_req >= 0)
            victims.append((int(self.slot_req[s]), int(self.stp[s]), bool(self.born[s] == self.born[running].min())))
            super()._preempt(s)

    run = Watched(spec, ids, mask, sp, want)
    out = run.execute()
    np.testing.assert_array_equal(out.tokens, want)
    assert run.pool.num_free == run.pool.capacity
    # row 1 had its first token (position 7, in its copied page) and waited while row 0 wrote
    # positions 8..11 (page 2); row 0's position 12 needs a third page: row 1 is preempted
    assert victims == [(1, 1, False)]
    assert run.stats["waits"] == 4


def test_no_progress_guard_raises_instead_of_spinning():
    """A scheduler that never lets a request finish (simulated: the decode model emits nothing) is
    stopped by the guard with an error, within its round limit."""
    spec = eng.EngineSpec(num_slots=2, page_size=4, num_pages=16, max_prompt_len=9, decode_chunk=2)
    ids, mask = np.full((2, 9), 9, np.int32), np.ones((2, 9), np.int32)
    sp = sampler.SamplingParams(max_new_tokens=6, pad_id=0)

    class Stuck(_HostRun):
        def _decode(self, kv, live_S):
            self.calls += 1
            S, C = self.spec.num_slots, self.spec.decode_chunk
            return (kv, np.zeros((S, C), np.int32), np.zeros((S, C), np.float32), np.zeros((S, C), np.float32),
                    self.stp.copy(), live_S.copy())

    run = Stuck(spec, ids, mask, sp, np.full((2, 6), 7, np.int32))
    with pytest.raises(RuntimeError, match="made no progress"):
        run.execute()
    assert run.calls == run._round_limit() + 1


def test_tight_pool_generate_matches_a_roomy_one_or_refuses(tiny):
    """Real `generate` calls on a pool of 4 pages (page 4, 6 new tokens, chunk 2): random batches
    either give exactly the tokens of a 63-page pool (T = 1, so preemption and waiting must not
    change a row's tokens) or, when the hand count says some request cannot fit alone, raise
    RequestTooLarge; one engine each, so the programs compile once."""
    cfg, model = tiny
    tight, roomy = (_engine(cfg, slots=3, page=4, pages=n, chunk=2, prompt_len=11) for n in (5, 64))
    params = tight.prepare_params(_params(model))
    sp = sampler.SamplingParams(max_new_tokens=6, temperature=1.0, eos_ids=(EOS,), pad_id=0)
    rng = np.random.default_rng(5)
    outcomes = []
    for case in range(6):
        lens = np.repeat(rng.integers(1, 12, 3), 2)
        ids = rng.integers(6, 48, (6, 11)).astype(np.int32)
        mask = (np.arange(11)[None] >= 11 - lens[:, None]).astype(np.int32)
        ids[1::2] = ids[::2]  # groups of two
        key = jax.random.key(case)
        if max(_hand_pages(int(n), 6, 4) for n in lens) > 4:  # 8, 10, 11 tokens: 5 pages; 9: 4
            with pytest.raises(eng.RequestTooLarge):
                tight.generate(params, ids, mask, key, sp)
            outcomes.append("refused")
            continue
        out, ref = tight.generate(params, ids, mask, key, sp), roomy.generate(params, ids, mask, key, sp)
        np.testing.assert_array_equal(out.tokens, ref.tokens, err_msg=f"case {case}")
        np.testing.assert_array_equal(out.lengths, ref.lengths, err_msg=f"case {case}")
        assert tight.last_stats["pages_free_at_end"] == tight.last_stats["pages_capacity"]
        outcomes.append("short" if tight.last_stats.get("preemptions", 0) + tight.last_stats.get("waits", 0) else "ok")
    assert "refused" in outcomes and "short" in outcomes, outcomes
