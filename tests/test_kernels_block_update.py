"""The shared block maths of the fused kernels, against float64 numpy and `kernels.masking`."""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from kernels import block_update as bu
from kernels.masking import visible_mask


def np_row_attention(s, mask, v):
    """float64 softmax rows: (out, entropy, lse) with lse nan / out 0 / entropy 0 on empty rows."""
    s = np.where(mask, s.astype(np.float64), -np.inf)
    mx = np.max(s, -1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.where(mask, np.exp(s - mx), 0.0)
    l = e.sum(-1, keepdims=True)
    p = e / np.where(l > 0, l, 1.0)
    ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1)
    with np.errstate(divide="ignore"):
        lse = np.where(l[..., 0] > 0, mx[..., 0] + np.log(l[..., 0]), np.nan)
    return p @ v.astype(np.float64), ent, lse, p


def _tiles(R=8, S=3 * 128, D=64, seed=0):
    rng = np.random.default_rng(seed)
    s = (rng.standard_normal((R, S)) * 3).astype(np.float32)
    v = rng.standard_normal((S, D)).astype(np.float32)
    mask = rng.random((R, S)) < 0.6
    mask[0, :200] = False     # first blocks fully masked, visible keys later
    mask[1] = False           # a row that sees no key at all
    mask[2, :] = False
    mask[2, 300] = True       # exactly one visible key: entropy 0
    mask[3, :] = True
    s[3, :] += 80.0           # large logits: the raw Σp·s accumulator would lose precision
    return s, v, mask


def _run_blocks(s, v, mask, bk, width, lo=0, hi=None):
    hi = s.shape[1] if hi is None else hi
    state = bu.init_state((s.shape[0],), width, v.shape[1])
    for a in range(lo, hi, bk):
        state = bu.online_softmax_step(state, jnp.asarray(s[:, a:a + bk]), jnp.asarray(mask[:, a:a + bk]),
                                       jnp.asarray(v[a:a + bk]))
    return state


@pytest.mark.parametrize("width", [1, 128])  # [R, 1] (GPU / XLA) and lane-replicated (TPU)
def test_online_blocks_match_direct_softmax(width):
    s, v, mask = _tiles()
    state = _run_blocks(s, v, mask, 128, width)
    out, ent, lse = bu.finalize(state)
    o_ref, e_ref, l_ref, _ = np_row_attention(s, mask, v)
    assert ent.shape == (s.shape[0], width)
    assert np.all(np.isfinite(np.asarray(out))) and np.all(np.isfinite(np.asarray(ent)))
    np.testing.assert_allclose(np.asarray(out), o_ref, atol=1e-5)
    for c in range(width):  # every lane of a replicated statistic holds the same value
        np.testing.assert_allclose(np.asarray(ent)[:, c], e_ref, atol=2e-5)
        valid = ~np.isnan(l_ref)
        np.testing.assert_allclose(np.asarray(lse)[valid, c], l_ref[valid], rtol=1e-6, atol=1e-5)
    assert np.all(np.asarray(lse)[1] == bu.EMPTY_ROW_LSE)
    assert np.all(np.asarray(ent)[1] == 0.0) and np.all(np.asarray(out)[1] == 0.0)
    assert np.all(np.asarray(ent)[2] == 0.0)


def test_entropy_switched_off_leaves_out_unchanged():
    s, v, mask = _tiles(seed=1)
    state = bu.init_state((s.shape[0],), 1, v.shape[1])
    for a in range(0, s.shape[1], 128):
        state = bu.online_softmax_step(state, jnp.asarray(s[:, a:a + 128]), jnp.asarray(mask[:, a:a + 128]),
                                       jnp.asarray(v[a:a + 128]), entropy=False)
    out, ent, _ = bu.finalize(state, entropy=False)
    assert ent is None
    np.testing.assert_allclose(np.asarray(out), np_row_attention(s, mask, v)[0], atol=1e-5)


def test_split_combine_equals_attention_over_all_keys():
    s, v, mask = _tiles(seed=2)
    # three uneven key ranges; range 0 is fully masked for row 0 (and row 1 sees nothing anywhere)
    cuts = [(0, 128), (128, 256), (256, 384)]
    parts = [_run_blocks(s, v, mask, 64, 1, lo, hi) for lo, hi in cuts]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *parts)
    out, ent, lse = bu.finalize(bu.combine_splits(stacked))
    o_ref, e_ref, l_ref, _ = np_row_attention(s, mask, v)
    np.testing.assert_allclose(np.asarray(out), o_ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent)[:, 0], e_ref, atol=2e-5)
    valid = ~np.isnan(l_ref)
    np.testing.assert_allclose(np.asarray(lse)[valid, 0], l_ref[valid], atol=1e-5)


def test_recompute_probs_and_softmax_grad():
    s, v, mask = _tiles(seed=3)
    _, _, l_ref, p_ref = np_row_attention(s, mask, v)
    lse = np.where(np.isnan(l_ref), bu.EMPTY_ROW_LSE, l_ref).astype(np.float32)[:, None]
    p = np.asarray(bu.recompute_probs(jnp.asarray(s), jnp.asarray(lse), jnp.asarray(mask)))
    np.testing.assert_allclose(p, p_ref, atol=1e-5)
    assert np.all(p[~mask] == 0.0)
    rng = np.random.default_rng(0)
    dp = rng.standard_normal(s.shape).astype(np.float32)
    di = np.sum(p_ref * dp, -1, keepdims=True)  # Σ_j p dp = Σ_d o·do
    ds = bu.softmax_grad(jnp.asarray(p_ref, jnp.float32), jnp.asarray(dp), jnp.asarray(di, jnp.float32))
    ds = np.asarray(ds)
    # dS of softmax rows: (diag(p) - p pᵀ) dp
    np.testing.assert_allclose(ds, p_ref * dp - p_ref * di, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("S", [21, 29])
def test_tile_mask_is_the_visible_mask(causal, S):
    T = 21
    seg = np.ones((2, T), np.int32)
    seg[0, :6] = 0                   # left padding
    seg[1, 10:] = 2                  # packed
    seg[1, -3:] = 0
    q_pos = (jnp.arange(T) + S - T)[:, None]
    k_pos = jnp.arange(S)[None, :]
    if S == T:
        seg_j = jnp.asarray(seg)
        got = bu.tile_mask(q_pos, k_pos, causal=causal, q_seg=seg_j[:, :, None], k_seg=seg_j[:, None, :])
        want = visible_mask(2, T, S, causal=causal, segment_ids=seg_j)
    else:
        got = bu.tile_mask(q_pos, k_pos, causal=causal, kv_len=S - 4)  # 4 padded keys at the end
        want = visible_mask(1, T, S, causal=causal, segment_ids=None)[0] & (jnp.arange(S) < S - 4)[None]
    np.testing.assert_array_equal(np.broadcast_to(np.asarray(got), np.asarray(want).shape), np.asarray(want))


def test_floordiv_matches_python_floor_division():
    a = jnp.arange(-40, 40, dtype=jnp.int32)
    got = np.asarray(bu.floordiv(a, 16, lowest=-40))
    np.testing.assert_array_equal(got, np.arange(-40, 40) // 16)


def test_widen_layouts():
    x = jnp.arange(8 * 128, dtype=jnp.float32).reshape(8, 128)
    assert bu.widen(x, 384).shape == (8, 384)
    np.testing.assert_array_equal(np.asarray(bu.widen(x, 64)), np.asarray(x)[:, :64])
    assert bu.widen(x[:, :1], 512).shape == (8, 1)  # broadcasts implicitly
    with pytest.raises(ValueError, match="multiple of 128"):
        bu.widen(x, 200)
