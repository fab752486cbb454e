"""Attention as the model calls it: one dispatch point over the implementations.

Plain layers only need the output; probe layers also need the per-head row entropy `[B, T, Hq]`
and the head-mixture entropy `[B, T]` (docs/design-notes.md, §3), and optionally the probabilities.

Implementations (`impl`):
  "xla"     materialised probabilities (`kernels.reference_attention`): exact, O(T²) memory; the
            oracle, and the fastest choice on CPU for short sequences.
  "kernel"  (alias "pallas", the name in docs/design-notes.md) the fused flash kernel (`kernels.entropy_attention` / `kernels.flash_attention`) plus the
            blockwise head-mixture pass; O(T) memory. `kernel_backend` picks its shell
            (None = by platform; "xla" = blockwise XLA, "tpu", "gpu", "interpret_*").
  "splash"  plain layers only: JAX's TPU splash attention (block-sparse causal flash, GQA, segment
            ids); `kernel_backend="interpret_tpu"` runs it in Pallas interpret mode (CPU tests).
  "cudnn"   plain layers only: `jax.nn.dot_product_attention(implementation="cudnn")` on GPUs, causal
            with per-row sequence lengths (never a [B, 1, T, T] mask). cuDNN takes right-padded rows,
            so each row is rotated to start at its first token and back; this needs one contiguous
            run of tokens per row (padding masks, as the RL step uses; not packed segments).
  "auto"    plain layers only: the platform's strongest: splash on TPU, cuDNN on GPU, else "kernel".
  "blockwise" plain layers only: the kernels' blockwise pure-XLA flash forward, differentiated by
            JAX itself (no custom VJP), so forward mode (`jax.jvp`) works through it with O(T)
            memory; reverse mode does not (its loops have data-dependent length). For JVPs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxrl_entropy import kernels
from jaxrl_entropy.kernels.reference import NEG_INF

from jax.sharding import PartitionSpec as P

KERNEL_IMPLS = ("kernel", "pallas")  # one implementation, two names
PLAIN_IMPLS = ("xla", *KERNEL_IMPLS, "splash", "cudnn", "blockwise", "auto")
PROBE_IMPLS = ("xla", *KERNEL_IMPLS)


@struct.dataclass
class ProbeResult:
    """A pytree (it leaves `jax.checkpoint` when the layer is rematerialised)."""
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


def resolve_plain(impl: str, kernel_backend: str | None) -> str:
    """"auto" → the platform's strongest plain attention (`kernel_backend` names the platform)."""
    if impl != "auto":
        return impl
    backend = kernels.resolve_backend(kernel_backend)
    return {"tpu": "splash", "interpret_tpu": "splash", "gpu": "cudnn"}.get(backend, "kernel")


SPLASH_BLOCK = 512  # query/key block of splash attention (MaxText's default); smaller T uses T


def splash_attention(q, k, v, segment_ids, *, sm_scale: float, interpret: bool = False):
    """Causal attention `[B, T, Hq, D]` by JAX's TPU splash kernel (one device's shard).

    Splash masks by segment equality, so padding (segment 0) rows attend to padding; they are
    zeroed like every other path's. T must be a multiple of 128 (Mosaic's tile)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    B, T, H, D = q.shape
    if T % 128:
        raise ValueError(f"splash attention needs a sequence length that is a multiple of 128, got {T}; "
                         "use model.attention='kernel' (it pads) or pad the batch")
    blk = min(SPLASH_BLOCK, T) if T % min(SPLASH_BLOCK, T) == 0 else 128
    sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    mask = sa.MultiHeadMask([sa.CausalMask((T, T)) for _ in range(H)])
    kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)                     # [B, T, H, D] -> [B, H, T, D]
    qh = heads_first((q.astype(jnp.float32) * sm_scale).astype(q.dtype))  # splash takes no scale
    seg = segment_ids if segment_ids is not None else jnp.ones((B, T), jnp.int32)
    seg = seg.astype(jnp.int32)
    out = jax.vmap(lambda q_, k_, v_, s_: kernel(q_, k_, v_, segment_ids=sa.SegmentIds(q=s_, kv=s_)))(
        qh, heads_first(k), heads_first(v), seg)
    out = jnp.swapaxes(out, 1, 2).astype(q.dtype)
    return jnp.where((seg != 0)[:, :, None, None], out, 0) if segment_ids is not None else out


def cudnn_attention(q, k, v, segment_ids, *, sm_scale: float, implementation: str = "cudnn"):
    """Causal attention `[B, T, Hq, D]` through `jax.nn.dot_product_attention` with `is_causal` and
    sequence lengths (cuDNN's fused kernel; `implementation="xla"` runs the same maths anywhere).

    Rows are rotated left by their leading padding so each starts at its first token (cuDNN
    expects right padding), then rotated back; padding rows come out as 0. Needs each row's tokens
    (segment ≠ 0) to form one contiguous run."""
    B, T = q.shape[:2]
    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=True, implementation=implementation)
    valid = segment_ids != 0
    lengths = jnp.sum(valid, axis=1).astype(jnp.int32)
    start = jnp.argmax(valid, axis=1).astype(jnp.int32)                     # leading padding per row
    idx = (jnp.arange(T)[None, :] + start[:, None]) % T
    rot = lambda x, i: jnp.take_along_axis(x, i[:, :, None, None], axis=1)
    out = jax.nn.dot_product_attention(rot(q, idx), rot(k, idx), rot(v, idx), scale=sm_scale, is_causal=True,
                                       query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                       implementation=implementation)
    back = (jnp.arange(T)[None, :] - start[:, None]) % T
    return jnp.where(valid[:, :, None, None], rot(out, back), 0).astype(q.dtype)


def plain_attention(q, k, v, segment_ids, *, impl: str, kernel_backend: str | None, sm_scale: float,
                    mesh=None):
    """Output `[B, T, Hq, D]` of causal self-attention with segment/padding masking."""
    impl = resolve_plain(impl, kernel_backend)
    if impl == "xla":
        out, _ = kernels.reference_attention(q, k, v, causal=True, segment_ids=segment_ids, sm_scale=sm_scale)
        return out
    if impl in KERNEL_IMPLS:
        fn = lambda q_, k_, v_, s_: kernels.flash_attention(q_, k_, v_, causal=True, segment_ids=s_,
                                                              sm_scale=sm_scale, backend=kernel_backend)
        return _on_mesh(fn, mesh, (q, k, v, segment_ids), heads_split=True, n_head_outputs=1)
    if impl == "blockwise":
        from jaxrl_entropy.kernels import flash_xla
        out, _, _ = flash_xla.forward(q, k, v, segment_ids, causal=True, sm_scale=sm_scale, entropy=False)
        return out
    if impl == "splash":
        interpret = kernels.resolve_backend(kernel_backend) != "tpu"
        fn = lambda q_, k_, v_, s_: splash_attention(q_, k_, v_, s_, sm_scale=sm_scale, interpret=interpret)
        return _on_mesh(fn, mesh, (q, k, v, segment_ids), heads_split=True, n_head_outputs=1)
    if impl == "cudnn":
        fn = lambda q_, k_, v_, s_: cudnn_attention(q_, k_, v_, s_, sm_scale=sm_scale)
        return _on_mesh(fn, mesh, (q, k, v, segment_ids), heads_split=True, n_head_outputs=1)
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
