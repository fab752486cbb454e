"""The config schema: every preset validates; bad keys and values fail with the key named."""
import json

import ml_collections
import pytest

from jaxrl_entropy import config as config_lib
from jaxrl_entropy import presets
from jaxrl_entropy.config import ConfigError, validate


@pytest.mark.parametrize("variant", presets.PAPER_VARIANTS)
def test_presets_validate(variant):
    for make in (presets.demo, presets.qwen3_8b_dapo):
        cfg = validate(make(variant))
        assert cfg.name == variant and cfg.weights.mode == variant


def test_paper_preset_has_the_paper_hyperparameters():
    c = presets.qwen3_8b_dapo("anchor")
    assert (c.data.max_prompt_len, c.rollout.max_new_tokens) == (1024, 8192)
    assert (c.rl.eps_low, c.rl.eps_high, c.rl.clip_c, c.rl.group_size) == (0.2, 0.28, 10.0, 16)
    assert c.optim.lr == 1e-6 and c.entropy.layers == (20,) and c.weights.fraction == 0.2


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
    ("rl.group_size", 1, "at least 2"),
    ("rl.group_size", "8", "has type str; expected int"),
    ("weights.mode", "anchors", "weights.mode='anchors' is not one of"),
    ("weights.fraction", 0.0, "weights.fraction=0.0 must lie in"),
    ("weights.soft.alpha", 1.0, "alpha"),
    ("rl.mini_batch_prompts", 5, "multiple of rl.mini_batch_prompts"),
    ("rl.micro_batch_size", 48, "multiple of config.rl.micro_batch_size"),
    ("rollout.top_p", 1.5, "top_p"),
    ("rollout.temperature", 0.0, "temperature"),
    ("rl.overlong_buffer", 1000, "overlong_buffer"),
    ("entropy.layers", (1.5,), "depth fraction"),
    ("entropy.aggregation", "mean", "entropy.aggregation"),
    ("data.kind", "files", "train_files"),
    ("rl.kl_coef", 0.1, "reference policy"),
    ("model.attention", "flash", "model.attention"),
    ("train.steps", -1, "train.steps=-1 must be positive"),
])
def test_bad_values_name_the_key(key, value, message):
    c = presets.demo()
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(c)


def test_zero_rl_steps_only_with_a_warm_up():
    c = presets.demo()
    c.train.steps = 0
    assert c.train.sft_steps > 0
    validate(c)  # a warm-up-only run
    c.train.sft_steps = 0
    with pytest.raises(ConfigError, match="train.steps=0 must be positive"):
        validate(c)


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


def test_config_files_expose_the_presets():
    from ml_collections import config_flags  # noqa: F401  (the loader the CLI uses)
    import importlib.util

    for name, make in (("configs/demo.py", presets.demo), ("configs/qwen3_8b_dapo.py", presets.qwen3_8b_dapo)):
        import os
        spec = importlib.util.spec_from_file_location("cfgfile", os.path.join(os.path.dirname(__file__), "..", name))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.get_config("explorer").to_dict() == make("explorer").to_dict()
    assert isinstance(presets.get_config(), ml_collections.ConfigDict)
