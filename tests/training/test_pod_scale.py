"""Pod-scale mechanics on CPU: remat with probe layers, the non-finite guard, activation layout,
bf16 weight gathers, strided chunks, the batch check, splash / cuDNN-path attention."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxrl_entropy import kernels
from jaxrl_entropy.aot import hlo_stats
from jaxrl_entropy import parallel
from jaxrl_entropy.training import step_programs
from jaxrl_entropy.config import ConfigError
from jaxrl_entropy.models import attention as attn_lib
from jaxrl_entropy.models import qwen3
from jaxrl_entropy.rl import train_step as ts

CFG = qwen3.Qwen3Config(vocab_size=48, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8)
P, N, M = 5, 6, 8
SPEC = ts.StepSpec(prompt_len=P, response_len=N, probe_layers=(1,), aggregation="head_mixture")


def _batch(seed=0, rows=M):
    rng = np.random.RandomState(seed)
    prompt = rng.randint(1, CFG.vocab_size, (rows, P))
    pmask = np.ones((rows, P), np.int32)
    for i in range(rows):
        pmask[i, :rng.randint(0, P - 1)] = 0
    prompt[pmask == 0] = 0
    b = ts.build_sequences(prompt, pmask, rng.randint(1, CFG.vocab_size, (rows, N)), rng.randint(1, N + 1, rows))
    b["old_logp"] = -rng.rand(rows, N).astype(np.float32)
    b["advantage"] = np.broadcast_to(rng.randn(rows, 1), (rows, N)).astype(np.float32)
    b["weights"] = b["response_mask"].astype(np.float32)
    return b


def _params_and_graphdefs(**options):
    plain = qwen3.init_random(CFG, qwen3.RuntimeOptions(logits_chunk=4, **options), seed=3)
    remat = qwen3.init_random(CFG, qwen3.RuntimeOptions(logits_chunk=4, remat=True, **options), seed=3)
    params = nnx.to_pure_dict(nnx.state(plain))
    return params, nnx.graphdef(plain), nnx.graphdef(remat)


@pytest.mark.parametrize("impl", ["xla", "kernel"])
def test_remat_gradients_equal_plain_gradients(impl):
    """Oracle: the gradient without remat. With a probe layer in the forward (its ProbeResult leaves
    the checkpoint) and through the RL loss, remat must change memory, never values."""
    params, g_plain, g_remat = _params_and_graphdefs(attention=impl, probe_attention=impl, kernel_backend="xla")
    b = {k: jnp.asarray(v) for k, v in _batch().items()}

    def logits_loss(graphdef):
        def f(p):
            out = nnx.merge(graphdef, p)(b["input_ids"], attention_mask=b["attention_mask"], probe_layers=(1,))
            return jnp.sum(jnp.sin(out.logits)) + jnp.sum(out.mixture_entropy[1])
        return jax.jit(jax.value_and_grad(f))(params)

    def rl_loss(graphdef):
        f = lambda p: ts.minibatch_loss(graphdef, p, b, SPEC, jnp.float32(20.0), jnp.float32(20.0))[0]
        return jax.jit(jax.value_and_grad(f))(params)

    for run in (logits_loss, rl_loss):
        (v0, g0), (v1, g1) = run(g_plain), run(g_remat)
        assert float(v1) == pytest.approx(float(v0), rel=1e-6)
        for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):  # f32 round-off of a reordered sum
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4,
                                       atol=1e-5 * float(jnp.abs(c).max()) + 1e-8)
        assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g0))


def test_remat_rollout_stats_equal_plain():
    params, g_plain, g_remat = _params_and_graphdefs(attention="kernel", probe_attention="kernel", kernel_backend="xla")
    b = {k: jnp.asarray(_batch()[k]) for k in step_programs.ROLLOUT_KEYS}
    run = lambda g: jax.jit(lambda p: ts.rollout_stats(g, p, b, SPEC, chunk=4))(params)
    s0, s1 = run(g_plain), run(g_remat)
    for k in s0:
        np.testing.assert_allclose(np.asarray(s1[k]), np.asarray(s0[k]), rtol=1e-6, atol=1e-6)


def _update_setup(tx):
    params, graphdef, _ = _params_and_graphdefs()
    mb = {k: jnp.asarray(v).reshape(2, M // 2, *v.shape[1:]) for k, v in _batch().items()
          if k in step_programs.UPDATE_KEYS}
    return graphdef, params, tx.init(params), mb


@pytest.mark.parametrize("tx", [
    optax.adamw(float("nan")),                                  # lr = nan: finite gradient, NaN update
    optax.chain(optax.clip_by_global_norm(0.0), optax.sgd(1.0)),  # 0 · g/|g|: clipping to zero norm ...
    optax.chain(optax.scale(3e38), optax.sgd(1e3)),             # ... and an update that overflows to inf
], ids=["lr_nan", "clip_zero", "overflow"])
def test_guard_catches_a_non_finite_optimiser_step(tx):
    """The loss and gradient are finite; the optimiser's own step is not (or, for clip 0, is a zero
    step that must apply). The state must come back bit-identical when the step is not finite."""
    graphdef, params, opt, mb = _update_setup(tx)
    p_new, o_new, m = jax.jit(lambda p, o, b: ts.update(graphdef, p, o, b, SPEC, tx, "selected"))(params, opt, mb)
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), opt, params)  # what this optimiser does
    finite_step = all(bool(jnp.all(jnp.isfinite(jax.tree.leaves(optax.apply_updates(params, updates))[i])))
                      for i in range(len(jax.tree.leaves(params))))
    assert int(m["skipped"]) == (0 if finite_step else 1)
    if not finite_step:
        for a, c in zip(jax.tree.leaves((p_new, o_new)), jax.tree.leaves((params, opt))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    for x in jax.tree.leaves((p_new, o_new)):
        assert bool(jnp.all(jnp.isfinite(x))) if jnp.issubdtype(x.dtype, jnp.inexact) else True


def test_guard_applies_a_finite_step_exactly():
    """Oracle: optax's own update applied by hand."""
    tx = optax.adamw(1e-2)
    graphdef, params, opt, mb = _update_setup(tx)
    p_new, o_new, m = jax.jit(lambda p, o, b: ts.update(graphdef, p, o, b, SPEC, tx, "selected"))(params, opt, mb)
    mask = mb["response_mask"]
    denom = jnp.sum(mb["weights"] * mask)
    grads, _ = jax.jit(lambda p, b: ts.accumulate_grads(graphdef, p, b, SPEC, denom, jnp.sum(mask.astype(jnp.float32))))(params, mb)
    updates, o_ref = tx.update(grads, opt, params)
    p_ref = optax.apply_updates(params, updates)
    assert int(m["skipped"]) == 0
    for a, c in zip(jax.tree.leaves((p_new, o_new)), jax.tree.leaves((p_ref, o_ref))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-7)


def test_strided_chunks_by_hand():
    x = jnp.arange(12)[:, None] * 10 + jnp.arange(2)[None]   # [12, 2]
    c = ts.strided_chunks(x, 4)                              # 3 chunks of 4 rows: rows i, i+3, i+6, i+9
    np.testing.assert_array_equal(np.asarray(c[1][:, 0]), [10, 40, 70, 100])
    np.testing.assert_array_equal(np.asarray(ts.unchunk(c)), np.asarray(x))


def test_check_batch_names_what_to_set():
    from jaxrl_entropy import presets
    cfg = presets.qwen3_8b_dapo()
    cfg.rl.micro_batch_size = 16
    mesh = parallel.make_mesh(data=1, fsdp=8, tensor=1)
    step_programs.check_batch(cfg, mesh)  # 16 rows over 8 devices: fine
    cfg.rl.micro_batch_size = 4
    with pytest.raises(ConfigError, match=r"micro_batch_size=4 must be a multiple of the data-parallel size 8.*"
                                          r"--config\.rl\.micro_batch_size=8.*--config\.parallel\.tensor=2"):
        step_programs.check_batch(cfg, mesh)


def _sharded_update_hlo(constrain: bool, monkeypatch):
    """The compiled update on 8 CPU devices, FSDP over all of them, micro-batch of 8 rows."""
    if not constrain:
        monkeypatch.setattr(parallel, "constrain", lambda x, axes, mesh: x)
    mesh = parallel.make_mesh(data=1, fsdp=8, tensor=1)
    model = qwen3.init_random(CFG, qwen3.RuntimeOptions(logits_chunk=6, kernel_mesh=mesh), seed=0)
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model))
    p_sh = parallel.param_shardings(params, mesh)
    tx = optax.adamw(1e-3)
    o_sh = parallel.opt_state_shardings(jax.eval_shape(tx.init, params), p_sh, mesh)
    micro_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
    b = _batch(rows=16)
    mb = {k: jnp.asarray(v).reshape(2, 8, *v.shape[1:]) for k, v in b.items() if k in step_programs.UPDATE_KEYS}
    fn = jax.jit(lambda p, o, m: ts.update(graphdef, p, o, m, SPEC, tx, "selected"),
                 in_shardings=(p_sh, o_sh, micro_sh), out_shardings=(p_sh, o_sh, None))
    args = (jax.eval_shape(lambda: params), jax.eval_shape(tx.init, params), jax.eval_shape(lambda: mb))
    return fn.trace(*args).lower().compile().as_text()


def _batch_gathers(text: str) -> list[str]:
    """All-gathers whose result holds the whole micro-batch of activations: [8 rows, T = 11, ...]
    (floating point: gathering the token ids for the embedding lookup is cheap and fine)."""
    comps, _, _ = hlo_stats.parse(text)
    out = []
    for instrs in comps.values():
        for ins in instrs:
            if ins.opcode.startswith("all-gather"):
                dims = hlo_stats._dims(ins.type)
                if ins.type.startswith(("f32", "bf16")) and len(dims) >= 2 and 8 in dims and P + N in dims:
                    out.append(ins.type)
    return out


def test_activation_constraints_keep_rows_sharded(monkeypatch):
    """With FSDP over 8 devices, activations stay [1 row, T, ...] per device: no all-gather of a
    whole micro-batch (8 rows × T). The control: the same program without the constraints does
    gather micro-batches here, so this test can see the difference."""
    assert _batch_gathers(_sharded_update_hlo(True, monkeypatch)) == []
    assert _batch_gathers(_sharded_update_hlo(False, monkeypatch)) != []


def test_bf16_compute_gathers_bf16_weights(tpu_devices):
    """f32 parameters, bf16 compute, FSDP over 8 TPU chips (the TPU compiler: the CPU one computes
    bf16 in f32 and may move the cast): every weight all-gather moves bf16, the cast happening on
    the shard, before the gather."""
    mesh = parallel.make_mesh(data=1, fsdp=8, tensor=1, devices=tpu_devices("v5p:2x2x2"))
    opts = qwen3.RuntimeOptions(dtype=jnp.bfloat16, param_dtype=jnp.float32, logits_chunk=6, kernel_mesh=mesh)
    model = qwen3.init_random(CFG, opts, seed=0)
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model))
    p_sh = parallel.param_shardings(params, mesh)
    b = _batch(rows=8)
    fwd = jax.jit(lambda p, ids, m: qwen3.merge_for_compute(graphdef, p)(ids, attention_mask=m).logits,
                  in_shardings=(p_sh, parallel.batch_sharding(mesh), parallel.batch_sharding(mesh)))
    text = fwd.trace(jax.eval_shape(lambda: params), jax.ShapeDtypeStruct(b["input_ids"].shape, jnp.int32),
                     jax.ShapeDtypeStruct(b["attention_mask"].shape, jnp.int32)).lower().compile().as_text()
    comps, _, _ = hlo_stats.parse(text)
    D, Dh = CFG.hidden_size, CFG.head_dim
    weight_sizes = {D * CFG.num_attention_heads * Dh, D * CFG.num_key_value_heads * Dh, D * CFG.intermediate_size,
                    D * CFG.vocab_size}
    # the TPU compiler gathers a weight [D, X] as [8 shards, D / 8, X]: match by element count
    gathered = [ins.type for instrs in comps.values() for ins in instrs if ins.opcode.startswith("all-gather")
                and int(np.prod(hlo_stats._dims(ins.type))) in weight_sizes]
    assert len(gathered) >= 4, "expected FSDP weight gathers"
    assert all(t.startswith("bf16") or "(bf16" in t for t in gathered), gathered


def _qkv(B=2, T=256, H=4, K=2, D=128, seed=0):
    r = np.random.RandomState(seed)
    q = jnp.asarray(r.randn(B, T, H, D), jnp.float32)
    k = jnp.asarray(r.randn(B, T, K, D), jnp.float32)
    v = jnp.asarray(r.randn(B, T, K, D), jnp.float32)
    seg = np.ones((B, T), np.int32)
    seg[0, :37], seg[0, T - 56:] = 0, 0                 # left + right padding
    seg[B - 1, T - 6:] = 0                              # right padding only (B = 1: both on one row)
    return q, k, v, jnp.asarray(seg)


def test_cudnn_path_rotation_equals_masked_attention():
    """The cuDNN path (rows rotated to right padding, causal + sequence lengths) computed by XLA's
    implementation of the same call; oracle: the materialised masked reference."""
    q, k, v, seg = _qkv()
    ref, _ = kernels.reference_attention(q, k, v, causal=True, segment_ids=seg, sm_scale=0.125)
    out = attn_lib.cudnn_attention(q, k, v, seg, sm_scale=0.125, implementation="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_splash_interpret_equals_reference_forward_and_backward():
    q, k, v, seg = _qkv(B=1, T=128, H=2, K=1)
    f = lambda q, k, v: attn_lib.splash_attention(q, k, v, seg, sm_scale=0.125, interpret=True)
    g = lambda q, k, v: kernels.reference_attention(q, k, v, causal=True, segment_ids=seg, sm_scale=0.125)[0]
    np.testing.assert_allclose(np.asarray(f(q, k, v)), np.asarray(g(q, k, v)), atol=1e-5)
    d = jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), (0, 1, 2))(q, k, v)
    d_ref = jax.grad(lambda *a: jnp.sum(jnp.sin(g(*a))), (0, 1, 2))(q, k, v)
    for a, c in zip(d, d_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-4)


def test_auto_attention_by_platform():
    assert attn_lib.resolve_plain("auto", "tpu") == "splash"
    assert attn_lib.resolve_plain("auto", "gpu") == "cudnn"
    assert attn_lib.resolve_plain("auto", "xla") == "kernel"
    assert attn_lib.resolve_plain("xla", "tpu") == "xla"


def test_tpu_mesh_follows_physical_links(tpu_devices):
    """On a v5p-64 (a 2×4×4 torus of chips), each group of 4 tensor-parallel chips is a line of
    ICI neighbours (one hop apart). The devices' listed order puts 2×2 squares there instead."""
    from jaxrl_entropy import chips

    devices = chips.resolve("v5p-64").tpu_devices()
    hops = lambda grid: [sum(abs(a - b) for a, b in zip(g[i].coords, g[i + 1].coords))
                         for g in np.asarray(grid).reshape(-1, 4) for i in range(3)]
    assert max(hops(parallel.make_mesh(1, 8, 4, devices=devices).devices)) == 1
    assert max(hops(np.asarray(devices, dtype=object).reshape(1, 8, 4))) == 2  # the control
