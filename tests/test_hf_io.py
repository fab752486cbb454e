"""Bad checkpoints give errors that name the file and the field."""
import json
import os
import shutil

import numpy as np
import pytest

from jaxrl_entropy.models import qwen3
from jaxrl_entropy.models.config import CheckpointError
from jaxrl_entropy.models.safetensors_io import SafetensorsFile, save_file


@pytest.fixture
def ckpt(make_hf_qwen3, tmp_path):
    _, path = make_hf_qwen3()
    dst = tmp_path / "ckpt"
    shutil.copytree(path, dst)
    return dst


def _edit_config(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        qwen3.from_pretrained(str(tmp_path / "nope"))


def test_missing_config(ckpt):
    os.remove(ckpt / "config.json")
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        qwen3.from_pretrained(str(ckpt))


def test_malformed_config_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        qwen3.from_pretrained(str(ckpt))


@pytest.mark.parametrize("changes, field", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling 'yarn'"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), "rope scaling 'linear'"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(model_type="qwen3_moe"), "model_type"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
])
def test_unsupported_config_fields(ckpt, changes, field):
    _edit_config(ckpt, **changes)
    with pytest.raises(CheckpointError, match=field) as e:
        qwen3.from_pretrained(str(ckpt))
    assert "config.json" in str(e.value)


def test_missing_required_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing required field\(s\) \['hidden_size'\]"):
        qwen3.from_pretrained(str(ckpt))


def test_shape_mismatch_names_file_and_tensor(ckpt):
    path = str(ckpt / "model.safetensors")
    f = SafetensorsFile(path)
    tensors = {k: np.array(f[k]) for k in f.keys()}
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-1]
    del f
    save_file(tensors, path)
    with pytest.raises(CheckpointError) as e:
        qwen3.from_pretrained(str(ckpt))
    msg = str(e.value)
    assert "model.safetensors" in msg and name in msg and "(79, 48)" in msg and "(80, 48)" in msg


def test_missing_tensor(ckpt):
    path = str(ckpt / "model.safetensors")
    f = SafetensorsFile(path)
    tensors = {k: np.array(f[k]) for k in f.keys() if k != "lm_head.weight"}
    del f
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="'lm_head.weight' missing .* tie_word_embeddings=False"):
        qwen3.from_pretrained(str(ckpt))


def test_no_weight_files(ckpt):
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no \*.safetensors files"):
        qwen3.from_pretrained(str(ckpt))


def test_truncated_weight_file(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        qwen3.from_pretrained(str(ckpt))


def test_sharded_hf_checkpoint_loads(make_hf_qwen3, torch):
    hf_model, path = make_hf_qwen3(max_shard_size="30KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    model = qwen3.from_pretrained(path)
    ids = np.arange(12).reshape(2, 6)
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids).logits), ref, atol=1e-4)


def test_safetensors_bf16_round_trip(tmp_path, torch):
    import ml_dtypes
    from safetensors.torch import load_file

    x = np.random.RandomState(0).randn(3, 5).astype(ml_dtypes.bfloat16)
    save_file({"x": x}, str(tmp_path / "a.safetensors"))
    got = load_file(str(tmp_path / "a.safetensors"))["x"]  # the reference implementation reads ours
    assert got.dtype == torch.bfloat16
    np.testing.assert_array_equal(got.float().numpy(), x.astype(np.float32))
