"""Attention benchmark: the fused entropy kernel against its no-entropy twin, XLA and cuDNN.

For each shape (B·T = 16k tokens, T ∈ {1k, 4k, 8k}, Hq/Hkv = 32/8, D = 128, causal, bf16) it
times, forward and forward+backward:
  - `kernels.entropy_attention`   fused flash attention + per-head row entropy
  - `kernels.flash_attention`     the same kernel without the entropy accumulator (the baseline
                                  every ratio is taken against, measured in the same run)
  - `kernels.reference_attention` plain XLA, materialised probabilities ("skipped"/"OOM" when it
                                  cannot fit)
  - `jax.nn.dot_product_attention` (implementation="cudnn" on GPU, XLA's default elsewhere)
  - `kernels.head_mixture_entropy` the second, lse-based pass (forward only; lse from the fused
                                  forward, as in training)

FLOPs count useful work only: forward 4·B·Hq·D·P with P the visible (query, key) pairs (causal:
T(T+1)/2 per row block), backward 2.5× forward (the FlashAttention convention); the head-mixture
pass does one QKᵀ per head, 2·B·Hq·D·P. Every implementation is credited the same FLOPs.
Memory: "compiled MiB" is XLA's own accounting of the compiled program (arguments + outputs +
temporaries; forward+backward where there is one); "device peak MiB" is the device allocator's
high-water mark after the row (`device.memory_stats()`, cumulative over the process; n/a on CPU).

Usage:
  python benchmarks/attention.py                                # full shapes, platform backend
  python benchmarks/attention.py --shapes small                 # CPU smoke run (~1-2 min)
  python benchmarks/attention.py --shapes cpu --backend xla     # blockwise-XLA shell on a CPU
  python benchmarks/attention.py --backend gpu --out benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp

from jaxrl_entropy.kernels import (entropy_attention, flash_attention, head_mixture_entropy, reference_attention,
                     resolve_backend)


@dataclasses.dataclass(frozen=True)
class Shape:
    B: int
    T: int
    Hq: int
    Hkv: int
    D: int
    causal: bool = True
    dtype: str = "bfloat16"

    def label(self) -> str:
        return f"B{self.B} T{self.T} H{self.Hq}/{self.Hkv} D{self.D}"

    @property
    def pairs(self) -> int:
        """Visible (query, key) pairs per batch row and head."""
        return self.T * (self.T + 1) // 2 if self.causal else self.T * self.T


FULL_SHAPES = tuple(Shape(16384 // T, T, 32, 8, 128) for T in (1024, 4096, 8192))
SMALL_SHAPES = (Shape(2, 128, 4, 2, 32), Shape(1, 256, 4, 2, 32))
# CPU-sized but long enough that the reference's O(T²) probabilities dominate its memory
CPU_SHAPES = (Shape(4, 512, 8, 2, 64), Shape(1, 2048, 8, 2, 64))

# Order matters: the baseline first (ratios), the memory-hungry reference last (the device peak
# column is a running high-water mark).
IMPLS = ("flash_attention", "entropy_attention", "head_mixture_entropy", "dot_product_attention",
         "reference_attention")
BASELINE = "flash_attention"

COLUMNS = ("shape", "impl", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s",
           "fwd × flash", "fwd+bwd × flash", "compiled MiB", "device peak MiB")

# The reference materialises s, p and their gradients: skip it when that would not fit.
_REFERENCE_BYTES_PER_SCORE = 4 * 4
_CPU_REFERENCE_LIMIT = 8 << 30


def forward_flops(shape: Shape) -> float:
    return 4.0 * shape.B * shape.Hq * shape.D * shape.pairs


def _inputs(shape: Shape, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    dt = jnp.dtype(shape.dtype)
    q = jax.random.normal(keys[0], (shape.B, shape.T, shape.Hq, shape.D), dt)
    k = jax.random.normal(keys[1], (shape.B, shape.T, shape.Hkv, shape.D), dt)
    v = jax.random.normal(keys[2], (shape.B, shape.T, shape.Hkv, shape.D), dt)
    do = jax.random.normal(keys[3], (shape.B, shape.T, shape.Hq, shape.D), jnp.float32)
    return q, k, v, do


def _attention_fn(impl: str, shape: Shape, backend: str) -> Callable:
    """`(q, k, v) -> out` (plus whatever else the implementation returns first-class)."""
    causal = shape.causal
    if impl == "entropy_attention":
        return lambda q, k, v: entropy_attention(q, k, v, causal=causal, backend=backend)
    if impl == "flash_attention":
        return lambda q, k, v: flash_attention(q, k, v, causal=causal, backend=backend)
    if impl == "reference_attention":
        return lambda q, k, v: reference_attention(q, k, v, causal=causal)
    if impl == "dot_product_attention":
        implementation = "cudnn" if jax.default_backend() == "gpu" else None
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                            implementation=implementation)
    raise ValueError(f"unknown attention implementation {impl!r}; choose from {IMPLS}")


def _out_only(fn: Callable) -> Callable:
    def out(q, k, v):
        res = fn(q, k, v)
        return res[0] if isinstance(res, tuple) else res
    return out


def _compile(fn: Callable, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    try:
        ma = compiled.memory_analysis()
        mem = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
               - ma.alias_size_in_bytes)
    except Exception:  # not every backend reports it
        mem = None
    return compiled, mem


def _median_time(compiled, args, reps: int) -> float:
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def _skip_reason(impl: str, shape: Shape) -> str | None:
    if impl != "reference_attention":
        return None
    need = shape.B * shape.Hq * shape.T * shape.T * _REFERENCE_BYTES_PER_SCORE
    stats = jax.devices()[0].memory_stats()
    limit = (stats or {}).get("bytes_limit", _CPU_REFERENCE_LIMIT)
    if need > 0.7 * limit:
        return f"skipped (needs ~{need / 2**30:.0f} GiB)"
    return None


def _is_oom(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def bench_row(impl: str, shape: Shape, *, backend: str | None = None, reps: int = 10) -> dict:
    """Times one implementation on one shape.

    Returns a dict with `shape`, `impl`, `fwd_s`, `fwdbwd_s` (seconds or None), `fwd_flops`,
    `fwdbwd_flops`, `compiled_bytes`, `device_peak_bytes` and `note` (why something is missing).
    """
    backend = resolve_backend(backend)
    row = dict(shape=shape, impl=impl, fwd_s=None, fwdbwd_s=None, compiled_bytes=None,
               device_peak_bytes=None, note="")
    f_fwd = forward_flops(shape)
    row["fwd_flops"] = f_fwd / 2 if impl == "head_mixture_entropy" else f_fwd
    row["fwdbwd_flops"] = None if impl == "head_mixture_entropy" else 3.5 * f_fwd
    skip = _skip_reason(impl, shape)
    if skip:
        row["note"] = skip
        return row
    q, k, v, do = _inputs(shape)
    try:
        if impl == "head_mixture_entropy":
            # lse from the fused forward, as the training step reads it.
            _, _, lse = entropy_attention(q, k, v, causal=shape.causal, backend=backend,
                                          return_lse=True)
            fwd = lambda q, k, lse: head_mixture_entropy(q, k, causal=shape.causal, lse=lse,
                                                         backend=backend)
            compiled, mem = _compile(fwd, q, k, lse)
            row["fwd_s"] = _median_time(compiled, (q, k, lse), reps)
            row["compiled_bytes"] = mem
        else:
            attn = _attention_fn(impl, shape, backend)
            compiled, _ = _compile(attn, q, k, v)
            row["fwd_s"] = _median_time(compiled, (q, k, v), reps)

            def loss(q, k, v, do):
                return jnp.sum(_out_only(attn)(q, k, v).astype(jnp.float32) * do)

            grad = jax.grad(loss, argnums=(0, 1, 2))
            compiled, mem = _compile(grad, q, k, v, do)
            row["fwdbwd_s"] = _median_time(compiled, (q, k, v, do), reps)
            row["compiled_bytes"] = mem
    except Exception as err:  # a row that cannot run is reported, not fatal
        row["note"] = "OOM" if _is_oom(err) else f"error: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
    row["device_peak_bytes"] = _device_peak_bytes()
    return row


def run_shape(shape: Shape, *, backend: str | None = None, reps: int = 10,
              impls: tuple[str, ...] = IMPLS) -> list[dict]:
    """All implementations on one shape, with ratios against the no-entropy kernel of this run."""
    rows = [bench_row(impl, shape, backend=backend, reps=reps) for impl in impls]
    base = next((r for r in rows if r["impl"] == BASELINE), None)
    for r in rows:
        for key in ("fwd_s", "fwdbwd_s"):
            b = None if base is None else base[key]
            r[key + "_ratio"] = None if (b is None or r[key] is None) else r[key] / b
    return rows


def _fmt(x, spec: str, missing: str = "—") -> str:
    return missing if x is None else format(x, spec)


def format_table(rows: list[dict]) -> str:
    """Markdown table with `COLUMNS`."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        missing = r["note"] or "—"
        tflops = lambda flops, s: None if (s is None or flops is None) else flops / s / 1e12
        cells = [
            r["shape"].label(),
            r["impl"],
            _fmt(None if r["fwd_s"] is None else r["fwd_s"] * 1e3, ".3f", missing),
            _fmt(tflops(r["fwd_flops"], r["fwd_s"]), ".3g", missing),
            _fmt(None if r["fwdbwd_s"] is None else r["fwdbwd_s"] * 1e3, ".3f",
                 "n/a (no gradient)" if r["impl"] == "head_mixture_entropy" else missing),
            _fmt(tflops(r["fwdbwd_flops"], r["fwdbwd_s"]), ".3g",
                 "n/a" if r["impl"] == "head_mixture_entropy" else missing),
            _fmt(r.get("fwd_s_ratio"), ".2f"),
            _fmt(r.get("fwdbwd_s_ratio"), ".2f"),
            _fmt(None if r["compiled_bytes"] is None else r["compiled_bytes"] / 2**20, ".1f", "n/a"),
            _fmt(None if r["device_peak_bytes"] is None else r["device_peak_bytes"] / 2**20, ".0f", "n/a"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_run(backend: str, shapes, reps: int) -> str:
    dev = jax.devices()[0]
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"device: {dev.platform} / {dev.device_kind} ×{jax.device_count()}; jax {jax.__version__}; "
            f"kernel backend: {backend}; dtype {shapes[0].dtype}; causal {shapes[0].causal}; "
            f"median of {reps} runs after warm-up; {when}\n"
            f"shapes: " + ", ".join(s.label() for s in shapes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default=None,
                        help="kernel shell: tpu, gpu, xla, interpret_tpu, interpret_gpu (default: by platform)")
    parser.add_argument("--shapes", choices=("full", "small", "cpu"), default="full",
                        help="full: B·T=16k, T∈{1k,4k,8k}, H 32/8, D 128; small: a tiny CPU smoke run; "
                             "cpu: B·T=2k, T∈{512, 2048}, H 8/2, D 64 (use with --backend xla)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10; small: 3)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    parser.add_argument("--out", default=None, help="append the table (with device and versions) to this markdown file")
    parser.add_argument("--title", default=None, help="heading for the --out section")
    args = parser.parse_args(argv)

    backend = resolve_backend(args.backend)
    shapes = {"small": SMALL_SHAPES, "cpu": CPU_SHAPES}.get(args.shapes, FULL_SHAPES)
    reps = args.reps or (3 if args.shapes == "small" else 10)
    impls = tuple(i.strip() for i in args.impls.split(",") if i.strip())
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        parser.error(f"--impls: unknown {unknown}; choose from {IMPLS}")

    rows = []
    for shape in shapes:
        rows += run_shape(shape, backend=backend, reps=reps, impls=impls)
        print(f"done {shape.label()}", file=sys.stderr, flush=True)
    header = describe_run(backend, shapes, reps)
    table = format_table(rows)
    print(header + "\n\n" + table)
    if args.out:
        title = args.title or f"Attention ({jax.devices()[0].device_kind}, {args.shapes} shapes)"
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(f"\n## {title}\n\n{header}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
