"""Attention as the model calls it: one dispatch point over the implementations.

Plain layers only need the output; probe layers also need the per-head row entropy `[B, T, Hq]`
and the head-mixture entropy `[B, T]` (DESIGN.md §3), and optionally the probabilities.

Implementations (`impl`):
  "xla"     materialised probabilities (`kernels.reference_attention`): exact, O(T²) memory; the
            oracle, and the fastest choice on CPU for short sequences.
  "kernel"  (alias "pallas", DESIGN.md's name) the fused flash kernel (`kernels.entropy_attention` / `kernels.flash_attention`) plus the
            blockwise head-mixture pass; O(T) memory. `kernel_backend` picks its shell
            (None = by platform; "xla" = blockwise XLA, "tpu", "gpu", "interpret_*").
  "cudnn"   plain layers only: `jax.nn.dot_product_attention(implementation="cudnn")` on GPUs.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import kernels
from kernels.reference import NEG_INF

from jax.sharding import PartitionSpec as P

KERNEL_IMPLS = ("kernel", "pallas")  # one implementation, two names
PLAIN_IMPLS = ("xla", *KERNEL_IMPLS, "cudnn")
PROBE_IMPLS = ("xla", *KERNEL_IMPLS)


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    out_BxTxHxD: jax.Array
    entropy_BxTxH: jax.Array
    mixture_BxT: jax.Array | None
    probs_BxHxTxS: jax.Array | None


def _on_mesh(fn, mesh, args, *, heads_split: bool, n_head_outputs: int, n_row_outputs: int = 0):
    """Run a Pallas kernel per shard: XLA cannot partition a `pallas_call`, so under a mesh the
    kernel runs inside `shard_map` on its batch shard (and head shard when `heads_split`)."""
    if mesh is None or mesh.size == 1:
        return fn(*args)
    from jaxrl_entropy import parallel

    batch = parallel.LOGICAL_RULES["batch"]
    q = args[0]
    tensor = mesh.shape.get("tensor", 1)
    split = heads_split and tensor > 1 and q.shape[2] % tensor == 0 and args[1].shape[2] % tensor == 0
    heads = "tensor" if split else None
    specs = [P(batch, None, heads, None), P(batch, None, heads, None)]
    if len(args) > 2 and args[2] is not None and args[2].ndim == 4:
        specs.append(P(batch, None, heads, None))
    rest = args[len(specs):]
    specs += [None if a is None else P(batch, *([None] * (a.ndim - 1))) if a.ndim == 2 else
              P(batch, None, heads) for a in rest]
    out_specs = tuple([P(batch, None, heads, None)] * (n_head_outputs > 0) +
                      [P(batch, None, heads)] * max(n_head_outputs - 1, 0) +
                      [P(batch, None)] * n_row_outputs)
    out_specs = out_specs[0] if len(out_specs) == 1 else out_specs
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(specs), out_specs=out_specs, check_vma=False)(*args)


def plain_attention(q, k, v, segment_ids, *, impl: str, kernel_backend: str | None, sm_scale: float,
                    mesh=None):
    """Output `[B, T, Hq, D]` of causal self-attention with segment/padding masking."""
    if impl == "xla":
        out, _ = kernels.reference_attention(q, k, v, causal=True, segment_ids=segment_ids, sm_scale=sm_scale)
        return out
    if impl in KERNEL_IMPLS:
        fn = lambda q_, k_, v_, s_: kernels.flash_attention(q_, k_, v_, causal=True, segment_ids=s_,
                                                              sm_scale=sm_scale, backend=kernel_backend)
        return _on_mesh(fn, mesh, (q, k, v, segment_ids), heads_split=True, n_head_outputs=1)
    if impl == "cudnn":
        B, T = q.shape[:2]
        mask = kernels.visible_mask(B, T, T, causal=True, segment_ids=segment_ids)[:, None]
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=sm_scale, implementation="cudnn")
        # Rows with no visible key (padding) are undefined in cuDNN; make them 0 like the others.
        if segment_ids is not None:
            out = jnp.where((segment_ids != 0)[:, :, None, None], out, 0)
        return out
    raise ValueError(f"unknown attention impl {impl!r}; choose one of {PLAIN_IMPLS}")


def probe_attention(q, k, v, segment_ids, *, impl: str, kernel_backend: str | None, sm_scale: float,
                    mixture: bool = True, return_probs: bool = False, mesh=None) -> ProbeResult:
    """Attention of a probe layer, with the entropies the token weights read."""
    if impl == "xla":
        out, ent, probs = kernels.reference_attention(
            q, k, v, causal=True, segment_ids=segment_ids, sm_scale=sm_scale, return_probs=True)
        mix = kernels.mixture_entropy_from_probs(probs) if mixture else None
        return ProbeResult(out, jax.lax.stop_gradient(ent),
                           None if mix is None else jax.lax.stop_gradient(mix),
                           jax.lax.stop_gradient(probs) if return_probs else None)
    if impl in KERNEL_IMPLS:
        fwd = lambda q_, k_, v_, s_: kernels.entropy_attention(
            q_, k_, v_, causal=True, segment_ids=s_, sm_scale=sm_scale, backend=kernel_backend, return_lse=True)
        out, ent, lse = _on_mesh(fwd, mesh, (q, k, v, segment_ids), heads_split=True, n_head_outputs=3)
        mix = probs = None
        if mixture:  # needs every head of a row: batch-sharded only
            mix_fn = lambda q_, k_, s_, l_: kernels.head_mixture_entropy(
                q_, k_, causal=True, segment_ids=s_, sm_scale=sm_scale, lse=l_, backend=kernel_backend)
            mix = _on_mesh(mix_fn, mesh, (q, k, segment_ids, lse), heads_split=False, n_head_outputs=0,
                           n_row_outputs=1)
        if return_probs:  # [B, Hq, T, S]: batch-sharded like q's leading dim
            probs_fn = lambda q_, k_, s_, l_: kernels.attention_probs(
                q_, k_, causal=True, segment_ids=s_, sm_scale=sm_scale, lse=l_, backend=kernel_backend)
            probs = _on_mesh(probs_fn, mesh, (q, k, segment_ids, lse), heads_split=False, n_head_outputs=1)
        return ProbeResult(out, ent, mix, probs)
    raise ValueError(f"unknown probe attention impl {impl!r}; choose one of {PROBE_IMPLS}")


def cached_attention(q_BxTxHxD, k_cache_BxSxKxD, v_cache_BxSxKxD, mask_BxTxS, *, sm_scale: float):
    """Attention of new queries over a KV cache (decode); `mask_BxTxS` says which slots are visible."""
    B, T, Hq, D = q_BxTxHxD.shape
    Hkv = k_cache_BxSxKxD.shape[2]
    q = q_BxTxHxD.reshape(B, T, Hkv, Hq // Hkv, D)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k_cache_BxSxKxD, preferred_element_type=jnp.float32) * sm_scale
    s = jnp.where(mask_BxTxS[:, None, None], s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask_BxTxS[:, None, None], p, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v_cache_BxSxKxD.dtype), v_cache_BxSxKxD,
                     preferred_element_type=jnp.float32)
    return out.reshape(B, T, Hq, D).astype(q_BxTxHxD.dtype)
