"""The paper's setting on a TPU pod: Qwen3-8B-Base + DAPO, probe layer 20.

    jaxrl-entropy train --config=configs/qwen3_8b_dapo.py:anchor --workdir=gs://bucket/runs/anchor \
        --config.model.hf_dir=/mnt/ckpt/Qwen3-8B-Base --config.data.train_files=/mnt/data/dapo.parquet

Variants (after the colon): full | random | anchor | explorer | soft, and optionally a slice the
batch is laid out for, comma-separated: v5p-64 (default) | v5p-8 (e.g. `:anchor,v5p-8`). Check a
slice before paying for it (docs/scaling.md):

    jaxrl-entropy dryrun --config=configs/qwen3_8b_dapo.py:full,v5p-8 --topology=v5p-8 \
        --config.model.hf_dir=configs/arch/qwen3-8b
"""
from jaxrl_entropy.presets import qwen3_8b_dapo


def get_config(variant: str = "full"):
    return qwen3_8b_dapo(variant or "full")
