"""Rollout throughput: the KV-cache sampler against re-running the whole prefix for every token.

    python benchmarks/sampler.py [--out benchmarks/RESULTS.md]

Prints a markdown table of generated tokens per second for a few batch sizes, with the ratio to the
no-cache baseline measured in the same run (same model, same prompts, greedy decoding, so both
produce the same tokens; the script checks that they do).
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
    dims = {"tiny": (128, 4, 4, 2, 32), "small": (256, 6, 8, 2, 32)}[size]
    h, layers, heads, kv, hd = dims
    cfg = qwen3.Qwen3Config(vocab_size=512, hidden_size=h, intermediate_size=3 * h, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd)
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
    ap.add_argument("--size", choices=("tiny", "small"), default="tiny")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
