"""The model with fused-kernel attention equals the model with the XLA reference, on one device and
sharded over 8 fake devices (the kernel then runs per shard inside shard_map)."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_entropy import parallel
from jaxrl_entropy.models import qwen3

CFG = qwen3.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def _inputs(B=8, T=24):
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 64, (B, T))
    mask = np.ones((B, T), np.int32)
    mask[1, :5] = 0
    mask[B - 1, :T - 1] = 0      # a row with a single token
    return jnp.asarray(ids), jnp.asarray(mask)


def _model(**options):
    return qwen3.init_random(CFG, qwen3.RuntimeOptions(**options), seed=3)


def _forward(model, ids, mask, probe_layers):
    """The model's forward, jitted (eager dispatch of interpret-mode kernels is slow)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s: nnx.merge(graphdef, s)(ids, attention_mask=mask, probe_layers=probe_layers))(state)


@pytest.mark.parametrize("impl, backend", [("kernel", "xla"), ("kernel", "interpret_gpu"),
                                           ("pallas", "interpret_tpu")])  # "pallas": the design notes name it so
def test_kernel_probe_layers_match_xla(impl, backend):
    ids, mask = _inputs(B=2, T=20)
    ref = _forward(_model(), ids, mask, (1,))
    out = _forward(_model(attention=impl, probe_attention=impl, kernel_backend=backend), ids, mask, (1,))
    valid = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(out.logits)[valid], np.asarray(ref.logits)[valid], atol=2e-5)
    np.testing.assert_allclose(np.asarray(out.entropy[1])[valid], np.asarray(ref.entropy[1])[valid], atol=2e-5)
    np.testing.assert_allclose(np.asarray(out.mixture_entropy[1])[valid],
                               np.asarray(ref.mixture_entropy[1])[valid], atol=2e-5)


def test_kernel_under_a_sharded_mesh_matches_one_device():
    assert jax.device_count() == 8, "tests/conftest.py forces 8 fake CPU devices"
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    ids, mask = _inputs()
    ref_graphdef, ref_state = nnx.split(_model())
    ref = jax.jit(lambda s: nnx.merge(ref_graphdef, s)(ids, attention_mask=mask, probe_layers=(0,)))(ref_state)
    model = _model(attention="kernel", probe_attention="kernel", kernel_backend="xla", kernel_mesh=mesh)
    graphdef, state = nnx.split(model)
    sharding = parallel.batch_sharding(mesh, 2)

    @jax.jit
    def fwd(state, ids, mask):
        out = nnx.merge(graphdef, state)(ids, attention_mask=mask, probe_layers=(0,))
        return out.logits, out.entropy[0], out.mixture_entropy[0]

    logits, ent, mix = fwd(state, jax.device_put(ids, sharding), jax.device_put(mask, sharding))
    valid = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(ref.logits)[valid], atol=2e-5)
    np.testing.assert_allclose(np.asarray(ent)[valid], np.asarray(ref.entropy[0])[valid], atol=2e-5)
    np.testing.assert_allclose(np.asarray(mix)[valid], np.asarray(ref.mixture_entropy[0])[valid], atol=2e-5)

    # gradients flow through the sharded kernel like through the reference
    def loss(state, m):
        return jnp.sum(nnx.merge(graphdef, state)(ids, attention_mask=mask).logits[:, -1, :4] ** 2)

    g_kernel = jax.jit(jax.grad(loss))(state, None)
    g_ref = jax.jit(jax.grad(lambda s: jnp.sum(nnx.merge(ref_graphdef, s)(ids, attention_mask=mask).logits[:, -1, :4] ** 2)))(
        ref_state)
    for a, b in zip(jax.tree.leaves(g_kernel), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
