"""The rollout engine's host side for one `generate` call: distinct prompts, slots, the page pool,
admission, growth and preemption (plain Python and numpy), around the engine's compiled programs
(`_run_prefills`, `_decode`, `_new_cache`: the only device calls, replaceable in tests)."""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_entropy.models.engine_spec import (RequestTooLarge, private_pages, prompt_pages, request_pages,
                                              shared_pages)
from jaxrl_entropy.models.paged_cache import NULL_PAGE, PagePool
from jaxrl_entropy.models.sampler import SampleOutput, SamplingParams

ProgressFn = Callable[[int, int, int, float], None]   # (rows done, tokens, running, KV pages used fraction)


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


def _distinct_prompts(ids, mask, max_prompt_len: int) -> tuple[list[_Prompt], np.ndarray]:
    """The distinct prompts of left-padded `ids` / `mask` `[B, P]`, in order of first appearance
    (each counting its rows in `pending`), and each row's prompt index `[B]`."""
    by_content: dict[bytes, int] = {}
    prompts: list[_Prompt] = []
    row_prompt = np.zeros(ids.shape[0], np.int64)
    for r in range(ids.shape[0]):
        toks = ids[r][mask[r]].astype(np.int32)
        if toks.size == 0:
            raise ValueError(f"prompt row {r} is empty (its mask has no 1): every request needs a prompt token")
        if toks.size > max_prompt_len:
            raise ValueError(f"prompt row {r} has {toks.size} tokens, more than the engine's max_prompt_len="
                             f"{max_prompt_len} (config data.max_prompt_len)")
        j = by_content.setdefault(toks.tobytes(), len(prompts))
        if j == len(prompts):
            prompts.append(_Prompt(toks, pending=0))
        prompts[j].pending += 1
        row_prompt[r] = j
    return prompts, row_prompt


@dataclasses.dataclass
class _RowOutputs:
    """What every row has generated so far, on the host: tokens `[B, N]`, their log-probs (full and
    behaviour policy, see `sampler.SampleOutput`), lengths and finished flags `[B]`."""
    tokens: np.ndarray
    logp: np.ndarray
    behaviour_logp: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray

    @classmethod
    def empty(cls, rows: int, max_new_tokens: int, pad_id: int) -> "_RowOutputs":
        B, N = rows, max_new_tokens
        return cls(np.full((B, N), pad_id, np.int32), np.zeros((B, N), np.float32), np.zeros((B, N), np.float32),
                   np.zeros(B, np.int32), np.zeros(B, bool))

    def clear(self, r: int, pad_id: int) -> None:
        """Row `r` starts again (preempted: it will be generated anew)."""
        self.tokens[r], self.logp[r], self.behaviour_logp[r] = pad_id, 0.0, 0.0

    def write(self, r: int, t0: int, tokens, logp, behaviour_logp) -> None:
        n = len(tokens)
        self.tokens[r, t0:t0 + n], self.logp[r, t0:t0 + n], self.behaviour_logp[r, t0:t0 + n] = (
            tokens, logp, behaviour_logp)

    def result(self) -> SampleOutput:
        return SampleOutput(tokens=self.tokens, lengths=self.lengths, logprobs=self.logp, finished=self.finished,
                            behaviour_logprobs=self.behaviour_logp)


class HostScheduler:
    """The host state of one `Engine.generate` call: `engine` supplies the compiled programs
    (`prefill_fn`, `decode_fn`, `new_cache`, `_put`) and the spec."""

    def __init__(self, engine, params, ids, mask, key, sp: SamplingParams, row_ids,
                 on_progress: ProgressFn | None = None):
        self.e, self.spec, self.params, self.sp = engine, engine.spec, params, sp
        spec, B, N = engine.spec, ids.shape[0], sp.max_new_tokens
        self.page = spec.page_size
        self.prompts, self.row_prompt = _distinct_prompts(ids, mask, spec.max_prompt_len)
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
        self.out = _RowOutputs.empty(B, N, sp.pad_id)
        self.done = np.zeros(B, bool)
        self.stats = collections.Counter()
        self.on_progress = on_progress

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
        self.out.clear(r, self.sp.pad_id)
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
        self.out.finished[r] = eos
        self.out.lengths[r] = int(self.stp[s])

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
        Returns (cache, tokens `[S, C]`, log-probs `[S, C]`, behaviour log-probs `[S, C]`, steps `[S]`,
        live `[S]`) on the host."""
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
        cache, out_t, out_lp, out_blp, stp, live_out = self._decode(cache, live)
        eos = set(self.sp.eos_ids)
        for s in np.flatnonzero(live):
            r, t0, n = int(self.slot_req[s]), int(self.stp[s]), int(stp[s] - self.stp[s])
            self.out.write(r, t0, out_t[s, :n], out_lp[s, :n], out_blp[s, :n])
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
                if self.on_progress is not None:
                    self.on_progress(int(self.done.sum()), self.stats["tokens"], int(np.sum(self.slot_req >= 0)),
                                     1.0 - self.pool.num_free / self.pool.capacity)
        finally:
            del cache
        if self.pool.num_free != self.pool.capacity:
            raise RuntimeError(f"rollout engine leaked {self.pool.capacity - self.pool.num_free} KV pages")
        elapsed = time.perf_counter() - t0
        self.e.last_stats = dict(self.stats, seconds=elapsed, tokens_per_s=self.stats["tokens"] / max(elapsed, 1e-9),
                                 pages_free_at_end=self.pool.num_free, pages_capacity=self.pool.capacity)
        return self.out.result()
