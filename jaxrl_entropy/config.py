"""The one config schema: `base_config()` lists every key with its default, `validate()` checks a
config against it before anything is compiled.

Experiment files (`configs/*.py`) start from `base_config()` and change values; they cannot add
keys (the dict is locked), so a typo in a file or on the command line (`--config.rl.gropu_size=8`)
fails at once with the list of valid keys.
"""
from __future__ import annotations

import difflib
import json
from typing import Any

import ml_collections

WEIGHT_MODES = ("full", "random", "anchor", "explorer", "pred_entropy_low", "pred_entropy_high",
                "position_early", "position_late", "soft")


class ConfigError(ValueError):
    """A config value or key that cannot work; the message names the key and the fix."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "run"            # label of the variant (analysis groups runs by it)
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.hf_dir = ""       # local HF Qwen3 directory; "" = random init from model.arch
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.attention = "xla"           # plain layers: xla | kernel (alias pallas) | cudnn
    c.model.probe_attention = "xla"     # probe layers: xla | kernel (alias pallas)
    c.model.kernel_backend = ""         # "" = by platform; xla | tpu | gpu | interpret_tpu | interpret_gpu
    c.model.remat = False
    c.model.logits_chunk = 1024
    c.model.arch = ml_collections.ConfigDict(dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, rope_theta=10000.0, tie_word_embeddings=True,
        rms_norm_eps=1e-6))

    c.tokenizer = ""          # local tokenizer dir; "" = model.hf_dir, or the built-in demo tokenizer

    c.data = ml_collections.ConfigDict()
    c.data.kind = "synthetic"           # synthetic | files
    c.data.train_files = ""             # path, glob, or comma-separated list (parquet / jsonl)
    c.data.max_prompt_len = 1024
    c.data.dedupe = True
    c.data.shuffle = True
    c.data.synthetic = ml_collections.ConfigDict(dict(
        digits=2, num_terms=2, ops="+", chat=True, train_size=20000, eval_size=200))

    c.rollout = ml_collections.ConfigDict(dict(
        max_new_tokens=8192, temperature=1.0, top_p=1.0, top_k=0,
        # the generation engine: "paged" (continuous batching over a paged KV cache, prompts
        # prefilled once per group; models/engine.py) or "dense" (models/sampler.py: one dense
        # cache per call, every row until the longest is done)
        engine="paged",
        page_size=32,         # tokens per KV page
        kv_cache_gib=0.0,     # KV pool per device; 0 = 85% of what is free after the inference weights
        max_slots=0,          # requests decoded together; 0 = as many as fit at full length (≤ one call's rows)
        decode_chunk=32,      # decode steps per device call (finished rows are replaced in between)
        prefill_tokens=8192,  # prompt tokens per prefill call
        tensor_parallel=0))   # engine devices per host (heads split); 0 = all local accelerators (1 on CPU)

    c.rl = ml_collections.ConfigDict()
    c.rl.prompts_per_step = 512
    c.rl.group_size = 16
    c.rl.mini_batch_prompts = 32        # prompts per optimiser update (16 updates per rollout step)
    c.rl.micro_batch_size = 8           # sequences per gradient-accumulation micro-batch
    c.rl.eps_low = 0.2
    c.rl.eps_high = 0.28
    c.rl.clip_c = 10.0
    c.rl.kl_coef = 0.0
    c.rl.entropy_coef = 0.0
    c.rl.scale_adv_by_std = True        # False = Dr. GRPO
    c.rl.dynamic_sampling = True
    c.rl.max_gen_batches = 10
    c.rl.correct_score = 1.0
    c.rl.incorrect_score = -1.0
    c.rl.math_verify = False
    c.rl.math_verify_timeout_s = 5.0
    c.rl.overlong_buffer = 2048         # 0 = no overlong shaping
    c.rl.overlong_factor = 1.0

    c.entropy = ml_collections.ConfigDict()
    c.entropy.layers = (0.55,)          # probe layers: ints (index) or floats (depth fraction)
    c.entropy.aggregation = "head_mixture"   # head_mixture | head_mean

    c.weights = ml_collections.ConfigDict()
    c.weights.mode = "full"
    c.weights.fraction = 0.2
    c.weights.normalization = "selected"     # selected | all
    c.weights.soft = ml_collections.ConfigDict(dict(
        shape="linear_tilt", alpha=0.5, sigma=0.25, floor=0.1, schedule="linear",
        start_step=0, end_step=100, hard_steps=0, hard_mode="anchor"))

    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-6, b1=0.9, b2=0.999, weight_decay=0.1, warmup_steps=10, grad_clip=1.0))

    c.train = ml_collections.ConfigDict(dict(
        steps=200, log_every=1, checkpoint_every=20, keep_checkpoints=3, geometry_every=0,
        sft_steps=0, sft_lr=1e-3, sft_batch_size=64, sft_target_accuracy=0.0, sft_check_every=25,
        progress=True))

    c.eval = ml_collections.ConfigDict(dict(
        every=10, k=8, temperature=1.0, top_p=0.7, max_new_tokens=0, max_problems=0,
        benchmarks=""))  # "name=path,name2=path2" (verl layout); synthetic data adds its held-out split

    c.parallel = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.lock()
    return c


# -------------------------------------------------------------------------------- validation
def _schema_keys(d: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_schema_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _choice(cfg_value, key, options):
    if cfg_value not in options:
        raise ConfigError(f"config.{key}={cfg_value!r} is not one of {list(options)}")


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check keys against the schema and values for sense; raise `ConfigError` naming the key."""
    schema = _schema_keys(base_config())
    given = _schema_keys(cfg)
    unknown = sorted(set(given) - set(schema))
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, schema, 1)) else k
                 for k in unknown]
        raise ConfigError(f"unknown config key(s): {', '.join(hints)}")
    missing = sorted(set(schema) - set(given))
    if missing:
        raise ConfigError(f"config is missing key(s) {missing}; build configs from jaxrl_entropy.config.base_config()")
    for key, default in schema.items():
        value = given[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        elif isinstance(default, tuple):
            ok = isinstance(value, (tuple, list, int, float))
        else:
            ok = True
        if not ok:
            raise ConfigError(f"config.{key}={value!r} has type {type(value).__name__}; "
                              f"expected {type(default).__name__} (default {default!r})")

    positive = ["rl.prompts_per_step", "rl.group_size", "rl.mini_batch_prompts", "rl.micro_batch_size",
                "rl.max_gen_batches", "rollout.max_new_tokens", "data.max_prompt_len",
                "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "eval.k",
                "model.logits_chunk", "rollout.page_size", "rollout.decode_chunk", "rollout.prefill_tokens"]
    for key in positive:
        if given[key] <= 0:
            raise ConfigError(f"config.{key}={given[key]} must be positive")
    if given["train.steps"] < 0 or (given["train.steps"] == 0 and given["train.sft_steps"] <= 0):
        raise ConfigError(f"config.train.steps={given['train.steps']} must be positive (0 is allowed only with "
                          "train.sft_steps > 0: a warm-up-only run that saves a step-0 checkpoint)")
    _choice(cfg.model.dtype, "model.dtype", ("float32", "bfloat16", "float16"))
    _choice(cfg.model.param_dtype, "model.param_dtype", ("float32", "bfloat16", "float16"))
    from jaxrl_entropy.models.attention import PLAIN_IMPLS, PROBE_IMPLS
    _choice(cfg.model.attention, "model.attention", PLAIN_IMPLS)
    _choice(cfg.model.probe_attention, "model.probe_attention", PROBE_IMPLS)
    _choice(cfg.model.kernel_backend, "model.kernel_backend", ("", "xla", "tpu", "gpu", "interpret_tpu", "interpret_gpu"))
    _choice(cfg.data.kind, "data.kind", ("synthetic", "files"))
    _choice(cfg.rollout.engine, "rollout.engine", ("paged", "dense"))
    for key in ("rollout.kv_cache_gib", "rollout.max_slots", "rollout.tensor_parallel"):
        if given[key] < 0:
            raise ConfigError(f"config.{key}={given[key]} must be >= 0 (0 = automatic)")
    _choice(cfg.entropy.aggregation, "entropy.aggregation", ("head_mixture", "head_mean"))
    _choice(cfg.weights.mode, "weights.mode", WEIGHT_MODES)
    _choice(cfg.weights.normalization, "weights.normalization", ("selected", "all"))
    _choice(cfg.weights.soft.shape, "weights.soft.shape", ("linear_tilt", "gaussian"))
    _choice(cfg.weights.soft.schedule, "weights.soft.schedule", ("linear", "cosine"))
    _choice(cfg.weights.soft.hard_mode, "weights.soft.hard_mode", tuple(m for m in WEIGHT_MODES if m != "soft"))
    if cfg.rl.kl_coef:
        raise ConfigError("config.rl.kl_coef > 0 needs a reference policy, which the trainer does not keep; "
                          "leave it at 0 (DAPO uses no KL; the loss function itself supports k3 KL)")
    if not 0.0 <= cfg.train.sft_target_accuracy <= 1.0:
        raise ConfigError(f"config.train.sft_target_accuracy={cfg.train.sft_target_accuracy} must lie in [0, 1]")
    if not 0.0 < cfg.weights.fraction <= 1.0:
        raise ConfigError(f"config.weights.fraction={cfg.weights.fraction} must lie in (0, 1]")
    if not 0.0 <= cfg.weights.soft.alpha < 1.0:
        raise ConfigError(f"config.weights.soft.alpha={cfg.weights.soft.alpha} must lie in [0, 1) (weights stay positive)")
    if cfg.weights.soft.end_step <= cfg.weights.soft.start_step:
        raise ConfigError("config.weights.soft.end_step must be greater than weights.soft.start_step")
    if cfg.rl.group_size < 2:
        raise ConfigError(f"config.rl.group_size={cfg.rl.group_size}: GRPO needs at least 2 responses per prompt")
    if cfg.rl.prompts_per_step % cfg.rl.mini_batch_prompts:
        raise ConfigError(f"config.rl.prompts_per_step ({cfg.rl.prompts_per_step}) must be a multiple of "
                          f"rl.mini_batch_prompts ({cfg.rl.mini_batch_prompts})")
    mini_seqs = cfg.rl.mini_batch_prompts * cfg.rl.group_size
    if mini_seqs % cfg.rl.micro_batch_size:
        raise ConfigError(f"rl.mini_batch_prompts × rl.group_size = {mini_seqs} sequences must be a multiple of "
                          f"config.rl.micro_batch_size ({cfg.rl.micro_batch_size})")
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise ConfigError(f"config.rollout.top_p={cfg.rollout.top_p} must lie in (0, 1]")
    if cfg.rollout.temperature <= 0:
        raise ConfigError(f"config.rollout.temperature={cfg.rollout.temperature} must be positive for RL "
                          "(the policy's log-probs are taken at this temperature)")
    if cfg.rl.eps_low < 0 or cfg.rl.eps_high < 0 or cfg.rl.clip_c <= 1:
        raise ConfigError("config.rl.eps_low/eps_high must be >= 0 and rl.clip_c > 1")
    if cfg.rl.overlong_buffer < 0 or cfg.rl.overlong_buffer >= cfg.rollout.max_new_tokens:
        raise ConfigError(f"config.rl.overlong_buffer={cfg.rl.overlong_buffer} must lie in "
                          f"[0, rollout.max_new_tokens={cfg.rollout.max_new_tokens})")
    if cfg.data.kind == "files" and not cfg.data.train_files:
        raise ConfigError("config.data.kind='files' needs config.data.train_files (parquet/jsonl path or glob)")
    layers = cfg.entropy.layers if isinstance(cfg.entropy.layers, (tuple, list)) else (cfg.entropy.layers,)
    if not layers:
        raise ConfigError("config.entropy.layers is empty; give at least one probe layer (index or depth fraction)")
    for item in layers:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ConfigError(f"config.entropy.layers item {item!r} must be an int index or a float fraction")
        if isinstance(item, float) and not 0.0 <= item <= 1.0:
            raise ConfigError(f"config.entropy.layers item {item} is a depth fraction and must lie in [0, 1]")
    return cfg


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


def from_json_file(path: str) -> ml_collections.ConfigDict:
    """A run's saved `config.json` back into a validated, locked ConfigDict."""
    with open(path) as f:
        return from_json_text(f.read(), source=path)


def from_json_text(text: str, *, source: str = "config.json") -> ml_collections.ConfigDict:
    cfg = base_config()
    try:
        _update_locked(cfg, json.loads(text), "")
    except (AttributeError, KeyError, json.JSONDecodeError) as e:
        raise ConfigError(f"{source}: {e}") from None
    return validate(cfg)


def _update_locked(cfg: ml_collections.ConfigDict, data: dict, prefix: str) -> None:
    for k, v in data.items():
        if k not in cfg:
            raise ConfigError(f"unknown config key {prefix}{k}")
        if isinstance(cfg[k], ml_collections.ConfigDict):
            _update_locked(cfg[k], v, f"{prefix}{k}.")
        else:
            cfg[k] = tuple(v) if isinstance(v, list) else v
