"""Independent reference computations for tests: textbook formulas and brute force written from
the definitions, never the library call (or kernel helper) the code under test makes."""
from __future__ import annotations

import itertools
import math

import numpy as np


def average_ranks(x) -> np.ndarray:
    """1-based ranks, ties sharing their average rank, by counting: #{x_j < x_i} + (#{x_j = x_i} + 1) / 2."""
    x = np.asarray(x, dtype=np.float64)
    below = (x[None, :] < x[:, None]).sum(axis=1)
    equal = (x[None, :] == x[:, None]).sum(axis=1)
    return below + (equal + 1) / 2.0


def pearson(x, y) -> float:
    """Σ(x − x̄)(y − ȳ) / sqrt(Σ(x − x̄)² Σ(y − ȳ)²)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx * dy).sum() / math.sqrt((dx * dx).sum() * (dy * dy).sum()))


def spearman(x, y) -> float:
    return pearson(average_ranks(x), average_ranks(y))


def partial_by_precision(x, y, z) -> float:
    """Partial correlation of x and y given the columns of z from the precision matrix
    P = inverse correlation matrix of [x, y, z]: −P_xy / sqrt(P_xx P_yy)."""
    data = np.column_stack([x, y, np.asarray(z, dtype=np.float64).reshape(len(x), -1)])
    p = np.linalg.inv(np.corrcoef(data, rowvar=False))
    return float(-p[0, 1] / math.sqrt(p[0, 0] * p[1, 1]))


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| ≥ |t|) for Student's t with integer `df`, from the closed-form series of
    Abramowitz & Stegun 26.7.3 (odd df) and 26.7.4 (even df) in θ = atan(|t| / sqrt(df))."""
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:  # A = 2/π [θ + sinθ (cosθ + 2/3 cos³θ + ... + (2·4···(df−3))/(1·3···(df−2)) cos^(df−2)θ)]
        term, total = c, 0.0
        for j in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c * c * (2 * j) / (2 * j + 1)
        a = 2 / math.pi * (theta + s * total) if df > 1 else 2 / math.pi * theta
    else:  # A = sinθ [1 + 1/2 cos²θ + (1·3)/(2·4) cos⁴θ + ... + (1·3···(df−3))/(2·4···(df−2)) cos^(df−2)θ]
        term, total = 1.0, 0.0
        for j in range(1, df // 2 + 1):
            total += term
            term *= c * c * (2 * j - 1) / (2 * j)
        a = s * total
    return 1.0 - a


def paired_t(a, b) -> tuple[float, float]:
    """(t, two-sided p) of the paired t-test: t = mean(d) / (sd(d) / sqrt(n)), df = n − 1."""
    d = np.subtract(a, b, dtype=np.float64)
    n = d.size
    t = float(d.mean() / (d.std(ddof=1) / math.sqrt(n)))
    return t, t_two_sided_p(t, n - 1)


def wilcoxon_exact_p(d) -> float:
    """Exact two-sided Wilcoxon signed-rank p-value by enumerating all 2^n sign patterns of the
    ranks of |d| (no zeros or ties in |d|): 2 · min(P(W ≤ w), P(W ≥ w)), capped at 1, where
    W is the sum of the ranks of the positive differences."""
    d = np.asarray(d, dtype=np.float64)
    ranks = average_ranks(np.abs(d))
    w = ranks[d > 0].sum()
    sums = np.array([sum(r for r, pos in zip(ranks, signs) if pos)
                     for signs in itertools.product((False, True), repeat=d.size)])
    return float(min(1.0, 2 * min(np.mean(sums <= w), np.mean(sums >= w))))


def visible_mask(B, T, S, causal, seg):
    """Attention visibility `[B, T, S]` from the definition: query t (key-aligned at t + S − T)
    sees key j iff j ≤ t + S − T when causal, and j is in t's segment and not padding (id 0)."""
    mask = np.ones((B, T, S), bool)
    if causal:
        mask &= (np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T))[None]
    if seg is not None:
        mask &= (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    return mask


def count_sketch(leaves, dim: int, seed: int) -> np.ndarray:
    """A count sketch written from its definition with numpy uint32 arithmetic: element i (row-major
    flat index) of leaf l goes to bucket h mod dim with sign (-1 if h's top bit is set), where
    h = mix(i ^ mix(seed·0x9E3779B1 + l·0x632BE5AB)) and mix is murmur3's 32-bit finaliser."""
    def mix(x):
        x = np.asarray(x, np.uint32)
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x85EBCA6B)
        x = x ^ (x >> np.uint32(13))
        x = x * np.uint32(0xC2B2AE35)
        return x ^ (x >> np.uint32(16))

    out = np.zeros(dim, np.float64)
    for l, leaf in enumerate(leaves):
        x = np.asarray(leaf, np.float64).ravel()
        salt = mix(np.array([(seed * 0x9E3779B1 + l * 0x632BE5AB) & 0xFFFFFFFF], np.uint32))[0]
        h = mix(np.arange(x.size, dtype=np.uint32) ^ salt)
        sign = np.where(h >> np.uint32(31), -1.0, 1.0)
        np.add.at(out, (h & np.uint32(dim - 1)).astype(np.int64), sign * x)
    return out
