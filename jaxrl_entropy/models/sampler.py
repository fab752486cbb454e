"""KV-cache sampling: batched prefill of left-padded prompts, then a `lax.while_loop` decode.

    out = sampler.generate(model, prompt_ids, prompt_mask, jax.random.key(0),
                           SamplingParams(max_new_tokens=64, temperature=1.0, eos_ids=(eos,), pad_id=pad))
    out.tokens    # [B, N] int32, pad_id after a row's EOS
    out.lengths   # [B] int32 response length, EOS included
    out.logprobs  # [B, N] float32 log-prob of each sampled token under softmax(logits / T); 0 after the end
    out.behaviour_logprobs  # [B, N] the same under the top-k / top-p truncated distribution sampled

The whole generation is one jitted program (compiled once per shape and `SamplingParams`); the loop
stops early when every row has finished.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxrl_entropy.models.qwen3 import Qwen3, positions_from_segments


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy. top_k 0 or -1 = off (stored as 0); top_p 1.0 = off. eos_ids stop a row."""
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= 0, or -1 for off (vLLM's convention), got {self.top_k}")
        object.__setattr__(self, "top_k", max(int(self.top_k), 0))
        object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))


@struct.dataclass
class SampleOutput:
    tokens: jax.Array      # [B, N] int32
    lengths: jax.Array     # [B] int32
    # [B, N] float32: log-prob of each sampled token under the *untruncated* softmax(logits / T), the
    # distribution the old-policy forward scores (so `rollout/logp_diff_*` compares like with like).
    # With top_k / top_p active the tokens were drawn from the truncated, renormalised distribution,
    # whose log-prob is higher by −log(kept mass): that is `behaviour_logprobs`.
    logprobs: jax.Array
    finished: jax.Array    # [B] bool: stopped on an EOS (False = ran out of max_new_tokens)
    # [B, N] float32: log-prob of each sampled token under the distribution it was drawn from (top-k /
    # top-p truncated and renormalised; 0 for greedy), for off-policy corrections; equal to `logprobs`
    # when neither is active. None where a caller (a test's stub) does not give it.
    behaviour_logprobs: jax.Array | None = None


# Top-p without sorting the vocabulary: the nucleus is sought among the NUCLEUS_CANDIDATES largest
# logits (one `top_k`). Only when some row's candidates hold less than top_p of its mass (a near-
# uniform distribution: random weights, a high temperature) does the step sort the whole vocabulary;
# the result is the same either way. At Qwen3's 151,936 tokens a full sort every decode step costs
# more than the model's head (benchmarks/top_p.py).
NUCLEUS_CANDIDATES = 1024


def _nucleus_threshold(desc_BxK: jax.Array, log_norm_Bx1: jax.Array, top_p: float):
    """The smallest logit `[B, 1]` of the nucleus among logits sorted descending, and `[B]` whether
    they hold at least `top_p` of the mass (`log_norm`: the log partition function of the row)."""
    probs = jnp.exp(desc_BxK - log_norm_Bx1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # keep the smallest prefix whose mass reaches top_p (the first token always survives)
    kept = jnp.where(mass_before < top_p, desc_BxK, jnp.inf)
    return jnp.min(kept, axis=-1, keepdims=True), mass_before[:, -1] + probs[:, -1] >= top_p


def _global_top(values_BxK: jax.Array, k: int, axis_name: str | None) -> jax.Array:
    """The k largest of a row `[B, k]`, descending: of this array, or, inside a `shard_map` over the
    vocabulary (`axis_name`), of every shard's own top k gathered (the global top k is among them)."""
    top = jax.lax.top_k(values_BxK, min(k, values_BxK.shape[-1]))[0]
    if axis_name is None:
        return top
    return jax.lax.top_k(jax.lax.all_gather(top, axis_name, axis=1, tiled=True), k)[0]


def _log_partition(logits_BxV: jax.Array, axis_name: str | None) -> jax.Array:
    """`[B, 1]` log Σ exp over the whole vocabulary (every shard's share summed inside a shard_map)."""
    if axis_name is None:
        return jax.nn.logsumexp(logits_BxV, axis=-1, keepdims=True)
    m = jax.lax.pmax(jnp.max(logits_BxV, axis=-1, keepdims=True), axis_name)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return m + jnp.log(jax.lax.psum(jnp.sum(jnp.exp(logits_BxV - m), axis=-1, keepdims=True), axis_name))


def filter_logits(logits_BxV: jax.Array, *, top_k: int, top_p: float, axis_name: str | None = None) -> jax.Array:
    """Set logits outside the top-k and then the nucleus (top-p of the top-k's renormalised mass) to
    -inf. Static switches: off costs nothing; top_k <= 0 (0, or vLLM's -1) is off.

    `axis_name`: called inside a `shard_map` whose devices each hold a slice of the vocabulary
    (`[B, V / n]`); the thresholds come from every shard's candidates (`all_gather` of n × k values
    per row, not the vocabulary) and a `psum` of the partition function, so no device sorts or
    gathers the split axis. The kept set is the same as unsplit."""
    V = logits_BxV.shape[-1] * (1 if axis_name is None else jax.lax.psum(1, axis_name))
    top = None
    if 0 < top_k < V:
        top = _global_top(logits_BxV, top_k, axis_name)          # [B, k], descending
        logits_BxV = jnp.where(logits_BxV < top[:, -1:], -jnp.inf, logits_BxV)
    if top_p < 1.0:
        log_norm = _log_partition(logits_BxV, axis_name)
        K = min(NUCLEUS_CANDIDATES, V)
        if top is not None:
            candidates = top[:, :K]
        elif K < V:
            candidates = _global_top(logits_BxV, K, axis_name)
        else:
            candidates = -jnp.sort(-_gathered(logits_BxV, axis_name), axis=-1)
        threshold, reached = _nucleus_threshold(candidates, log_norm, top_p)
        if candidates.shape[-1] < V:
            threshold = jax.lax.cond(
                jnp.all(reached), lambda: threshold,
                lambda: _nucleus_threshold(-jnp.sort(-_gathered(logits_BxV, axis_name), axis=-1), log_norm, top_p)[0])
        logits_BxV = jnp.where(logits_BxV < threshold, -jnp.inf, logits_BxV)
    return logits_BxV


def _gathered(logits_BxV: jax.Array, axis_name: str | None) -> jax.Array:
    return logits_BxV if axis_name is None else jax.lax.all_gather(logits_BxV, axis_name, axis=1, tiled=True)


def sample_token(logits_BxV: jax.Array, rng: jax.Array, params: SamplingParams, *, per_row: bool = False,
                 filter_fn: Callable | None = None):
    """Next token `[B]`, its log-prob `[B]` under the untruncated softmax(logits / temperature), and
    its log-prob `[B]` under the behaviour policy, the truncated, renormalised distribution it was
    drawn from (0 for greedy: a deterministic choice); the two log-probs are equal when top_k and
    top_p are off (see `SampleOutput`). `rng`: one key, or with `per_row` one key per row `[B]`
    (row b then draws as a batch of one with its own key, whatever the other rows are). `filter_fn`
    (`[B, V] -> [B, V]`): `filter_logits` as the caller runs it (the engine: per vocabulary shard)."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if params.temperature == 0.0:
        token = jnp.argmax(logits_BxV, axis=-1)
        logp = jax.nn.log_softmax(logits_BxV, axis=-1)
        behaviour = jnp.zeros_like(logp)
    else:
        scaled = logits_BxV / params.temperature
        logp = jax.nn.log_softmax(scaled, axis=-1)
        # the filter runs on the whole batch, outside any vmap: its top-p fallback is a `lax.cond`
        # that a vmap would turn into computing both branches
        filtered = (filter_fn or functools.partial(filter_logits, top_k=params.top_k, top_p=params.top_p))(scaled)
        if per_row:
            token = jax.vmap(lambda f, k: jax.random.categorical(k, f[None])[0])(filtered, rng)
        else:
            token = jax.random.categorical(rng, filtered)
        truncated = params.top_p < 1.0 or 0 < params.top_k < logits_BxV.shape[-1]
        behaviour = jax.nn.log_softmax(filtered, axis=-1) if truncated else logp
    pick = lambda lp: jnp.take_along_axis(lp, token[:, None], axis=-1)[:, 0]
    return token.astype(jnp.int32), pick(logp), pick(behaviour)


def _generate(graphdef, state, prompt_ids_BxP, prompt_mask_BxP, rng, params: SamplingParams):
    model: Qwen3 = nnx.merge(graphdef, state)
    B, P = prompt_ids_BxP.shape
    N = params.max_new_tokens
    mask = prompt_mask_BxP.astype(jnp.int32)
    cache = model.init_cache(B, P + N)
    logits, cache = model.decode(prompt_ids_BxP, positions_from_segments(mask), mask.astype(bool), cache)
    next_pos = jnp.sum(mask, axis=1).astype(jnp.int32)
    eos = jnp.asarray(params.eos_ids or (-1,), jnp.int32)

    def cond(carry):
        step, _, _, _, _, _, done, _ = carry
        return (step < N) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, tokens, logprobs, behaviour, done, rng = carry
        rng, key = jax.random.split(rng)
        tok, lp, blp = sample_token(logits, key, params)
        tok = jnp.where(done, params.pad_id, tok)
        tokens = tokens.at[:, step].set(tok)
        logprobs = logprobs.at[:, step].set(jnp.where(done, 0.0, lp))
        behaviour = behaviour.at[:, step].set(jnp.where(done, 0.0, blp))
        done = done | jnp.isin(tok, eos)
        logits, cache = model.decode(tok[:, None], (next_pos + step)[:, None], jnp.ones((B, 1), bool), cache)
        return step + 1, cache, logits, tokens, logprobs, behaviour, done, rng

    init = (jnp.zeros((), jnp.int32), cache, logits, jnp.full((B, N), params.pad_id, jnp.int32),
            jnp.zeros((B, N), jnp.float32), jnp.zeros((B, N), jnp.float32), jnp.zeros((B,), bool), rng)
    _, _, _, tokens, logprobs, behaviour, _, _ = jax.lax.while_loop(cond, body, init)
    is_eos = jnp.isin(tokens, eos)
    first_eos = jnp.argmax(is_eos, axis=1)
    finished = jnp.any(is_eos, axis=1)
    lengths = jnp.where(finished, first_eos + 1, N).astype(jnp.int32)
    return SampleOutput(tokens=tokens, lengths=lengths, logprobs=logprobs, finished=finished,
                        behaviour_logprobs=behaviour)


_generate_jit = jax.jit(_generate, static_argnames=("graphdef", "params"))


def generate(model: Qwen3, prompt_ids_BxP, prompt_mask_BxP, rng: jax.Array, params: SamplingParams,
             *, state=None) -> SampleOutput:
    """Sample up to `params.max_new_tokens` tokens after each left-padded prompt.

    `state` (the model's `nnx.State`, e.g. sharded parameters held by the trainer) avoids a split.
    """
    if prompt_ids_BxP.ndim != 2 or prompt_ids_BxP.shape != prompt_mask_BxP.shape:
        raise ValueError(f"prompt ids {prompt_ids_BxP.shape} and mask {prompt_mask_BxP.shape} must both be [B, P]")
    graphdef, full_state = nnx.split(model)
    return _generate_jit(graphdef, full_state if state is None else state, jnp.asarray(prompt_ids_BxP),
                         jnp.asarray(prompt_mask_BxP), rng, params)


def response_mask(lengths_B: jax.Array, n: int) -> jax.Array:
    """`[B, n]` True on the response tokens (EOS included), False after the end."""
    return jnp.arange(n)[None, :] < lengths_B[:, None]


def as_tuple(ids: int | Sequence[int] | None) -> tuple[int, ...]:
    if ids is None:
        return ()
    return (int(ids),) if isinstance(ids, int) else tuple(int(i) for i in ids)
