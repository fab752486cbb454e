"""Decode attention over a paged KV cache: one new query per sequence, keys and values read only
from that sequence's own pages, up to its length.

    out = paged_attention(q_SxHxD, k_pages, v_pages, lengths_S, page_table_SxM, sm_scale=D ** -0.5)

Layout (the one JAX's TPU kernel reads): `k_pages`, `v_pages` `[Hkv, N, page, D]`; page
`page_table[s, i]` holds key positions `i·page .. (i+1)·page − 1` of sequence s; keys at positions
`>= lengths[s]` are invisible. Shells (`backend`):

  "tpu"            `jax.experimental.pallas.ops.tpu.paged_attention` (Mosaic; DMAs only live pages).
  "interpret_tpu"  the same kernel in Pallas' TPU interpret mode (CPU tests).
  "xla"            blocked XLA: a while loop over blocks of `pages_per_block` pages, up to the
                   longest sequence of the batch, each block gathered through the page table and
                   folded in with `kernels.block_update`'s online softmax (no entropy in decode).
                   The CPU and GPU path.
  None             "tpu" on a TPU, "xla" elsewhere.

A sequence with length 0 gets output 0 (the shells agree on that); callers pass length >= 1 for
rows they read.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax import lax

from jaxrl_entropy.kernels import block_update as bu
from jaxrl_entropy.kernels import tiling

BACKENDS = ("tpu", "interpret_tpu", "xla")
DEFAULT_BLOCK_KEYS = 512  # keys per XLA block (rounded to whole pages)


def resolve_paged_backend(backend: str | None) -> str:
    if backend is None:
        return "tpu" if jax.default_backend() == "tpu" else "xla"
    if backend not in BACKENDS:
        raise ValueError(f"unknown paged-attention backend {backend!r}; choose one of {BACKENDS} or None (auto)")
    return backend


def tpu_kernel_available() -> bool:
    """Whether the installed jax ships the TPU paged-attention kernel (jax >= 0.4.2x does)."""
    try:
        from jax.experimental.pallas.ops.tpu import paged_attention as _  # noqa: F401
    except ImportError:
        return False
    return True


def _validate(q, k_pages, v_pages, lengths, page_table):
    if q.ndim != 3:
        raise ValueError(f"q must be [S, Hq, D], got shape {q.shape}")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages and v_pages must both be [Hkv, N, page, D]; got {k_pages.shape}, {v_pages.shape}")
    S, Hq, D = q.shape
    Hkv = k_pages.shape[0]
    if k_pages.shape[3] != D:
        raise ValueError(f"head_dim of q ({D}) and of the pages ({k_pages.shape[3]}) differ")
    if Hq % Hkv:
        raise ValueError(f"query heads Hq={Hq} must be a multiple of key/value heads Hkv={Hkv}")
    if lengths.shape != (S,) or page_table.ndim != 2 or page_table.shape[0] != S:
        raise ValueError(f"lengths must be [S] and page_table [S, M] with S={S}; got {lengths.shape}, "
                         f"{page_table.shape}")


def paged_attention(q_SxHxD: jax.Array, k_pages: jax.Array, v_pages: jax.Array, lengths_S: jax.Array,
                    page_table_SxM: jax.Array, *, sm_scale: float, backend: str | None = None,
                    pages_per_block: int | None = None, megacore_mode: str | None = None) -> jax.Array:
    """Attention of one query per sequence over its pages.

    Args:
      q_SxHxD: `[S, Hq, D]` queries (any float dtype).
      k_pages, v_pages: `[Hkv, N, page, D]` the page pool of one layer; Hq a multiple of Hkv
        (query head h reads K/V head h // (Hq // Hkv)).
      lengths_S: `[S]` int32 visible keys per sequence (positions 0 .. length − 1).
      page_table_SxM: `[S, M]` int32 page of each block of `page` positions; entries past a
        sequence's length are never read (any valid page index).
      sm_scale: logit scale.
      backend: see the module docstring.
      pages_per_block: pages per compute block (TPU kernel; XLA block). None = a default.
      megacore_mode: TPU kernel only: None, "batch" or "kv_head" (v4/v5p megacore chips).

    Returns:
      `[S, Hq, D]` in q's dtype.
    """
    _validate(q_SxHxD, k_pages, v_pages, lengths_S, page_table_SxM)
    backend = resolve_paged_backend(backend)
    lengths_S = lengths_S.astype(jnp.int32)
    page_table_SxM = page_table_SxM.astype(jnp.int32)
    page = k_pages.shape[2]
    M = page_table_SxM.shape[1]
    if backend == "xla":
        ppb = pages_per_block or max(1, DEFAULT_BLOCK_KEYS // page)
        return _xla(q_SxHxD, k_pages, v_pages, lengths_S, page_table_SxM, sm_scale=sm_scale,
                    pages_per_block=min(ppb, M))
    return _tpu(q_SxHxD, k_pages, v_pages, lengths_S, page_table_SxM, sm_scale=sm_scale,
                pages_per_block=pages_per_block, megacore_mode=megacore_mode,
                interpret=backend == "interpret_tpu")


def _xla(q, k_pages, v_pages, lengths, page_table, *, sm_scale: float, pages_per_block: int):
    S, Hq, D = q.shape
    Hkv, _, page, _ = k_pages.shape
    G = Hq // Hkv
    ppb = pages_per_block
    M = page_table.shape[1]
    n_blocks = -(-M // ppb)
    table = tiling.pad_axis(page_table, 1, n_blocks * ppb)      # padding points at page 0: never visible
    bk = ppb * page
    q_SxKxGxD = (q.astype(jnp.float32) * sm_scale).reshape(S, Hkv, G, D)
    precision = bu.matmul_precision(k_pages.dtype)
    if k_pages.dtype != jnp.float32:
        q_SxKxGxD = q_SxKxGxD.astype(k_pages.dtype)

    def body(b, state):
        idx_SxP = lax.dynamic_slice_in_dim(table, b * ppb, ppb, axis=1)
        k_blk = k_pages[:, idx_SxP].reshape(Hkv, S, bk, D)           # [Hkv, S, bk, D]
        v_blk = jnp.swapaxes(v_pages[:, idx_SxP].reshape(Hkv, S, bk, D), 0, 1)   # [S, Hkv, bk, D]
        s = jnp.einsum("skgd,kstd->skgt", q_SxKxGxD, k_blk, preferred_element_type=jnp.float32,
                       precision=precision)
        pos = b * bk + jnp.arange(bk, dtype=jnp.int32)
        mask = (pos[None, :] < lengths[:, None])[:, None, None, :]  # [S, 1, 1, bk]
        mask = jnp.broadcast_to(mask, s.shape)
        return bu.online_softmax_step(state, s, mask, v_blk, precision=precision)

    # only the blocks some sequence reaches: the loop runs to the longest live sequence
    live = jnp.minimum(-(-jnp.max(lengths) // bk), n_blocks)
    state = lax.fori_loop(0, live, body, bu.init_state((S, Hkv, G), 1, D, entropy=False))
    out, _, _ = bu.finalize(state)
    return out.reshape(S, Hq, D).astype(q.dtype)


def _tpu(q, k_pages, v_pages, lengths, page_table, *, sm_scale: float, pages_per_block: int | None,
         megacore_mode: str | None, interpret: bool):
    if not tpu_kernel_available():
        raise ValueError("this jax has no jax.experimental.pallas.ops.tpu.paged_attention; use backend='xla'")
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_paged

    M = page_table.shape[1]
    ppb = min(pages_per_block or max(1, DEFAULT_BLOCK_KEYS // k_pages.shape[2]), M)
    if M % ppb:  # the kernel needs whole compute blocks; extra entries point at page 0 (never read)
        page_table = tiling.pad_axis(page_table, 1, -(-M // ppb) * ppb)
    # the kernel applies no logit scale; scaling q in f32 first keeps bf16 rounding where XLA's is
    qs = (q.astype(jnp.float32) * sm_scale).astype(q.dtype)
    # zero-length rows are skipped by the kernel and their output left unwritten: give them one
    # key and zero the result below
    safe = jnp.maximum(lengths, 1)
    ctx = _interpret_ctx() if interpret else contextlib.nullcontext()
    with ctx:
        out = tpu_paged(qs, k_pages, v_pages, safe, page_table, pages_per_compute_block=ppb,
                        megacore_mode=megacore_mode)
    return jnp.where((lengths > 0)[:, None, None], out, 0).astype(q.dtype)


def _interpret_ctx():
    from jax.experimental.pallas import tpu as pltpu
    if not hasattr(pltpu, "force_tpu_interpret_mode"):
        raise ValueError("this jax has no pltpu.force_tpu_interpret_mode; the interpret_tpu backend needs it")
    return pltpu.force_tpu_interpret_mode()
