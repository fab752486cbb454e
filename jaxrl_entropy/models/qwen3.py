"""Qwen3 (HF `Qwen3ForCausalLM`) in Flax NNX, with attention entropy read at probe layers.

    from jaxrl_entropy.models import qwen3
    model = qwen3.from_pretrained(hf_dir, dtype=jnp.float32)
    out = model(input_ids, attention_mask=mask, probe_layers=(20,))
    out.logits                 # [B, T, V]
    out.entropy[20]            # [B, T, Hq] float32: per-head attention row entropy (nats)
    out.mixture_entropy[20]    # [B, T] float32: entropy of the head-averaged attention
    qwen3.save_pretrained(model, out_dir)

Parameter names mirror the HF module tree (`layers[i].self_attn.q_proj.kernel` is
`model.layers.{i}.self_attn.q_proj.weight`, transposed), so import/export is a name map.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxrl_entropy import parallel
from jaxrl_entropy.models import attention as attn_lib
from jaxrl_entropy.models import hf_io
from jaxrl_entropy.models.config import CheckpointError, Qwen3Config, read_hf_config

__all__ = [
    "Qwen3Config", "RuntimeOptions", "Qwen3", "Qwen3Output", "KVCache", "CheckpointError",
    "from_pretrained", "save_pretrained", "init_random", "positions_from_segments",
    "resolve_probe_layers", "merge_for_compute",
]


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How the model computes, as opposed to what it is (`Qwen3Config`).

    dtype: compute dtype (activations, matmuls); param_dtype: storage dtype of the weights.
    attention: implementation of the plain layers ("xla", "kernel" (alias "pallas"), "cudnn").
    probe_attention: implementation of the probe layers ("xla", "kernel" (alias "pallas")).
    kernel_backend: shell of the Pallas kernels (None = by platform, or "xla", "tpu", "gpu", ...).
    logits_chunk: sequence chunk for `token_logprobs` (never materialises [B, T, V] in f32).
    remat: rematerialise each decoder layer in the backward pass (memory for long sequences): only
      each layer's input is kept for the backward pass, everything inside is recomputed.
    kernel_mesh: the device mesh. Pallas kernels then run per shard inside `shard_map`, and
      activations are constrained to the layout of `parallel.LOGICAL_RULES` (rows over data × fsdp).
    """
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    probe_attention: str = "xla"
    kernel_backend: str | None = None
    logits_chunk: int = 1024
    remat: bool = False
    kernel_mesh: object = None

    def __post_init__(self):
        if self.attention not in attn_lib.PLAIN_IMPLS:
            raise ValueError(f"attention={self.attention!r}; choose one of {attn_lib.PLAIN_IMPLS}")
        if self.probe_attention not in attn_lib.PROBE_IMPLS:
            raise ValueError(f"probe_attention={self.probe_attention!r}; choose one of {attn_lib.PROBE_IMPLS}")


@struct.dataclass
class Qwen3Output:
    """logits `[B, T, V]` (None when not asked for); hidden `[B, T, D]` after the final norm;
    per probe layer: entropy `[B, T, Hq]`, mixture_entropy `[B, T]`, probs `[B, Hq, T, T]`."""
    logits: jax.Array | None
    hidden: jax.Array
    entropy: dict
    mixture_entropy: dict
    probs: dict


@struct.dataclass
class KVCache:
    """Keys/values per layer `[L, B, S, Hkv, D]`, which slots hold a real token `[B, S]`, and the
    next free slot (the same for every row: prompts are left-padded)."""
    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array


def resolve_probe_layers(spec, num_layers: int) -> tuple[int, ...]:
    """Probe layers from ints (negative counts from the end) or depth fractions in [0, 1].

    A float f picks round(f · L) clipped to [0, L − 1]: 0.55 of Qwen3-8B's 36 layers is layer 20.
    """
    if spec is None:
        return ()
    items = spec if isinstance(spec, (list, tuple)) else (spec,)
    out = []
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"probe layer {item!r} must be an int index or a float depth fraction")
        if isinstance(item, float):
            if not 0.0 <= item <= 1.0:
                raise ValueError(f"probe layer fraction {item} must lie in [0, 1]")
            idx = min(num_layers - 1, max(0, int(round(item * num_layers))))
        elif isinstance(item, int):
            idx = item + num_layers if item < 0 else item
            if not 0 <= idx < num_layers:
                raise ValueError(f"probe layer {item} out of range for a model with {num_layers} layers")
        else:
            raise ValueError(f"probe layer {item!r} must be an int index or a float depth fraction")
        out.append(idx)
    return tuple(sorted(set(out)))


def positions_from_segments(segment_ids_BxT: jax.Array) -> jax.Array:
    """RoPE positions `[B, T]`: each contiguous run of a segment counts from 0; padding gets 0.

    Left padding `[0, 0, 1, 1, 1]` → `[0, 0, 0, 1, 2]`; packed `[1, 1, 2, 2]` → `[0, 1, 0, 1]`.
    """
    seg = segment_ids_BxT.astype(jnp.int32)
    B, T = seg.shape
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    starts = jnp.concatenate([jnp.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    run_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return jnp.where(seg != 0, idx - run_start, 0)


# ---------------------------------------------------------------------------- building blocks
def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return std * jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel `[in, out]` (HF stores the transpose)."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, opts: RuntimeOptions, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_normal(rngs, (d_in, d_out), opts.param_dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), opts.param_dtype)) if bias else None
        self.dtype = opts.dtype

    def __call__(self, x):
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """HF Qwen3RMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, *, eps: float, opts: RuntimeOptions):
        self.weight = nnx.Param(jnp.ones((dim,), opts.param_dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


def rope(x_BxTxHxD: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
    """Default RoPE (rotate-half layout, as HF); angles in float32, applied in x's dtype."""
    D = x_BxTxHxD.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
    ang_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    ang = jnp.concatenate([ang_BxTxF, ang_BxTxF], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(ang).astype(x_BxTxHxD.dtype), jnp.sin(ang).astype(x_BxTxHxD.dtype)
    x1, x2 = jnp.split(x_BxTxHxD, 2, axis=-1)
    return x_BxTxHxD * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen3Config, opts: RuntimeOptions, rngs: nnx.Rngs):
        H, K, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, H * D, bias=cfg.attention_bias, opts=opts, rngs=rngs)
        self.k_proj = Linear(cfg.hidden_size, K * D, bias=cfg.attention_bias, opts=opts, rngs=rngs)
        self.v_proj = Linear(cfg.hidden_size, K * D, bias=cfg.attention_bias, opts=opts, rngs=rngs)
        self.o_proj = Linear(H * D, cfg.hidden_size, bias=False, opts=opts, rngs=rngs)
        self.q_norm = RMSNorm(D, eps=cfg.rms_norm_eps, opts=opts)
        self.k_norm = RMSNorm(D, eps=cfg.rms_norm_eps, opts=opts)
        self.heads, self.kv_heads, self.head_dim = H, K, D
        self.theta = cfg.rope_theta
        self.opts = opts

    def _qkv(self, x_BxTxD, positions_BxT):
        B, T, _ = x_BxTxD.shape
        c = lambda a: parallel.constrain(a, ("batch", "act_seq", "act_heads", "act_kv"), self.opts.kernel_mesh)
        q = self.q_norm(c(self.q_proj(x_BxTxD).reshape(B, T, self.heads, self.head_dim)))
        k = self.k_norm(c(self.k_proj(x_BxTxD).reshape(B, T, self.kv_heads, self.head_dim)))
        v = c(self.v_proj(x_BxTxD).reshape(B, T, self.kv_heads, self.head_dim))
        return rope(q, positions_BxT, self.theta), rope(k, positions_BxT, self.theta), v

    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, *, probe: bool, mixture: bool,
                 return_probs: bool):
        B, T, _ = x_BxTxD.shape
        q, k, v = self._qkv(x_BxTxD, positions_BxT)
        scale = self.head_dim ** -0.5
        if probe:
            res = attn_lib.probe_attention(
                q, k, v, segment_ids_BxT, impl=self.opts.probe_attention,
                kernel_backend=self.opts.kernel_backend, sm_scale=scale, mixture=mixture,
                return_probs=return_probs, mesh=self.opts.kernel_mesh)
            out, extra = res.out_BxTxHxD, res
        else:
            out = attn_lib.plain_attention(q, k, v, segment_ids_BxT, impl=self.opts.attention,
                                           kernel_backend=self.opts.kernel_backend, sm_scale=scale,
                                           mesh=self.opts.kernel_mesh)
            extra = None
        return self.o_proj(out.reshape(B, T, self.heads * self.head_dim)), extra

    def decode(self, x_BxTxD, positions_BxT, k_cache, v_cache, index, mask_BxTxS):
        """New tokens attend over the cache; their keys/values are written at slot `index`."""
        B, T, _ = x_BxTxD.shape
        q, k, v = self._qkv(x_BxTxD, positions_BxT)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
        out = attn_lib.cached_attention(q, k_cache, v_cache, mask_BxTxS, sm_scale=self.head_dim ** -0.5)
        return self.o_proj(out.reshape(B, T, self.heads * self.head_dim)), k_cache, v_cache


class MLP(nnx.Module):
    def __init__(self, cfg: Qwen3Config, opts: RuntimeOptions, rngs: nnx.Rngs):
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, opts=opts, rngs=rngs)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, opts=opts, rngs=rngs)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, opts=opts, rngs=rngs)
        self.mesh = opts.kernel_mesh

    def __call__(self, x_BxTxD):
        c = lambda a: parallel.constrain(a, ("batch", "act_seq", "act_mlp"), self.mesh)
        return self.down_proj(c(jax.nn.silu(c(self.gate_proj(x_BxTxD))) * c(self.up_proj(x_BxTxD))))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen3Config, opts: RuntimeOptions, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, opts=opts)
        self.self_attn = Attention(cfg, opts, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, opts=opts)
        self.mlp = MLP(cfg, opts, rngs)
        self.mesh = opts.kernel_mesh

    def __call__(self, x, positions, segment_ids, *, probe=False, mixture=True, return_probs=False):
        c = lambda a: parallel.constrain(a, ("batch", "act_seq", "act_embed"), self.mesh)
        h, extra = self.self_attn(self.input_layernorm(x), positions, segment_ids, probe=probe,
                                  mixture=mixture, return_probs=return_probs)
        x = c(x + c(h))
        return c(x + c(self.mlp(self.post_attention_layernorm(x)))), extra

    def decode(self, x, positions, k_cache, v_cache, index, mask):
        h, k_cache, v_cache = self.self_attn.decode(self.input_layernorm(x), positions, k_cache, v_cache,
                                                    index, mask)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k_cache, v_cache

    def with_attention(self, x, attend):
        """The block with a caller's attention: `attend(normed x) -> (h, aux)` (paged inference)."""
        h, aux = attend(self.input_layernorm(x))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), aux


# ---------------------------------------------------------------------------- the model
class Qwen3(nnx.Module):
    def __init__(self, cfg: Qwen3Config, opts: RuntimeOptions = RuntimeOptions(), *, rngs: nnx.Rngs):
        self.config = cfg
        self.options = opts
        self.embed_tokens = nnx.Param(_normal(rngs, (cfg.vocab_size, cfg.hidden_size), opts.param_dtype))
        self.layers = nnx.List([DecoderLayer(cfg, opts, rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, opts=opts)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear(cfg.hidden_size, cfg.vocab_size, bias=False, opts=opts, rngs=rngs))

    # -------------------------------------------------------------- pieces shared by all entry points
    def embed(self, input_ids_BxT):
        x = jnp.take(self.embed_tokens[...], input_ids_BxT, axis=0).astype(self.options.dtype)
        return parallel.constrain(x, ("batch", "act_seq", "act_embed"), self.options.kernel_mesh)

    def head_kernel_DxV(self):
        """The output projection `[D, V]`, gathered for use (`parallel.gather_for_use`)."""
        mesh = self.options.kernel_mesh
        if self.lm_head is None:
            return parallel.gather_for_use({"embed_tokens": self.embed_tokens[...]}, mesh)["embed_tokens"].T
        return parallel.gather_for_use({"lm_head": {"kernel": self.lm_head.kernel[...]}}, mesh)["lm_head"]["kernel"]

    def logits(self, hidden_BxTxD):
        dt = self.options.dtype
        return jnp.dot(hidden_BxTxD.astype(dt), self.head_kernel_DxV().astype(dt))

    # -------------------------------------------------------------- full-sequence forward
    def __call__(self, input_ids_BxT, attention_mask=None, *, positions=None, segment_ids=None,
                 probe_layers: Sequence[int] = (), return_probs: bool = False, mixture: bool = True,
                 return_logits: bool = True) -> Qwen3Output:
        """Forward over whole sequences.

        attention_mask `[B, T]` 1 = token, 0 = padding (left or right); or `segment_ids` `[B, T]`
        (0 = padding, other ids = packed sequences). positions default to counting from 0 within
        each segment. `probe_layers` (indices) return attention entropies; `return_probs` also the
        probabilities `[B, Hq, T, T]` (short inputs only).
        """
        B, T = input_ids_BxT.shape
        if segment_ids is None and attention_mask is not None:
            segment_ids = attention_mask.astype(jnp.int32)
        if positions is None:
            positions = (positions_from_segments(segment_ids) if segment_ids is not None else
                         jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
        probe_set = set(resolve_probe_layers(tuple(probe_layers), len(self.layers)))
        x = self.embed(input_ids_BxT)
        entropy, mixture_entropy, probs = {}, {}, {}
        for i, layer in enumerate(self.layers):
            x, extra = self._layer(layer, x, positions, segment_ids, probe=i in probe_set, mixture=mixture,
                                   return_probs=return_probs)
            if extra is not None:
                entropy[i] = extra.entropy_BxTxH
                if extra.mixture_BxT is not None:
                    mixture_entropy[i] = extra.mixture_BxT
                if extra.probs_BxHxTxS is not None:
                    probs[i] = extra.probs_BxHxTxS
        hidden = self.norm(x)
        logits = self.logits(hidden) if return_logits else None
        return Qwen3Output(logits=logits, hidden=hidden, entropy=entropy, mixture_entropy=mixture_entropy,
                           probs=probs)

    def _layer(self, layer: DecoderLayer, x, positions, segment_ids, **flags):
        """One decoder layer; with `options.remat` only its input is saved for the backward pass.

        The layer runs as a pure function of its own weights (split/merge), so the static flags
        (`probe`, ...) stay Python values and the probe layer's `ProbeResult` (a pytree) leaves
        `jax.checkpoint` like any other output. Its weights are gathered for use where it starts
        (`parallel.gather_for_use`), inside the remat boundary.
        """
        graphdef, state = nnx.split(layer)
        mesh = self.options.kernel_mesh

        def run(weights, x, positions, segment_ids):
            return nnx.merge(graphdef, parallel.gather_for_use(weights, mesh))(x, positions, segment_ids, **flags)

        run = jax.checkpoint(run) if self.options.remat else run
        return run(nnx.to_pure_dict(state), x, positions, segment_ids)

    def token_logprobs(self, hidden_BxTxD, targets_BxT, *, temperature: float = 1.0):
        """log π(target) and the predictive entropy, both `[B, T]` float32.

        Chunked over T (`options.logits_chunk`) and rematerialised, so neither the forward nor
        the backward holds `[B, T, V]` in float32 at once.
        """
        B, T, D = hidden_BxTxD.shape
        C = min(self.options.logits_chunk, T)
        n = -(-T // C)
        pad = n * C - T
        mesh = self.options.kernel_mesh
        h = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, C, D).swapaxes(0, 1)
        h = parallel.constrain(h, (None, "batch", "act_seq", "act_embed"), mesh)
        tgt = jnp.pad(targets_BxT, ((0, 0), (0, pad))).reshape(B, n, C).swapaxes(0, 1)
        tgt = parallel.constrain(tgt, (None, "batch", "act_seq"), mesh)
        w = self.head_kernel_DxV().astype(self.options.dtype)

        @jax.checkpoint
        def chunk(h_BxCxD, t_BxC):
            logits = jnp.dot(h_BxCxD.astype(w.dtype), w, preferred_element_type=jnp.float32) / temperature
            logits = parallel.constrain(logits, ("batch", "act_seq", "act_vocab"), mesh)
            logz = jax.nn.logsumexp(logits, axis=-1)
            logp = jnp.take_along_axis(logits, t_BxC[..., None], axis=-1)[..., 0] - logz
            p = jnp.exp(logits - logz[..., None])
            ent = logz - jnp.sum(p * logits, axis=-1)
            return logp, ent

        logp, ent = jax.lax.map(lambda a: chunk(*a), (h, tgt))
        logp = logp.swapaxes(0, 1).reshape(B, n * C)[:, :T]
        ent = ent.swapaxes(0, 1).reshape(B, n * C)[:, :T]
        return logp, ent

    # -------------------------------------------------------------- KV-cache decoding
    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        cfg = self.config
        dtype = dtype or self.options.dtype
        shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                       valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    def decode(self, tokens_BxT, positions_BxT, token_mask_BxT, cache: KVCache):
        """Run T new tokens (a prompt, or one token per row) against the cache.

        `token_mask_BxT` marks real tokens (False = left padding of a prompt: written to the
        cache but never visible). Returns (logits of the last position `[B, V]` float32, cache).
        """
        B, T = tokens_BxT.shape
        S = cache.k.shape[2]
        index = cache.index
        valid = jax.lax.dynamic_update_slice(cache.valid, token_mask_BxT.astype(bool), (0, index))
        slot = jnp.arange(S)
        causal_TxS = slot[None, :] <= (index + jnp.arange(T))[:, None]
        mask_BxTxS = valid[:, None, :] & causal_TxS[None]
        x = self.embed(tokens_BxT)
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            x, k_i, v_i = layer.decode(x, positions_BxT, cache.k[i], cache.v[i], index, mask_BxTxS)
            ks.append(k_i)
            vs.append(v_i)
        hidden = self.norm(x[:, -1:])
        logits = self.logits(hidden)[:, 0].astype(jnp.float32)
        return logits, KVCache(k=jnp.stack(ks), v=jnp.stack(vs), valid=valid, index=index + T)


    # -------------------------------------------------------------- paged inference (models/engine.py)
    def prefill_kv(self, input_ids_BxT, segment_ids_BxT):
        """Keys and values of every layer (two tuples of L arrays `[B, T, Hkv, D]`, after k_norm and
        RoPE) of right-padded
        prompts, through the plain attention of `options.attention` (flash where configured;
        never the decode path). Nothing after the last layer's attention input is needed, so XLA
        drops the rest."""
        B, T = input_ids_BxT.shape
        positions = positions_from_segments(segment_ids_BxT)
        x = self.embed(input_ids_BxT)
        ks, vs = [], []
        for layer in self.layers:
            a = layer.self_attn

            def attend(h, a=a):
                q, k, v = a._qkv(h, positions)
                out = attn_lib.plain_attention(q, k, v, segment_ids_BxT, impl=a.opts.attention,
                                               kernel_backend=a.opts.kernel_backend, sm_scale=a.head_dim ** -0.5,
                                               mesh=a.opts.kernel_mesh)
                return a.o_proj(out.reshape(B, T, a.heads * a.head_dim)), (k, v)

            x, (k, v) = layer.with_attention(x, attend)
            ks.append(k)
            vs.append(v)
        return tuple(ks), tuple(vs)

    def decode_paged(self, tokens_B, positions_B, attend, carry):
        """One token per row through every layer; `attend(layer, q [B, Hq, D], k [B, Hkv, D],
        v [B, Hkv, D], carry) -> (out [B, Hq, D], carry)` writes the cache and attends (see
        `models/engine.py`). Returns (hidden after the final norm `[B, D]`, carry)."""
        B = tokens_B.shape[0]
        x = self.embed(tokens_B[:, None])
        for i, layer in enumerate(self.layers):
            a = layer.self_attn

            def attend_layer(h, a=a, i=i):
                q, k, v = a._qkv(h, positions_B[:, None])
                out, new_carry = attend(i, q[:, 0], k[:, 0], v[:, 0], carry)
                return a.o_proj(out.reshape(B, 1, a.heads * a.head_dim)), new_carry

            x, carry = layer.with_attention(x, attend_layer)
        return self.norm(x)[:, 0], carry


def merge_for_compute(graphdef, params) -> Qwen3:
    """The module over `params` (a pure dict) with its matmul weights in the compute dtype, each cast
    where its shard lies (`parallel.cast_sharded`): FSDP then gathers bf16 weights for bf16
    compute, not f32 ones. Gradients flow back through the cast to the stored (f32) parameters."""
    model = nnx.merge(graphdef, params)
    opts = model.options
    if jnp.dtype(opts.dtype) == jnp.dtype(opts.param_dtype):
        return model
    return nnx.merge(graphdef, parallel.cast_sharded(params, opts.dtype, opts.kernel_mesh))


def init_random(cfg: Qwen3Config, opts: RuntimeOptions = RuntimeOptions(), *, seed: int = 0) -> Qwen3:
    """A randomly initialised model (normal(0, 0.02) weights, unit norms), e.g. for the CPU demo."""
    return Qwen3(cfg, opts, rngs=nnx.Rngs(seed))


def from_pretrained(hf_dir: str, *, dtype=jnp.float32, param_dtype=None, mesh=None, **options) -> Qwen3:
    """Load a local HF Qwen3 directory (config.json + *.safetensors), sharded over `mesh` when given.

    dtype: compute dtype; param_dtype: storage dtype (default: dtype); `options` go to
    `RuntimeOptions`. The model is built abstractly and each weight read into its shard
    (`hf_io.load_weights`): no full host copy.
    """
    cfg = read_hf_config(hf_dir)
    opts = RuntimeOptions(dtype=dtype, param_dtype=param_dtype or dtype, **options)
    abstract = nnx.eval_shape(lambda: Qwen3(cfg, opts, rngs=nnx.Rngs(0)))
    return hf_io.load_weights(abstract, hf_dir, mesh=mesh)


def save_pretrained(model: Qwen3, out_dir: str, **kwargs) -> None:
    """Write a HF checkpoint directory that `transformers` loads. See `hf_io.save`."""
    hf_io.save(model, out_dir, **kwargs)
