"""HF checkpoint I/O: bad checkpoints give errors that name the file and the field; bf16 files
round-trip with transformers; an architecture is read from config.json alone."""
import ast
import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxrl_entropy.models import hf_io, qwen3
from jaxrl_entropy.models.config import CheckpointError, read_hf_config


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
    tensors = load_file(path)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = np.ascontiguousarray(tensors[name][:-1])
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        qwen3.from_pretrained(str(ckpt))
    msg = str(e.value)
    assert "model.safetensors" in msg and name in msg and "(79, 48)" in msg and "(80, 48)" in msg


def test_missing_tensor(ckpt):
    path = str(ckpt / "model.safetensors")
    tensors = {k: v for k, v in load_file(path).items() if k != "lm_head.weight"}
    save_file(tensors, path, metadata={"format": "pt"})
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


@pytest.fixture(scope="module")
def bf16_hf_checkpoint(make_hf_qwen3, torch, tmp_path_factory):
    """A HF checkpoint stored in bfloat16 by transformers itself; (torch model, dir)."""
    import copy

    hf_model, _ = make_hf_qwen3()
    path = tmp_path_factory.mktemp("hf_bf16")
    bf16 = copy.deepcopy(hf_model).to(torch.bfloat16)  # the session's model stays float32
    bf16.save_pretrained(path)
    return bf16.state_dict(), str(path)


def test_bf16_checkpoint_written_by_transformers_loads_exactly(bf16_hf_checkpoint):
    ref, path = bf16_hf_checkpoint
    assert load_file(os.path.join(path, "model.safetensors"))["lm_head.weight"].dtype == ml_dtypes.bfloat16
    model = qwen3.from_pretrained(path, param_dtype=np.float32)
    up = np.asarray(model.layers[1].mlp.up_proj.kernel[...])
    emb = np.asarray(model.embed_tokens[...])
    # bf16 → f32 is exact, so the values equal torch's own upcast (the kernel is transposed)
    np.testing.assert_array_equal(up, ref["model.layers.1.mlp.up_proj.weight"].float().numpy().T)
    np.testing.assert_array_equal(emb, ref["model.embed_tokens.weight"].float().numpy())


def test_sharded_read_of_a_bf16_file_equals_the_whole_read(bf16_hf_checkpoint):
    from jaxrl_entropy import parallel
    import jax

    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    _, path = bf16_hf_checkpoint
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    whole = hf_io.flat_params(qwen3.from_pretrained(path, param_dtype=np.float32))
    sharded = hf_io.flat_params(qwen3.from_pretrained(path, param_dtype=np.float32, mesh=mesh))
    q = sharded["layers.0.self_attn.q_proj.kernel"][...]
    assert {s.data.shape for s in q.addressable_shards} == {(24, 40)}  # really split (fsdp × tensor)
    for name, var in whole.items():
        np.testing.assert_array_equal(np.asarray(sharded[name][...]), np.asarray(var[...]), err_msg=name)


def test_bf16_export_is_what_torch_rounds_to(make_hf_qwen3, torch, tmp_path):
    from transformers import Qwen3ForCausalLM

    _, path = make_hf_qwen3()
    model = qwen3.from_pretrained(path)  # float32
    qwen3.save_pretrained(model, str(tmp_path), dtype=ml_dtypes.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = Qwen3ForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.bfloat16).state_dict()
    f32 = np.asarray(model.layers[2].self_attn.o_proj.kernel[...]).T
    want = torch.from_numpy(np.ascontiguousarray(f32)).to(torch.bfloat16)  # torch's rounding: the oracle
    got = back["model.layers.2.self_attn.o_proj.weight"]
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_hf_io_does_not_import_the_model():
    """qwen3 → hf_io, never back: the file layer knows names and files, not the model."""
    tree = ast.parse(open(hf_io.__file__).read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                 for a in n.names}
    assert not any("qwen3" in m for m in imported), imported


# Qwen3-8B's config.json as published (transformers 4.51 layout).
QWEN3_8B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12288,
    "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def _config_only_dir(tmp_path, **changes):
    d = tmp_path / "qwen3_8b"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({**QWEN3_8B_CONFIG, **changes}))
    return str(d)


def test_qwen3_8b_architecture_from_config_json_alone(tmp_path):
    from transformers import Qwen3Config as HFConfig

    cfg = read_hf_config(_config_only_dir(tmp_path))
    hf = HFConfig(**QWEN3_8B_CONFIG)  # transformers' reading of the same file: the oracle
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                  "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(cfg, field) == getattr(hf, field), field
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (4096, 12288, 36)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.group_size) == (32, 8, 128, 4)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.tie_word_embeddings) == (151936, 1e6, False)
    assert (cfg.rms_norm_eps, cfg.max_position_embeddings) == (1e-6, 40960)


@pytest.mark.parametrize("changes, field", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
     "rope scaling 'yarn'"),
    (dict(use_sliding_window=True, sliding_window=4096), "use_sliding_window"),
    (dict(model_type="qwen3_moe", num_experts=128), "model_type is 'qwen3_moe'"),
])
def test_config_only_directory_rejects_what_loading_rejects(tmp_path, changes, field):
    with pytest.raises(CheckpointError, match=field) as e:
        read_hf_config(_config_only_dir(tmp_path, **changes))
    assert "config.json" in str(e.value)


def test_read_hf_config_names_a_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        read_hf_config(str(tmp_path / "absent"))


@pytest.mark.parametrize("max_shard_bytes, stop_at_ask", [(5 * 2**30, 1), (5 * 2**30, 2), (8 << 10, 3)])
def test_save_honours_a_stop_request_on_every_shard_count(tmp_path, max_shard_bytes, stop_at_ask):
    # One shard (the whole model under the limit) was never asked: a stop during its export was
    # ignored and the export finished. Asked before each shard and after the last; the n-th ask says stop.
    from jaxrl_entropy.rundir.preemption import StopRequested

    cfg = qwen3.Qwen3Config(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = qwen3.init_random(cfg, seed=0)
    asks = []

    def should_stop():
        asks.append(1)
        return len(asks) == stop_at_ask

    with pytest.raises(StopRequested):
        hf_io.save(model, str(tmp_path / "out"), max_shard_bytes=max_shard_bytes, should_stop=should_stop)
    assert len(asks) == stop_at_ask
    assert not os.path.exists(tmp_path / "out" / "config.json")  # nothing is final without config.json

    # unasked, the same export completes and is asked once per shard plus once at the end
    asks.clear()
    hf_io.save(model, str(tmp_path / "full"), max_shard_bytes=max_shard_bytes, should_stop=lambda: asks.append(1) and False)
    shards = [f for f in os.listdir(tmp_path / "full") if f.endswith(".safetensors")]
    assert len(asks) == len(shards) + 1 and os.path.exists(tmp_path / "full" / "config.json")
