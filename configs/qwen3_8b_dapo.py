"""The paper's setting on a TPU pod: Qwen3-8B-Base + DAPO, probe layer 20.

    jaxrl-entropy train --config=configs/qwen3_8b_dapo.py:anchor --workdir=gs://bucket/runs/anchor \
        --config.model.hf_dir=/mnt/ckpt/Qwen3-8B-Base --config.data.train_files=/mnt/data/dapo.parquet

Variants (after the colon): full | random | anchor | explorer | soft.
"""
from jaxrl_entropy.presets import qwen3_8b_dapo


def get_config(variant: str = "full"):
    return qwen3_8b_dapo(variant or "full")
