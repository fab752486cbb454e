"""A paged KV cache: fixed-size pages in one pool per layer, a page table per sequence.

    cache = paged_cache.init(arch, num_pages=N, page_size=32, dtype=jnp.bfloat16)     # zeros
    cache = paged_cache.write_prompts(cache, k_LxBxTxKxD, v, dest_pages_BxQ)    # prefill
    cache = paged_cache.copy_pages(cache, src_C, dst_C)                          # copy-on-write
    k_l = paged_cache.write_token(cache.k[l], k_SxKxD, page_table_SxM, positions_S, live_S)

Device side (pure functions, jit-friendly, written in place by XLA): `PagedKVCache` holds one
`[Hkv, N, page, D]` array per layer for K and for V (the layout of JAX's TPU paged-attention
kernel). Separate per-layer buffers, not one `[L, ...]` array: a layer's pool goes to the
attention kernel as it is, where a slice of a stacked array would be copied first.
Page 0 is the *null page*: never handed out, it absorbs the writes of idle slots and padding rows,
and unused page-table entries point at it (never read: attention stops at a sequence's length).

Host side: `PagePool` hands out and takes back page indices (a free list with counts, so a leak or
a double free is caught where it happens).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxrl_entropy.models.config import Qwen3Config

NULL_PAGE = 0


@struct.dataclass
class PagedKVCache:
    """k, v: tuples of L arrays `[Hkv, N, page, D]`."""
    k: tuple
    v: tuple

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[1]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]

    @property
    def dtype(self):
        return self.k[0].dtype


def layer_shape(arch: Qwen3Config, num_pages: int, page_size: int) -> tuple[int, ...]:
    return (arch.num_key_value_heads, num_pages, page_size, arch.head_dim)


def abstract(arch: Qwen3Config, *, num_pages: int, page_size: int, dtype, sharding=None) -> PagedKVCache:
    """The cache as `jax.ShapeDtypeStruct`s (ahead-of-time compilation)."""
    leaf = jax.ShapeDtypeStruct(layer_shape(arch, num_pages, page_size), jnp.dtype(dtype), sharding=sharding)
    L = arch.num_hidden_layers
    return PagedKVCache(tuple([leaf] * L), tuple([leaf] * L))


def init_fn(arch: Qwen3Config, *, num_pages: int, page_size: int, dtype, sharding=None):
    """A jitted `() -> PagedKVCache` making a zeroed pool (zeros, not garbage: a partly written
    page is read under a mask, and 0·NaN would still poison p @ v)."""
    shape, L = layer_shape(arch, num_pages, page_size), arch.num_hidden_layers
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(L))
    out = None if sharding is None else PagedKVCache((sharding,) * L, (sharding,) * L)
    return jax.jit(lambda: PagedKVCache(zeros(), zeros()), out_shardings=out)


def init(arch: Qwen3Config, *, num_pages: int, page_size: int, dtype, sharding=None) -> PagedKVCache:
    """A zeroed pool (see `init_fn`)."""
    return init_fn(arch, num_pages=num_pages, page_size=page_size, dtype=dtype, sharding=sharding)()


def bytes_per_token(arch: Qwen3Config, dtype) -> int:
    """K and V of one token over all layers (the whole model, before any sharding)."""
    return 2 * arch.num_hidden_layers * arch.num_key_value_heads * arch.head_dim * jnp.dtype(dtype).itemsize


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


# ---------------------------------------------------------------------------------- device side
def write_token(pages_KxNxPxD: jax.Array, new_SxKxD: jax.Array, page_table_SxM: jax.Array,
                positions_S: jax.Array, live_S: jax.Array) -> jax.Array:
    """Write one token per sequence at its position (`page_table[s, pos // page]`, slot
    `pos % page`); rows that are not live write into the null page.

    Whole pages are read, merged and written back (`[Hkv, S, page, D]`), not single tokens: a
    token-sized scatter into the `(page, D)`-tiled pool makes XLA's TPU layout assignment keep
    the decode loop's pool in another layout, i.e. a full copy of the pool converted on the way
    in and out (compiled for a v5p: temporaries = the pool; with whole pages: none). A page is
    only ever written by the one sequence that owns it (shared prompt pages are read-only, idle
    rows write the null page), so the merge cannot lose another row's token.
    """
    page = pages_KxNxPxD.shape[2]
    block = jnp.clip(positions_S // page, 0, page_table_SxM.shape[1] - 1)
    dest_S = jnp.where(live_S, jnp.take_along_axis(page_table_SxM, block[:, None], axis=1)[:, 0], NULL_PAGE)
    hit_SxP = jnp.arange(page)[None, :] == jnp.where(live_S, positions_S % page, 0)[:, None]
    old_KxSxPxD = pages_KxNxPxD[:, dest_S]
    new_KxSx1xD = jnp.swapaxes(new_SxKxD, 0, 1)[:, :, None, :].astype(pages_KxNxPxD.dtype)
    merged_KxSxPxD = jnp.where(hit_SxP[None, :, :, None], new_KxSx1xD, old_KxSxPxD)
    return pages_KxNxPxD.at[:, dest_S].set(merged_KxSxPxD, mode="promise_in_bounds")


def write_prompts(cache: PagedKVCache, k_layers, v_layers, dest_pages_BxQ: jax.Array) -> PagedKVCache:
    """Scatter prefilled keys/values (per layer `[B, T, Hkv, D]`, T = Q · page) into whole pages:
    block q of row b goes to page `dest_pages[b, q]` (the null page for blocks nobody reads)."""
    B, T, K, D = k_layers[0].shape
    page = cache.page_size
    Q = dest_pages_BxQ.shape[1]
    if T != Q * page:
        raise ValueError(f"prefill length {T} must be {Q} pages of {page}")

    def put(pages_KxNxPxD, x_BxTxKxD):  # block q of row b -> page dest[b, q]
        x = jnp.transpose(x_BxTxKxD.reshape(B, Q, page, K, D), (3, 0, 1, 2, 4)).astype(pages_KxNxPxD.dtype)
        return pages_KxNxPxD.at[:, dest_pages_BxQ].set(x, mode="promise_in_bounds")

    return PagedKVCache(tuple(map(put, cache.k, k_layers)), tuple(map(put, cache.v, v_layers)))


def copy_pages(cache: PagedKVCache, src_C: jax.Array, dst_C: jax.Array) -> PagedKVCache:
    """Copy page `src[c]` to page `dst[c]` in every layer (null → null is a no-op entry)."""
    copy = lambda c: c.at[:, dst_C].set(c[:, src_C], mode="promise_in_bounds")
    return PagedKVCache(tuple(map(copy, cache.k)), tuple(map(copy, cache.v)))


# ---------------------------------------------------------------------------------- host side
class PoolExhausted(RuntimeError):
    """Not enough free pages (the scheduler preempts, or reports a request that can never fit)."""


class PagePool:
    """Free list of page indices 1 .. N − 1 (page 0 is the null page)."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (one is the null page), got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low indices first
        self._used = np.zeros(num_pages, bool)

    @property
    def capacity(self) -> int:
        """Pages that can ever be handed out (all but the null page)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise PoolExhausted(f"asked for {n} pages, {len(self._free)} free of {self.capacity}")
        out = [self._free.pop() for _ in range(n)]
        self._used[out] = True
        return out

    def free(self, pages) -> None:
        for p in pages:
            if p == NULL_PAGE or not self._used[p]:
                raise ValueError(f"page {p} freed twice or never allocated")
            self._used[p] = False
            self._free.append(p)


def num_pages_for_budget(budget_bytes: float, arch: Qwen3Config, dtype, page_size: int, shards: int = 1) -> int:
    """Pages whose K/V fit in `budget_bytes` per device when heads are split over `shards` devices."""
    per_page = bytes_per_token(arch, dtype) * page_size / shards
    return int(math.floor(budget_bytes / per_page))
