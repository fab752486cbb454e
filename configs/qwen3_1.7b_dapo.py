"""Qwen3-1.7B-Base + DAPO, the paper's recipe at a smaller scale (`presets.qwen3_dapo("1.7b", variant)`).

    jaxrl-entropy train --config=configs/qwen3_1.7b_dapo.py:full,v6e-8 --workdir=runs/1.7b-full \
        --config.model.hf_dir=/mnt/ckpt/Qwen3-1.7B-Base --config.data.train_files=/mnt/data/dapo-math-17k.parquet \
        --config.eval.benchmarks=aime24=/mnt/data/aime24.parquet,aime25=/mnt/data/aime25.parquet,amc23=/mnt/data/amc23.parquet,math500=/mnt/data/math500.parquet,minerva=/mnt/data/minerva.parquet,olympiadbench=/mnt/data/olympiadbench.parquet

Variants (after the colon): full | random | anchor | explorer | soft, and optionally the slice the
batch is laid out for, comma-separated: h100x1 | h100x8 | v5e-8 | v6e-8 | v5p-8 | v5p-64 (default
v6e-8). Probe layer: 0.55 of the depth. Whether a slice holds it, and what a run costs there:
docs/scaling.md; check one before paying for it:

    jaxrl-entropy dryrun --config=configs/qwen3_1.7b_dapo.py:full,v6e-8 --topology=v6e-8 \
        --config.model.hf_dir=configs/arch/qwen3-1.7b
"""
from jaxrl_entropy.presets import qwen3_dapo


def get_config(variant: str = "full"):
    return qwen3_dapo("1.7b", variant or "full")
