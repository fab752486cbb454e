"""The one config schema: `base_config()` lists every key with its default, `RULES` every key's
allowed values, `validate()` checks a config against both before anything is compiled, and
`validate_for_runtime()` adds the checks that need the model's depth or the device count.

Experiment files (`configs/*.py`) start from `base_config()` and change values; they cannot add
keys (the dict is locked), so a typo in a file or on the command line (`--config.rl.gropu_size=8`)
fails at once with the list of valid keys.

Lists of allowed names are imported from the module that implements them (token-weight modes,
soft shapes and schedules, loss normalisations, prompt truncation modes, attention
implementations, kernel backends, dtypes), so the config can never offer a name the code does not
know.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from typing import Any

import ml_collections

from jaxrl_entropy.data import synthetic
from jaxrl_entropy.data.truncation import TRUNCATION_MODES
from jaxrl_entropy.models.attention import PLAIN_IMPLS, PROBE_IMPLS
from jaxrl_entropy.models.config import DTYPES
from jaxrl_entropy.rl.loss import NORMALIZATIONS
from jaxrl_entropy.rl.token_weights import HARD_MODES, MODES, SCHEDULES, SOFT_SHAPES
from jaxrl_entropy.kernels.platform import BACKENDS

DATA_KINDS = ("synthetic", "files")
AGGREGATIONS = ("head_mixture", "head_mean")  # read by rl/train_step.py (StepSpec.aggregation)


class ConfigError(ValueError):
    """A config value or key that cannot work; the message names the key and the fix."""


# The presets' stand-in for a path only the user knows (a checkpoint, a data file): `train` refuses
# to start while any key still holds one (`check_placeholders`), naming every such key at once.
PLACEHOLDER = "/path/to/"


def base_config() -> ml_collections.ConfigDict:
    """Every key with its default (locked). The RL defaults are the paper's DAPO setting; the
    presets (`jaxrl_entropy/presets.py`) change only what differs for their model and data."""
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
    # prompts longer than max_prompt_len (chat template included): "error" (stop, naming the row),
    # "drop" (leave them out) or "left" (keep their last tokens: the paper's / verl's recipe);
    # every mode logs the count, and metrics.jsonl records it at step 0
    c.data.truncation = "error"
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
        kv_cache_gib=0.0,     # KV pool per device; 0 = auto (engine_setup.kv_budget_bytes)
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
        sft_steps=0, sft_lr=1e-3, sft_batch_size=64, sft_grad_clip=1.0, sft_target_accuracy=0.0, sft_check_every=25,
        progress=True))
    # a damaged newest checkpoint: "fail" (stop, naming the step and file) or "fallback" (log it, move
    # it aside to <step>.corrupt, resume from the newest intact step). "fail" by default: damage means
    # the storage lost data, which a person should see before more compute is spent on it.
    c.train.on_corrupt_checkpoint = "fail"
    # stop with an error after this many consecutive steps in which every update was skipped as
    # non-finite (0: never stop)
    c.train.max_skipped_steps = 3

    c.eval = ml_collections.ConfigDict(dict(
        every=10, k=8, temperature=1.0, top_p=0.7, max_new_tokens=0, max_problems=0,
        benchmarks=""))  # "name=path,name2=path2" (verl layout); synthetic data adds its held-out split

    c.parallel = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    # What `jaxrl-entropy dryrun`'s cost estimate assumes about a run (training ignores these):
    # keep_rate = the share of prompt groups dynamic sampling keeps (it generates about 1/keep_rate
    # batches per step; the trainer logs the measured `sampling/kept_group_frac`); 1 = one batch.
    # eval_problems = the problems of eval.benchmarks together (k samples each, every eval.every
    # steps); 0 = evaluation not counted.
    c.dryrun = ml_collections.ConfigDict(dict(keep_rate=1.0, eval_problems=0))
    c.lock()
    return c


# -------------------------------------------------------------------------- allowed values
_INTERVAL = re.compile(r"^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$")


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed numbers: an interval in the usual notation ("(0, 1]", "[1, inf)"); `also` lists
    single values allowed outside it (-1 = "fill the rest"); `why` is said when a value is
    refused. NaN and ±inf are never allowed."""
    interval: str
    also: tuple = ()
    why: str = ""

    def __post_init__(self):
        if not _INTERVAL.match(self.interval):
            raise ValueError(f"bad interval {self.interval!r}")

    def allows(self, value: float) -> bool:
        if value in self.also:
            return True
        if not math.isfinite(value):
            return False
        lo_bracket, lo, hi, hi_bracket = _INTERVAL.match(self.interval).groups()
        lo, hi = float(lo), float(hi)
        above = value >= lo if lo_bracket == "[" else value > lo
        below = value <= hi if hi_bracket == "]" else value < hi
        return above and below

    def describe(self) -> str:
        extra = "".join(f" or {v}" for v in self.also)
        return f"must lie in {self.interval}{extra}{': ' + self.why if self.why else ''}"


@dataclasses.dataclass(frozen=True)
class Choice:
    """Allowed strings."""
    options: tuple[str, ...]
    why: str = ""

    def allows(self, value: str) -> bool:
        return value in self.options

    def describe(self) -> str:
        return f"is not one of {list(self.options)}{': ' + self.why if self.why else ''}"


_POSITIVE_INT = Range("[1, inf)")
_COUNT = Range("[0, inf)")
_POSITIVE = Range("(0, inf)")
_PROBABILITY = Range("[0, 1]")
_TOP_P = Range("(0, 1]", why="nucleus sampling keeps this share of the probability mass (1 = off)")
# Upper bounds far past any real model or batch: a typo (hidden_size=1e9, group_size=1e8) otherwise
# runs into the memory of the machine, or a generation that never ends, instead of this message.
_SIZE_WHY = "far beyond any real setting: probably a typo"
_MESH_AXIS = Range("[1, inf)", also=(-1,), why="devices along this mesh axis (-1: all the devices left)")

# Every key's allowed values, in one place. A key that is not here is a free string or a boolean
# (`FREE_TEXT`); `entropy.layers` has its own rule (ints or depth fractions). Checks that tie two
# keys together are in `validate`, checks that need the model or the devices in
# `validate_for_runtime`.
RULES: dict[str, Range | Choice] = {
    "seed": Range("[0, 4294967296)", why="an unsigned 32-bit integer (the data shuffle's seed)"),
    "model.dtype": Choice(tuple(DTYPES)),
    "model.param_dtype": Choice(tuple(DTYPES)),
    "model.attention": Choice(PLAIN_IMPLS),
    "model.probe_attention": Choice(PROBE_IMPLS),
    "model.kernel_backend": Choice(("",) + BACKENDS, why='"" picks the backend by platform'),
    "model.logits_chunk": _POSITIVE_INT,
    "model.arch.hidden_size": Range("[1, 65536]", why=_SIZE_WHY),
    "model.arch.intermediate_size": Range("[1, 262144]", why=_SIZE_WHY),
    "model.arch.num_hidden_layers": Range("[1, 1024]", why=_SIZE_WHY),
    "model.arch.num_attention_heads": Range("[1, 1024]", why=_SIZE_WHY),
    "model.arch.num_key_value_heads": Range("[1, 1024]", why=_SIZE_WHY),
    "model.arch.head_dim": Range("[2, inf)", why="RoPE rotates pairs of dimensions (an even number)"),
    "model.arch.rope_theta": _POSITIVE,
    "model.arch.rms_norm_eps": _POSITIVE,
    "data.kind": Choice(DATA_KINDS),
    "data.max_prompt_len": _POSITIVE_INT,
    "data.truncation": Choice(TRUNCATION_MODES, why="what to do with prompts longer than data.max_prompt_len "
                                                    "(left = keep their last tokens, the paper's recipe)"),
    "data.synthetic.digits": Range(f"[{synthetic.DIGITS[0]}, {synthetic.DIGITS[1]}]"),
    "data.synthetic.num_terms": Range(f"[{synthetic.NUM_TERMS[0]}, {synthetic.NUM_TERMS[1]}]"),
    "data.synthetic.train_size": _POSITIVE_INT,
    "data.synthetic.eval_size": Range("[0, inf)", why="0 = no held-out evaluation"),
    "rollout.max_new_tokens": _POSITIVE_INT,
    "rollout.temperature": Range("(0, inf)", why="the policy's log-probs are taken at this temperature"),
    "rollout.top_p": _TOP_P,
    "rollout.top_k": Range("[0, inf)", why="0 = off"),
    "rollout.engine": Choice(("paged", "dense")),
    "rollout.page_size": _POSITIVE_INT,
    "rollout.decode_chunk": _POSITIVE_INT,
    "rollout.prefill_tokens": _POSITIVE_INT,
    "rollout.kv_cache_gib": Range("[0, inf)", why="0 = automatic: 80% of the memory the training state and inference weights leave, halved (engine_setup)"),
    "rollout.max_slots": Range("[0, inf)", why="0 = as many requests as fit at full length"),
    "rollout.tensor_parallel": Range("[0, inf)", why="0 = all local accelerators"),
    "rl.prompts_per_step": Range("[1, 65536]", why=_SIZE_WHY),
    "rl.group_size": Range("[2, 4096]", why="GRPO needs at least 2 responses per prompt; more than 4096 is a typo "
                           "rather than a setting (the paper uses 16)"),
    "rl.mini_batch_prompts": _POSITIVE_INT,
    "rl.micro_batch_size": _POSITIVE_INT,
    "rl.eps_low": Range("[0, 1)", why="the ratio's lower clip 1 - eps_low must stay positive"),
    "rl.eps_high": Range("[0, inf)"),
    "rl.clip_c": Range("(1, inf)", why="the dual clip bounds the ratio from above for negative advantages"),
    "rl.kl_coef": Range("[0, 0]", why="a KL term needs a reference policy, which the trainer does not keep "
                                      "(DAPO uses no KL; the loss function itself supports k3 KL)"),
    "rl.entropy_coef": Range("[0, inf)", why="the weight of an entropy bonus (0 = off)"),
    "rl.max_gen_batches": _POSITIVE_INT,
    "rl.correct_score": Range("(-inf, inf)"),
    "rl.incorrect_score": Range("(-inf, inf)"),
    "rl.math_verify_timeout_s": _POSITIVE,
    "rl.overlong_buffer": Range("[0, inf)", why="0 = no overlong shaping"),
    "rl.overlong_factor": Range("[0, inf)"),
    "entropy.aggregation": Choice(AGGREGATIONS),
    "weights.mode": Choice(MODES),
    "weights.fraction": Range("(0, 1]", why="the share of valid response tokens a hard mode keeps"),
    "weights.normalization": Choice(NORMALIZATIONS),
    "weights.soft.shape": Choice(SOFT_SHAPES),
    "weights.soft.alpha": Range("[0, 1)", why="weights stay positive"),
    "weights.soft.sigma": _POSITIVE,
    "weights.soft.floor": _PROBABILITY,
    "weights.soft.schedule": Choice(SCHEDULES),
    "weights.soft.start_step": _COUNT,
    "weights.soft.end_step": _COUNT,
    "weights.soft.hard_steps": _COUNT,
    "weights.soft.hard_mode": Choice(HARD_MODES),
    "optim.lr": _POSITIVE,
    "optim.b1": Range("[0, 1)"),
    "optim.b2": Range("[0, 1)"),
    "optim.weight_decay": Range("[0, inf)"),
    "optim.warmup_steps": _COUNT,
    "optim.grad_clip": Range("(0, inf)", why="the largest global gradient norm"),
    "train.steps": Range("[0, inf)", why="RL steps (0 only with train.sft_steps > 0)"),
    "train.log_every": _POSITIVE_INT,
    "train.checkpoint_every": _POSITIVE_INT,
    "train.keep_checkpoints": _POSITIVE_INT,
    "train.geometry_every": Range("[0, inf)", why="0 = no gradient geometry"),
    "train.sft_steps": Range("[0, inf)", why="0 = no supervised warm-up"),
    "train.sft_lr": _POSITIVE,
    "train.sft_batch_size": _POSITIVE_INT,
    "train.sft_grad_clip": Range("(0, inf)", why="the largest global gradient norm of a warm-up step"),
    "train.sft_target_accuracy": Range("[0, 1]", why="0 = run all train.sft_steps"),
    "train.sft_check_every": _POSITIVE_INT,
    "train.max_skipped_steps": Range("[0, inf)", why="0 = never stop on skipped updates"),
    "train.on_corrupt_checkpoint": Choice(("fail", "fallback"),
                                          why="fallback = resume from the newest intact checkpoint"),
    "eval.every": Range("[0, inf)", why="0 = no evaluation during training"),
    "eval.k": _POSITIVE_INT,
    "eval.temperature": Range("[0, inf)", why="0 = greedy"),
    "eval.top_p": _TOP_P,
    "eval.max_new_tokens": Range("[0, inf)", why="0 = rollout.max_new_tokens"),
    "eval.max_problems": Range("[0, inf)", why="0 = every problem"),
    "parallel.data": _MESH_AXIS,
    "parallel.fsdp": _MESH_AXIS,
    "parallel.tensor": _MESH_AXIS,
    "dryrun.keep_rate": Range("(0, 1]", why="the share of generated groups dynamic sampling keeps (1 = all: one "
                              "generation batch per step)"),
    "dryrun.eval_problems": Range("[0, inf)", why="problems in eval.benchmarks together (0 = evaluation not counted)"),
}
# Keys whose value is any string: paths, labels, the benchmark list (checked when it is read).
FREE_TEXT = ("name", "model.hf_dir", "tokenizer", "data.train_files", "data.synthetic.ops", "eval.benchmarks")


# -------------------------------------------------------------------------------- validation
def _schema_keys(d: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_schema_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def get_key(cfg: ml_collections.ConfigDict, key: str) -> Any:
    """The value at a dotted key (`"eval.k"`), as `--config.eval.k` names it."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def set_key(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Set the value at a dotted key (`"eval.k"`); the key must exist (the config is locked)."""
    parent, _, leaf = key.rpartition(".")
    (get_key(cfg, parent) if parent else cfg)[leaf] = value


def _check_types(schema: dict[str, Any], given: dict[str, Any]) -> None:
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
            ok = isinstance(value, (tuple, list, int, float)) and not isinstance(value, bool)
        else:
            ok = True
        if not ok:
            raise ConfigError(f"config.{key}={value!r} has type {type(value).__name__}; "
                              f"expected {type(default).__name__} (default {default!r})")


def _probe_layers(cfg: ml_collections.ConfigDict) -> tuple:
    layers = cfg.entropy.layers
    return tuple(layers) if isinstance(layers, (tuple, list)) else (layers,)


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check keys against the schema and values against `RULES` and each other; raise
    `ConfigError` naming the key and its allowed values. Needs neither the model nor devices."""
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
    _check_types(schema, given)
    for key, rule in RULES.items():
        if not rule.allows(given[key]):
            raise ConfigError(f"config.{key}={given[key]!r} {rule.describe()}")

    c = cfg
    if c.train.steps == 0 and c.train.sft_steps == 0:
        raise ConfigError("config.train.steps=0 is allowed only with config.train.sft_steps > 0 (a warm-up-only "
                          "run that saves a step-0 checkpoint)")
    if c.data.kind == "files" and not c.data.train_files:
        raise ConfigError("config.data.kind='files' needs config.data.train_files (parquet/jsonl path or glob)")
    if c.train.sft_steps and c.data.kind != "synthetic":
        raise ConfigError("config.train.sft_steps > 0 needs the synthetic task (it has reference solutions); "
                          "set config.train.sft_steps=0 for config.data.kind='files'")
    if not c.model.hf_dir:
        a = c.model.arch
        if a.num_attention_heads % a.num_key_value_heads:
            raise ConfigError(f"config.model.arch.num_attention_heads ({a.num_attention_heads}) must be a multiple "
                              f"of config.model.arch.num_key_value_heads ({a.num_key_value_heads})")
        if a.head_dim % 2:
            raise ConfigError(f"config.model.arch.head_dim={a.head_dim} must be even (RoPE rotates pairs)")
    if c.data.kind == "synthetic":
        _check_synthetic(c)
    if c.rl.prompts_per_step % c.rl.mini_batch_prompts:
        raise ConfigError(f"config.rl.prompts_per_step ({c.rl.prompts_per_step}) must be a multiple of "
                          f"config.rl.mini_batch_prompts ({c.rl.mini_batch_prompts})")
    mini_seqs = c.rl.mini_batch_prompts * c.rl.group_size
    if mini_seqs % c.rl.micro_batch_size:
        raise ConfigError(f"config.rl.mini_batch_prompts × config.rl.group_size = {mini_seqs} sequences must be a "
                          f"multiple of config.rl.micro_batch_size ({c.rl.micro_batch_size})")
    if c.rl.overlong_buffer >= c.rollout.max_new_tokens:
        raise ConfigError(f"config.rl.overlong_buffer={c.rl.overlong_buffer} must lie in "
                          f"[0, config.rollout.max_new_tokens={c.rollout.max_new_tokens})")
    if c.rl.correct_score <= c.rl.incorrect_score:
        raise ConfigError(f"config.rl.correct_score ({c.rl.correct_score}) must be greater than "
                          f"config.rl.incorrect_score ({c.rl.incorrect_score}): otherwise no answer is better")
    if c.weights.soft.end_step < c.weights.soft.start_step:
        raise ConfigError(f"config.weights.soft.end_step ({c.weights.soft.end_step}) must be >= "
                          f"config.weights.soft.start_step ({c.weights.soft.start_step})")
    if sum(v == -1 for v in c.parallel.values()) > 1:
        raise ConfigError(f"at most one of config.parallel.data/fsdp/tensor may be -1 (all the devices left); "
                          f"got {c.parallel.to_dict()}")
    layers = _probe_layers(c)
    if not layers:
        raise ConfigError("config.entropy.layers is empty; give at least one probe layer (index or depth fraction)")
    for item in layers:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ConfigError(f"config.entropy.layers item {item!r} must be an int index or a float depth fraction")
        if isinstance(item, float) and not 0.0 <= item <= 1.0:
            raise ConfigError(f"config.entropy.layers item {item} is a depth fraction and must lie in [0, 1]")
    return cfg


def _check_synthetic(c: ml_collections.ConfigDict) -> None:
    s = c.data.synthetic
    try:
        task = synthetic.ArithmeticTask(digits=s.digits, num_terms=s.num_terms, ops=s.ops, chat=s.chat)
    except ValueError as e:  # the task names its own field: say which config key that is
        raise ConfigError(str(e).replace("ArithmeticTask.", "config.data.synthetic.")) from None
    most = task.max_records("test")
    if s.eval_size > most:
        raise ConfigError(f"config.data.synthetic.eval_size={s.eval_size}: the held-out split of "
                          f"digits={s.digits}, num_terms={s.num_terms}, ops={s.ops!r} holds at most {most} "
                          "distinct problems; lower eval_size or raise digits/num_terms")


def model_num_layers(cfg: ml_collections.ConfigDict) -> int:
    """The model's depth: from `model.hf_dir`'s config.json (no weights read) or `model.arch`."""
    if cfg.model.hf_dir:
        from jaxrl_entropy.models.config import read_hf_config
        return read_hf_config(cfg.model.hf_dir).num_hidden_layers
    return cfg.model.arch.num_hidden_layers


def mesh_sizes(cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """`parallel.data/fsdp/tensor` with -1 resolved against `num_devices`; ConfigError if they do
    not multiply to the device count."""
    sizes = dict(cfg.parallel.to_dict())
    fill = [k for k, v in sizes.items() if v == -1]
    known = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if num_devices % known:
            raise ConfigError(f"config.parallel.{fill[0]}=-1 cannot fill {num_devices} devices: the other axes "
                              f"({sizes}) multiply to {known}, which does not divide {num_devices}")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(f"config.parallel.data × fsdp × tensor = {math.prod(sizes.values())} ({sizes}) but "
                          f"there are {num_devices} devices; make the product {num_devices} or set one axis to -1")
    return sizes


def check_micro_batch(cfg: ml_collections.ConfigDict, sizes: dict[str, int]) -> None:
    """Every micro-batch (and the old-policy forward's chunks) must split evenly over the
    data-parallel devices (`parallel.data` × `parallel.fsdp`, `sizes` = the mesh's axis sizes);
    otherwise a `ConfigError` that says what to set."""
    d = sizes.get("data", 1) * sizes.get("fsdp", 1)  # the batch axes of parallel.LOGICAL_RULES
    micro = cfg.rl.micro_batch_size
    if micro % d == 0:
        return
    mini = cfg.rl.mini_batch_prompts * cfg.rl.group_size
    good = [m for m in range(d, mini + 1, d) if mini % m == 0]
    fix = (f"set --config.rl.micro_batch_size={good[0]}" if good else
           f"raise rl.mini_batch_prompts × rl.group_size ({mini}) to a multiple of {d}")
    k, tensor = d // math.gcd(d, micro), sizes.get("tensor", 1)
    alt = (f"; or move a factor {k} to tensor parallelism: --config.parallel.tensor={tensor * k} "
           f"(data-parallel size {d // k})")
    raise ConfigError(
        f"config.rl.micro_batch_size={micro} must be a multiple of the data-parallel size {d} "
        f"(config.parallel.data × config.parallel.fsdp, mesh {sizes}: every device takes "
        f"micro_batch_size / {d} rows); {fix}{alt}")


def validate_for_runtime(cfg: ml_collections.ConfigDict, *, num_devices: int, num_processes: int = 1,
                         num_layers: int | None = None) -> ml_collections.ConfigDict:
    """`validate` plus the checks that need the model's depth and the devices, all before any
    weight is read or anything compiled.

    num_devices: `jax.device_count()`; num_processes: `jax.process_count()`; num_layers: the
    model's depth (default `model_num_layers(cfg)`, which reads only config.json).
    """
    validate(cfg)
    sizes = mesh_sizes(cfg, num_devices)
    check_micro_batch(cfg, sizes)
    data_parallel = sizes["data"] * sizes["fsdp"]  # the batch is split over both (parallel.LOGICAL_RULES)
    if cfg.train.sft_steps and cfg.train.sft_batch_size % data_parallel:
        raise ConfigError(f"config.train.sft_batch_size={cfg.train.sft_batch_size} must be a multiple of the "
                          f"data-parallel size {data_parallel} (config.parallel.data × config.parallel.fsdp)")
    if cfg.rl.prompts_per_step % num_processes:
        raise ConfigError(f"config.rl.prompts_per_step={cfg.rl.prompts_per_step} must be a multiple of the "
                          f"number of processes ({num_processes}): each loads an equal share of the prompts")
    layers = model_num_layers(cfg) if num_layers is None else num_layers
    for item in _probe_layers(cfg):
        if isinstance(item, int) and not -layers <= item < layers:
            where = f"config.json of {cfg.model.hf_dir}" if cfg.model.hf_dir else "config.model.arch"
            raise ConfigError(f"config.entropy.layers item {item} is out of range for a model with {layers} layers "
                              f"({where}); use an index in [{-layers}, {layers}) or a depth fraction in [0, 1]")
    return cfg


def placeholders(cfg: ml_collections.ConfigDict) -> dict[str, str]:
    """Keys whose value still holds a preset's placeholder path (`PLACEHOLDER`): key -> value."""
    given = _schema_keys(cfg)
    return {key: given[key] for key in FREE_TEXT
            if isinstance(given.get(key), str) and PLACEHOLDER in given[key]}


def check_placeholders(cfg: ml_collections.ConfigDict, keys: tuple[str, ...] | None = None) -> None:
    """A `ConfigError` listing every key (of `keys`, default all) that still holds a placeholder
    path, each as the flag that sets it, so that one message says all that is missing."""
    found = {k: v for k, v in placeholders(cfg).items() if keys is None or k in keys}
    if found:
        raise ConfigError(
            f"{len(found)} config key(s) still hold the preset's placeholder paths ({PLACEHOLDER}...): set each "
            "on the command line, with your paths in place of /path/to (local or gs://; model.hf_dir a local "
            "directory on every host):\n" + "\n".join(f"  --config.{k}={v}" for k, v in found.items()))


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
