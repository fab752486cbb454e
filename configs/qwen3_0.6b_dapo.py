"""Qwen3-0.6B-Base + DAPO, the paper's recipe at a smaller scale (`presets.qwen3_dapo("0.6b", variant)`).

    jaxrl-entropy train --config=configs/qwen3_0.6b_dapo.py:full,v5e-8 --workdir=runs/0.6b-full \
        --config.model.hf_dir=/mnt/ckpt/Qwen3-0.6B-Base --config.data.train_files=/mnt/data/dapo-math-17k.parquet \
        --config.eval.benchmarks=aime24=/mnt/data/aime24.parquet,aime25=/mnt/data/aime25.parquet,amc23=/mnt/data/amc23.parquet,math500=/mnt/data/math500.parquet,minerva=/mnt/data/minerva.parquet,olympiadbench=/mnt/data/olympiadbench.parquet

Variants (after the colon): full | random | anchor | explorer | soft, and optionally the slice the
batch is laid out for, comma-separated: h100x1 | h100x8 | v5e-8 | v6e-8 | v5p-8 | v5p-64 (default
h100x1). Probe layer: 0.55 of the depth. Whether a slice holds it, and what a run costs there:
docs/scaling.md; check one before paying for it:

    jaxrl-entropy dryrun --config=configs/qwen3_0.6b_dapo.py:full,v5e-8 --topology=v5e-8 \
        --config.model.hf_dir=configs/arch/qwen3-0.6b
"""
from jaxrl_entropy.presets import qwen3_dapo


def get_config(variant: str = "full"):
    return qwen3_dapo("0.6b", variant or "full")
