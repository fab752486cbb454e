"""Fused flash attention with row entropy: every shell against a float64 numpy oracle.

Shells run on CPU: the blockwise XLA path natively, the Pallas GPU (Triton) shell with
`interpret=True`, the Mosaic TPU shell in TPU interpret mode. Shapes are chosen so that every
kernel sees >= 3 query blocks and >= 3 key blocks, with lengths that are not block multiples.
The oracle is written here in numpy float64 (x64 stays off in kernel tests: interpret-mode bugs).
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxrl_entropy.kernels import entropy_attention, flash_attention, reference_attention

import oracles  # the float64 / brute-force references (tests/oracles.py)

F32, BF16 = jnp.float32, jnp.bfloat16

# Smallest legal blocks per shell; L = sequence length (not a multiple of either block).
SHELLS = {
    "xla": dict(L=70, bq=16, bk=32),
    "interpret_gpu": dict(L=70, bq=16, bk=32),   # Triton: powers of two >= 16
    "interpret_tpu": dict(L=200, bq=128, bk=128),  # Mosaic: multiples of 128 (lane dim)
}


# ------------------------------------------------------------------------------ float64 oracle




def oracle(q, k, v, dout, *, causal, seg, scale=None, g_ent=None, g_lse=None):
    """Attention, row entropy, lse and the gradients, in float64, K/V repeated per head.

    The gradients are those of Σ out·dout + Σ g_ent·entropy + Σ g_lse·lse (g_ent, g_lse
    `[B, T, Hq]` or None), by hand: ∂lse/∂s = p, ∂H/∂s = −p ⊙ (log p + H).
    Returns (out [B,T,Hq,D], ent [B,T,Hq], lse [B,T,Hq] (nan where no key), dq, dk, dv).
    """
    q, k, v, dout = (np.asarray(jnp.asarray(x, F32), np.float64) for x in (q, k, v, dout))
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    kr, vr = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    mask = oracles.visible_mask(B, T, S, causal, seg)[:, None]  # [B, 1, T, S]
    s = np.where(mask, np.einsum("bthd,bshd->bhts", q, kr) * scale, -np.inf)
    mx = np.max(s, axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.where(mask, np.exp(s - mx), 0.0)
    l = e.sum(-1, keepdims=True)
    p = e / np.where(l > 0, l, 1.0)
    with np.errstate(divide="ignore"):
        ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
        lse = np.where(l[..., 0] > 0, mx[..., 0] + np.log(l[..., 0]), np.nan)
    out = np.einsum("bhts,bshd->bthd", p, vr)
    dp = np.einsum("bthd,bshd->bhts", dout, vr)
    ds = p * (dp - np.einsum("bthd,bthd->bht", dout, out)[..., None])
    tr_in = lambda x: np.transpose(np.asarray(x, np.float64), (0, 2, 1))[..., None]  # noqa: E731
    if g_lse is not None:
        ds += p * tr_in(g_lse)
    if g_ent is not None:
        logp = np.where(mask, s - np.where(l > 0, mx + np.log(np.where(l > 0, l, 1.0)), 0.0), 0.0)
        ds -= tr_in(g_ent) * p * (logp + ent[..., None])
    dq = np.einsum("bhts,bshd->bthd", ds, kr) * scale
    dk = (np.einsum("bhts,bthd->bshd", ds, q) * scale).reshape(B, S, Hkv, G, D).sum(3)
    dv = np.einsum("bhts,bthd->bshd", p, dout).reshape(B, S, Hkv, G, D).sum(3)
    tr = lambda x: np.transpose(x, (0, 2, 1))  # noqa: E731
    return out, tr(ent), tr(lse), dq, dk, dv


def assert_close(actual, expected, tol, what):
    actual = np.asarray(jnp.asarray(actual, F32), np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    err = np.max(np.abs(actual - expected))
    bound = tol * max(1.0, float(np.max(np.abs(expected))))
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def make_segments(kind, B, T):
    if kind is None:
        return None
    seg = np.ones((B, T), np.int32)
    if kind == "left":  # left-padded prompts: padding rows see no key at all
        seg[0, : T // 3] = 0
        if B > 1:
            seg[1, :5] = 0
    elif kind == "packed":  # two packed segments, trailing padding
        seg[:, T // 2:] = 2
        seg[0, -7:] = 0
        if B > 1:
            seg[1, :3] = 0
    return seg


def make_inputs(rng, B, T, S, Hq, Hkv, D, dtype, spread=1.5):
    """q, k with N(0, spread²) entries, so the scaled logits have std spread² (60 for 7.75)."""
    q = jnp.asarray(rng.standard_normal((B, T, Hq, D)) * spread, dtype)
    k = jnp.asarray(rng.standard_normal((B, S, Hkv, D)) * spread, dtype)
    v = jnp.asarray(rng.standard_normal((B, S, Hkv, D)), dtype)
    dout = jnp.asarray(rng.standard_normal((B, T, Hq, D)), dtype)
    return q, k, v, dout


# id: (B, Hq, Hkv, D, causal, segments, dtype, (T, S) as fractions of the shell's L)
# Together they cover GQA ratios 1/2/4/8, head_dim 64/128, f32/bf16, causal/full, left padding
# with rows that see no key, packed segments, S != T (queries aligned to the end of the keys), and
# widely spread logits (std 60: rows nearly one-hot, the running max jumping between blocks).
WIDE = 60.0 ** 0.5
CASES = {
    "gqa4-d64-causal-wide": (1, 4, 1, 64, True, None, F32, (1.0, 1.0)),
    "gqa8-d128-causal-leftpad": (1, 8, 1, 128, True, "left", F32, (1.0, 1.0)),
    "mha-d128-full-bf16-S<T": (1, 2, 2, 128, False, None, BF16, (1.0, 0.62)),
    "gqa2-d64-causal-leftpad-bf16": (1, 4, 2, 64, True, "left", BF16, (1.0, 1.0)),
    "gqa2-d64-full-packed": (2, 4, 2, 64, False, "packed", F32, (1.0, 1.0)),
    "gqa2-d128-causal-S>T": (1, 4, 2, 128, True, None, F32, (0.62, 1.0)),
    "mha-d64-causal-S<T-emptyrows": (1, 2, 2, 64, True, None, F32, (1.0, 0.62)),
}
# TPU interpret mode is the slowest shell (its compile alone is ~5 s per kernel): it skips the
# case whose only new feature (negative causal offset) lives in shell-independent index maths.
SKIP = {("interpret_tpu", "mha-d64-causal-S<T-emptyrows")}
# the widest grids are marked slow (still run in CI)
HEAVY = {("interpret_tpu", "gqa8-d128-causal-leftpad"), ("interpret_tpu", "gqa2-d64-full-packed")}


def _params():
    for shell in SHELLS:
        for case in CASES:
            if (shell, case) in SKIP:
                continue
            marks = [pytest.mark.slow] if (shell, case) in HEAVY else []
            yield pytest.param(shell, case, id=f"{shell}-{case}", marks=marks)


@pytest.mark.parametrize("backend,case", list(_params()))
def test_forward_and_gradients_match_float64_oracle(backend, case):
    B, Hq, Hkv, D, causal, seg_kind, dtype, (ft, fs) = CASES[case]
    cfg = SHELLS[backend]
    T, S = int(cfg["L"] * ft), int(cfg["L"] * fs)
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    q, k, v, dout = make_inputs(rng, B, T, S, Hq, Hkv, D, dtype, WIDE if case.endswith("wide") else 1.5)
    g_ent = jnp.asarray(rng.standard_normal((B, T, Hq)), F32)  # an entropy regulariser's weights
    g_lse = jnp.asarray(rng.standard_normal((B, T, Hq)), F32)
    seg = make_segments(seg_kind, B, T)
    seg_j = None if seg is None else jnp.asarray(seg)

    def fn(q, k, v):
        return entropy_attention(q, k, v, causal=causal, segment_ids=seg_j, backend=backend,
                                 return_lse=True, block_q=cfg["bq"], block_k=cfg["bk"])

    (out, ent, lse), vjp = jax.vjp(fn, q, k, v)
    dq, dk, dv = vjp((dout, g_ent, g_lse))
    o_ref, e_ref, l_ref, dq_ref, dk_ref, dv_ref = oracle(q, k, v, dout, causal=causal, seg=seg,
                                                         g_ent=g_ent, g_lse=g_lse)

    assert out.dtype == dtype and out.shape == (B, T, Hq, D)
    assert ent.dtype == jnp.float32 and ent.shape == (B, T, Hq)
    assert dq.dtype == dtype and dk.dtype == dtype and dv.dtype == dtype
    tol_out, tol_ent, tol_grad = (1e-5, 1e-5, 2e-5) if dtype == F32 else (1e-2, 1e-3, 2e-2)
    if case.endswith("wide"):
        # logits up to ±230 carry ~3e-5 of float32 rounding before any kernel maths (the plain
        # float32 reference_attention is off by 1.3e-5 on out here too); p inherits it
        tol_out, tol_ent = 5e-5, 5e-5
    assert_close(out, o_ref, tol_out, "out")
    assert_close(ent, e_ref, tol_ent, "entropy")
    empty = np.isnan(l_ref)
    if case.endswith("emptyrows") or seg_kind == "left":
        assert empty.any(), "the case was meant to contain rows that see no key"
    assert_close(np.where(empty, 0.0, lse), np.where(empty, 0.0, l_ref), tol_ent, "lse")
    assert np.all(np.asarray(ent)[empty] == 0.0) and np.all(np.asarray(out, np.float32)[empty.any(-1)] == 0.0)
    assert np.all(np.asarray(lse)[empty] == 1e30)
    assert_close(dq, dq_ref, tol_grad, "dq")
    assert_close(dk, dk_ref, tol_grad, "dk")
    assert_close(dv, dv_ref, tol_grad, "dv")


@pytest.mark.parametrize("backend", list(SHELLS))
def test_flash_attention_is_the_out_of_entropy_attention(backend):
    cfg = SHELLS[backend]
    T = cfg["L"]
    rng = np.random.default_rng(1)
    q, k, v, dout = make_inputs(rng, 1, T, T, 2, 1, 64, F32)
    seg = jnp.asarray(make_segments("left", 1, T))
    kw = dict(causal=True, segment_ids=seg, backend=backend, block_q=cfg["bq"], block_k=cfg["bk"])
    out_f = flash_attention(q, k, v, **kw)
    out_e, _ = entropy_attention(q, k, v, **kw)
    # the entropy accumulator must not perturb the output at all
    np.testing.assert_allclose(np.asarray(out_f), np.asarray(out_e), rtol=0, atol=1e-6)
    # default blocks (one tiling per shell) agree with the oracle too
    out_d, ent_d = entropy_attention(q, k, v, causal=True, segment_ids=seg, backend=backend)
    o_ref, e_ref, *_ = oracle(q, k, v, dout, causal=True, seg=np.asarray(seg))
    assert_close(out_d, o_ref, 1e-5, "out (default blocks)")
    assert_close(ent_d, e_ref, 1e-5, "entropy (default blocks)")


def test_flash_attention_gradient_equals_entropy_attention_gradient():
    rng = np.random.default_rng(5)
    q, k, v, dout = make_inputs(rng, 1, 40, 40, 4, 2, 32, F32)
    kw = dict(causal=True, backend="interpret_gpu", block_q=16, block_k=16)
    _, vjp_f = jax.vjp(lambda q, k, v: flash_attention(q, k, v, **kw), q, k, v)
    _, vjp_e = jax.vjp(lambda q, k, v: entropy_attention(q, k, v, **kw)[0], q, k, v)
    for a, b in zip(vjp_f(dout), vjp_e(dout)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_gradients_match_jax_grad_of_float64_reference(backend="xla"):
    """out and entropy both in the loss: the kernel's custom backward against autodiff of the
    plain reference, run in float64 (x64 only around the reference; the kernel stays float32).
    One shell suffices here: every shell meets the hand-derived float64 oracle above."""
    rng = np.random.default_rng(2)
    q, k, v, dout = make_inputs(rng, 2, 40, 40, 4, 2, 32, F32)
    w_ent = jnp.asarray(rng.standard_normal((2, 40, 4)), F32)
    seg = make_segments("packed", 2, 40)

    def loss(attn, seg_ids):
        def f(q, k, v):
            out, ent = attn(q, k, v, causal=True, segment_ids=seg_ids)
            return jnp.sum(out * dout.astype(out.dtype)) + jnp.sum(ent * w_ent.astype(ent.dtype))
        return f

    kernel = lambda *a, **kw: entropy_attention(*a, **kw, backend=backend, block_q=16, block_k=16)  # noqa: E731
    got = jax.grad(loss(kernel, jnp.asarray(seg)), (0, 1, 2))(q, k, v)
    with jax.enable_x64(True):
        f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))  # noqa: E731
        want = jax.grad(loss(reference_attention, jnp.asarray(seg)), (0, 1, 2))(f64(q), f64(k), f64(v))
        want = [np.asarray(w) for w in want]
    assert want[0].dtype == np.float64
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, 2e-5, f"d{name}")


def test_a_stopped_entropy_gives_the_plain_flash_gradient():
    """`stop_gradient` on the entropy (the model's measurement use) leaves exactly dL/d out."""
    rng = np.random.default_rng(7)
    q, k, v, dout = make_inputs(rng, 1, 40, 40, 4, 2, 32, F32)
    kw = dict(causal=True, backend="xla", block_q=16, block_k=16)

    def f(q, k, v):
        out, ent = entropy_attention(q, k, v, **kw)
        return jnp.sum(out * dout) + jnp.sum(jax.lax.stop_gradient(ent))

    got = jax.grad(f, (0, 1, 2))(q, k, v)
    _, _, _, dq_ref, dk_ref, dv_ref = oracle(q, k, v, dout, causal=True, seg=None)
    for name, a, b in zip("qkv", got, (dq_ref, dk_ref, dv_ref)):
        assert_close(a, b, 2e-5, f"d{name}")


@pytest.mark.parametrize("backend", ["xla", "interpret_gpu"])
def test_whole_blocks_of_left_padding_are_never_read(backend):
    """Left padding filling whole blocks is skipped, not masked: NaN in its q, k and v (say, an
    uninitialised cache) reaches no output and no gradient; the rest equals the oracle computed
    without the padding."""
    rng = np.random.default_rng(8)
    pad, T = 32, 64  # two of four 16-row blocks
    q, k, v, dout = make_inputs(rng, 1, T, T, 4, 2, 32, F32)
    seg = np.ones((1, T), np.int32)
    seg[0, :pad] = 0
    poison = lambda x: x.at[:, :pad].set(jnp.nan)  # noqa: E731

    def fn(q, k, v):
        return entropy_attention(q, k, v, causal=True, segment_ids=jnp.asarray(seg), backend=backend,
                                 block_q=16, block_k=16)

    (out, ent), vjp = jax.vjp(fn, poison(q), poison(k), poison(v))
    dq, dk, dv = vjp((dout, jnp.ones_like(ent)))
    o_ref, e_ref, _, dq_ref, dk_ref, dv_ref = oracle(q[:, pad:], k[:, pad:], v[:, pad:], dout[:, pad:],
                                                     causal=True, seg=None, g_ent=jnp.ones_like(ent[:, pad:]))
    for name, a, b in (("out", out, o_ref), ("entropy", ent, e_ref), ("dq", dq, dq_ref), ("dk", dk, dk_ref),
                       ("dv", dv, dv_ref)):
        assert_close(a[:, pad:], b, 2e-5, name)
        assert np.all(np.asarray(a[:, :pad]) == 0.0), name


@pytest.mark.parametrize("backend,D", [("interpret_gpu", 40), ("xla", 40)])
def test_head_dim_that_is_not_a_power_of_two(backend, D):
    """The GPU shell zero-pads head_dim to a power of two; results must not change."""
    rng = np.random.default_rng(6)
    q, k, v, dout = make_inputs(rng, 1, 40, 40, 2, 1, D, F32)
    fn = lambda q, k, v: entropy_attention(q, k, v, backend=backend, block_q=16, block_k=16)  # noqa: E731
    (out, ent), vjp = jax.vjp(fn, q, k, v)
    dq, dk, dv = vjp((dout, jnp.zeros_like(ent)))
    o_ref, e_ref, _, dq_ref, dk_ref, dv_ref = oracle(q, k, v, dout, causal=True, seg=None)
    for name, a, b in (("out", out, o_ref), ("dq", dq, dq_ref), ("dk", dk, dk_ref), ("dv", dv, dv_ref)):
        assert_close(a, b, 2e-5, name)
    assert_close(ent, e_ref, 1e-5, "entropy")


# ---------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs,args,match", [
    ({}, ((1, 8, 3, 16), (1, 8, 2, 16), F32), "multiple of key/value heads"),
    ({}, ((1, 8, 2, 16), (1, 8, 2, 8), F32), "head_dim"),
    ({}, ((8, 2, 16), (1, 8, 2, 16), F32), "q must be 4-D"),
    ({"segment_ids": np.ones((1, 7), np.int32)}, ((1, 8, 2, 16), (1, 8, 2, 16), F32), "segment_ids must be"),
    ({"segment_ids": np.ones((1, 8), np.float32)}, ((1, 8, 2, 16), (1, 8, 2, 16), F32), "integer"),
    ({"segment_ids": np.ones((1, 8), np.int32)}, ((1, 8, 2, 16), (1, 9, 2, 16), F32), "S == T"),
    ({"backend": "cuda"}, ((1, 8, 2, 16), (1, 8, 2, 16), F32), "unknown kernel backend"),
    ({"block_q": 0}, ((1, 8, 2, 16), (1, 8, 2, 16), F32), "block_q must be a positive int"),
    ({"backend": "interpret_gpu", "block_k": 24}, ((1, 8, 2, 16), (1, 8, 2, 16), F32), "power of two"),
    ({"backend": "interpret_tpu", "block_q": 64}, ((1, 8, 2, 16), (1, 8, 2, 16), F32), "multiples of 128"),
    ({}, ((1, 8, 2, 16), (1, 8, 2, 16), jnp.int32), "dtype must be"),
    ({"sm_scale": jnp.float32(0.1)}, ((1, 8, 2, 16), (1, 8, 2, 16), F32), "sm_scale must be a Python float"),
])
def test_bad_arguments_raise_clear_errors(kwargs, args, match):
    qs, ks, dtype = args
    q, k = jnp.zeros(qs, dtype), jnp.zeros(ks, dtype)
    kwargs = {n: (jnp.asarray(x) if isinstance(x, np.ndarray) else x) for n, x in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        entropy_attention(q, k, k, **kwargs)


def test_mixed_dtypes_raise():
    q = jnp.zeros((1, 8, 2, 16), F32)
    with pytest.raises(ValueError, match="share one dtype"):
        entropy_attention(q, q.astype(BF16), q.astype(BF16))
