"""Top-p (nucleus) filtering at Qwen3's vocabulary: a full sort of every row vs the candidates' path.

    python benchmarks/top_p.py [--rows 64 256] [--vocab 151936] [--out benchmarks/RESULTS.md]

One decode step's sampling work for `rows` rows: `sampler.filter_logits` (top-k pre-filter of
`NUCLEUS_CANDIDATES` logits, the full sort only when a row's candidates hold less than top_p of its
mass) against the baseline that sorts the whole vocabulary every step (what the filter did before).
For scale, the LM head's matmul at a reduced hidden size (`--hidden`) is timed beside them. Two
kinds of rows: peaked (a trained model's; the candidates suffice) and near-uniform (random weights;
the fallback sorts). Median wall time after compilation, and XLA's FLOP count of each compiled
program. The machine's plain f32 matmul GFLOP/s is printed with the times (machines of one kind
differ up to 5x between sessions).
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

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from jaxrl_entropy.models import sampler  # noqa: E402


def full_sort_filter(logits_BxV: jax.Array, top_p: float) -> jax.Array:
    """The baseline: sort the whole vocabulary of every row, every step."""
    log_norm = jax.nn.logsumexp(logits_BxV, axis=-1, keepdims=True)
    threshold, _ = sampler._nucleus_threshold(-jnp.sort(-logits_BxV, axis=-1), log_norm, top_p)
    return jnp.where(logits_BxV < threshold, -jnp.inf, logits_BxV)


def median_time(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def flops(fn, *args) -> float:
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def matmul_gflops(n: int = 2048) -> float:
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    return 2 * n ** 3 / median_time(mm, a, reps=5) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=512, help="the LM head's input width, for scale")
    ap.add_argument("--top-p", type=float, default=0.7)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    V, p = args.vocab, args.top_p
    new = jax.jit(lambda x: sampler.filter_logits(x, top_k=0, top_p=p))
    old = jax.jit(lambda x: full_sort_filter(x, p))
    rows = []
    for B in args.rows:
        rng = np.random.default_rng(B)
        # peaked: logits of spread 4 (the top 1024 hold nearly all the mass); flat: spread 0.01
        cases = {"peaked": rng.standard_normal((B, V), np.float32) * 4.0,
                 "near-uniform": rng.standard_normal((B, V), np.float32) * 0.01}
        hidden = jnp.asarray(rng.standard_normal((B, args.hidden), np.float32))
        head = jnp.asarray(rng.standard_normal((args.hidden, V), np.float32))
        head_fn = jax.jit(lambda h, w: h @ w)
        t_head = median_time(head_fn, hidden, head, reps=args.reps)
        for name, logits in cases.items():
            x = jnp.asarray(logits)
            np.testing.assert_array_equal(np.isfinite(np.asarray(new(x))), np.isfinite(np.asarray(old(x))))
            t_new, t_old = median_time(new, x, reps=args.reps), median_time(old, x, reps=args.reps)
            rows.append(f"| {B} | {name} | {t_old * 1e3:.1f} | {t_new * 1e3:.1f} | {t_old / t_new:.1f}× | "
                        f"{t_head * 1e3:.1f} | {flops(old, x) / 1e6:.0f} | {flops(new, x) / 1e6:.0f} |")
    dev = jax.devices()[0]
    head_line = (f"device: {dev.platform} / {dev.device_kind}; jax {jax.__version__}; plain f32 matmul "
                 f"{matmul_gflops():.0f} GFLOP/s; vocabulary {V}, top_p {p}, candidates "
                 f"{sampler.NUCLEUS_CANDIDATES}; head at hidden {args.hidden}; median of {args.reps}; "
                 f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    table = "\n".join([head_line, "", "| rows | logits | full sort ms | candidates ms | speed-up | head matmul ms | "
                                      "full sort MFLOP (XLA) | candidates MFLOP (XLA) |",
                       "|---|---|---|---|---|---|---|---|", *rows])
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n## Sampler — top-p at Qwen3's vocabulary: candidates vs a full sort\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
