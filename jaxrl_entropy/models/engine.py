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

import collections
import dataclasses
import logging
import math
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxrl_entropy.kernels.paged_attention as paged_attn
from jaxrl_entropy import parallel
from jaxrl_entropy.models import paged_cache, qwen3
from jaxrl_entropy.models.paged_cache import NULL_PAGE, PagedKVCache, PagePool, pages_for
from jaxrl_entropy.models.sampler import SampleOutput, SamplingParams, sample_token

log = logging.getLogger("jaxrl_entropy")


class RequestTooLarge(ValueError):
    """A single request (prompt + max_new_tokens) needs more pages than the whole pool holds."""


# ------------------------------------------------------------------------------ page arithmetic
# The one account of what a request holds, used by the fit check and by the scheduler alike. A
# prompt of n tokens prefills its first n − 1 into `shared_pages` full pages (read-only, shared by
# its samples) and, when n − 1 is not a whole number of pages, one partial page: the copy source
# of each sample's first private page, kept while any sample of the prompt runs. So the need is
# not monotone in n: with page 4 and 6 new tokens, 9 tokens need 4 pages but 8 tokens need 5.
def shared_pages(prompt_len: int, page_size: int) -> int:
    """Full prompt pages (of the n − 1 prefilled tokens) a prompt's samples share read-only."""
    return (prompt_len - 1) // page_size


def prompt_pages(prompt_len: int, page_size: int) -> int:
    """Pages a resident prompt holds: its full pages plus the partial last one, if any."""
    return pages_for(prompt_len - 1, page_size)


def private_pages(prompt_len: int, steps: int, page_size: int) -> int:
    """Private pages of a sample after `steps` ≥ 1 decode steps: those holding positions
    n − 1 .. n + steps − 2 (the copied partial page included) beyond the shared ones."""
    last = prompt_len - 1 + steps - 1
    return last // page_size + 1 - shared_pages(prompt_len, page_size)


def request_pages(prompt_len: int, max_new_tokens: int, page_size: int) -> int:
    """Pages one request holds at its longest, alone in the pool: its prompt's pages plus its
    private pages after `max_new_tokens` steps. A pool of fewer (null page excluded) can never
    finish it."""
    return prompt_pages(prompt_len, page_size) + private_pages(prompt_len, max_new_tokens, page_size)


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """The engine's static geometry: one compiled prefill per bucket, one decode per setting.

    num_slots: decode rows run together. page_size: tokens per page. num_pages: pages per layer,
    the null page included. max_prompt_len: longest prompt (tokens) the buckets cover.
    decode_chunk: decode steps per program call (host scheduling in between). prefill_tokens:
    prompt tokens per prefill call (rows = prefill_tokens // bucket). prefill_multiple: bucket
    lengths are multiples of it (0 = page_size; TPU attention kernels want 128).
    attention_backend: shell of the paged decode attention (None: by platform). megacore_mode: TPU
    kernel option.
    """
    num_slots: int
    page_size: int
    num_pages: int
    max_prompt_len: int
    decode_chunk: int = 32
    prefill_tokens: int = 8192
    prefill_multiple: int = 0
    attention_backend: str | None = None
    megacore_mode: str | None = None

    def __post_init__(self):
        for name in ("num_slots", "page_size", "max_prompt_len", "decode_chunk", "prefill_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EngineSpec.{name} must be positive, got {getattr(self, name)}")
        if self.num_pages < 2:
            raise ValueError(f"EngineSpec.num_pages={self.num_pages}: the pool needs the null page and at least one more")

    def buckets(self) -> tuple[int, ...]:
        """Prefill lengths (of the n − 1 prefilled tokens): whole pages (and multiples of
        `prefill_multiple`), doubling, up to the longest prompt."""
        unit = math.lcm(self.page_size, self.prefill_multiple or self.page_size)
        top = -(-max(self.max_prompt_len - 1, 1) // unit) * unit
        out, t = [], unit
        while t < top:
            out.append(t)
            t *= 2
        return tuple(out) + (top,)

    def bucket_for(self, n_tokens: int) -> int:
        for b in self.buckets():
            if n_tokens <= b:
                return b
        raise ValueError(f"a prompt of {n_tokens + 1} tokens is longer than the engine's max_prompt_len="
                         f"{self.max_prompt_len} (config data.max_prompt_len)")

    def prefill_rows(self, bucket: int, n_prompts: int | None = None) -> int:
        """Rows of a prefill call at `bucket`: at most `prefill_tokens // bucket`; for fewer
        prompts, the next power of two (a few compiled shapes, little padding)."""
        most = max(1, self.prefill_tokens // bucket)
        if n_prompts is None or n_prompts >= most:
            return most
        return min(most, 1 << max(0, n_prompts - 1).bit_length())

    def table_width(self, max_new_tokens: int) -> int:
        """Page-table entries per slot: every position a request can write."""
        return pages_for(self.max_prompt_len + max_new_tokens, self.page_size)


# ------------------------------------------------------------------------------------ programs
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
    Returns (cache, tokens `[S, C]`, log-probs `[S, C]`, steps `[S]`, live `[S]`): a slot emitted
    `steps_out − steps_in` tokens; live False = finished (EOS or max_new_tokens) or idle.
    """
    model = nnx.merge(graphdef, params)
    cache = paged_cache.copy_pages(cache, copy_src_S, copy_dst_S)
    S, C, N = tokens_S.shape[0], spec.decode_chunk, sp.max_new_tokens
    eos = jnp.asarray(sp.eos_ids or (-1,), jnp.int32)
    head = model.head_kernel_DxV().astype(model.options.dtype)
    sm_scale = model.config.head_dim ** -0.5
    attend_fn = _attention_fn(spec, mesh, sm_scale)

    def step(carry):
        c, cache, tok, pos, stp, live, out_t, out_lp = carry

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
        new, lp = jax.vmap(lambda l, k: sample_token(l[None], k, sp))(logits, row_keys)
        new, lp = new[:, 0], lp[:, 0]
        new = jnp.where(live, new, sp.pad_id)
        out_t = out_t.at[:, c].set(new)
        out_lp = out_lp.at[:, c].set(jnp.where(live, lp, 0.0))
        stp_next = stp + live
        done = live & (jnp.isin(new, eos) | (stp_next >= N))
        return (c + 1, cache, jnp.where(live, new, tok), pos + live, stp_next, live & ~done, out_t, out_lp)

    init = (jnp.zeros((), jnp.int32), cache, tokens_S, positions_S, steps_S, live_S,
            jnp.full((S, C), sp.pad_id, jnp.int32), jnp.zeros((S, C), jnp.float32))
    _, cache, _, _, stp, live, out_t, out_lp = jax.lax.while_loop(
        lambda carry: (carry[0] < C) & jnp.any(carry[5]), step, init)
    return cache, out_t, out_lp, stp, live


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


# ------------------------------------------------------------------------------------ host side
@jax.jit
def _fold_in_rows(base: jax.Array, row_ids_R: jax.Array) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(row_ids_R)


def row_keys(base: jax.Array, row_ids) -> np.ndarray:
    """`[R, ...]` key data of `fold_in(base, row_id)` for each row: row r's tokens depend on its
    id alone, never on which call or slot decodes it. Ids are padded to a power of two, so a
    rollout's calls of ever-changing size share a few compiled programs (compiling the fold-in
    anew for every call cost ~0.14 s per call in the CPU demo, two calls per step)."""
    ids = np.asarray(row_ids, np.uint32)
    padded = np.zeros(max(8, 1 << max(len(ids) - 1, 0).bit_length()), np.uint32)
    padded[:len(ids)] = ids
    return np.asarray(jax.random.key_data(_fold_in_rows(base, jnp.asarray(padded))))[:len(ids)]


@dataclasses.dataclass
class _Prompt:
    tokens: np.ndarray            # [n] int32
    pending: int                  # requests not finished (queued or running)
    users: int = 0                # running requests reading its pages
    shared: list = dataclasses.field(default_factory=list)   # full pages, read-only
    partial: int | None = None    # page with the last n − 1 mod page tokens (copy source)
    resident: bool = False

    @property
    def n(self) -> int:
        return len(self.tokens)


class Engine:
    """Continuous-batching generation on one mesh (the devices of one host, tensor-parallel)."""

    def __init__(self, arch: qwen3.Qwen3Config, spec: EngineSpec, mesh=None, *, dtype=jnp.float32,
                 attention: str = "xla", kernel_backend: str | None = None, logger: logging.Logger | None = None):
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
        self._log = logger or log
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
                out_shardings=(cache_sh, rep, rep, rep, rep), donate_argnums=self._donate())
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
                 row_ids=None, progress: bool = False) -> SampleOutput:
        """Sample up to `sp.max_new_tokens` tokens after every prompt row (left- or right-padded;
        `mask` 1 = token). `params`: from `prepare_params` (or `engine_setup.inference_params`).
        `row_ids` `[B]` name the rows for their random streams (default 0..B − 1; a host that
        generates a share of a global batch passes the global row indices). Returns host numpy
        arrays in a `SampleOutput`."""
        ids = np.asarray(prompt_ids_BxP)
        mask = np.asarray(prompt_mask_BxP).astype(bool)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(f"prompt ids {ids.shape} and mask {mask.shape} must both be [B, P]")
        B = ids.shape[0]
        row_ids = np.arange(B) if row_ids is None else np.asarray(row_ids)
        run = _Run(self, params, ids, mask, key, sp, row_ids, progress)
        return run.execute()


class _Run:
    """The host state of one `Engine.generate` call."""

    def __init__(self, engine: Engine, params, ids, mask, key, sp: SamplingParams, row_ids, progress: bool):
        self.e, self.spec, self.params, self.sp = engine, engine.spec, params, sp
        spec, B, N = engine.spec, ids.shape[0], sp.max_new_tokens
        self.page = spec.page_size
        # distinct prompts, in order of first appearance
        by_content: dict[bytes, int] = {}
        self.prompts: list[_Prompt] = []
        self.row_prompt = np.zeros(B, np.int64)
        for r in range(B):
            toks = ids[r][mask[r]].astype(np.int32)
            if toks.size == 0:
                raise ValueError(f"prompt row {r} is empty (its mask has no 1): every request needs a prompt token")
            if toks.size > spec.max_prompt_len:
                raise ValueError(f"prompt row {r} has {toks.size} tokens, more than the engine's max_prompt_len="
                                 f"{spec.max_prompt_len} (config data.max_prompt_len)")
            j = by_content.setdefault(toks.tobytes(), len(self.prompts))
            if j == len(self.prompts):
                self.prompts.append(_Prompt(toks, pending=0))
            self.prompts[j].pending += 1
            self.row_prompt[r] = j
        self.width = spec.table_width(N)
        self._check_fits()
        base = key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)
        self.key_impl = jax.random.key_impl(base)
        self.keys = row_keys(base, row_ids)
        S = spec.num_slots
        self.pool = PagePool(spec.num_pages)
        self.queue = collections.deque(range(B))
        self.slot_req = np.full(S, -1, np.int64)
        self.tok = np.zeros(S, np.int32)
        self.pos = np.zeros(S, np.int32)
        self.stp = np.zeros(S, np.int32)
        self.table = np.zeros((S, self.width), np.int32)
        self.private: list[list[int]] = [[] for _ in range(S)]
        self.born = np.zeros(S, np.int64)
        self.waiting = np.zeros(S, bool)   # running but skipping this chunk: no pages to grow into
        self.admissions = 0
        self.copies: list[tuple[int, int]] = []
        self.to_prefill: list[int] = []
        self.out_tokens = np.full((B, N), sp.pad_id, np.int32)
        self.out_logp = np.zeros((B, N), np.float32)
        self.lengths = np.zeros(B, np.int32)
        self.finished = np.zeros(B, bool)
        self.done = np.zeros(B, bool)
        self.stats = collections.Counter()
        self.progress = progress

    # -------------------------------------------------------------- page arithmetic
    def _shared_blocks(self, prompt: _Prompt) -> int:
        return shared_pages(prompt.n, self.page)

    def _prompt_pages(self, prompt: _Prompt) -> int:
        return prompt_pages(prompt.n, self.page)

    def _private_needed(self, prompt: _Prompt, steps: int) -> int:
        """Private pages a request needs to run its next chunk from `steps` generated tokens."""
        chunk = min(self.spec.decode_chunk, self.sp.max_new_tokens - steps)
        return private_pages(prompt.n, steps + chunk, self.page)

    def _check_fits(self):
        """Refuse a batch with a request the pool cannot hold even alone (it could never finish:
        the scheduler would preempt and re-admit it forever). Every distinct prompt is sized, not
        the longest: the need is not monotone in the prompt's length (see `prompt_pages`)."""
        N, capacity = self.sp.max_new_tokens, self.spec.num_pages - 1
        needs = [request_pages(p.n, N, self.page) for p in self.prompts]
        j = int(np.argmax(needs))
        if needs[j] > capacity:
            p, row = self.prompts[j], int(np.flatnonzero(self.row_prompt == j)[0])
            raise RequestTooLarge(
                f"rollout engine: prompt row {row} ({p.n} tokens) + max_new_tokens={N} needs {needs[j]} KV pages "
                f"of {self.page} tokens ({self._prompt_pages(p)} for its prompt, kept while it runs, + "
                f"{needs[j] - self._prompt_pages(p)} of its own) but the whole pool holds {capacity}, so it could "
                f"never finish. Raise rollout.kv_cache_gib (--config.rollout.kv_cache_gib; 0 = automatic sizing), "
                f"or lower rollout.max_new_tokens / data.max_prompt_len; "
                f"rollout.page_size changes the rounding to pages")

    # -------------------------------------------------------------- scheduling
    def _free_pages_for(self, need: int, keep_prompt: int | None = None) -> bool:
        """Make `need` pages free: drop resident prompts nobody reads first (cheap to prefill
        again), then preempt the youngest running requests. False if impossible."""
        if self.pool.num_free >= need:
            return True
        for j, p in enumerate(self.prompts):
            if p.resident and p.users == 0 and j != keep_prompt:
                self._evict(p)
                if self.pool.num_free >= need:
                    return True
        return False

    def _evict(self, p: _Prompt, *, retired: bool = False):
        """Free a prompt's pages: it is done (`retired`), or dropped under memory pressure."""
        self.pool.free(p.shared + ([p.partial] if p.partial is not None else []))
        p.shared, p.partial, p.resident = [], None, False
        self.stats["prompts_retired" if retired else "prompt_evictions"] += 1

    def _preempt(self, s: int):
        r = int(self.slot_req[s])
        p = self.prompts[self.row_prompt[r]]
        self.pool.free(self.private[s])
        self.private[s] = []
        p.users -= 1
        self.slot_req[s] = -1
        self.table[s] = NULL_PAGE
        self.waiting[s] = False
        self.out_tokens[r] = self.sp.pad_id
        self.out_logp[r] = 0.0
        self.queue.appendleft(r)
        self.stats["preemptions"] += 1

    def _grow(self):
        """Reserve the pages every running request writes in the next chunk, oldest first.

        When the pool is short, the request being grown preempts the youngest running requests
        *younger than itself*; with none younger it waits this chunk out (`self.waiting`, keeping
        its pages and tokens) for older ones to finish. So no request ever preempts itself or an
        older one: the oldest running request is never preempted, and since `_check_fits` made
        sure it fits alone (everything else can be freed), it always grows and runs. It failing
        to is an accounting error, raised here rather than looped on."""
        running = sorted(np.flatnonzero(self.slot_req >= 0), key=lambda s: self.born[s])
        self.waiting[:] = False
        for i, s in enumerate(running):
            if self.slot_req[s] < 0:  # preempted by an older request
                continue
            p = self.prompts[self.row_prompt[self.slot_req[s]]]
            extra = self._private_needed(p, int(self.stp[s])) - len(self.private[s])
            while extra > 0 and not self._free_pages_for(extra):
                younger = [v for v in running[i + 1:] if self.slot_req[v] >= 0]
                if younger:
                    self._preempt(younger[-1])
                elif i > 0:  # older requests hold the pages: wait for them (they finish)
                    self.waiting[s] = True
                    self.stats["waits"] += 1
                    break
                else:
                    raise RuntimeError(
                        f"rollout engine: the oldest running request (row {int(self.slot_req[s])}, prompt of "
                        f"{p.n} tokens, {int(self.stp[s])} tokens generated) cannot get {extra} more KV pages "
                        f"with every other request preempted ({self.pool.num_free} of {self.pool.capacity} "
                        f"free): a page accounting error in the engine, not a setting (the fit check passed)")
            if self.waiting[s] or extra <= 0:
                continue
            new = self.pool.alloc(extra)
            first = self._shared_blocks(p) + len(self.private[s])
            self.table[s, first:first + extra] = new
            self.private[s] += new

    def _admit(self):
        """Queued requests into free slots while pages last (none while a running request waits
        for pages: it would only be preempted again by the one waiting)."""
        if self.waiting.any():
            return
        free_slots = list(np.flatnonzero(self.slot_req < 0))
        while self.queue and free_slots:
            r = self.queue[0]
            j = int(self.row_prompt[r])
            p = self.prompts[j]
            need_prompt = 0 if p.resident else self._prompt_pages(p)
            need = need_prompt + self._private_needed(p, 0)
            if not self._free_pages_for(need, keep_prompt=j):  # never preempts: waits for running ones
                break
            self.queue.popleft()
            if not p.resident:
                pages = self.pool.alloc(need_prompt)
                nb = self._shared_blocks(p)
                p.shared, p.partial = pages[:nb], (pages[nb] if len(pages) > nb else None)
                p.resident = True
                if p.n > 1:
                    self.to_prefill.append(j)
            s = free_slots.pop(0)
            nb = self._shared_blocks(p)
            own = self.pool.alloc(self._private_needed(p, 0))
            self.table[s] = NULL_PAGE
            self.table[s, :nb] = p.shared
            self.table[s, nb:nb + len(own)] = own
            self.private[s] = own
            if p.partial is not None:
                self.copies.append((p.partial, own[0]))
            p.users += 1
            self.slot_req[s] = r
            self.tok[s], self.pos[s], self.stp[s] = p.tokens[-1], p.n - 1, 0
            self.admissions += 1
            self.born[s] = self.admissions
            self.stats["admissions"] += 1

    def _finish(self, s: int, r: int, eos: bool):
        p = self.prompts[self.row_prompt[r]]
        self.pool.free(self.private[s])
        self.private[s] = []
        self.table[s] = NULL_PAGE
        self.slot_req[s] = -1
        p.users -= 1
        p.pending -= 1
        if p.pending == 0 and p.resident:
            self._evict(p, retired=True)
        self.done[r] = True
        self.finished[r] = eos
        self.lengths[r] = int(self.stp[s])

    # -------------------------------------------------------------- device calls
    def _run_prefills(self, cache):
        by_bucket: dict[int, list[int]] = collections.defaultdict(list)
        for j in self.to_prefill:
            by_bucket[self.spec.bucket_for(self.prompts[j].n - 1)].append(j)
        self.to_prefill = []
        fn = self.e.prefill_fn()
        for T, js in sorted(by_bucket.items()):
            Q, most = T // self.page, self.spec.prefill_rows(T)
            for lo in range(0, len(js), most):
                rows = self.spec.prefill_rows(T, len(js) - lo)
                ids = np.zeros((rows, T), np.int32)
                seg = np.zeros((rows, T), np.int32)
                dest = np.full((rows, Q), NULL_PAGE, np.int32)
                for b, j in enumerate(js[lo:lo + rows]):
                    p = self.prompts[j]
                    m = p.n - 1
                    ids[b, :m], seg[b, :m] = p.tokens[:m], 1
                    pages = p.shared + ([p.partial] if p.partial is not None else [])
                    dest[b, :len(pages)] = pages
                cache = fn(self.params, cache, self.e._put(ids), self.e._put(seg), self.e._put(dest))
                self.stats["prefill_calls"] += 1
                self.stats["prefill_tokens"] += int(seg.sum())
        return cache

    def _new_cache(self):
        return self.e.new_cache()

    def _decode(self, cache, live_S: np.ndarray):
        """One decode program call for the slots in `live_S` (the pending page copies first).
        Returns (cache, tokens `[S, C]`, log-probs `[S, C]`, steps `[S]`, live `[S]`) on the host."""
        S = self.spec.num_slots
        keys = np.zeros((S,) + self.keys.shape[1:], self.keys.dtype)
        keys[live_S] = self.keys[self.slot_req[live_S]]
        src = np.full(S, NULL_PAGE, np.int32)
        dst = np.full(S, NULL_PAGE, np.int32)
        for i, (a, b) in enumerate(self.copies):
            src[i], dst[i] = a, b
        self.copies = []
        put = self.e._put
        args = (put(self.tok), put(self.pos), put(self.stp), put(live_S),
                jax.random.wrap_key_data(put(keys), impl=self.key_impl), put(self.table), put(src), put(dst))
        cache, *out = self.e.decode_fn(self.sp)(self.params, cache, *args)
        return (cache, *(np.asarray(x) for x in out))

    def _run_chunk(self, cache):
        live = (self.slot_req >= 0) & ~self.waiting
        cache, out_t, out_lp, stp, live_out = self._decode(cache, live)
        eos = set(self.sp.eos_ids)
        for s in np.flatnonzero(live):
            r, t0, n = int(self.slot_req[s]), int(self.stp[s]), int(stp[s] - self.stp[s])
            self.out_tokens[r, t0:t0 + n] = out_t[s, :n]
            self.out_logp[r, t0:t0 + n] = out_lp[s, :n]
            self.stats["tokens"] += n
            if n:
                self.tok[s] = out_t[s, n - 1]
            self.pos[s] += n
            self.stp[s] += n
            if not live_out[s]:
                self._finish(s, r, eos=n > 0 and int(out_t[s, n - 1]) in eos)
        self.stats["chunks"] += 1
        return cache

    def _round_limit(self) -> int:
        """Scheduling rounds allowed without a request finishing. The oldest running request runs
        in every chunk and finishes within ⌈max_new_tokens / decode_chunk⌉ of them (`_grow`), so
        ten times that (plus slack) is never reached by a scheduler that works."""
        return 10 * (-(-self.sp.max_new_tokens // self.spec.decode_chunk) + 2)

    def execute(self) -> SampleOutput:
        t0 = time.perf_counter()
        cache = self._new_cache()
        bar = _Progress(len(self.done), self.progress, self.e._log)
        limit, idle_rounds = self._round_limit(), 0
        try:
            while self.queue or np.any(self.slot_req >= 0):
                done_before = int(self.done.sum())
                self._grow()
                self._admit()
                if not np.any((self.slot_req >= 0) & ~self.waiting):
                    raise RuntimeError("rollout engine: no request could be admitted with an empty batch "
                                       "(page accounting error)")
                if self.to_prefill:
                    cache = self._run_prefills(cache)
                cache = self._run_chunk(cache)
                idle_rounds = 0 if self.done.sum() > done_before else idle_rounds + 1
                if idle_rounds > limit:  # a guard, not a schedule: raise rather than spin
                    raise RuntimeError(
                        f"rollout engine made no progress: no request finished in {idle_rounds} scheduling rounds "
                        f"(at most {-(-self.sp.max_new_tokens // self.spec.decode_chunk)} are needed; "
                        f"{int(self.done.sum())}/{len(self.done)} rows done, {int(np.sum(self.slot_req >= 0))} "
                        f"running, {len(self.queue)} queued, {self.pool.num_free}/{self.pool.capacity} pages free, "
                        f"{self.stats['preemptions']} preemptions): a scheduler bug in the engine; as a workaround "
                        f"raise rollout.kv_cache_gib or lower rollout.max_slots")
                bar.update(int(self.done.sum()), self.stats["tokens"], int(np.sum(self.slot_req >= 0)),
                           1.0 - self.pool.num_free / self.pool.capacity)
        finally:
            bar.close()
            del cache
        if self.pool.num_free != self.pool.capacity:
            raise RuntimeError(f"rollout engine leaked {self.pool.capacity - self.pool.num_free} KV pages")
        elapsed = time.perf_counter() - t0
        self.e.last_stats = dict(self.stats, seconds=elapsed, tokens_per_s=self.stats["tokens"] / max(elapsed, 1e-9),
                                 pages_free_at_end=self.pool.num_free, pages_capacity=self.pool.capacity)
        return SampleOutput(tokens=self.out_tokens, lengths=self.lengths, logprobs=self.out_logp,
                            finished=self.finished)


class _Progress:
    """Rows finished and tokens/s: a tqdm bar on a terminal (shown only when a rollout takes a
    while), a log line at most every 30 s otherwise; process 0 only."""

    def __init__(self, total: int, enabled: bool, logger: logging.Logger):
        self.enabled = enabled and jax.process_index() == 0
        self.t0 = self.last_log = time.perf_counter()
        self.log, self.bar, self.total = logger, None, total
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc="rollout", unit="row", leave=False, delay=5.0, dynamic_ncols=True)

    def update(self, done: int, tokens: int, running: int, pages_used: float):
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = tokens / max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(tok_s=f"{rate:,.0f}", running=running, kv=f"{pages_used:.0%}", refresh=False)
        elif now - self.last_log >= 30.0:
            self.last_log = now
            self.log.info("rollout: %d/%d rows done, %d tokens, %.0f tokens/s, %d running, KV pages %.0f%% used",
                          done, self.total, tokens, rate, running, 100 * pages_used)

    def close(self):
        if self.bar is not None:
            self.bar.close()
