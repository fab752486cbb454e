"""The shared block maths and tiling of the fused kernels, against float64 numpy and a brute-force
visibility mask written here."""
from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

from jaxrl_entropy.kernels import block_update as bu
from jaxrl_entropy.kernels import tiling
from jaxrl_entropy.kernels.masking import visible_mask

import oracles  # the float64 / brute-force references (tests/oracles.py)


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


def _tiles(R=8, S=3 * 128, D=64, seed=0, spread=3.0):
    rng = np.random.default_rng(seed)
    s = (rng.standard_normal((R, S)) * spread).astype(np.float32)
    v = rng.standard_normal((S, D)).astype(np.float32)
    mask = rng.random((R, S)) < 0.6
    mask[0, :200] = False     # first blocks fully masked, visible keys later
    mask[1] = False           # a row that sees no key at all
    mask[2, :] = False
    mask[2, 300] = True       # exactly one visible key: entropy 0
    mask[3, :] = True
    s[3, :] += 80.0           # a uniform shift (centring cancels it)
    return s, v, mask


def _run_blocks(s, v, mask, bk, width, lo=0, hi=None):
    hi = s.shape[1] if hi is None else hi
    state = bu.init_state((s.shape[0],), width, v.shape[1])
    for a in range(lo, hi, bk):
        state = bu.online_softmax_step(state, jnp.asarray(s[:, a:a + bk]), jnp.asarray(mask[:, a:a + bk]),
                                       jnp.asarray(v[a:a + bk]))
    return state


# spread 60: logits spread over hundreds of nats, rows nearly one-hot, the running max jumping
# from block to block (the case where a raw Σ p·s accumulator loses all precision)
@pytest.mark.parametrize("width,spread", [(1, 3.0), (128, 3.0), (1, 60.0)])  # [R, 1] (GPU / XLA), (R, 128) (TPU)
def test_online_blocks_match_direct_softmax(width, spread):
    s, v, mask = _tiles(spread=spread)
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


@pytest.mark.parametrize("entropy,values", [(False, True), (False, False)])
def test_entropy_or_values_switched_off(entropy, values):
    """flash_attention's state (no t) and attention_lse's (no t, no accumulator)."""
    s, v, mask = _tiles(seed=1)
    state = bu.init_state((s.shape[0],), 1, v.shape[1] if values else None, entropy=entropy)
    for a in range(0, s.shape[1], 128):
        state = bu.online_softmax_step(state, jnp.asarray(s[:, a:a + 128]), jnp.asarray(mask[:, a:a + 128]),
                                       jnp.asarray(v[a:a + 128]) if values else None)
    out, ent, lse = bu.finalize(state)
    o_ref, _, l_ref, _ = np_row_attention(s, mask, v)
    assert ent is None and (out is None) == (not values)
    if values:
        np.testing.assert_allclose(np.asarray(out), o_ref, atol=1e-5)
    valid = ~np.isnan(l_ref)
    np.testing.assert_allclose(np.asarray(lse)[valid, 0], l_ref[valid], rtol=1e-6, atol=1e-5)


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


def _np_entropy_lse(s, mask):
    """Row entropy and lse of masked float64 logits (the functions whose gradient is checked)."""
    z = np.where(mask, s, -np.inf)
    mx = np.max(z, -1, keepdims=True)
    lse = (mx + np.log(np.sum(np.exp(z - mx), -1, keepdims=True)))[..., 0]
    p = np.where(mask, np.exp(z - lse[:, None]), 0.0)
    logp = np.where(mask, s - lse[:, None], 0.0)
    return -np.sum(p * logp, -1), lse


def test_softmax_grad_with_entropy_and_lse_cotangents_matches_finite_differences():
    """ds = p ⊙ (dp − Δ + g_lse − g_H·(log p + H)) against central differences of H and lse."""
    rng = np.random.default_rng(4)
    R, K = 5, 24
    s = rng.standard_normal((R, K)) * 2.0
    mask = rng.random((R, K)) < 0.7
    mask[:, 0] = True
    g_ent, g_lse = rng.standard_normal(R), rng.standard_normal(R)
    ent, lse = _np_entropy_lse(s, mask)
    want = np.zeros_like(s)
    eps = 1e-6
    for r in range(R):
        for c in range(K):
            if not mask[r, c]:
                continue
            sp, sm = s.copy(), s.copy()
            sp[r, c] += eps
            sm[r, c] -= eps
            (ep, lp), (em, lm) = _np_entropy_lse(sp, mask), _np_entropy_lse(sm, mask)
            want[r, c] = (g_ent[r] * (ep[r] - em[r]) + g_lse[r] * (lp[r] - lm[r])) / (2 * eps)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    log_p = bu.log_probs(f32(s), f32(lse[:, None]), jnp.asarray(mask))
    p = jnp.exp(log_p)
    # no output cotangent: dp = 0, Δ = 0; row_delta folds g_lse and g_H·H into di
    zeros = jnp.zeros((1, R, 1, 1), jnp.float32)
    di = bu.row_delta(zeros, zeros, f32(ent)[None, :, None], f32(g_ent)[None, :, None],
                      f32(g_lse)[None, :, None])[0, :, 0][:, None]
    ds = bu.softmax_grad(p, jnp.zeros_like(p), di, g_ent=f32(g_ent[:, None]), log_p=log_p)
    np.testing.assert_allclose(np.asarray(ds), want, atol=2e-5)
    assert np.all(np.asarray(ds)[~mask] == 0.0)


def test_mixture_entropy_term():
    rng = np.random.default_rng(5)
    H, R, K = 3, 4, 16
    p = rng.random((H, R, K))
    p /= p.sum(-1, keepdims=True) * 2.0  # each head's mass on this tile: 1/2
    p[:, 0, :5] = 0.0                    # keys no head attends: 0·log 0 = 0
    pbar = p.mean(0)
    want = -np.sum(np.where(pbar > 0, pbar * np.log(np.where(pbar > 0, pbar, 1.0)), 0.0), -1)
    got = bu.mixture_entropy_term(jnp.asarray(p.sum(0), jnp.float32), H)
    np.testing.assert_allclose(np.asarray(got)[:, 0], want, rtol=1e-6)


# ----------------------------------------------------------------------------------- tiling




def _layouts():
    T = 40
    left = np.ones((2, T), np.int32)
    left[0, :19] = 0                      # two whole key blocks of padding, then a partial one
    left[1, :3] = 0
    packed = np.ones((2, T), np.int32)
    packed[:, 16:] = 2
    packed[0, 33:] = 0                    # right padding
    holes = np.ones((1, T), np.int32)     # id 1 in two separate runs: the same segment
    holes[0, 8:24] = 2
    return {"none": None, "left": left, "packed": packed, "holes": holes}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout,T,S", [("none", 40, 40), ("none", 24, 40), ("none", 40, 28),
                                        ("left", 40, 40), ("packed", 40, 40), ("holes", 40, 40)])
def test_block_kinds_and_visit_ranges_are_sound(layout, causal, T, S):
    """SKIP blocks hold no visible pair, FULL blocks only visible pairs of real keys; every block
    with a visible pair is visited, and the unmasked range holds FULL blocks only."""
    seg = _layouts()[layout]
    B = 1 if seg is None else seg.shape[0]
    bq, bk = 8, 8
    g = tiling.Tiling((B, T, 2, 16), (B, S, 1, 16), causal=causal, has_seg=seg is not None, bq=bq, bk=bk)
    kinds = np.asarray(g.block_kinds(None if seg is None else jnp.asarray(seg)))
    vis = np.zeros((B, g.Tp, g.Sp), bool)
    vis[:, :T, :S] = oracles.visible_mask(B, T, S, causal, seg)
    real_key = np.arange(g.Sp) < S
    for name, rng, blocks in (("kv", np.asarray(tiling.visit_ranges(jnp.asarray(kinds))), kinds),
                              ("q", np.asarray(tiling.visit_ranges(jnp.asarray(kinds), transpose=True)),
                               np.swapaxes(kinds, 1, 2))):
        for b in range(B):
            for n in range(blocks.shape[1]):
                lo, full_lo, full_hi, hi = rng[b, n]
                assert 0 <= lo <= full_lo <= full_hi <= hi <= blocks.shape[2], (name, rng[b, n])
                for m in range(blocks.shape[2]):
                    i, j = (n, m) if name == "kv" else (m, n)
                    tile = vis[b, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                    rows_real = slice(0, min(bq, T - i * bq))
                    if tile.any():
                        assert lo <= m < hi, (name, b, i, j)
                    if full_lo <= m < full_hi:
                        assert blocks[b, n, m] == tiling.FULL
                    if kinds[b, i, j] == tiling.SKIP:
                        assert not tile.any(), (b, i, j)
                    if kinds[b, i, j] == tiling.FULL:
                        assert real_key[j * bk:(j + 1) * bk].all() and tile[rows_real].all(), (b, i, j)


def test_visit_ranges_skip_left_padding_and_the_upper_triangle():
    """Hand-computed ranges: 19 padding tokens then 21 tokens, causal, 8 x 8 blocks."""
    seg = np.ones((1, 40), np.int32)
    seg[0, :19] = 0
    g = tiling.Tiling((1, 40, 1, 16), (1, 40, 1, 16), causal=True, has_seg=True, bq=8, bk=8)
    rng = np.asarray(tiling.visit_ranges(g.block_kinds(jnp.asarray(seg))))[0]
    # query blocks 0, 1: padding only -> nothing; block 2 (rows 16-23) straddles the padding edge
    # and the diagonal; block 3 sees key block 2 (partly padding, masked) and 3 (diagonal);
    # block 4 sees key block 2 masked, key block 3 unmasked, key block 4 on the diagonal
    np.testing.assert_array_equal(rng, [[0, 0, 0, 0], [0, 0, 0, 0], [2, 3, 3, 3], [2, 4, 4, 4],
                                        [2, 3, 4, 5]])


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


def test_widen_layouts():
    x = jnp.arange(8 * 128, dtype=jnp.float32).reshape(8, 128)
    assert bu.widen(x, 384).shape == (8, 384)
    np.testing.assert_array_equal(np.asarray(bu.widen(x, 64)), np.asarray(x)[:, :64])
    assert bu.widen(x[:, :1], 512).shape == (8, 1)  # broadcasts implicitly
    with pytest.raises(ValueError, match="multiple of 128"):
        bu.widen(x, 200)
