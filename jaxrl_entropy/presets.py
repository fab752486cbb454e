"""The built-in configs. Each sets only what differs from `jaxrl_entropy.config.base_config()`.

This module is itself a config file: `jaxrl-entropy train` with no `--config` loads it, and its
`get_config` returns the CPU demo, so an installed package runs without this repository's
`configs/` directory. `configs/demo.py` and `configs/qwen3_8b_dapo.py` expose the same configs
to `--config=FILE.py[:variant]`.
"""
from __future__ import annotations

import ml_collections

from jaxrl_entropy.config import base_config
from jaxrl_entropy.rl.token_weights import MODES

PAPER_VARIANTS = ("full", "random", "anchor", "explorer", "soft")


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """The paper's token subsets: full DAPO, random, anchors (lowest Hnorm), explorers (highest),
    each `weights.fraction` (default 20%) of the tokens, and Low2High soft re-weighting; or a
    control mode (any of `token_weights.MODES`)."""
    if variant not in MODES:
        raise ValueError(f"unknown variant {variant!r}; choose one of {PAPER_VARIANTS} or a control mode "
                         f"{tuple(m for m in MODES if m not in PAPER_VARIANTS)}")
    c.name = variant
    c.weights.mode = variant
    return c


def demo(variant: str = "full") -> ml_collections.ConfigDict:
    """A tiny random-init Qwen3 (`model.arch`'s defaults: 4 layers, hidden 128) learning 2-digit
    addition by RL on a 2-core CPU, after a short supervised warm-up on the format."""
    c = base_config()
    c.model.logits_chunk = 64
    c.data.max_prompt_len = 25   # the task's prompts, chat template included, are 25 tokens: no padding column
    c.data.synthetic.eval_size = 128
    c.rollout.max_new_tokens = 56
    # a CPU decodes compute-bound: 32 slots (a quarter of a 128-row call, the CPU default) refilled
    # every 16 steps beat decoding all 128 rows until the longest is done
    c.rollout.update(dict(max_slots=32, decode_chunk=16))
    c.rl.update(dict(prompts_per_step=16, group_size=8,
                     mini_batch_prompts=8,      # 2 optimiser updates per rollout step
                     micro_batch_size=64, overlong_buffer=8, max_gen_batches=4))
    c.optim.update(dict(lr=1e-4, warmup_steps=5, weight_decay=0.0))
    # warm-up until 40% of sampled answers on training prompts are right, checked every 100 steps
    # of 16 rows (every 20 near the target). 16 rows, clipped, reach it on fewer rows than 64:
    # ~8,300 rows vs ~27,000 at seed 0 (benchmarks/RESULTS.md)
    c.train.update(dict(steps=100, sft_steps=2000, sft_lr=3e-3, sft_batch_size=16, sft_check_every=100,
                        sft_target_accuracy=0.4))
    c.eval.update(dict(every=20, k=4, top_p=1.0))
    return apply_variant(c, variant)


def multiplication(variant: str = "full") -> ml_collections.ConfigDict:
    """The study's second, longer-reasoning task: 2-digit long multiplication with a digit-by-digit
    scratchpad (responses of 104–145 tokens against the demo's 15–40) on a deeper random-init model
    (8 layers), otherwise the demo's settings. Probe layers: `--config.entropy.layers` takes depth
    fractions, e.g. (0.25,), (0.55,), (0.9,) for early / middle / late."""
    c = demo(variant)
    c.data.synthetic.update(dict(ops="*", scratchpad="long"))
    c.model.arch.num_hidden_layers = 8
    c.rollout.max_new_tokens = 160
    c.rl.overlong_buffer = 16
    return c


# TPU slices the 8B preset is sized for (checked by `jaxrl-entropy dryrun`, docs/scaling.md). Each
# micro-batch puts one 9216-token sequence on every chip: micro_batch_size = the data-parallel size.
SLICES: dict[str, dict] = {
    "v5p-64": dict(micro_batch_size=32),   # 32 chips, FSDP over all of them (the default)
    "v5p-8": dict(micro_batch_size=4),     # one host, 4 chips
}
DEFAULT_SLICE = "v5p-64"


def _split_variant(variant: str) -> tuple[str, str]:
    """"anchor,v5p-8" → ("anchor", "v5p-8"); either part may be left out."""
    parts = [p.strip() for p in (variant or "").split(",") if p.strip()]
    slices = [p for p in parts if p in SLICES]
    rest = [p for p in parts if p not in SLICES]
    if len(slices) > 1 or len(rest) > 1:
        raise ValueError(f"variant {variant!r}: give at most one paper variant {PAPER_VARIANTS} and one slice "
                         f"{tuple(SLICES)}, comma-separated (e.g. 'anchor,v5p-8')")
    return (rest[0] if rest else "full"), (slices[0] if slices else DEFAULT_SLICE)


def qwen3_8b_dapo(variant: str = "full") -> ml_collections.ConfigDict:
    """The paper's setting: Qwen3-8B-Base, DAPO, probe layer 20, on a TPU pod (FSDP mesh).

    The DAPO hyperparameters (group 16, 512 prompts per step in mini-batches of 32, clip
    0.2 / 0.28, dual clip 10, lr 1e-6, 10 warm-up steps, weight decay 0.1, overlong buffer 2048,
    dynamic sampling, prompts ≤ 1024 and responses ≤ 8192 tokens, eval mean@8 at top-p 0.7) are
    `base_config()`'s defaults; this sets the model, the data, the probe layer, the mesh and the
    micro-batch of the slice. `variant` = a paper variant and/or a slice of `SLICES`,
    comma-separated ("anchor,v5p-8"); the slice defaults to v5p-64.
    """
    variant, slice_name = _split_variant(variant)
    c = base_config()
    c.model.update(dict(hf_dir="/path/to/Qwen3-8B-Base",       # a local HF directory
                        dtype="bfloat16", attention="auto",     # splash on TPU, cuDNN on GPU
                        probe_attention="kernel", remat=True))
    c.data.kind = "files"
    c.data.train_files = "/path/to/dapo-math-17k.parquet"
    c.entropy.layers = (20,)
    c.train.update(dict(steps=120, checkpoint_every=10, geometry_every=10))
    c.eval.benchmarks = ("aime24=/path/to/aime24.parquet,aime25=/path/to/aime25.parquet,"
                         "amc23=/path/to/amc23.parquet,math500=/path/to/math500.parquet,"
                         "minerva=/path/to/minerva.parquet,olympiadbench=/path/to/olympiadbench.parquet")
    c.parallel.update(dict(data=1, fsdp=-1))
    c.rl.update(SLICES[slice_name])
    return apply_variant(c, variant)


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    """The default of `jaxrl-entropy train --config` (this file): the CPU demo."""
    return demo(variant or "full")
