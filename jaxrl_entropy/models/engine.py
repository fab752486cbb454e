"""The rollout engine: continuous batching over a fixed number of decode slots, each prompt
prefilled once and shared by its samples, a paged KV cache written in place.

    engine = Engine(arch, EngineSpec(num_slots=64, page_size=32, num_pages=2049, max_prompt_len=1024),
                    mesh, dtype=jnp.bfloat16, attention="kernel")
    out = engine.generate(params, prompt_ids_BxP, prompt_mask_BxP, key, sampling_params)
    out.tokens, out.lengths, out.logprobs, out.finished      # numpy, as `sampler.generate` returns

How a rollout runs (host loop, `generate`):
- *Requests* are the rows of the batch; identical prompts (the G rows of a group) are found by
  content and prefilled once: the first n − 1 tokens of a prompt of n go through the model's own
  attention (`Qwen3.prefill_kv`: the flash kernel where configured), batched over prompts padded
  to a few bucket lengths (whole pages, doubling), straight into pages. Full pages are then shared
  read-only by the prompt's samples; the last partial page is copied into each sample's first
  private page when the sample starts (copy-on-write of one page).
- Each slot carries a *current token* (for a new request: the prompt's last token) at a position;
  one decode step writes that token's K/V into the slot's page, attends over the slot's pages
  (`kernels.paged_attention`), and samples the next token.
- One jitted program runs `decode_chunk` steps for all slots (idle slots masked; it stops early
  when none is live). Between chunks the host takes the new tokens, frees the pages of finished
  requests at once, admits queued requests into free slots, and reserves the pages the next chunk
  will write. When the pool runs dry it first drops prompts no running request reads, then
  preempts the youngest request (frees its pages, puts it back at the head of the queue: it
  restarts from its prompt and, its randomness being its own, samples the same tokens again).
- Progress is guaranteed: a request that cannot fit in the pool alone (`request_pages`) is refused
  up front (`RequestTooLarge`); a request being grown takes pages only from younger ones (with
  none younger it waits a chunk, keeping its pages), so the oldest running request is never
  preempted, always grows, and finishes within ⌈max_new_tokens / decode_chunk⌉ chunks.
- Randomness: request r samples its t-th token with `fold_in(fold_in(key, row_id[r]), t)`, so its
  tokens do not depend on the slot it runs in, the chunk size, preemption or the rest of the batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrl_entropy import parallel
from jaxrl_entropy.models import paged_cache, qwen3
from jaxrl_entropy.models.engine_programs import _kv_spec, decode_program, prefill_program
from jaxrl_entropy.models.engine_scheduler import HostScheduler, ProgressFn, row_keys
from jaxrl_entropy.models.engine_spec import (EngineSpec, RequestTooLarge, private_pages, prompt_pages,
                                              request_pages, shared_pages)
from jaxrl_entropy.models.paged_cache import PagedKVCache
from jaxrl_entropy.models.sampler import SampleOutput, SamplingParams

# the engine's public names, wherever they live (`from jaxrl_entropy.models.engine import ...`)
__all__ = ["Engine", "EngineSpec", "HostScheduler", "ProgressFn", "RequestTooLarge", "decode_program",
           "prefill_program", "private_pages", "prompt_pages", "request_pages", "row_keys", "shared_pages"]

class Engine:
    """Continuous-batching generation on one mesh (the devices of one host, tensor-parallel)."""

    def __init__(self, arch: qwen3.Qwen3Config, spec: EngineSpec, mesh=None, *, dtype=jnp.float32,
                 attention: str = "xla", kernel_backend: str | None = None):
        """`mesh`: a `parallel.make_mesh` mesh over the engine's devices (heads and the KV pool split
        over its `tensor` axis; `data`/`fsdp` of size 1). Default: the first local device."""
        if mesh is None:
            mesh = parallel.make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
        if mesh.shape["data"] * mesh.shape["fsdp"] != 1:
            raise ValueError(f"the engine's mesh must be tensor-parallel only (data = fsdp = 1), got {dict(mesh.shape)}")
        # kernels follow the engine's devices, not the default backend (ahead-of-time compilation
        # for a TPU runs on a CPU host)
        platform = mesh.devices.flat[0].platform
        if spec.attention_backend is None:
            spec = dataclasses.replace(spec, attention_backend="tpu" if platform == "tpu" else "xla")
        if kernel_backend is None and platform in ("tpu", "gpu"):
            kernel_backend = platform
        self.arch, self.spec, self.mesh = arch, spec, mesh
        self.dtype = jnp.dtype(dtype)
        tp = mesh.shape["tensor"]
        if arch.num_key_value_heads % tp or arch.num_attention_heads % tp:
            raise ValueError(f"tensor parallelism {tp} must divide the model's {arch.num_attention_heads} query and "
                             f"{arch.num_key_value_heads} key/value heads (config rollout.tensor_parallel)")
        opts = qwen3.RuntimeOptions(dtype=self.dtype, param_dtype=self.dtype, attention=attention,
                                    kernel_backend=kernel_backend,
                                    kernel_mesh=mesh if mesh.size > 1 else None)
        model = nnx.eval_shape(lambda: qwen3.Qwen3(arch, opts, rngs=nnx.Rngs(0)))
        self.graphdef, state = nnx.split(model)
        self.param_shapes = nnx.to_pure_dict(state)
        self.param_shardings = parallel.param_shardings(self.param_shapes, mesh)
        self._kv_sharding = NamedSharding(mesh, _kv_spec(mesh))
        self._replicated = NamedSharding(mesh, P())
        self._programs: dict[Any, Callable] = {}
        self.last_stats: dict[str, float] = {}

    # ------------------------------------------------------------------ compiled programs
    def _donate(self) -> tuple[int, ...]:
        return (1,)  # the cache: written in place (jax >= 0.4.3x donates on CPU too)

    def prefill_fn(self) -> Callable:
        if "prefill" not in self._programs:
            cache_sh, rep = self.cache_shardings(), self._replicated
            self._programs["prefill"] = jax.jit(
                lambda p, c, ids, seg, dest: prefill_program(self.graphdef, p, c, ids, seg, dest),
                in_shardings=(self.param_shardings, cache_sh, rep, rep, rep), out_shardings=cache_sh,
                donate_argnums=self._donate())
        return self._programs["prefill"]

    def decode_fn(self, sp: SamplingParams) -> Callable:
        key = ("decode", sp)
        if key not in self._programs:
            cache_sh, rep = self.cache_shardings(), self._replicated
            self._programs[key] = jax.jit(
                lambda p, c, *a: decode_program(self.graphdef, self.spec, sp, self.mesh, p, c, *a),
                in_shardings=(self.param_shardings, cache_sh) + (rep,) * 8,
                out_shardings=(cache_sh, rep, rep, rep, rep, rep), donate_argnums=self._donate())
        return self._programs[key]

    def cache_shardings(self) -> PagedKVCache:
        L = self.arch.num_hidden_layers
        return PagedKVCache((self._kv_sharding,) * L, (self._kv_sharding,) * L)

    def new_cache(self) -> PagedKVCache:
        if "init" not in self._programs:
            self._programs["init"] = paged_cache.init_fn(self.arch, num_pages=self.spec.num_pages,
                                                         page_size=self.spec.page_size, dtype=self.dtype,
                                                         sharding=self._kv_sharding)
        return self._programs["init"]()

    def prepare_params(self, params):
        """Parameters in the engine's dtype and layout (host-local arrays on `mesh`). A caller
        that holds a sharded training copy should reshard once per rollout
        (`engine_setup.inference_params`); this is the simple path for a local model."""
        return jax.device_put(jax.tree.map(lambda x: jnp.asarray(x, self.dtype), params), self.param_shardings)

    def _put(self, x):
        return jax.device_put(x, self._replicated)

    def abstract_args(self, sp: SamplingParams) -> dict[str, tuple]:
        """The arguments of `prefill_fn()` (at the longest bucket) and `decode_fn(sp)` as
        `jax.ShapeDtypeStruct`s with their shardings (ahead-of-time compilation, memory analysis)."""
        spec, rep = self.spec, self._replicated
        sds = lambda shape, dtype, sh=rep: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sh)
        params = jax.tree.map(lambda x, sh: sds(x.shape, self.dtype, sh), self.param_shapes, self.param_shardings)
        cache = paged_cache.abstract(self.arch, num_pages=spec.num_pages, page_size=spec.page_size, dtype=self.dtype,
                                     sharding=self._kv_sharding)
        T = spec.buckets()[-1]
        R = spec.prefill_rows(T)
        S, W = spec.num_slots, spec.table_width(sp.max_new_tokens)
        i32 = lambda *shape: sds(shape, jnp.int32)
        key = jax.ShapeDtypeStruct((S,), jax.random.key(0).dtype, sharding=rep)
        return {"prefill": (params, cache, i32(R, T), i32(R, T), i32(R, T // spec.page_size)),
                "decode": (params, cache, i32(S), i32(S), i32(S), sds((S,), bool), key, i32(S, W), i32(S), i32(S))}

    # ------------------------------------------------------------------ generation
    def generate(self, params, prompt_ids_BxP, prompt_mask_BxP, key: jax.Array, sp: SamplingParams, *,
                 row_ids=None, on_progress: ProgressFn | None = None) -> SampleOutput:
        """Sample up to `sp.max_new_tokens` tokens after every prompt row (left- or right-padded;
        `mask` 1 = token). `params`: from `prepare_params` (or `engine_setup.inference_params`).
        `row_ids` `[B]` name the rows for their random streams (default 0..B − 1; a host that
        generates a share of a global batch passes the global row indices). `on_progress(rows done,
        tokens, running, KV pages used)` is called after every decode chunk (the caller draws a bar
        or logs). Returns host numpy arrays in a `SampleOutput`."""
        ids = np.asarray(prompt_ids_BxP)
        mask = np.asarray(prompt_mask_BxP).astype(bool)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(f"prompt ids {ids.shape} and mask {mask.shape} must both be [B, P]")
        B = ids.shape[0]
        row_ids = np.arange(B) if row_ids is None else np.asarray(row_ids)
        return HostScheduler(self, params, ids, mask, key, sp, row_ids, on_progress).execute()
