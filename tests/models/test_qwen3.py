"""Qwen3 port against HF transformers' PyTorch Qwen3 (the oracle), tiny random configs."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxrl_entropy.models import qwen3

CONFIGS = {
    "untied_gqa2": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "tied_gqa1": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "untied_gqa4": dict(num_key_value_heads=1, tie_word_embeddings=False, head_dim=16),
}


def _inputs(B=3, T=11, vocab=101, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, :4] = 0  # left padding
    mask[2, :1] = 0
    return ids, mask


def _hf_forward(torch, model, ids, mask):
    pos = np.clip(mask.cumsum(1) - 1, 0, None)  # what HF generate uses for left padding
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos), output_attentions=True)


def _entropy(p, axis=-1):
    p = np.asarray(p, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_probe_entropy_match_hf(make_hf_qwen3, torch, name):
    hf_model, path = make_hf_qwen3(**CONFIGS[name])
    model = qwen3.from_pretrained(path, dtype=jnp.float32)
    ids, mask = _inputs()
    ref = _hf_forward(torch, hf_model, ids, mask)
    out = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), probe_layers=(1, -1), return_probs=True)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.logits)[valid], ref.logits.numpy()[valid], atol=1e-4, rtol=0)
    for layer in (1, 2):
        a = ref.attentions[layer].numpy()                  # [B, H, T, T]
        ent_BxTxH = _entropy(a).transpose(0, 2, 1)
        np.testing.assert_allclose(np.asarray(out.entropy[layer])[valid], ent_BxTxH[valid], atol=1e-4)
        np.testing.assert_allclose(np.asarray(out.mixture_entropy[layer])[valid], _entropy(a.mean(1))[valid],
                                   atol=1e-4)
        probs = np.asarray(out.probs[layer])
        np.testing.assert_allclose(probs.transpose(0, 2, 1, 3)[valid], a.transpose(0, 2, 1, 3)[valid], atol=1e-5)
    assert set(out.entropy) == {1, 2}


def test_head_dim_differs_from_hidden_over_heads(make_hf_qwen3):
    _, path = make_hf_qwen3(**CONFIGS["untied_gqa4"])
    model = qwen3.from_pretrained(path)
    attn = model.layers[0].self_attn
    # Qwen3 sets head_dim explicitly: 16 here, not hidden_size / heads = 48 / 4 = 12
    assert attn.head_dim == 16
    assert attn.q_proj.kernel.shape == (48, 4 * 16) and attn.o_proj.kernel.shape == (4 * 16, 48)
    ids, mask = _inputs()
    assert model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits.shape == (*ids.shape, 101)


def test_export_reload_in_transformers(make_hf_qwen3, torch, tmp_path):
    from transformers import Qwen3ForCausalLM

    hf_model, path = make_hf_qwen3(**CONFIGS["untied_gqa2"])
    model = qwen3.from_pretrained(path)
    qwen3.save_pretrained(model, str(tmp_path / "export"), max_shard_bytes=20_000)  # forces an index
    assert (tmp_path / "export" / "model.safetensors.index.json").exists()
    reloaded = Qwen3ForCausalLM.from_pretrained(str(tmp_path / "export"), attn_implementation="eager").eval()
    ids, mask = _inputs()
    a, b = _hf_forward(torch, hf_model, ids, mask), _hf_forward(torch, reloaded, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(b.logits.numpy()[valid], a.logits.numpy()[valid], atol=1e-5)
    # and our loader reads the sharded export back
    again = qwen3.from_pretrained(str(tmp_path / "export"))
    out = again(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out.logits)[valid], a.logits.numpy()[valid], atol=1e-4)


def test_tied_export_has_no_lm_head(make_hf_qwen3, tmp_path):
    from safetensors import safe_open

    _, path = make_hf_qwen3(**CONFIGS["tied_gqa1"])
    qwen3.save_pretrained(qwen3.from_pretrained(path), str(tmp_path))
    names = set(safe_open(str(tmp_path / "model.safetensors"), framework="np").keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


def test_bf16_params_close_to_f32(make_hf_qwen3, torch):
    hf_model, path = make_hf_qwen3(**CONFIGS["untied_gqa2"])
    model = qwen3.from_pretrained(path, dtype=jnp.bfloat16)
    assert model.embed_tokens[...].dtype == jnp.bfloat16
    mixed = qwen3.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert mixed.embed_tokens[...].dtype == jnp.float32
    ids, mask = _inputs()
    ref = _hf_forward(torch, hf_model, ids, mask).logits.numpy()
    out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits, np.float32)
    valid = mask.astype(bool)
    scale = np.abs(ref[valid]).max()
    assert np.abs(out[valid] - ref[valid]).max() < 0.05 * scale


def test_sharded_load_on_8_devices(make_hf_qwen3, torch):
    from jaxrl_entropy import parallel

    assert jax.device_count() == 8, "tests/conftest.py forces 8 fake CPU devices"
    hf_model, path = make_hf_qwen3(**CONFIGS["untied_gqa2"])
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    model = qwen3.from_pretrained(path, mesh=mesh)
    q = model.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # each device holds only its slice
    assert {s.data.shape for s in q.addressable_shards} == {(24, 40)}
    ids, mask = _inputs(B=4)
    ref = _hf_forward(torch, hf_model, ids, mask).logits.numpy()
    out = jax.jit(lambda m, i, a: m(i, attention_mask=a).logits)(model, jnp.asarray(ids), jnp.asarray(mask))
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], atol=1e-4)


def test_token_logprobs_chunked_equals_log_softmax(make_hf_qwen3, torch):
    hf_model, path = make_hf_qwen3(**CONFIGS["untied_gqa2"])
    model = qwen3.from_pretrained(path, logits_chunk=4)  # 11 tokens → 3 chunks with padding
    ids, mask = _inputs()
    logits = _hf_forward(torch, hf_model, ids, mask).logits.numpy().astype(np.float64)
    targets = np.roll(ids, -1, axis=1)
    out = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), return_logits=False)
    logp, ent = model.token_logprobs(out.hidden, jnp.asarray(targets))
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ref_logp = np.take_along_axis(logits, targets[..., None], -1)[..., 0] - logz
    p = np.exp(logits - logz[..., None])
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logp)[valid], ref_logp[valid], atol=1e-4)
    np.testing.assert_allclose(np.asarray(ent)[valid], _entropy(p)[valid], atol=1e-4)


def test_positions_from_segments_by_hand():
    seg = jnp.array([[0, 0, 1, 1, 1], [1, 1, 2, 2, 0], [1, 1, 1, 1, 1]])
    expected = [[0, 0, 0, 1, 2], [0, 1, 0, 1, 0], [0, 1, 2, 3, 4]]
    assert qwen3.positions_from_segments(seg).tolist() == expected


def test_resolve_probe_layers():
    assert qwen3.resolve_probe_layers(0.55, 36) == (20,)
    assert qwen3.resolve_probe_layers((-1, 0, 0.5), 4) == (0, 2, 3)
    with pytest.raises(ValueError, match="out of range"):
        qwen3.resolve_probe_layers(4, 4)
    with pytest.raises(ValueError, match="fraction"):
        qwen3.resolve_probe_layers(1.5, 4)
