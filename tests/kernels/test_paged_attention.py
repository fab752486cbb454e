"""Paged decode attention against a float64 numpy oracle and `kernels.reference_attention`."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxrl_entropy import kernels
from jaxrl_entropy.kernels.paged_attention import paged_attention


def _problem(seed=0, *, S=5, Hq=4, Hkv=2, D=16, N=12, page=4, M=5, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((S, Hq, D)).astype(dtype)
    k = rng.standard_normal((Hkv, N, page, D)).astype(dtype)
    v = rng.standard_normal((Hkv, N, page, D)).astype(dtype)
    # lengths: empty, one key, a page boundary, mid-page, the whole table
    lengths = np.array([0, 1, page, 2 * page + 1, M * page][:S], np.int32)
    table = np.stack([rng.permutation(np.arange(1, N))[:M] for _ in range(S)]).astype(np.int32)
    return q, k, v, lengths, table


def _gather(pages_KxNxPxD, row, length):
    """The first `length` keys of one sequence, `[length, Hkv, D]`."""
    x = np.concatenate([pages_KxNxPxD[:, p] for p in row], axis=1)[:, :length]
    return np.swapaxes(x, 0, 1)


def _oracle(q, k, v, lengths, table, sm_scale):
    """float64 softmax attention per sequence over its gathered keys (0 for an empty one)."""
    S, Hq, D = q.shape
    Hkv = k.shape[0]
    out = np.zeros((S, Hq, D))
    for s in range(S):
        n = int(lengths[s])
        if n == 0:
            continue
        kk = _gather(k.astype(np.float64), table[s], n)  # [n, Hkv, D]
        vv = _gather(v.astype(np.float64), table[s], n)
        qq = q[s].astype(np.float64).reshape(Hkv, Hq // Hkv, D)
        logits = np.einsum("kgd,nkd->kgn", qq, kk) * sm_scale
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[s] = np.einsum("kgn,nkd->kgd", p, vv).reshape(Hq, D)
    return out


@pytest.mark.parametrize("pages_per_block", [1, 2, None])
def test_xla_matches_float64_oracle(pages_per_block):
    q, k, v, lengths, table = _problem()
    scale = 0.3
    got = paged_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths), jnp.asarray(table),
                          sm_scale=scale, backend="xla", pages_per_block=pages_per_block)
    np.testing.assert_allclose(np.asarray(got), _oracle(q, k, v, lengths, table, scale), atol=2e-5, rtol=2e-5)


def test_xla_matches_reference_attention_bf16():
    q, k, v, lengths, table = _problem(1, D=32, page=8, N=20, M=4)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    got = paged_attention(q, k, v, jnp.asarray(lengths), jnp.asarray(table), sm_scale=32 ** -0.5, backend="xla",
                          pages_per_block=2)
    for s in (3, 4):  # mid-page and the whole table (the float64 test covers the other lengths)
        n = int(lengths[s])
        kk = jnp.asarray(_gather(np.asarray(k, np.float32), table[s], n))[None]
        vv = jnp.asarray(_gather(np.asarray(v, np.float32), table[s], n))[None]
        ref, _ = kernels.reference_attention(q[s][None, None].astype(jnp.float32), kk, vv, causal=False)
        np.testing.assert_allclose(np.asarray(got[s], np.float32), np.asarray(ref[0, 0]), atol=2e-2, rtol=2e-2)
    assert np.all(np.asarray(got[0], np.float32) == 0)


def test_tpu_kernel_interpret_matches_oracle():
    pytest.importorskip("jax.experimental.pallas.ops.tpu.paged_attention")
    q, k, v, lengths, table = _problem(2, S=3, D=128, page=16, N=6, M=4)
    lengths = np.array([0, 17, 64], np.int32)
    got = paged_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths), jnp.asarray(table),
                          sm_scale=128 ** -0.5, backend="interpret_tpu", pages_per_block=2)
    # the kernel's matmuls run at the TPU's default (bf16-pass) precision, also when interpreted
    np.testing.assert_allclose(np.asarray(got), _oracle(q, k, v, lengths, table, 128 ** -0.5), atol=2e-2, rtol=2e-2)


def test_tpu_kernel_lowers_to_mosaic():
    pytest.importorskip("jax.experimental.pallas.ops.tpu.paged_attention")
    q = jax.ShapeDtypeStruct((8, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 64, 32, 128), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((8,), jnp.int32)
    table = jax.ShapeDtypeStruct((8, 12), jnp.int32)
    fn = lambda q, k, v, n, t: paged_attention(q, k, v, n, t, sm_scale=0.1, backend="tpu", pages_per_block=4)
    text = jax.jit(fn).trace(q, kv, kv, lengths, table).lower(lowering_platforms=("tpu",)).as_text()
    assert sum("tpu_custom_call" in line for line in text.splitlines()) == 1


def test_bad_shapes_are_named():
    q, k, v, lengths, table = _problem()
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        paged_attention(jnp.asarray(q[:, :3]), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths),
                        jnp.asarray(table), sm_scale=1.0, backend="xla")
    with pytest.raises(ValueError, match="backend"):
        paged_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths), jnp.asarray(table),
                        sm_scale=1.0, backend="cuda")
