"""The built-in configs. Each sets only what differs from `jaxrl_entropy.config.base_config()`.

This module is itself a config file: `jaxrl-entropy train` with no `--config` loads it, and its
`get_config` returns the CPU demo, so an installed package runs without this repository's
`configs/` directory. `configs/demo.py` and `configs/qwen3_{0.6b,1.7b,4b,8b}_dapo.py` expose the
same configs to `--config=FILE.py[:variant]`; `qwen3_dapo(size, "anchor,v6e-8")` builds them here.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from jaxrl_entropy.config import PLACEHOLDER, base_config
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


def column_addition(variant: str = "full") -> ml_collections.ConfigDict:
    """The study's second task as it ran: 4-digit addition of 5 terms with a column-by-column
    scratchpad (responses of 106–112 tokens against the demo's 15–40) on the 8-layer model of
    `multiplication`. Its warm-up reaches the 40 % target in ~2,000 steps of 16 rows, where long
    multiplication's sampled no right answer after 500 (docs/reproduction.md)."""
    c = multiplication(variant)
    c.data.synthetic.update(dict(ops="+", digits=4, num_terms=5, scratchpad="columns"))
    c.data.max_prompt_len = 48   # 5 four-digit terms with the chat template
    c.train.sft_steps = 3000
    return c


# The Qwen3 base models the presets start from. `configs/arch/<arch>/config.json` holds each one's
# published architecture (for `dryrun`, which needs no weights). `keep_rate` is an ASSUMPTION used
# only for planning (`dryrun.keep_rate`): the share of prompt groups DAPO's dynamic sampling keeps
# (not all 16 answers right or all wrong) early in training on DAPO-Math-17k; smaller models solve
# fewer problems, so more groups come back all wrong. Replace it with the `sampling/kept_group_frac`
# your first steps log.
@dataclasses.dataclass(frozen=True)
class ModelPreset:
    size: str             # as the command line names it: "0.6b"
    hf_name: str          # the HF repository name of the base model
    arch: str             # configs/arch/<arch>/config.json
    keep_rate: float      # assumed dynamic-sampling keep rate (planning only; see above)
    default_slice: str    # the slice the batch is laid out for when the variant names none


MODELS: dict[str, ModelPreset] = {
    "0.6b": ModelPreset("0.6b", "Qwen3-0.6B-Base", "qwen3-0.6b", keep_rate=0.3, default_slice="h100x1"),
    "1.7b": ModelPreset("1.7b", "Qwen3-1.7B-Base", "qwen3-1.7b", keep_rate=0.4, default_slice="v6e-8"),
    "4b": ModelPreset("4b", "Qwen3-4B-Base", "qwen3-4b", keep_rate=0.5, default_slice="v5p-8"),
    "8b": ModelPreset("8b", "Qwen3-8B-Base", "qwen3-8b", keep_rate=0.5, default_slice="v5p-64"),
}

# Slices a user has, named as `dryrun --topology` names them. Each micro-batch puts one 9216-token
# sequence on every chip (pure FSDP): micro_batch_size = the number of chips.
SLICES: dict[str, dict] = {
    "h100x1": dict(micro_batch_size=1),    # one H100 (80 GB)
    "h100x8": dict(micro_batch_size=8),    # one 8 × H100 node
    "v5e-8": dict(micro_batch_size=8),     # one host, 8 chips of 16 GiB
    "v6e-8": dict(micro_batch_size=8),     # one host, 8 chips of 32 GiB
    "v5p-8": dict(micro_batch_size=4),     # one host, 4 chips of 95 GiB
    "v5p-64": dict(micro_batch_size=32),   # 8 hosts, 32 chips: FSDP over all of them
}
# What each slice is for (docs/scaling.md has the table behind these sentences)
SLICE_PURPOSE: dict[str, str] = {
    "h100x1": "a pipeline check (0.6B, 1.7B) with a shrunk step: at the paper's shapes a step takes ~10 h",
    "h100x8": "full runs of every preset (estimated to fit): 120 steps in about a week at roofline",
    "v5e-8": "the cheapest TPU: pipeline checks and 0.6B / 1.7B runs; 4B and 8B do not fit its 16 GiB chips",
    "v6e-8": "full runs of 0.6B to 4B; Qwen3-8B does not fit as configured (f32 state)",
    "v5p-8": "every preset fits: Qwen3-8B end to end at the paper's shapes before paying for a pod",
    "v5p-64": "the paper's 120 steps on Qwen3-8B in under 3 days at roofline",
}
DEFAULT_SLICE = MODELS["8b"].default_slice

# Sampling as verl's DAPO recipe sets it (recipe/dapo/test_dapo_7b_math.sh: temperature=1.0,
# top_p=1.0, top_k=-1 for rollouts; val_kwargs temperature 1.0, top_p 0.7, top_k -1). These are
# base_config()'s defaults, so the presets do not restate them; tests/test_config.py checks they
# still hold. Evaluation draws eval.k = 8 samples per problem (the paper's mean@8). verl's recipe
# reaches its AIME avg@32 with n=1 over aime-2024.parquet, which repeats each of the 30 problems 32
# times; `eval` scores each distinct problem once with eval.k samples, so --config.eval.k=32 gives
# the same estimator (at 4× the evaluation's generation).
VERL_DAPO_SAMPLING = {"rollout.temperature": 1.0, "rollout.top_p": 1.0, "rollout.top_k": 0,
                      "eval.temperature": 1.0, "eval.top_p": 0.7}

# The paper's evaluation sets (verl layout), in the problems each file holds once de-duplicated:
# AIME 2024 30, AIME 2025 30, AMC 2023 40, MATH-500 500, Minerva 272, OlympiadBench 675.
EVAL_SETS = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "minerva": 272, "olympiadbench": 675}
DATA_DIR = PLACEHOLDER + "data"   # where the presets expect the parquet files until told otherwise


def _split_variant(variant: str) -> tuple[str, str | None]:
    """"anchor,v5p-8" → ("anchor", "v5p-8"); either part may be left out (slice None)."""
    parts = [p.strip() for p in (variant or "").split(",") if p.strip()]
    slices = [p for p in parts if p in SLICES]
    rest = [p for p in parts if p not in SLICES]
    if len(slices) > 1 or len(rest) > 1:
        raise ValueError(f"variant {variant!r}: give at most one paper variant {PAPER_VARIANTS} and one slice "
                         f"{tuple(SLICES)}, comma-separated (e.g. 'anchor,v5p-8')")
    return (rest[0] if rest else "full"), (slices[0] if slices else None)


def qwen3_dapo(size: str, variant: str = "full") -> ml_collections.ConfigDict:
    """The paper's DAPO setting on a Qwen3 base model of `size` (a key of `MODELS`: 0.6b, 1.7b,
    4b, 8b), laid out for a slice of `SLICES`.

    The DAPO hyperparameters (group 16, 512 prompts per step in mini-batches of 32, clip
    0.2 / 0.28, dual clip 10, lr 1e-6, 10 warm-up steps, weight decay 0.1, overlong buffer 2048,
    dynamic sampling, prompts ≤ 1024 and responses ≤ 8192 tokens), the probe layer at 0.55 of the
    depth (layer 20 of 36, 15 of 28) and the sampling (`VERL_DAPO_SAMPLING`; evaluation mean@8 at
    temperature 1.0, top-p 0.7, every 10 steps) are `base_config()`'s defaults; this sets the model,
    the data, the mesh, the slice's micro-batch and what `dryrun` assumes for its cost estimate.
    `variant` = a paper variant and/or a slice, comma-separated ("anchor,v6e-8"); the slice
    defaults to the model's `default_slice`.

    Paths the presets cannot know are placeholders under /path/to/: `train` stops before anything
    runs with one message that lists every key still to set (`config.check_placeholders`).
    """
    if size not in MODELS:
        raise ValueError(f"unknown Qwen3 size {size!r}; choose one of {tuple(MODELS)}")
    model = MODELS[size]
    variant, slice_name = _split_variant(variant)
    c = base_config()
    c.model.update(dict(hf_dir=f"{PLACEHOLDER}{model.hf_name}",  # a local HF directory
                        dtype="bfloat16", attention="auto",     # splash on TPU, cuDNN on GPU
                        probe_attention="kernel", remat=True))
    c.data.kind = "files"
    c.data.train_files = f"{DATA_DIR}/dapo-math-17k.parquet"
    c.train.update(dict(steps=120, checkpoint_every=10, geometry_every=10))
    c.eval.benchmarks = ",".join(f"{name}={DATA_DIR}/{name}.parquet" for name in EVAL_SETS)
    c.parallel.update(dict(data=1, fsdp=-1))
    c.rl.update(SLICES[slice_name or model.default_slice])
    c.dryrun.update(dict(keep_rate=model.keep_rate, eval_problems=sum(EVAL_SETS.values())))
    return apply_variant(c, variant)


def qwen3_8b_dapo(variant: str = "full") -> ml_collections.ConfigDict:
    """The paper's setting: Qwen3-8B-Base (`qwen3_dapo("8b", variant)`); slices v5p-64 (default),
    v5p-8, h100x8, ... (`SLICES`)."""
    return qwen3_dapo("8b", variant)


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    """The default of `jaxrl-entropy train --config` (this file): the CPU demo."""
    return demo(variant or "full")
