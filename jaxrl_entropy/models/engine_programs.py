"""The rollout engine's compiled programs: prefill of prompts into their pages, and a chunk of
decode steps for all slots (paged attention, sampling, the KV write in place)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxrl_entropy.kernels.paged_attention as paged_attn
from jaxrl_entropy.models import paged_cache
from jaxrl_entropy.models.engine_spec import EngineSpec
from jaxrl_entropy.models.paged_cache import PagedKVCache
from jaxrl_entropy.models.sampler import SamplingParams, filter_logits, sample_token


def _kv_spec(mesh) -> P:
    return P("tensor", None, None, None) if mesh.shape.get("tensor", 1) > 1 else P()


def prefill_program(graphdef, params, cache: PagedKVCache, ids_BxT, segment_ids_BxT, dest_BxQ) -> PagedKVCache:
    """Prefill right-padded prompts (`segment_ids` 1 = token, 0 = padding) into their pages."""
    model = nnx.merge(graphdef, params)
    k_layers, v_layers = model.prefill_kv(ids_BxT, segment_ids_BxT)
    return paged_cache.write_prompts(cache, k_layers, v_layers, dest_BxQ)


def decode_program(graphdef, spec: EngineSpec, sp: SamplingParams, mesh, params, cache: PagedKVCache,
                   tokens_S, positions_S, steps_S, live_S, keys_S, table_SxM, copy_src_S, copy_dst_S):
    """Up to `spec.decode_chunk` decode steps for every slot.

    Inputs per slot: the current token and its position, response tokens generated so far,
    live flag, the request's key, its page table; `copy_src → copy_dst` page copies run first
    (the prompt's partial page into a new sample's first page).
    Returns (cache, tokens `[S, C]`, log-probs `[S, C]`, behaviour log-probs `[S, C]` (see
    `sampler.SampleOutput`), steps `[S]`, live `[S]`): a slot emitted
    `steps_out − steps_in` tokens; live False = finished (EOS or max_new_tokens) or idle.
    """
    model = nnx.merge(graphdef, params)
    cache = paged_cache.copy_pages(cache, copy_src_S, copy_dst_S)
    S, C, N = tokens_S.shape[0], spec.decode_chunk, sp.max_new_tokens
    eos = jnp.asarray(sp.eos_ids or (-1,), jnp.int32)
    head = model.head_kernel_DxV().astype(model.options.dtype)
    sm_scale = model.config.head_dim ** -0.5
    attend_fn = _attention_fn(spec, mesh, sm_scale)
    filter_fn = _filter_fn(sp, mesh, head.shape[-1])

    def step(carry):
        c, cache, tok, pos, stp, live, out_t, out_lp, out_blp = carry

        def attend(i, q, k, v, cache):
            kp = paged_cache.write_token(cache.k[i], k, table_SxM, pos, live)
            vp = paged_cache.write_token(cache.v[i], v, table_SxM, pos, live)
            out = attend_fn(q, kp, vp, jnp.where(live, pos + 1, 0), table_SxM)
            ks, vs = list(cache.k), list(cache.v)
            ks[i], vs[i] = kp, vp
            return out, PagedKVCache(tuple(ks), tuple(vs))

        hidden, cache = model.decode_paged(tok, pos, attend, cache)
        # f32 accumulation as in the training forward's `token_logprobs`
        logits = jnp.dot(hidden.astype(head.dtype), head, preferred_element_type=jnp.float32)
        row_keys = jax.vmap(jax.random.fold_in)(keys_S, stp)
        new, lp, blp = sample_token(logits, row_keys, sp, per_row=True, filter_fn=filter_fn)
        new = jnp.where(live, new, sp.pad_id)
        out_t = out_t.at[:, c].set(new)
        out_lp = out_lp.at[:, c].set(jnp.where(live, lp, 0.0))
        out_blp = out_blp.at[:, c].set(jnp.where(live, blp, 0.0))
        stp_next = stp + live
        done = live & (jnp.isin(new, eos) | (stp_next >= N))
        return (c + 1, cache, jnp.where(live, new, tok), pos + live, stp_next, live & ~done, out_t, out_lp, out_blp)

    init = (jnp.zeros((), jnp.int32), cache, tokens_S, positions_S, steps_S, live_S,
            jnp.full((S, C), sp.pad_id, jnp.int32), jnp.zeros((S, C), jnp.float32), jnp.zeros((S, C), jnp.float32))
    _, cache, _, _, stp, live, out_t, out_lp, out_blp = jax.lax.while_loop(
        lambda carry: (carry[0] < C) & jnp.any(carry[5]), step, init)
    return cache, out_t, out_lp, out_blp, stp, live


def _filter_fn(sp: SamplingParams, mesh, vocab: int) -> Callable | None:
    """Top-k / top-p under tensor parallelism: per vocabulary shard (`shard_map`), so that no device
    sorts or gathers a split vocabulary (a distributed sort: hundreds of GB of collectives per call
    at Qwen3's 151,936 tokens); None (the plain filter) otherwise."""
    n = mesh.shape.get("tensor", 1)
    if n == 1 or vocab % n or not (sp.top_p < 1.0 or sp.top_k > 0):
        return None
    rows_vocab = P(None, "tensor")
    return jax.shard_map(lambda x: filter_logits(x, top_k=sp.top_k, top_p=sp.top_p, axis_name="tensor"),
                         mesh=mesh, in_specs=(rows_vocab,), out_specs=rows_vocab, check_vma=False)


def _attention_fn(spec: EngineSpec, mesh, sm_scale: float) -> Callable:
    """Paged decode attention; under tensor parallelism it runs per head shard (`shard_map`:
    XLA cannot partition a Pallas call, and heads never mix)."""
    def attend(q, kp, vp, lengths, table):
        return paged_attn.paged_attention(q, kp, vp, lengths, table, sm_scale=sm_scale,
                                          backend=spec.attention_backend, megacore_mode=spec.megacore_mode)

    if mesh.shape.get("tensor", 1) == 1:
        return attend
    heads = P(None, "tensor", None)
    return jax.shard_map(attend, mesh=mesh, in_specs=(heads, _kv_spec(mesh), _kv_spec(mesh), P(), P()),
                         out_specs=heads, check_vma=False)
