"""The config's sections as frozen dataclasses: every key once, with its default, the rule its
values obey and what it means. A section checks itself when it is built (types, rules, the checks
that tie its own keys together); `Config` adds the checks that tie two sections together.

The RL defaults are the paper's DAPO setting; the presets (`jaxrl_entropy/presets.py`) change only
what differs for their model and data. Lists of allowed names come from the module that implements
them, so a config can never offer a name the code does not know.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from jaxrl_entropy.config.rules import (COUNT, MESH_AXIS, POSITIVE, POSITIVE_INT, SIZE_WHY, TOP_P, Choice,
                                        ConfigError, Range, check_value, setting)
from jaxrl_entropy.data import layout as row_layout, synthetic
from jaxrl_entropy.data.truncation import TRUNCATION_MODES
from jaxrl_entropy.kernels.platform import BACKENDS
from jaxrl_entropy.models.attention import PLAIN_IMPLS, PROBE_IMPLS
from jaxrl_entropy.models.config import DTYPES
from jaxrl_entropy.rl.loss import NORMALIZATIONS
from jaxrl_entropy.rl.token_weights import MODES, SFT_WEIGHT_MODES, SoftConfig

DATA_KINDS = ("synthetic", "files")
AGGREGATIONS = ("head_mixture", "head_mean")  # read by rl/train_step.py (StepSpec.aggregation)
ROLLOUT_ENGINES = ("paged", "dense")
ON_CORRUPT = ("fail", "fallback")


def _section(cls) -> Any:
    return dataclasses.field(default_factory=cls)


class Section:
    """Base of the sections: on construction every scalar field is checked against its default's
    type and its rule (errors name `config.<PATH>.<field>`), then `check()`."""
    PATH: ClassVar[str] = ""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            checked = check_value(self.key(f.name), value, default, f.metadata.get("rule"))
            if checked is not value:
                object.__setattr__(self, f.name, checked)
        self.check()

    @classmethod
    def key(cls, name: str) -> str:
        """The dotted key of field `name`, as `--config.` names it."""
        return f"{cls.PATH}.{name}" if cls.PATH else name

    def check(self) -> None:
        """Checks that tie this section's keys together (none by default)."""


# ------------------------------------------------------------------------------------ model
@dataclasses.dataclass(frozen=True)
class ArchConfig(Section):
    """The random-init model's shape (used when `model.hf_dir` is empty)."""
    PATH: ClassVar[str] = "model.arch"
    hidden_size: int = setting(128, Range("[1, 65536]", why=SIZE_WHY))
    intermediate_size: int = setting(384, Range("[1, 262144]", why=SIZE_WHY))
    num_hidden_layers: int = setting(4, Range("[1, 1024]", why=SIZE_WHY))
    num_attention_heads: int = setting(4, Range("[1, 1024]", why=SIZE_WHY))
    num_key_value_heads: int = setting(2, Range("[1, 1024]", why=SIZE_WHY))
    head_dim: int = setting(32, Range("[2, inf)", why="RoPE rotates pairs of dimensions (an even number)"))
    rope_theta: float = setting(10000.0, POSITIVE)
    tie_word_embeddings: bool = setting(True)
    rms_norm_eps: float = setting(1e-6, POSITIVE)

    def check(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"config.model.arch.num_attention_heads ({self.num_attention_heads}) must be a "
                              f"multiple of config.model.arch.num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"config.model.arch.head_dim={self.head_dim} must be even (RoPE rotates pairs)")


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
    PATH: ClassVar[str] = "model"
    hf_dir: str = setting("", doc='a local HF Qwen3 directory; "" = random init from model.arch')
    dtype: str = setting("float32", Choice(tuple(DTYPES)), "compute dtype (activations, matmuls)")
    param_dtype: str = setting("float32", Choice(tuple(DTYPES)),
                               "storage dtype of the parameters (bf16: AdamW on a float32 master copy)")
    attention: str = setting("xla", Choice(PLAIN_IMPLS), "plain layers: xla | kernel (alias pallas) | cudnn")
    probe_attention: str = setting("xla", Choice(PROBE_IMPLS), "probe layers: xla | kernel (alias pallas)")
    kernel_backend: str = setting("", Choice(("",) + BACKENDS, why='"" picks the backend by platform'),
                                  '"" = by platform; xla | tpu | gpu | interpret_tpu | interpret_gpu')
    remat: bool = setting(False)
    logits_chunk: int = setting(1024, POSITIVE_INT)
    arch: ArchConfig = _section(ArchConfig)


# ------------------------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class SyntheticConfig(Section):
    """The built-in arithmetic task (`data/synthetic.py`)."""
    PATH: ClassVar[str] = "data.synthetic"
    digits: int = setting(2, Range(f"[{synthetic.DIGITS[0]}, {synthetic.DIGITS[1]}]"))
    num_terms: int = setting(2, Range(f"[{synthetic.NUM_TERMS[0]}, {synthetic.NUM_TERMS[1]}]"))
    ops: str = setting("+", doc='operators to draw from, a subset of "+-*"')
    chat: bool = setting(True)
    train_size: int = setting(20000, POSITIVE_INT)
    eval_size: int = setting(200, Range("[0, inf)", why="0 = no held-out evaluation"))
    scratchpad: str = setting("auto", Choice(synthetic.SCRATCHPADS), "the warm-up's reference solutions")

    def task(self, seed: int = 0) -> synthetic.ArithmeticTask:
        """The task these settings describe; ConfigError naming the key if it cannot exist."""
        try:
            return synthetic.ArithmeticTask(digits=self.digits, num_terms=self.num_terms, ops=self.ops,
                                            chat=self.chat, scratchpad=self.scratchpad, seed=seed)
        except ValueError as e:  # the task names its own field: say which config key that is
            raise ConfigError(str(e).replace("ArithmeticTask.", "config.data.synthetic.")) from None

    def check_task(self) -> None:
        most = self.task().max_records("test")
        if self.eval_size > most:
            raise ConfigError(f"config.data.synthetic.eval_size={self.eval_size}: the held-out split of "
                              f"digits={self.digits}, num_terms={self.num_terms}, ops={self.ops!r} holds at most "
                              f"{most} distinct problems; lower eval_size or raise digits/num_terms")


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    PATH: ClassVar[str] = "data"
    kind: str = setting("synthetic", Choice(DATA_KINDS), "synthetic | files")
    train_files: str = setting("", doc="path, glob, or comma-separated list (parquet / jsonl)")
    prompt_key: str = setting(row_layout.VERL_PROMPT_KEY, doc="the column of data.train_files holding the prompt "
                              "(verl's layout by default; MATH-500-style files: problem)")
    answer_key: str = setting(row_layout.VERL_ANSWER_KEY, doc="the column holding the answer, dotted for a nested "
                              "field (verl: reward_model.ground_truth; MATH-500-style files: answer)")
    prompt_template: str = setting("", doc='what a bare problem text goes into: "" (none), "dapo" (the paper\'s '
                                   "prompt) or a text holding {problem}. eval.benchmarks files are read in verl's "
                                   "layout (`jaxrl-entropy prepare-data`)")
    max_prompt_len: int = setting(1024, POSITIVE_INT)
    truncation: str = setting(
        "error", Choice(TRUNCATION_MODES, why="what to do with prompts longer than data.max_prompt_len "
                                              "(left = keep their last tokens, the paper's recipe)"),
        'prompts longer than max_prompt_len (chat template included): "error" (stop, naming the row), '
        '"drop" (leave them out) or "left" (keep their last tokens: the paper\'s / verl\'s recipe); every '
        "mode logs the count, and metrics.jsonl records it at step 0")
    dedupe: bool = setting(True)
    shuffle: bool = setting(True)
    synthetic: SyntheticConfig = _section(SyntheticConfig)

    def layout(self) -> row_layout.RowLayout:
        """The columns and prompt template `train_files` are read with; ConfigError naming the key
        when one cannot work."""
        try:
            template = row_layout.resolve_template(self.prompt_template)
        except ValueError as e:
            raise ConfigError(f"config.data.prompt_template: {e}") from None
        try:
            return row_layout.RowLayout(prompt_key=self.prompt_key, answer_key=self.answer_key, template=template,
                                    settings="--config.data.")
        except ValueError as e:
            raise ConfigError(f"config.data.{e}") from None

    def check(self) -> None:
        if self.kind == "files" and not self.train_files:
            raise ConfigError("config.data.kind='files' needs config.data.train_files (parquet/jsonl path or glob)")
        self.layout()
        if self.kind == "synthetic":
            self.synthetic.check_task()


# ---------------------------------------------------------------------------------- rollout
@dataclasses.dataclass(frozen=True)
class RolloutConfig(Section):
    PATH: ClassVar[str] = "rollout"
    max_new_tokens: int = setting(8192, POSITIVE_INT)
    temperature: float = setting(1.0, Range("(0, inf)", why="the policy's log-probs are taken at this temperature"))
    top_p: float = setting(1.0, TOP_P)
    top_k: int = setting(0, Range("[0, inf)", also=(-1,), why="0 or -1 (vLLM's convention) = off"))
    engine: str = setting("paged", Choice(ROLLOUT_ENGINES),
                          '"paged" (continuous batching over a paged KV cache, prompts prefilled once per '
                          'group; models/engine.py) or "dense" (models/sampler.py: one dense cache per call, '
                          "every row until the longest is done)")
    page_size: int = setting(32, POSITIVE_INT, "tokens per KV page")
    kv_cache_gib: float = setting(0.0, Range("[0, inf)", why="0 = automatic: 80% of the memory the training "
                                             "state and inference weights leave, halved (engine_setup)"),
                                  "KV pool per device")
    max_slots: int = setting(0, Range("[0, inf)", why="0 = as many requests as fit at full length"),
                             "requests decoded together (≤ one call's rows)")
    decode_chunk: int = setting(32, POSITIVE_INT, "decode steps per device call (finished rows are replaced in between)")
    prefill_tokens: int = setting(8192, POSITIVE_INT, "prompt tokens per prefill call")
    tensor_parallel: int = setting(0, Range("[0, inf)", why="0 = all local accelerators"),
                                   "engine devices per host (heads split); 1 on CPU")


# --------------------------------------------------------------------------------------- rl
@dataclasses.dataclass(frozen=True)
class RLConfig(Section):
    PATH: ClassVar[str] = "rl"
    prompts_per_step: int = setting(512, Range("[1, 65536]", why=SIZE_WHY))
    group_size: int = setting(16, Range("[2, 4096]", why="GRPO needs at least 2 responses per prompt; more than "
                                        "4096 is a typo rather than a setting (the paper uses 16)"))
    mini_batch_prompts: int = setting(32, POSITIVE_INT, "prompts per optimiser update (16 updates per rollout step)")
    micro_batch_size: int = setting(8, POSITIVE_INT, "sequences per gradient-accumulation micro-batch")
    eps_low: float = setting(0.2, Range("[0, 1)", why="the ratio's lower clip 1 - eps_low must stay positive"))
    eps_high: float = setting(0.28, Range("[0, inf)"))
    clip_c: float = setting(10.0, Range("(1, inf)", why="the dual clip bounds the ratio from above for negative "
                                        "advantages"))
    kl_coef: float = setting(0.0, Range("[0, 0]", why="a KL term needs a reference policy, which the trainer does "
                                        "not keep (DAPO uses no KL; the loss function itself supports k3 KL)"))
    entropy_coef: float = setting(0.0, Range("[0, inf)", why="the weight of an entropy bonus (0 = off)"))
    scale_adv_by_std: bool = setting(True, doc="False = Dr. GRPO")
    dynamic_sampling: bool = setting(True)
    max_gen_batches: int = setting(10, POSITIVE_INT)
    correct_score: float = setting(1.0, Range("(-inf, inf)"))
    incorrect_score: float = setting(-1.0, Range("(-inf, inf)"))
    math_verify: bool = setting(False)
    math_verify_timeout_s: float = setting(5.0, POSITIVE)
    overlong_buffer: int = setting(2048, Range("[0, inf)", why="0 = no overlong shaping"))
    overlong_factor: float = setting(1.0, Range("[0, inf)"))

    def check(self) -> None:
        if self.prompts_per_step % self.mini_batch_prompts:
            raise ConfigError(f"config.rl.prompts_per_step ({self.prompts_per_step}) must be a multiple of "
                              f"config.rl.mini_batch_prompts ({self.mini_batch_prompts})")
        mini_seqs = self.mini_batch_prompts * self.group_size
        if mini_seqs % self.micro_batch_size:
            raise ConfigError(f"config.rl.mini_batch_prompts × config.rl.group_size = {mini_seqs} sequences must be "
                              f"a multiple of config.rl.micro_batch_size ({self.micro_batch_size})")
        if self.correct_score <= self.incorrect_score:
            raise ConfigError(f"config.rl.correct_score ({self.correct_score}) must be greater than "
                              f"config.rl.incorrect_score ({self.incorrect_score}): otherwise no answer is better")


# ---------------------------------------------------------------------- entropy and weights
@dataclasses.dataclass(frozen=True)
class EntropyConfig(Section):
    PATH: ClassVar[str] = "entropy"
    layers: tuple = setting((0.55,), doc="probe layers: ints (index) or floats (depth fraction); their "
                                         "entropies are averaged")
    aggregation: str = setting("head_mixture", Choice(AGGREGATIONS), "head_mixture | head_mean")

    @property
    def probe_layers(self) -> tuple:
        return as_tuple(self.layers)

    def check(self) -> None:
        if not self.probe_layers:
            raise ConfigError("config.entropy.layers is empty; give at least one probe layer (index or depth fraction)")
        check_layer_items("config.entropy.layers", self.probe_layers)


def as_tuple(value) -> tuple:
    """A tuple-valued key as a tuple (`--config.KEY=3` gives a bare item)."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def check_layer_items(key: str, items: tuple) -> None:
    """Layer items are int indices (negative from the end) or float depth fractions in [0, 1]
    (`qwen3.resolve_probe_layers` turns them into indices once the depth is known)."""
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ConfigError(f"{key} item {item!r} must be an int index or a float depth fraction")
        if isinstance(item, float) and not 0.0 <= item <= 1.0:
            raise ConfigError(f"{key} item {item} is a depth fraction and must lie in [0, 1]")


@dataclasses.dataclass(frozen=True)
class WeightsConfig(Section):
    PATH: ClassVar[str] = "weights"
    mode: str = setting("full", Choice(MODES), "which tokens the loss weights (the paper's subsets, soft, controls)")
    fraction: float = setting(0.2, Range("(0, 1]", why="the share of valid response tokens a hard mode keeps"))
    normalization: str = setting("selected", Choice(NORMALIZATIONS), "selected | all")
    # its own rules: `token_weights.SoftConfig` checks itself (the one place)
    soft: SoftConfig = _section(SoftConfig)


# ------------------------------------------------------------------------- optimiser, train
@dataclasses.dataclass(frozen=True)
class OptimConfig(Section):
    PATH: ClassVar[str] = "optim"
    lr: float = setting(1e-6, POSITIVE)
    b1: float = setting(0.9, Range("[0, 1)"))
    b2: float = setting(0.999, Range("[0, 1)"))
    weight_decay: float = setting(0.1, Range("[0, inf)"))
    warmup_steps: int = setting(10, COUNT)
    grad_clip: float = setting(1.0, Range("(0, inf)", why="the largest global gradient norm"))


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    PATH: ClassVar[str] = "train"
    steps: int = setting(200, Range("[0, inf)", why="RL steps (0 only with train.sft_steps > 0)"))
    log_every: int = setting(1, POSITIVE_INT)
    checkpoint_every: int = setting(20, POSITIVE_INT)
    keep_checkpoints: int = setting(3, POSITIVE_INT)
    geometry_every: int = setting(0, Range("[0, inf)", why="0 = no gradient geometry"))
    sft_steps: int = setting(0, Range("[0, inf)", why="0 = no supervised warm-up"))
    sft_lr: float = setting(1e-3, POSITIVE)
    sft_batch_size: int = setting(64, POSITIVE_INT)
    sft_grad_clip: float = setting(1.0, Range("(0, inf)", why="the largest global gradient norm of a warm-up step"))
    sft_target_accuracy: float = setting(0.0, Range("[0, 1]", why="0 = run all train.sft_steps"))
    sft_check_every: int = setting(25, POSITIVE_INT)
    sft_weights: str = setting(
        "full", Choice(SFT_WEIGHT_MODES),
        "which response tokens the warm-up's cross-entropy counts: all (full), or weights.fraction of them "
        "picked as RL picks them: the lowest (anchor) or highest (explorer) attention entropy of "
        "entropy.layers, or at random; the loss is the mean over the picked tokens")
    progress: bool = setting(True)
    geometry_consecutive: bool = setting(
        False, doc="with geometry_every: also probe at step s + 1 after each probe at s, so that cos_prev "
                   "compares consecutive optimiser steps (geometry/steps_since_prev says the gap)")
    geometry_random_fractions: tuple = setting(
        (), doc="random subsets of these token fractions besides `random` (geometry/random@f/*: cos_full "
                "against the subset's size in tokens)")
    geometry_layers: tuple = setting(
        (), doc="more probe layers for the geometry probe only (ints or depth fractions, as entropy.layers): "
                "each one's attention entropy alone splits anchors from explorers (geometry/anchor@L<i>/*, "
                "geometry/explorer@L<i>/*), while training keeps entropy.layers")
    geometry_halves: bool = setting(
        False, doc="each subset's gradient on two disjoint halves of the rows (geometry/<subset>/cos_halves: "
                   "its variance within one batch; triples the gradients computed)")
    on_corrupt_checkpoint: str = setting(
        "fail", Choice(ON_CORRUPT, why="fallback = resume from the newest intact checkpoint"),
        'a damaged newest checkpoint: "fail" (stop, naming the step and file) or "fallback" (log it, move it '
        "aside to <step>.corrupt, resume from the newest intact step). fail by default: damage means the "
        "storage lost data, which a person should see before more compute is spent on it")
    max_skipped_steps: int = setting(
        3, Range("[0, inf)", why="0 = never stop on skipped updates"),
        "stop with an error after this many consecutive steps in which every update was skipped as non-finite")

    def check(self) -> None:
        if self.steps == 0 and self.sft_steps == 0:
            raise ConfigError("config.train.steps=0 is allowed only with config.train.sft_steps > 0 (a warm-up-only "
                              "run that saves a step-0 checkpoint)")
        check_layer_items("config.train.geometry_layers", as_tuple(self.geometry_layers))
        for f in as_tuple(self.geometry_random_fractions):
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
                raise ConfigError(f"config.train.geometry_random_fractions item {f!r} must be a token fraction "
                                  "in (0, 1]")


@dataclasses.dataclass(frozen=True)
class EvalConfig(Section):
    PATH: ClassVar[str] = "eval"
    every: int = setting(10, Range("[0, inf)", why="0 = no evaluation during training"))
    k: int = setting(8, POSITIVE_INT)
    temperature: float = setting(1.0, Range("[0, inf)", why="0 = greedy"))
    top_p: float = setting(0.7, TOP_P)
    max_new_tokens: int = setting(0, Range("[0, inf)", why="0 = rollout.max_new_tokens"))
    max_problems: int = setting(0, Range("[0, inf)", why="0 = every problem"))
    benchmarks: str = setting("", doc='"name=path,name2=path2" (verl layout); synthetic data adds its held-out split')


@dataclasses.dataclass(frozen=True)
class ParallelConfig(Section):
    PATH: ClassVar[str] = "parallel"
    data: int = setting(-1, MESH_AXIS)
    fsdp: int = setting(1, MESH_AXIS)
    tensor: int = setting(1, MESH_AXIS)

    def check(self) -> None:
        sizes = dataclasses.asdict(self)
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ConfigError(f"at most one of config.parallel.data/fsdp/tensor may be -1 (all the devices left); "
                              f"got {sizes}")


@dataclasses.dataclass(frozen=True)
class DryrunConfig(Section):
    """What `jaxrl-entropy dryrun`'s cost estimate assumes about a run (training ignores these)."""
    PATH: ClassVar[str] = "dryrun"
    keep_rate: float = setting(
        1.0, Range("(0, 1]", why="the share of generated groups dynamic sampling keeps (1 = all: one generation "
                   "batch per step)"),
        "the share of prompt groups dynamic sampling keeps (it generates about 1/keep_rate batches per step; "
        "the trainer logs the measured sampling/kept_group_frac)")
    eval_problems: int = setting(
        0, Range("[0, inf)", why="problems in eval.benchmarks together (0 = evaluation not counted)"),
        "the problems of eval.benchmarks together (k samples each, every eval.every steps)")


# ---------------------------------------------------------------------------------- the whole
@dataclasses.dataclass(frozen=True)
class Config(Section):
    """A run's whole config, typed and checked: what `config.typed()` makes of an `ml_collections`
    config at the boundary (the CLI, `Trainer`). Lower layers take the section they need."""
    PATH: ClassVar[str] = ""
    name: str = setting("run", doc="label of the variant (analysis groups runs by it)")
    seed: int = setting(0, Range("[0, 4294967296)", why="an unsigned 32-bit integer (the data shuffle's seed)"))
    model: ModelConfig = _section(ModelConfig)
    tokenizer: str = setting("", doc='a local tokenizer dir; "" = model.hf_dir, or the built-in demo tokenizer')
    data: DataConfig = _section(DataConfig)
    rollout: RolloutConfig = _section(RolloutConfig)
    rl: RLConfig = _section(RLConfig)
    entropy: EntropyConfig = _section(EntropyConfig)
    weights: WeightsConfig = _section(WeightsConfig)
    optim: OptimConfig = _section(OptimConfig)
    train: TrainConfig = _section(TrainConfig)
    eval: EvalConfig = _section(EvalConfig)
    parallel: ParallelConfig = _section(ParallelConfig)
    dryrun: DryrunConfig = _section(DryrunConfig)

    def check(self) -> None:
        if self.train.sft_steps and self.data.kind != "synthetic":
            raise ConfigError("config.train.sft_steps > 0 needs the synthetic task (it has reference solutions); "
                              "set config.train.sft_steps=0 for config.data.kind='files'")
        if self.rl.overlong_buffer >= self.rollout.max_new_tokens:
            raise ConfigError(f"config.rl.overlong_buffer={self.rl.overlong_buffer} must lie in "
                              f"[0, config.rollout.max_new_tokens={self.rollout.max_new_tokens})")
