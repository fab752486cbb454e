"""Head-mixture entropy, per-head lse and attention probabilities against a float64 numpy oracle.

The oracle builds the full score matrix in float64 with its own mask rule, takes each head's
softmax, averages over heads and reads the entropy with `scipy.special.xlogy`. Every shell runs:
the blockwise XLA path broadly, the Pallas shells in interpret mode on a few tiny shapes (slow),
and the real TPU / GPU lowerings are checked by exporting for those platforms (no device needed).
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.special

import jax
import jax.numpy as jnp
from jax import export

from jaxrl_entropy.kernels import head_mixture as hm

# ------------------------------------------------------------------------------------------------
# float64 oracle
# ------------------------------------------------------------------------------------------------


def _np_mask(B, T, S, causal, seg):
    """`[B, T, S]` bool, written from the definition (independently of kernels.masking)."""
    t_idx, s_idx = np.arange(T)[:, None], np.arange(S)[None, :]
    mask = np.ones((B, T, S), bool)
    if causal:  # queries aligned to the end of the keys
        mask &= (s_idx <= t_idx + (S - T))[None]
    if seg is not None:
        mask &= (seg[:, None, :] != 0) & (seg[:, :, None] == seg[:, None, :])
    return mask


def _oracle(q, k, *, causal, seg=None, sm_scale=None):
    """(probs [B, Hq, T, S], lse [B, T, Hq], head-mixture entropy [B, T], visible [B, T]) in float64."""
    q64 = np.asarray(jnp.asarray(q, jnp.float32), np.float64)
    k64 = np.asarray(jnp.asarray(k, jnp.float32), np.float64)
    B, T, Hq, D = q64.shape
    S, Hkv = k64.shape[1:3]
    k_rep = np.repeat(k64, Hq // Hkv, axis=2)  # query head h reads key head h // G
    scale = D**-0.5 if sm_scale is None else sm_scale
    s = np.einsum("bthd,bshd->bhts", q64, k_rep) * scale
    mask = _np_mask(B, T, S, causal, None if seg is None else np.asarray(seg))[:, None]
    visible = mask.any(-1)  # [B, 1, T]
    lse = scipy.special.logsumexp(np.where(mask, s, -np.inf), axis=-1)  # -inf on empty rows
    probs = np.where(mask, np.exp(s - np.where(visible, lse, 0.0)[..., None]), 0.0)
    pbar = probs.mean(axis=1)  # [B, T, S]
    ent = -scipy.special.xlogy(pbar, pbar).sum(-1)
    return probs, np.transpose(lse, (0, 2, 1)), ent, visible[:, 0]


def _inputs(seed, B, T, S, Hq, Hkv, D, dtype, *, left_pad=None, packed=False):
    rng = np.random.default_rng(seed)
    # Spread logits enough that heads disagree and the mixture differs from each head.
    q = jnp.asarray(rng.normal(size=(B, T, Hq, D)) * 1.5, dtype)
    k = jnp.asarray(rng.normal(size=(B, S, Hkv, D)) * 1.5, dtype)
    seg = None
    if left_pad is not None:
        seg_np = np.ones((B, T), np.int32)
        for b, n in enumerate(left_pad):
            seg_np[b, :n] = 0
        if packed:  # second document in the last row
            seg_np[-1, T // 2:] = 2
        seg = jnp.asarray(seg_np)
    return q, k, seg


def _lse_with_garbage(lse_np, visible):
    """The oracle's lse in float32, NaN on rows with no visible key (consumers must ignore it)."""
    return jnp.asarray(np.where(visible[..., None], lse_np, np.nan), jnp.float32)


_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1e-4}


def _check_entropy(ent, ent_ref, visible, dtype):
    ent = np.asarray(ent)
    assert ent.shape == ent_ref.shape and ent.dtype == np.float32
    assert np.all(np.isfinite(ent))
    np.testing.assert_array_equal(ent[~visible], 0.0)
    np.testing.assert_allclose(ent, ent_ref, atol=_TOL[dtype] * 10, rtol=_TOL[dtype])


# ------------------------------------------------------------------------------------------------
# head_mixture_entropy
# ------------------------------------------------------------------------------------------------

# (backend, block_q, block_k, T): T leaves a partial last block and gives >= 3 blocks each way.
_SHELLS = {
    "xla": (16, 16, 45),
    "interpret_gpu": (16, 16, 45),
    "interpret_tpu": (128, 128, 300),
}

_XLA_CASES = [  # (group, causal, dtype, lse_given)
    (1, True, jnp.float32, False),
    (2, True, jnp.bfloat16, True),
    (4, True, jnp.float32, True),
    (1, False, jnp.bfloat16, True),
    (2, False, jnp.float32, False),
    (4, False, jnp.bfloat16, False),
]


@pytest.mark.parametrize("group,causal,dtype,lse_given", _XLA_CASES)
def test_head_mixture_xla(group, causal, dtype, lse_given):
    bq, bk, T = _SHELLS["xla"]
    B, Hkv, D = 2, 2, 16
    q, k, seg = _inputs(group, B, T, T, Hkv * group, Hkv, D, dtype, left_pad=(0, 7), packed=True)
    _, lse_np, ent_ref, visible = _oracle(q, k, causal=causal, seg=seg)
    lse = _lse_with_garbage(lse_np, visible) if lse_given else None
    ent = hm.head_mixture_entropy(q, k, causal=causal, segment_ids=seg, lse=lse, backend="xla",
                                  block_q=bq, block_k=bk)
    _check_entropy(ent, ent_ref, visible, dtype)


@pytest.mark.parametrize("backend,group,causal,dtype,lse_given,D", [
    ("interpret_gpu", 2, True, jnp.float32, False, 16),
    ("interpret_gpu", 4, False, jnp.bfloat16, True, 128),
    ("interpret_gpu", 1, True, jnp.bfloat16, True, 16),
    ("interpret_tpu", 2, True, jnp.bfloat16, False, 128),  # [B, T, H·D] layout: heads as lane slices
    ("interpret_tpu", 4, False, jnp.float32, True, 16),    # [B, H, T, D] layout
])
def test_head_mixture_pallas_interpret(backend, group, causal, dtype, lse_given, D):
    bq, bk, T = _SHELLS[backend]
    B, Hkv = 2, 2  # Hkv > 1 so a wrong query-head -> key-head map shows
    q, k, seg = _inputs(10 + group, B, T, T, Hkv * group, Hkv, D, dtype, left_pad=(0, T // 3))
    _, lse_np, ent_ref, visible = _oracle(q, k, causal=causal, seg=seg)
    lse = _lse_with_garbage(lse_np, visible) if lse_given else None
    ent = hm.head_mixture_entropy(q, k, causal=causal, segment_ids=seg, lse=lse, backend=backend,
                                  block_q=bq, block_k=bk)
    _check_entropy(ent, ent_ref, visible, dtype)


def test_head_mixture_reads_the_fused_forward_lse():
    """The training path: lse from `entropy_attention(..., return_lse=True)` (1e30 on empty rows)."""
    from jaxrl_entropy.kernels.flash import entropy_attention

    q, k, seg = _inputs(9, 2, 40, 40, 4, 2, 16, jnp.bfloat16, left_pad=(0, 6))
    _, lse_np, ent_ref, visible = _oracle(q, k, causal=True, seg=seg)
    _, _, lse = entropy_attention(q, k, k, segment_ids=seg, backend="xla", return_lse=True)
    vis = np.broadcast_to(visible[..., None], lse.shape)
    np.testing.assert_allclose(np.asarray(lse)[vis], lse_np[vis], atol=1e-4, rtol=1e-5)
    ent = hm.head_mixture_entropy(q, k, segment_ids=seg, lse=lse, backend="xla", block_q=16, block_k=16)
    _check_entropy(ent, ent_ref, visible, jnp.bfloat16)


def test_head_mixture_cross_attention_offset_and_scale():
    """S != T: causal queries sit at the end of the keys; a custom sm_scale reaches every logit."""
    q, k, _ = _inputs(3, 1, 21, 50, 4, 2, 16, jnp.float32)
    _, _, ent_ref, visible = _oracle(q, k, causal=True, sm_scale=0.7)
    ent = hm.head_mixture_entropy(q, k, causal=True, sm_scale=0.7, backend="xla", block_q=8, block_k=16)
    _check_entropy(ent, ent_ref, visible, jnp.float32)


def test_head_mixture_default_blocks_match_small_blocks():
    """Default (clamped) blocks on a sequence shorter than one block give the oracle too."""
    q, k, seg = _inputs(4, 2, 37, 37, 4, 2, 16, jnp.float32, left_pad=(5, 0))
    _, _, ent_ref, visible = _oracle(q, k, causal=True, seg=seg)
    _check_entropy(hm.head_mixture_entropy(q, k, segment_ids=seg, backend="xla"), ent_ref, visible,
                   jnp.float32)


def test_head_mixture_is_not_the_mean_of_head_entropies():
    """Guards against computing the `head_mean` aggregation by mistake: the two must differ."""
    q, k, _ = _inputs(5, 1, 32, 32, 4, 4, 16, jnp.float32)
    probs, _, ent_ref, _ = _oracle(q, k, causal=True)
    head_mean = (-scipy.special.xlogy(probs, probs).sum(-1)).mean(1)[0]
    ent = np.asarray(hm.head_mixture_entropy(q, k, backend="xla", block_q=8, block_k=8))[0]
    np.testing.assert_allclose(ent, ent_ref[0], atol=2e-4)
    assert np.max(ent[4:] - head_mean[4:]) > 0.05  # mixing heads raises entropy (concavity)


def test_head_mixture_has_no_gradient():
    q, k, _ = _inputs(6, 1, 16, 16, 2, 1, 16, jnp.float32)
    dq, dk = jax.grad(lambda q, k: jnp.sum(hm.head_mixture_entropy(q, k, backend="xla", block_q=8,
                                                                   block_k=8)), argnums=(0, 1))(q, k)
    assert not np.any(np.asarray(dq)) and not np.any(np.asarray(dk))


# ------------------------------------------------------------------------------------------------
# attention_lse and attention_probs
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["xla", "interpret_gpu", "interpret_tpu"])
def test_attention_lse(backend):
    bq, bk, T = _SHELLS[backend]
    q, k, seg = _inputs(7, 2, T, T, 4, 2, 16, jnp.float32, left_pad=(0, 9))
    _, lse_ref, _, visible = _oracle(q, k, causal=True, seg=seg)
    lse = np.asarray(hm.attention_lse(q, k, segment_ids=seg, backend=backend, block_q=bq, block_k=bk))
    assert lse.shape == lse_ref.shape
    vis = np.broadcast_to(visible[..., None], lse.shape)
    np.testing.assert_allclose(lse[vis], lse_ref[vis], atol=2e-5, rtol=2e-5)
    assert np.all(lse[~vis] == 1e30)  # the fused forward's convention for rows that see no key


@pytest.mark.parametrize("backend,causal,lse_given", [
    ("xla", True, False),
    ("xla", False, True),
    ("interpret_gpu", True, True),
    ("interpret_tpu", False, False),
])
def test_attention_probs(backend, causal, lse_given):
    bq, bk, T = _SHELLS[backend]
    if backend == "interpret_tpu":
        T = 140  # 2 x 2 blocks of 128: keeps the slow TPU interpreter short
    q, k, seg = _inputs(8, 2, T, T, 4, 2, 16, jnp.bfloat16, left_pad=(3, 0))
    probs_ref, lse_np, _, visible = _oracle(q, k, causal=causal, seg=seg)
    lse = _lse_with_garbage(lse_np, visible) if lse_given else None
    probs = np.asarray(hm.attention_probs(q, k, causal=causal, segment_ids=seg, lse=lse,
                                          backend=backend, block_q=bq, block_k=bk))
    assert probs.shape == probs_ref.shape and probs.dtype == np.float32
    np.testing.assert_allclose(probs, probs_ref, atol=2e-6, rtol=1e-4)
    # Rows sum to 1 where a key is visible, 0 elsewhere.
    np.testing.assert_allclose(probs.sum(-1), np.broadcast_to(visible[:, None], probs.shape[:3]),
                               atol=1e-5)


def _kernels_outside_shard_map(jaxpr, inside=False, found=None):
    """Names of the pallas_calls of a jaxpr that do not run inside a shard_map."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "pallas_call" and not inside:
            found.append(eqn.params.get("name_and_src_info", name))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns") and name != "pallas_call":
                    _kernels_outside_shard_map(sub, inside or name == "shard_map", found)
    return found


def test_probe_attention_probs_run_per_shard_under_a_mesh():
    """The model's analysis path under an 8-device mesh: XLA cannot partition a kernel, so every
    kernel (probabilities included) must run inside shard_map; the numbers equal the oracle."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    from jaxrl_entropy import parallel
    from jaxrl_entropy.models import attention

    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    q, k, seg = _inputs(12, 4, 24, 24, 4, 2, 16, jnp.float32, left_pad=(0, 5, 0, 23))
    probs_ref, _, ent_ref, visible = _oracle(q, k, causal=True, seg=seg)

    def run(q, k, seg):
        res = attention.probe_attention(q, k, k, seg, impl="kernel", kernel_backend="interpret_gpu",
                                        sm_scale=16 ** -0.5, return_probs=True, mesh=mesh)
        return res.probs_BxHxTxS, res.mixture_BxT

    assert _kernels_outside_shard_map(jax.make_jaxpr(run)(q, k, seg).jaxpr) == []
    probs, mix = jax.jit(run)(*(jax.device_put(x, parallel.batch_sharding(mesh, x.ndim)) for x in (q, k, seg)))
    np.testing.assert_allclose(np.asarray(probs), probs_ref, atol=2e-6)
    _check_entropy(mix, ent_ref, visible, jnp.float32)


# ------------------------------------------------------------------------------------------------
# Real TPU (Mosaic) and GPU (Triton) lowerings, checked by exporting without the device
# ------------------------------------------------------------------------------------------------

_TRITON = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


@pytest.mark.parametrize("platform,backend", [("tpu", "tpu"), ("cuda", "gpu")])
def test_real_lowerings(platform, backend):
    """Default blocks on a Qwen3-like head layout lower to Mosaic / Triton (block rules checked)."""
    q = jax.ShapeDtypeStruct((1, 1000, 8, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 1000, 2, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 1000), jnp.int32)

    def fn(q, k, seg):
        lse = hm.attention_lse(q, k, segment_ids=seg, backend=backend)
        ent = hm.head_mixture_entropy(q, k, segment_ids=seg, lse=lse, backend=backend)
        probs = hm.attention_probs(q[:, :256], k[:, :256], causal=False, lse=lse[:, :256],
                                   backend=backend)
        return ent, probs

    text = export.export(jax.jit(fn), platforms=[platform], disabled_checks=_TRITON)(q, k, seg).mlir_module()
    marker = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
    assert text.count(marker) >= 3


# ------------------------------------------------------------------------------------------------
# Argument errors
# ------------------------------------------------------------------------------------------------

def test_errors_name_the_problem():
    q = jnp.zeros((1, 8, 3, 16))
    k = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        hm.head_mixture_entropy(q, k, backend="xla")
    q = jnp.zeros((1, 8, 4, 16))
    with pytest.raises(ValueError, match="lse must be"):
        hm.head_mixture_entropy(q, k, lse=jnp.zeros((1, 8, 2)), backend="xla")
    with pytest.raises(ValueError, match="segment_ids must be"):
        hm.head_mixture_entropy(q, k, segment_ids=jnp.ones((1, 7), jnp.int32), backend="xla")
    with pytest.raises(ValueError, match="multiples of 128"):
        hm.head_mixture_entropy(q, jnp.zeros((1, 300, 2, 16)), causal=False, backend="interpret_tpu",
                                block_k=64)
    with pytest.raises(ValueError, match="power of two"):
        hm.head_mixture_entropy(q, k, backend="interpret_gpu", block_q=24)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        hm.head_mixture_entropy(q, k, backend="cuda")
