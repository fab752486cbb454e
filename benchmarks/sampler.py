"""Rollout throughput.

    python benchmarks/sampler.py [--out benchmarks/RESULTS.md]                # dense KV cache vs no cache
    python benchmarks/sampler.py --mode engine [--out benchmarks/RESULTS.md]  # paged engine vs dense sampler

`--mode cache` (default): the dense KV-cache sampler against re-running the whole prefix for every
token; greedy, so both produce the same tokens (checked).

`--mode engine`: the continuous-batching engine (`models/engine.py`) against the dense sampler
(`sampler.generate`) on rollout-shaped batches: G samples per prompt, temperature 1, and response
lengths spread from a few tokens to the limit (the EOS set is sized so that a response stops with
probability ≈ 3 / max_new_tokens per token: geometric lengths, a few percent hit the limit).
Generated tokens/s of each (its own samples, after compilation), their ratio in the same run, and
the memory each compiled program needs (arguments + temporaries, from XLA's memory analysis; for
the engine: weights, the KV pool and the decode program). Before timing, both are run greedily on
the same prompts and must produce the same tokens.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from jaxrl_entropy.models import qwen3, sampler  # noqa: E402


def model_for(size: str) -> qwen3.Qwen3:
    """tiny / small: vocabulary 512; demo: the CPU demo's model (4 layers, hidden 128, vocabulary 128, tied)."""
    dims = {"tiny": (128, 4, 4, 2, 32), "small": (256, 6, 8, 2, 32), "demo": (128, 4, 4, 2, 32)}[size]
    h, layers, heads, kv, hd = dims
    cfg = qwen3.Qwen3Config(vocab_size=128 if size == "demo" else 512, hidden_size=h, intermediate_size=3 * h,
                            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
                            tie_word_embeddings=size == "demo")
    return qwen3.init_random(cfg, seed=0)


def no_cache_generate(model, ids, n):
    """Greedy decoding that recomputes the whole sequence for every new token (the baseline)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids):
        B, P = ids.shape
        buf = jnp.concatenate([ids, jnp.zeros((B, n), ids.dtype)], axis=1)

        def body(t, buf):
            logits = nnx.merge(graphdef, state)(buf, attention_mask=(jnp.arange(P + n) < P + t)[None].repeat(B, 0)
                                                .astype(jnp.int32)).logits
            nxt = jnp.argmax(logits[:, P + t - 1], axis=-1).astype(ids.dtype)
            return buf.at[:, P + t].set(nxt)

        return jax.lax.fori_loop(0, n, body, buf)[:, P:]

    return lambda: run(state, ids)


def timeit(fn, reps):
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("cache", "engine"), default="cache")
    ap.add_argument("--size", choices=("tiny", "small", "demo"), default="tiny")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--group", type=int, default=8, help="engine mode: samples per prompt")
    ap.add_argument("--slots", type=int, nargs="+", default=[0], help="engine mode: decode slots (0 = batch / 4)")
    ap.add_argument("--chunk", type=int, default=16, help="engine mode: decode steps per call")
    ap.add_argument("--page", type=int, default=16, help="engine mode: tokens per KV page")
    args = ap.parse_args(argv)
    if args.mode == "engine":
        return engine_main(args)
    model = model_for(args.size)
    rows = []
    for B in args.batches:
        ids = jax.random.randint(jax.random.key(B), (B, args.prompt_len), 1, 512)
        mask = jnp.ones_like(ids)
        params = sampler.SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, eos_ids=())
        cached = lambda: sampler.generate(model, ids, mask, jax.random.key(0), params).tokens
        baseline = no_cache_generate(model, ids, args.new_tokens)
        np.testing.assert_array_equal(np.asarray(cached()), np.asarray(baseline()))
        t_cache, t_base = timeit(cached, args.reps), timeit(baseline, args.reps)
        n_tok = B * args.new_tokens
        rows.append(f"| {B} | {args.prompt_len} + {args.new_tokens} | {n_tok / t_cache:,.0f} | "
                    f"{n_tok / t_base:,.0f} | {t_base / t_cache:.1f}× |")
    dev = jax.devices()[0]
    head = (f"device: {dev.platform} / {dev.device_kind}; jax {jax.__version__}; model {args.size} "
            f"({sum(x.size for x in jax.tree.leaves(nnx.state(model))) / 1e6:.2f}M params); greedy; "
            f"median of {args.reps}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    table = "\n".join([head, "", "| batch | prompt + new | KV-cache tokens/s | no-cache tokens/s | speed-up |",
                       "|---|---|---|---|---|", *rows])
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n## Sampler — KV cache vs recomputing the prefix\n\n{table}\n")
    return 0


def _mib(compiled) -> float:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
            - m.alias_size_in_bytes) / 2 ** 20


def rollout_batch(B: int, G: int, P: int, vocab: int, seed: int = 0):
    """B rows: B / G prompts of 1/2 P .. P tokens (left-padded), each repeated G times."""
    rng = np.random.default_rng(seed)
    n = B // G
    ids = rng.integers(10, vocab, (n, P)).astype(np.int32)
    mask = np.ones((n, P), np.int32)
    for i, length in enumerate(rng.integers(P // 2, P + 1, n)):
        mask[i, :P - length] = 0
    ids[mask == 0] = 0
    return np.repeat(ids, G, 0), np.repeat(mask, G, 0)


def engine_main(args) -> int:
    from jaxrl_entropy.models import engine as eng

    model = model_for(args.size)
    cfg = model.config
    params = nnx.to_pure_dict(nnx.state(model))
    P, N = args.prompt_len, args.new_tokens
    n_eos = max(1, round(3 * cfg.vocab_size / N))  # P(stop) ≈ 3 / N per token on a near-uniform model
    eos = tuple(range(n_eos))
    rows = []
    for B in args.batches:
        ids, mask = rollout_batch(B, args.group, P, cfg.vocab_size, seed=B)
        greedy = sampler.SamplingParams(max_new_tokens=N, temperature=0.0, eos_ids=eos, pad_id=0)
        sp = sampler.SamplingParams(max_new_tokens=N, temperature=1.0, eos_ids=eos, pad_id=0)
        dense = lambda p=sp: sampler.generate(model, ids, mask, jax.random.key(1), p)
        graphdef, state = nnx.split(model)
        dense_mib = _mib(sampler._generate_jit.lower(graphdef, state, jnp.asarray(ids), jnp.asarray(mask),
                                                     jax.random.key(1), sp).compile())
        for slots in args.slots:
            slots = slots or max(1, B // 4)
            spec = eng.EngineSpec(num_slots=slots, page_size=args.page, max_prompt_len=P, decode_chunk=args.chunk,
                                  num_pages=1 + slots * (-(-(N + args.page) // args.page) + -(-P // args.page)),
                                  prefill_tokens=max(512, 8 * P))
            e = eng.Engine(cfg, spec)
            pp = e.prepare_params(params)
            run = lambda p=sp: e.generate(pp, ids, mask, jax.random.key(1), p)
            np.testing.assert_array_equal(run(greedy).tokens, np.asarray(dense(greedy).tokens))
            t_dense = timeit(lambda: dense().tokens, args.reps)
            t_eng = timeit(lambda: run().tokens, args.reps)
            n_dense, n_eng = int(np.sum(np.asarray(dense().lengths))), int(np.sum(run().lengths))
            lengths = run().lengths
            a = e.abstract_args(sp)
            eng_mib = _mib(e.decode_fn(sp).lower(*a["decode"]).compile())
            rows.append(f"| {B} ({B // args.group}×{args.group}) | {P // 2}–{P} + ≤{N} | "
                        f"{lengths.mean():.0f} / {np.median(lengths):.0f} / {lengths.max()} | {slots} | "
                        f"{n_eng / t_eng:,.0f} | {n_dense / t_dense:,.0f} | {(n_eng / t_eng) / (n_dense / t_dense):.2f}× | "
                        f"{eng_mib:.1f} | {dense_mib:.1f} |")
    dev = jax.devices()[0]
    head = (f"device: {dev.platform} / {dev.device_kind}; jax {jax.__version__}; model {args.size} "
            f"({sum(x.size for x in jax.tree.leaves(nnx.state(model))) / 1e6:.2f}M params, vocab {cfg.vocab_size}); "
            f"temperature 1, {n_eos} EOS ids; engine: page {args.page}, chunk {args.chunk}; median of {args.reps}; "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    table = "\n".join([head, "", "| rows (prompts×G) | prompt + new | response len mean / median / max | slots | "
                                 "engine tokens/s | dense tokens/s | engine ÷ dense | engine MiB | dense MiB |",
                       "|---|---|---|---|---|---|---|---|---|", *rows])
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n## Sampler — paged engine vs dense sampler, spread response lengths\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
