"""The paper's setting: Qwen3-8B-Base + DAPO, probe layer 20 (0.55 of 36), on a TPU pod.

    jaxrl-entropy train --config=configs/qwen3_8b_dapo.py:anchor --workdir=gs://bucket/runs/anchor \
        --config.model.hf_dir=/mnt/ckpt/Qwen3-8B-Base --config.data.train_files=gs://bucket/data/dapo-math-17k.parquet \
        --config.eval.benchmarks=aime24=gs://bucket/data/aime24.parquet,aime25=gs://bucket/data/aime25.parquet,amc23=gs://bucket/data/amc23.parquet,math500=gs://bucket/data/math500.parquet,minerva=gs://bucket/data/minerva.parquet,olympiadbench=gs://bucket/data/olympiadbench.parquet

Variants (after the colon): full | random | anchor | explorer | soft, and optionally a slice the
batch is laid out for, comma-separated: v5p-64 (default) | v5p-8 | h100x8 | v6e-8 | ...
(`presets.SLICES`; e.g. `:anchor,v5p-8`). Every /path/to/... placeholder must be set: `train`
names the ones left. Check a slice before paying for it (docs/scaling.md):

    jaxrl-entropy dryrun --config=configs/qwen3_8b_dapo.py:full,v5p-8 --topology=v5p-8 \
        --config.model.hf_dir=configs/arch/qwen3-8b
"""
from jaxrl_entropy.presets import qwen3_8b_dapo


def get_config(variant: str = "full"):
    return qwen3_8b_dapo(variant or "full")
