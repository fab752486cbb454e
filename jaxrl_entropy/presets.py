"""Built-in configs. `configs/*.py` expose them to `--config=`; `demo()` is the default of
`jaxrl-entropy train` when no `--config` is given, so a fresh install runs without any file."""
from __future__ import annotations

import ml_collections

from jaxrl_entropy.config import base_config

PAPER_VARIANTS = ("full", "random", "anchor", "explorer", "soft")


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """The paper's token subsets: full DAPO, random 20%, anchors (bottom 20% Hnorm), explorers
    (top 20%), and Low2High soft re-weighting."""
    if variant not in PAPER_VARIANTS + ("pred_entropy_low", "pred_entropy_high", "position_early", "position_late"):
        raise ValueError(f"unknown variant {variant!r}; choose one of {PAPER_VARIANTS} or a control mode")
    c.name = variant
    c.weights.mode = variant
    c.weights.fraction = 0.2
    return c


def demo(variant: str = "full") -> ml_collections.ConfigDict:
    """A tiny random-init Qwen3 learning 2-digit addition by RL on a 2-core CPU (after a short
    supervised warm-up on the format)."""
    c = base_config()
    c.model.arch.update(dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=32, tie_word_embeddings=True))
    c.model.logits_chunk = 64
    c.data.kind = "synthetic"
    c.data.max_prompt_len = 32
    c.data.synthetic.update(dict(digits=2, num_terms=2, ops="+", train_size=20000, eval_size=128))
    c.rollout.max_new_tokens = 56
    # a CPU decodes compute-bound: 32 slots (a quarter of a 128-row call, the CPU default) refilled
    # every 16 steps beat decoding all 128 rows until the longest is done
    c.rollout.update(dict(max_slots=32, decode_chunk=16))
    c.rl.prompts_per_step = 16
    c.rl.group_size = 8
    c.rl.mini_batch_prompts = 8         # 2 optimiser updates per rollout step
    c.rl.micro_batch_size = 64
    c.rl.overlong_buffer = 8
    c.rl.max_gen_batches = 4
    c.entropy.layers = (0.55,)
    c.optim.update(dict(lr=1e-4, warmup_steps=5, weight_decay=0.0))
    # warm-up until 40% of sampled answers on training prompts are right (checked every 25 steps)
    c.train.update(dict(steps=100, checkpoint_every=20, sft_steps=1000, sft_lr=3e-3, sft_batch_size=64,
                        sft_target_accuracy=0.4, sft_check_every=25))
    c.eval.update(dict(every=20, k=4, temperature=1.0, top_p=1.0))
    c.weights.soft.update(dict(start_step=0, end_step=100))
    return apply_variant(c, variant)


def qwen3_8b_dapo(variant: str = "full") -> ml_collections.ConfigDict:
    """The paper's setting: Qwen3-8B-Base, DAPO, probe layer 20, on a TPU pod (data/fsdp mesh)."""
    c = base_config()
    c.model.hf_dir = "/path/to/Qwen3-8B-Base"          # a local HF directory
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.attention = "kernel"
    c.model.probe_attention = "kernel"
    c.model.remat = True
    c.data.kind = "files"
    c.data.train_files = "/path/to/dapo-math-17k.parquet"
    c.data.max_prompt_len = 1024
    c.data.dedupe = True
    c.rollout.update(dict(max_new_tokens=8192, temperature=1.0, top_p=1.0))
    c.rl.update(dict(prompts_per_step=512, group_size=16, mini_batch_prompts=32, micro_batch_size=16,
                     eps_low=0.2, eps_high=0.28, clip_c=10.0, overlong_buffer=2048, overlong_factor=1.0,
                     dynamic_sampling=True, max_gen_batches=10))
    c.entropy.layers = (20,)
    c.entropy.aggregation = "head_mixture"
    c.optim.update(dict(lr=1e-6, warmup_steps=10, weight_decay=0.1, grad_clip=1.0))
    c.train.update(dict(steps=120, checkpoint_every=10, geometry_every=10))
    c.eval.update(dict(every=10, k=8, temperature=1.0, top_p=0.7,
                       benchmarks="aime24=/path/to/aime24.parquet,aime25=/path/to/aime25.parquet,"
                                  "amc23=/path/to/amc23.parquet,math500=/path/to/math500.parquet,"
                                  "minerva=/path/to/minerva.parquet,olympiadbench=/path/to/olympiadbench.parquet"))
    c.parallel.update(dict(data=1, fsdp=-1, tensor=1))
    apply_variant(c, variant)
    return c


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    """This file is itself a config file (the default of `--config`): the CPU demo."""
    return demo(variant or "full")
