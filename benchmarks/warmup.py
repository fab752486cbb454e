"""The demo's supervised warm-up: rows read (the cost) until its stop rule fires, by batch and clip.

    python benchmarks/warmup.py [--runs 64:0 16:0 16:1.0] [--seed 0] [--out benchmarks/RESULTS.md]

Each run is the README's demo command cut to its warm-up (`--config.train.steps=0`: warm-up, then the
step-0 held-out evaluation) with `train.sft_batch_size` and `train.sft_grad_clip` set (clip 0 = off)
and checks every 1,600 rows (`sft_check_every` = 1600 / batch), in its own process and workdir.
Prints steps, rows read, wall time to the end of the warm-up, the ratio of rows and of time to the
first run, and held-out mean@4 at the end. A step costs the same per row at these sizes on a CPU, so
rows read is what a setting saves or wastes.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from jaxrl_entropy.rundir import metrics  # noqa: E402

NO_CLIP = 1e12   # train.sft_grad_clip must be positive: "off" is a norm no gradient reaches


def run_one(batch: int, clip: float, seed: int, workdir: str) -> dict:
    cmd = [sys.executable, "-m", "jaxrl_entropy.cli", "train", f"--workdir={workdir}",
           "--config.train.steps=0", "--config.train.progress=False", f"--config.seed={seed}",
           f"--config.train.sft_batch_size={batch}", f"--config.train.sft_check_every={max(1, 1600 // batch)}",
           f"--config.train.sft_grad_clip={clip if clip > 0 else NO_CLIP}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines = metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    sft = next(d for d in lines if "sft/steps" in d)
    held = next(d for d in lines if "eval/synthetic_heldout/mean@4" in d)
    return {"batch": batch, "clip": clip, "steps": int(sft["sft/steps"]), "rows": int(sft["sft/steps"]) * batch,
            "seconds": float(sft["time"]), "sft_accuracy": float(sft["sft/accuracy"] if sft.get("sft/accuracy") is not None else "nan"),  # no check yet: null
            "heldout": float(held["eval/synthetic_heldout/mean@4"])}


def table(results: list[dict], seed: int) -> str:
    base = results[0]
    head = (f"device: {jax.devices()[0].platform} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores); "
            f"jax {jax.__version__}; demo preset, seed {seed}, lr = the preset's sft_lr; checks every 1,600 rows; "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n")
    rows = ["| rows / step | clip | steps | rows read | warm-up s | rows ÷ first | time ÷ first | last estimate | held-out mean@4 |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['batch']} | {r['clip'] or '—'} | {r['steps']} | {r['rows']:,} | {r['seconds']:.0f} | "
                    f"{r['rows'] / base['rows']:.2f} | {r['seconds'] / base['seconds']:.2f} | {r['sft_accuracy']:.3f} | "
                    f"{r['heldout']:.3f} |")
    return head + "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=["64:0", "16:0", "16:1.0"],
                    help="BATCH:CLIP pairs (clip 0 = off); the first is the baseline of the ratios")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="append the table to this markdown file")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(args.runs):
            batch, clip = spec.split(":")
            r = run_one(int(batch), float(clip), args.seed, os.path.join(tmp, f"run{i}"))
            print(f"batch {r['batch']} clip {r['clip'] or 'off'}: {r['steps']} steps, {r['rows']:,} rows, "
                  f"{r['seconds']:.0f} s, held-out {r['heldout']:.3f}", flush=True)
            results.append(r)
    out = table(results, args.seed)
    print(out)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n## Supervised warm-up — rows read until the stop rule fires (`benchmarks/warmup.py`)\n\n" + out)


if __name__ == "__main__":
    main()
