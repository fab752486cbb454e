"""The config schema: every preset validates; bad keys and values fail with the key named, before
anything is compiled; every numeric key has a stated range; error messages name real keys."""
import ast
import json
import math
import pathlib
import re

import ml_collections
import pytest

from conftest import REPO_ROOT, TINY_CLI_FLAGS
from jaxrl_entropy import cli
from jaxrl_entropy import config as config_lib
from jaxrl_entropy import presets
from jaxrl_entropy.config import Choice, ConfigError, Range, validate, validate_for_runtime

PACKAGE = pathlib.Path(config_lib.__file__).parent.parent
SCHEMA = config_lib.schema_keys()


def _field(key: str):
    """The dataclass field behind a dotted key of the typed schema."""
    import dataclasses

    cls, *parents, leaf = [config_lib.Config, *key.split(".")]
    for p in parents:
        cls = type(getattr(cls(), p))
    return next(f for f in dataclasses.fields(cls) if f.name == leaf)


def _rule(key: str):
    return _field(key).metadata.get("rule")


def _set(c, key, value):
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value
    return c


# ------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("variant", presets.PAPER_VARIANTS)
def test_presets_validate(variant):
    makers = [presets.demo, presets.qwen3_8b_dapo, presets.multiplication, presets.column_addition]
    makers += [lambda v, s=s: presets.qwen3_dapo(s, v) for s in presets.MODELS]
    for make in makers:
        cfg = validate(make(variant))
        assert cfg.name == variant and cfg.weights.mode == variant


@pytest.mark.parametrize("size", list(presets.MODELS))
@pytest.mark.parametrize("slice_name", list(presets.SLICES))
def test_every_model_on_every_slice_lays_one_sequence_on_each_chip(size, slice_name):
    from jaxrl_entropy import chips

    c = validate(presets.qwen3_dapo(size, f"anchor,{slice_name}"))
    n = chips.resolve(slice_name).num_chips
    assert c.rl.micro_batch_size == n and c.weights.mode == "anchor"
    config_lib.check_micro_batch(c.rl, {"data": 1, "fsdp": n, "tensor": 1})
    assert presets.SLICE_PURPOSE[slice_name]


def test_paper_preset_has_the_paper_hyperparameters():
    from jaxrl_entropy.models import qwen3

    c = presets.qwen3_8b_dapo("anchor")
    assert (c.data.max_prompt_len, c.rollout.max_new_tokens) == (1024, 8192)
    assert (c.rl.eps_low, c.rl.eps_high, c.rl.clip_c, c.rl.group_size) == (0.2, 0.28, 10.0, 16)
    assert (c.rl.prompts_per_step, c.rl.mini_batch_prompts, c.rl.overlong_buffer) == (512, 32, 2048)
    assert (c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay, c.optim.grad_clip) == (1e-6, 10, 0.1, 1.0)
    assert qwen3.resolve_probe_layers(c.entropy.layers, 36) == (20,) and c.weights.fraction == 0.2
    assert (c.eval.k, c.eval.top_p, c.model.dtype) == (8, 0.7, "bfloat16")
    assert c.rl.micro_batch_size == 32   # the default slice, v5p-64


@pytest.mark.parametrize("size, depth, layer", [("0.6b", 28, 15), ("1.7b", 28, 15), ("4b", 36, 20), ("8b", 36, 20)])
def test_probe_layer_is_the_papers_depth_fraction(size, depth, layer):
    """0.55 of the depth: layer 20 of Qwen3-8B's 36 (the paper's), 15 of a 28-layer model (not 20, 0.71)."""
    import json

    from jaxrl_entropy.models import qwen3

    arch = json.loads((REPO_ROOT / "configs" / "arch" / presets.MODELS[size].arch / "config.json").read_text())
    assert arch["num_hidden_layers"] == depth
    assert qwen3.resolve_probe_layers(presets.qwen3_dapo(size).entropy.layers, depth) == (layer,)


def test_presets_sample_as_verls_dapo_recipe():
    """Rollouts at temperature 1, top-p 1, no top-k; evaluation at temperature 1, top-p 0.7, no top-k
    (verl's val_kwargs), mean@8 (the paper's)."""
    for size in presets.MODELS:
        c = presets.qwen3_dapo(size)
        for key, value in presets.VERL_DAPO_SAMPLING.items():
            assert config_lib.get_key(c, key) == value, key
        assert c.eval.k == 8 and c.eval.every == 10
        assert "top_k" not in c.eval   # the evaluation's sampler has no top-k: verl's top_k=-1


def _assigned_keys(function_name: str) -> list[str]:
    """Keys a preset function writes: `c.a.b = v`, `c.a.update(dict(k=v))`, `c.a.update(k=v)`."""
    tree = ast.parse((PACKAGE / "presets.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function_name)

    def dotted(node):
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        return ".".join(reversed(parts)) if isinstance(node, ast.Name) and node.id == "c" else None

    keys = []
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign):
            keys += [k for k in map(dotted, node.targets) if k]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update":
            prefix = dotted(node.func.value)
            kws = list(node.keywords)
            for arg in node.args:
                if isinstance(arg, ast.Call) and getattr(arg.func, "id", None) == "dict":
                    kws += arg.keywords
            keys += [f"{prefix}.{kw.arg}" for kw in kws]
    return keys


@pytest.mark.parametrize("name", ["demo", "qwen3_dapo"])
def test_presets_set_only_what_differs_from_base_config(name):
    keys = _assigned_keys(name)
    assert len(keys) > 5  # the parse found the assignments
    make = presets.demo if name == "demo" else (lambda v: presets.qwen3_dapo("8b", v))
    made = config_lib.flatten(make("full"))
    restated = [k for k in keys if made[k] == SCHEMA[k]]
    assert not restated, f"presets.{name} restates base_config defaults: {restated}"


def test_cli_default_is_the_demo_and_needs_no_configs_dir(tmp_path, monkeypatch):
    from absl import flags
    from jaxrl_entropy.cli import commands as cli_commands

    monkeypatch.chdir(tmp_path)  # no configs/ here: the default must come from the package
    fv = flags.FlagValues()
    cli_commands._define(fv, ["jaxrl-entropy train"])
    fv(["jaxrl-entropy train"])
    assert fv.config.to_dict() == presets.demo().to_dict()


def test_config_files_expose_the_presets():
    import importlib.util

    files = [("configs/demo.py", presets.demo), ("configs/qwen3_8b_dapo.py", presets.qwen3_8b_dapo),
             ("configs/multiplication.py", presets.multiplication),
             ("configs/column_addition.py", presets.column_addition)]
    files += [(f"configs/qwen3_{s}_dapo.py", lambda v, s=s: presets.qwen3_dapo(s, v)) for s in presets.MODELS]
    for name, make in files:
        spec = importlib.util.spec_from_file_location("cfgfile", str(REPO_ROOT / name))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.get_config("explorer").to_dict() == make("explorer").to_dict()
        if "qwen3" in name:
            assert module.get_config("explorer,v6e-8").to_dict() == make("explorer,v6e-8").to_dict()
    assert isinstance(presets.get_config(), ml_collections.ConfigDict)


def test_placeholder_paths_are_listed_in_one_message():
    c = presets.qwen3_dapo("1.7b", "soft,v6e-8")
    assert set(config_lib.placeholders(c)) == {"model.hf_dir", "data.train_files", "eval.benchmarks"}
    with pytest.raises(ConfigError) as e:
        config_lib.check_placeholders(c)
    lines = str(e.value).splitlines()
    assert lines[0].startswith("3 config key(s) still hold the preset's placeholder paths")
    assert lines[1:] == ["  --config.model.hf_dir=/path/to/Qwen3-1.7B-Base",
                         "  --config.data.train_files=/path/to/data/dapo-math-17k.parquet",
                         "  --config.eval.benchmarks=" + ",".join(f"{n}=/path/to/data/{n}.parquet"
                                                                  for n in presets.EVAL_SETS)]
    config_lib.set_key(c, "model.hf_dir", "/ckpt/Qwen3-1.7B-Base")
    config_lib.set_key(c, "data.train_files", "gs://b/dapo.parquet")
    with pytest.raises(ConfigError, match="1 config key") as e:
        config_lib.check_placeholders(c)
    assert "--config.eval.benchmarks=" in str(e.value) and "--config.model.hf_dir" not in str(e.value)
    config_lib.check_placeholders(c, keys=("model.hf_dir",))   # only the keys asked about


def test_train_with_a_preset_stops_before_anything_runs_naming_every_placeholder(tmp_path, capsys):
    code = cli.main(["jaxrl-entropy", "train", "--config=" + str(REPO_ROOT / "configs" / "qwen3_4b_dapo.py") +
                     ":anchor,v5p-8", f"--workdir={tmp_path / 'run'}", "--config.model.hf_dir=/ckpt/Qwen3-4B-Base"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "2 config key(s) still hold" in err and "--config.data.train_files=" in err, err
    assert "--config.eval.benchmarks=aime24=" in err and "--config.model.hf_dir" not in err, err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------- the rules table
def test_every_key_has_a_rule_or_says_what_it_is():
    # numbers have an allowed range; names a choice; free text (paths, labels) and switches say
    # what they mean; every default obeys its own rule. weights.soft.* is token_weights.SoftConfig,
    # which checks itself (tested in tests/rl/test_token_weights.py).
    assert set(config_lib.as_dict(config_lib.Config())) == set(config_lib.base_config())
    for key, default in SCHEMA.items():
        if key.startswith("weights.soft."):
            continue
        rule = _rule(key)
        if isinstance(default, bool) or key in ("entropy.layers", "train.geometry_random_fractions"):
            assert rule is None
        elif isinstance(default, (int, float)):
            assert isinstance(rule, Range), f"numeric key {key} has no allowed range"
        elif isinstance(default, str):
            assert isinstance(rule, Choice) or _field(key).metadata["doc"], f"free-text key {key} says nothing"
        assert rule is None or rule.allows(default), f"the default of {key} breaks its own rule"


def test_allowed_names_come_from_the_code_that_uses_them():
    from jaxrl_entropy.kernels import platform as kernel_platform
    from jaxrl_entropy.models import attention, config as model_config
    from jaxrl_entropy.rl import loss, token_weights

    assert _rule("weights.mode").options is token_weights.MODES
    assert _rule("weights.normalization").options is loss.NORMALIZATIONS
    assert _rule("model.attention").options is attention.PLAIN_IMPLS
    assert _rule("model.probe_attention").options is attention.PROBE_IMPLS
    assert _rule("model.kernel_backend").options == ("",) + kernel_platform.BACKENDS
    assert _rule("model.dtype").options == tuple(model_config.DTYPES)
    from jaxrl_entropy.data import pipeline
    assert _rule("data.truncation").options is pipeline.TRUNCATION_MODES
    assert config_lib.base_config().data.truncation == "error"   # the safe default: no silent cut


@pytest.mark.parametrize("interval, inside, outside", [
    ("(0, 1]", [1e-9, 0.5, 1.0], [0.0, -1.0, 1.0000001, math.nan, math.inf]),
    ("[0, 1)", [0.0, 0.999], [1.0, -1e-9, math.nan]),
    ("[1, inf)", [1, 10**9], [0, -1, math.inf, math.nan]),
    ("(-inf, inf)", [-1e30, 0.0, 3.5], [math.nan, math.inf, -math.inf]),
])
def test_range_semantics(interval, inside, outside):
    rule = Range(interval)
    assert all(rule.allows(v) for v in inside)
    assert not any(rule.allows(v) for v in outside)
    assert Range("[1, inf)", also=(-1,)).allows(-1)


@pytest.mark.parametrize("key, value, ok", [
    ("weights.soft.alpha", -0.1, False), ("weights.soft.alpha", 0.99, True), ("weights.soft.alpha", 1.0, False),
    ("weights.soft.sigma", 0.0, False), ("weights.soft.floor", 1.1, False), ("weights.soft.hard_steps", -1, False),
    ("weights.soft.end_step", 0, True), ("weights.soft.start_step", -1, False), ("weights.soft.shape", "bump", False),
    ("weights.soft.hard_mode", "soft", False), ("weights.soft.hard_mode", "explorer", True),
    ("weights.soft.alpha", "0.5", False),
])
def test_soft_settings_are_checked_by_soft_config_and_named_as_config_keys(key, value, ok):
    """One rule, one place: `token_weights.SoftConfig` is the config's weights.soft section; its
    refusals come back naming the --config key."""
    c = _set(presets.demo("soft"), key, value)
    if ok:
        assert config_lib.typed(c).weights.soft == config_lib.typed(c).weights.soft.__class__(
            **{**config_lib.as_dict(config_lib.typed(presets.demo("soft")))["weights"]["soft"], key.split(".")[-1]: value})
    else:
        with pytest.raises(ConfigError, match=re.escape(f"config.{key}={value!r}")):
            validate(c)


# --------------------------------------------------------------------------------- validate
def test_locked_config_rejects_new_keys():
    c = presets.demo()
    with pytest.raises(AttributeError, match="group_size"):
        c.rl.gropu_size = 8


def test_unknown_key_in_a_handmade_config_suggests_the_right_one():
    c = presets.demo()
    c.unlock()
    c.rl.gropu_size = 8
    with pytest.raises(ConfigError, match=r"rl.gropu_size \(did you mean rl.group_size\?\)"):
        validate(c)


@pytest.mark.parametrize("key, value, message", [
    ("rl.group_size", 1, "config.rl.group_size=1 must lie in [2, 4096]: GRPO needs at least 2"),
    ("rl.group_size", "8", "has type str; expected int"),
    ("weights.mode", "anchors", "weights.mode='anchors' is not one of"),
    ("weights.fraction", 0.0, "weights.fraction=0.0 must lie in (0, 1]"),
    ("weights.soft.alpha", 1.0, "config.weights.soft.alpha=1.0: must be in [0, 1)"),
    ("rl.mini_batch_prompts", 5, "multiple of config.rl.mini_batch_prompts"),
    ("rl.micro_batch_size", 48, "multiple of config.rl.micro_batch_size"),
    ("rollout.top_p", 1.5, "top_p=1.5 must lie in (0, 1]"),
    ("rollout.temperature", 0.0, "temperature=0.0 must lie in (0, inf)"),
    ("rl.overlong_buffer", 1000, "overlong_buffer=1000 must lie in [0, config.rollout.max_new_tokens"),
    ("entropy.layers", (1.5,), "depth fraction"),
    ("entropy.layers", (), "entropy.layers is empty"),
    ("entropy.aggregation", "mean", "entropy.aggregation"),
    ("rl.kl_coef", 0.1, "reference policy"),
    ("model.attention", "flash", "model.attention"),
    ("train.steps", -1, "train.steps=-1 must lie in [0, inf)"),
    ("weights.soft.start_step", 150, "config.weights.soft.end_step=100: must be >= start_step=150"),
    ("parallel.tensor", -1, "at most one of config.parallel"),
    ("model.arch.num_key_value_heads", 3, "num_attention_heads (4) must be a multiple"),
    ("model.arch.head_dim", 31, "head_dim=31 must be even"),
    ("data.synthetic.eval_size", 5000, "holds at most 729"),
    ("data.truncation", "right", "data.truncation='right' is not one of ['error', 'drop', 'left']"),
])
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(_set(presets.demo(), key, value))


def test_files_need_train_files_and_no_warm_up():
    c = _set(presets.demo(), "data.kind", "files")
    with pytest.raises(ConfigError, match="needs config.data.train_files"):
        validate(c)
    c.data.train_files = "x.parquet"
    with pytest.raises(ConfigError, match="train.sft_steps > 0 needs the synthetic task"):
        validate(c)
    c.train.sft_steps = 0
    validate(c)


def test_zero_rl_steps_only_with_a_warm_up():
    c = presets.demo()
    c.train.steps = 0
    assert c.train.sft_steps > 0
    validate(c)  # a warm-up-only run
    c.train.sft_steps = 0
    with pytest.raises(ConfigError, match=r"train.steps=0 is allowed only with config.train.sft_steps > 0"):
        validate(c)


@pytest.fixture
def no_trainer(monkeypatch):
    """Fails the test if anything gets as far as building a Trainer (which compiles)."""
    from jaxrl_entropy.training import trainer as _trainer_module

    class Refused:
        def __init__(self, *a, **k):
            raise AssertionError("a Trainer was built: the config error came too late")

    monkeypatch.setattr(_trainer_module, "Trainer", Refused)


# Issue 12: values accepted although meaningless, and raw tracebacks that did not name the key.
@pytest.mark.parametrize("key, value, allowed", [
    ("optim.lr", "-1e-4", "(0, inf)"),
    ("optim.lr", "nan", "(0, inf)"),
    ("optim.grad_clip", "0", "(0, inf)"),
    ("optim.b2", "1", "[0, 1)"),
    ("optim.warmup_steps", "-1", "[0, inf)"),
    ("eval.every", "-1", "[0, inf)"),
    ("train.geometry_every", "-1", "[0, inf)"),
    ("train.sft_steps", "-1", "[0, inf)"),
    ("rl.incorrect_score", "nan", "(-inf, inf)"),
    ("eval.top_p", "0", "(0, 1]"),
    ("rollout.top_k", "-2", "[0, inf) or -1"),
    ("data.synthetic.digits", "0", "[1, 9]"),
    ("data.synthetic.ops", "+/", "distinct characters from '+-*'"),
    ("model.dtype", "float64", "['float32', 'bfloat16', 'float16']"),
    ("seed", "-3", "[0, 4294967296)"),
    ("rl.group_size", "100000000", "[2, 4096]"),   # typos that used to run into the memory of the machine
    ("model.arch.hidden_size", "1000000000", "[1, 65536]"),
])
def test_cli_rejects_bad_values_before_compiling(key, value, allowed, tmp_path, capsys, no_trainer):
    code = cli.main(["jaxrl-entropy", "train", f"--workdir={tmp_path / 'run'}", *TINY_CLI_FLAGS,
                     f"--config.{key}={value}"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"config.{key}" in err and allowed in err, err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ runtime checks
@pytest.mark.parametrize("override, message", [
    ("--config.entropy.layers=(7,)", "config.entropy.layers item 7 is out of range for a model with 2 layers"),
    ("--config.parallel.data=3", "config.parallel.data × fsdp × tensor = 3"),
])
def test_cli_runtime_checks_name_the_key_before_building_anything(override, message, tmp_path, capsys,
                                                                    no_trainer):
    code = cli.main(["jaxrl-entropy", "train", f"--workdir={tmp_path / 'run'}", *TINY_CLI_FLAGS, override])
    err = capsys.readouterr().err
    assert code == 1 and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("layers, ok", [((3,), True), ((-4,), True), ((0.99,), True), ((4,), False),
                                        ((7,), False), ((-5,), False)])
def test_probe_layers_against_the_model_depth(layers, ok):
    c = _set(presets.demo(), "entropy.layers", layers)  # model.arch: 4 layers
    if ok:
        validate_for_runtime(c, num_devices=1)
    else:
        with pytest.raises(ConfigError, match=r"config.entropy.layers item -?\d+ is out of range for a model "
                                              r"with 4 layers \(config.model.arch\)"):
            validate_for_runtime(c, num_devices=1)


def test_probe_layers_against_a_config_json_only_checkpoint(tmp_path):
    # the committed config.json of Qwen3-8B, no weights at all
    (tmp_path / "config.json").write_text((REPO_ROOT / "configs" / "arch" / "qwen3-8b" / "config.json").read_text())
    c = _set(presets.qwen3_8b_dapo(), "model.hf_dir", str(tmp_path))
    assert config_lib.model_num_layers(c.model) == 36
    validate_for_runtime(c, num_devices=8)  # layer 20 of 36
    _set(c, "entropy.layers", (36,))
    with pytest.raises(ConfigError, match=r"item 36 is out of range for a model with 36 layers \(config.json"):
        validate_for_runtime(c, num_devices=8)


@pytest.mark.parametrize("changes, devices, message", [
    ({"parallel.data": 3}, 8, "config.parallel.data × fsdp × tensor = 3"),
    ({"parallel.data": -1, "parallel.fsdp": 3}, 8, "config.parallel.data=-1 cannot fill 8 devices"),
    ({"parallel.data": 8, "rl.micro_batch_size": 4, "rl.mini_batch_prompts": 4, "rl.prompts_per_step": 16},
     8, "config.rl.micro_batch_size=4 must be a multiple of the data-parallel size 8"),
    ({"parallel.data": 2, "parallel.fsdp": 4, "train.sft_batch_size": 12}, 8,
     "config.train.sft_batch_size=12 must be a multiple of the data-parallel size 8"),
])
def test_mesh_and_batches_against_the_device_count(changes, devices, message):
    c = presets.demo()
    for key, value in changes.items():
        _set(c, key, value)
    validate(c)  # statically fine: only the device count rules it out
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_for_runtime(c, num_devices=devices)


def test_mesh_sizes_fill_the_devices():
    c = presets.demo()
    assert config_lib.mesh_sizes(c.parallel, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert config_lib.mesh_sizes(_set(c, "parallel.tensor", 2).parallel, 8) == {"data": 4, "fsdp": 1, "tensor": 2}
    _set(c, "parallel.data", 2)
    assert config_lib.mesh_sizes(_set(c, "parallel.fsdp", -1).parallel, 8) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_prompts_split_over_processes():
    c = presets.demo()  # 16 prompts per step
    validate_for_runtime(c, num_devices=8, num_processes=4)
    _set(_set(c, "parallel.data", 1), "parallel.tensor", -1)  # batches unsplit: only the processes matter
    with pytest.raises(ConfigError, match="rl.prompts_per_step=16 must be a multiple of the number of processes"):
        validate_for_runtime(c, num_devices=6, num_processes=3)


# ---------------------------------------------------------------------------- saved configs
def test_saved_config_round_trips(tmp_path):
    c = presets.demo("soft")
    path = tmp_path / "config.json"
    path.write_text(config_lib.to_json(c))
    back = config_lib.from_json_file(str(path))
    assert back.to_dict() == c.to_dict()
    data = json.loads(path.read_text())
    data["rl"]["bogus"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="rl.bogus"):
        config_lib.from_json_file(str(path))


# ------------------------------------------------------------- error messages name real keys
_SECTIONS = sorted({k.split(".")[0] for k in SCHEMA if "." in k})
_KNOWN = set(SCHEMA) | {".".join(k.split(".")[:i]) for k in SCHEMA for i in range(1, k.count(".") + 1)}
_FULL = re.compile(r"(?<![\w.])config\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
_BARE = re.compile(r"(?<![\w./-])((?:%s)\.[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)" % "|".join(_SECTIONS))
_NOT_KEYS = re.compile(r"(^|\.)(json|py|safetensors|parquet|jsonl)$|^[A-Z_]+$")  # file names, placeholders


def _message_strings(tree):
    """String pieces of error messages: raised exceptions, log/warning calls, and any string that
    says "config key"."""
    for node in ast.walk(tree):
        message = None
        if isinstance(node, ast.Raise) and node.exc is not None:
            message = node.exc
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("warning", "warn", "error", "exception", "info")):
            message = node
        if message is not None:
            for sub in ast.walk(message):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    yield sub.lineno, sub.value
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "config key" in node.value:
            yield node.lineno, node.value


def test_error_messages_name_only_real_config_keys():
    bad, seen = [], 0
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, text in _message_strings(ast.parse(path.read_text())):
            for pattern in (_FULL, _BARE):
                for key in pattern.findall(text):
                    if _NOT_KEYS.search(key):
                        continue
                    seen += 1
                    if key not in _KNOWN:
                        bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {key}")
    assert seen > 30  # the scan reads the messages (they name many keys)
    assert not bad, "error messages name config keys that do not exist:\n" + "\n".join(bad)


def test_the_key_scan_catches_a_made_up_key():
    tree = ast.parse('raise ValueError("set `data.batch_size` or config.model.tokenizer")')
    found = [k for _, t in _message_strings(tree) for p in (_FULL, _BARE) for k in p.findall(t)]
    assert set(found) == {"data.batch_size", "model.tokenizer"} and not set(found) & _KNOWN


# ------------------------------------------------------------------------ config files that cannot load
@pytest.mark.parametrize("text, message", [
    (None, "no such file"),
    ("def get_config(:\n    pass\n", "bad.py:1: invalid syntax"),
    ("x = 1\n", "bad.py has no get_config()"),
    ("raise RuntimeError('boom')\n", "bad.py: RuntimeError: boom (raised while loading the config file)"),
])
def test_a_config_file_that_cannot_load_is_one_line_naming_it(text, message, tmp_path, capsys, no_trainer):
    path = tmp_path / "bad.py"
    if text is not None:
        path.write_text(text)
    code = cli.main(["jaxrl-entropy", "train", f"--config={path}", f"--workdir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_a_workdir_that_is_a_file_is_named_as_such(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.write_text("not a directory")
    code = cli.main(["jaxrl-entropy", "train", f"--workdir={workdir}", *TINY_CLI_FLAGS,
                     "--config.train.sft_steps=0"])
    err = capsys.readouterr().err
    assert code == 1 and "is a file, not a directory" in err and str(workdir) in err, err


def test_functions_that_take_a_section_still_take_the_whole_config_with_a_warning():
    from jaxrl_entropy.training import model_setup, sampling

    c = presets.demo()
    with pytest.warns(DeprecationWarning, match=r"mesh_sizes\(cfg.parallel\)"):
        assert config_lib.mesh_sizes(c, 8) == config_lib.mesh_sizes(c.parallel, 8)
    for whole in (c, config_lib.typed(c)):
        with pytest.warns(DeprecationWarning, match=r"build_mesh\(cfg.parallel\)"):
            assert dict(model_setup.build_mesh(whole).shape) == dict(model_setup.build_mesh(whole.parallel).shape)
        with pytest.warns(DeprecationWarning, match="rollout_sampling_params"):
            assert (sampling.rollout_sampling_params(whole, (1,), 0) ==
                    sampling.rollout_sampling_params(whole.rollout, (1,), 0))
