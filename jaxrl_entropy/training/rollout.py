"""Rollouts: G sampled responses per prompt, decoded and scored, and DAPO's dynamic sampling that
keeps generating until the batch holds `rl.prompts_per_step` groups whose accuracy varies.

    sample = PolicySampler(policy, cfg)             # (params, ids, mask, key, sampling params) → SampleOutput
    collector = RolloutCollector(cfg, tokenizer, batcher, records, verifier, eos_ids)
    batch, metrics = collector.collect(step, lambda ids, mask, key, sp: sample(params, ids, mask, key, sp))

Generation batch g of step s samples with `fold_in(rng.step_key(seed, s, rng.SAMPLE), g)`, so a
resumed run samples exactly what an uninterrupted one would.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from jaxrl_entropy import parallel
from jaxrl_entropy.training import rng
from jaxrl_entropy.training.evaluate import decode_responses
from jaxrl_entropy.training.model_setup import Policy
from jaxrl_entropy.models import sampler
from jaxrl_entropy.rundir.preemption import StopRequested
from jaxrl_entropy.rl import advantages as adv_lib
from jaxrl_entropy.training.sampling import rollout_sampling_params
from jaxrl_entropy.rl.rewards import overlong_penalty, score_responses

SampleFn = Callable[[np.ndarray, np.ndarray, jax.Array, sampler.SamplingParams], sampler.SampleOutput]


class PolicySampler:
    """Generation from given parameters; the one place training, evaluation and the warm-up's
    checks sample from.

    With `rollout.engine="paged"` (the default; `cfg` given): the rollout engine of this host
    (`engine_setup`): the weights are cast and resharded once per parameter set (kept until
    `release()` or new parameters), every process generates its share of the rows, all rows come
    back on every process. Without `cfg`, or `"dense"`: host prompt arrays `[B, P]` become global
    arrays with rows over the mesh's batch axes, then `sampler.generate`.
    """

    def __init__(self, policy: Policy, cfg: ml_collections.ConfigDict | None = None, *, progress: bool = False):
        self.policy = policy
        self.batch_sharding = parallel.batch_sharding(policy.mesh, 2)
        self.engine = None
        self.progress = progress
        if cfg is not None and cfg.rollout.engine == "paged":
            from jaxrl_entropy.training import engine_setup
            self.engine = engine_setup.build(cfg, policy)
        self._inference: tuple[Any, Any] | None = None  # (training params, engine copy)

    def __call__(self, params, ids_BxP, mask_BxP, key, sp: sampler.SamplingParams) -> sampler.SampleOutput:
        if self.engine is not None:
            from jaxrl_entropy.training import engine_setup
            return engine_setup.generate(self.engine, self.inference_params(params), ids_BxP, mask_BxP, key, sp,
                                         progress=self.progress)
        ids = parallel.host_to_global(np.asarray(ids_BxP, np.int32), self.batch_sharding)
        mask = parallel.host_to_global(np.asarray(mask_BxP, np.int32), self.batch_sharding)
        return sampler.generate(self.policy.module(params), ids, mask, key, sp, state=params)

    def inference_params(self, params):
        """The engine's copy of `params` (made on first use of this parameter set)."""
        if self._inference is None or self._inference[0] is not params:
            from jaxrl_entropy.training import engine_setup
            self._inference = None  # free the old copy before making the new one
            self._inference = (params, engine_setup.inference_params(self.engine, params, self.policy.mesh))
        return self._inference[1]

    def release(self) -> None:
        """Drop the engine's copy of the weights (before an update needs the memory)."""
        self._inference = None


def logp_diff_metrics(rollout_logp_MxN, old_logp_MxN, mask_MxN) -> dict[str, float]:
    """|rollout log-prob − old-policy log-prob| over response tokens (max and mean), as verl logs
    it: a mismatch between the sampler's numerics and the training forward's shows up here."""
    mask = np.asarray(mask_MxN, bool)
    if not mask.any():
        return {"rollout/logp_diff_max": 0.0, "rollout/logp_diff_mean": 0.0}
    diff = np.abs(np.asarray(rollout_logp_MxN, np.float64) - np.asarray(old_logp_MxN, np.float64))[mask]
    return {"rollout/logp_diff_max": float(diff.max()), "rollout/logp_diff_mean": float(diff.mean())}


def behaviour_gap_metrics(behaviour_logp_MxN, rollout_logp_MxN, mask_MxN) -> dict[str, float]:
    """With top-k / top-p sampling, tokens are drawn from the truncated, renormalised distribution:
    its log-prob exceeds the untruncated one by −log(mass kept). The mean of that gap over response
    tokens, and the largest, say how far the behaviour policy is from the policy the loss scores."""
    mask = np.asarray(mask_MxN, bool)
    if not mask.any():
        return {"rollout/behaviour_logp_gap_mean": 0.0, "rollout/behaviour_logp_gap_max": 0.0}
    gap = (np.asarray(behaviour_logp_MxN, np.float64) - np.asarray(rollout_logp_MxN, np.float64))[mask]
    return {"rollout/behaviour_logp_gap_mean": float(gap.mean()), "rollout/behaviour_logp_gap_max": float(gap.max())}


class RolloutCollector:
    """Prompt batches → scored groups of G responses → a full rollout batch."""

    def __init__(self, cfg: ml_collections.ConfigDict, tokenizer, batcher, records, verifier,
                 eos_ids: tuple[int, ...]):
        self.cfg, self.tokenizer, self.batcher, self.records = cfg, tokenizer, batcher, records
        self.verifier = verifier
        self.sampling = rollout_sampling_params(cfg.rollout, eos_ids, tokenizer.pad_token_id)

    def generate_and_score(self, step: int, gen_index: int, sample: SampleFn,
                           prompts: int | None = None) -> dict[str, Any]:
        """One generation batch: `rl.prompts_per_step` prompts (or its first `prompts`) × G responses,
        decoded and rewarded.
        Returns host arrays: prompt_ids/prompt_mask `[M, P]`, response `[M, N]`, lengths, reward,
        correct, finished `[M]` (M = prompts × G, each prompt's G rows adjacent)."""
        cfg, G = self.cfg, self.cfg.rl.group_size
        batch = next(self.batcher)
        if jax.process_count() > 1:  # every process holds the whole batch (its rows are sharded later)
            from jax.experimental import multihost_utils
            batch = {k: (np.asarray(multihost_utils.process_allgather(v, tiled=True))
                         if isinstance(v, np.ndarray) else v) for k, v in batch.items()}
            batch["ground_truth"] = [self.records[i]["reward_model"]["ground_truth"]
                                     for i in batch["record_index"]]
        if prompts is not None:  # the batch's first prompts: the others would have been discarded
            batch = {k: v[:prompts] for k, v in batch.items()}
        ids = np.repeat(batch["input_ids"], G, axis=0)
        mask = np.repeat(batch["attention_mask"], G, axis=0)
        key = jax.random.fold_in(rng.step_key(cfg.seed, step, rng.SAMPLE), gen_index)
        out = sample(ids, mask, key, self.sampling)
        tokens, lengths = parallel.to_host(out.tokens), parallel.to_host(out.lengths)
        logprobs = parallel.to_host(out.logprobs)
        behaviour = logprobs if out.behaviour_logprobs is None else parallel.to_host(out.behaviour_logprobs)
        # each process decodes and scores its share of the rows (the verifier is the costly part),
        # then every process gets every row's reward
        lo, hi, _ = parallel.process_rows(len(tokens))
        texts = decode_responses(self.tokenizer, tokens[lo:hi], lengths[lo:hi])
        truths = [t for t in batch["ground_truth"] for _ in range(G)][lo:hi]
        results = score_responses(texts, truths, verifier=self.verifier, correct_score=cfg.rl.correct_score,
                                  incorrect_score=cfg.rl.incorrect_score)
        reward, correct = parallel.gather_rows([np.array([r.score for r in results], np.float32),
                                                np.array([r.correct for r in results], bool)], len(tokens))
        if cfg.rl.overlong_buffer:
            reward = reward + overlong_penalty(lengths, max_len=cfg.rollout.max_new_tokens,
                                               buffer_len=cfg.rl.overlong_buffer, factor=cfg.rl.overlong_factor)
        return {"prompt_ids": ids, "prompt_mask": mask, "response": tokens, "lengths": lengths, "logprobs": logprobs,
                "behaviour_logprobs": behaviour,
                "reward": reward.astype(np.float32), "correct": correct,
                "finished": parallel.to_host(out.finished)}

    def collect(self, step: int, sample: SampleFn,
                should_stop: Callable[[], bool] | None = None) -> tuple[dict[str, Any], dict[str, float]]:
        """A full rollout batch; with `rl.dynamic_sampling` only groups whose accuracy varies are kept
        (more generation batches until `rl.prompts_per_step` groups, at most `rl.max_gen_batches`).
        `should_stop()` is asked between generation batches (a collective on several processes);
        True raises `preemption.StopRequested` and the partial rollout is dropped (the caller
        rewinds the data iterator to the step's start)."""
        cfg = self.cfg
        seen: list[dict] = []
        extra: dict[str, float] = {}
        if not cfg.rl.dynamic_sampling:
            batch = self.generate_and_score(step, 0, sample)
            seen.append(batch)
        else:
            acc = adv_lib.GroupAccumulator(cfg.rl.prompts_per_step, cfg.rl.group_size, cfg.rl.max_gen_batches,
                                           metric_key="correct")
            per_batch, n_proc = cfg.rl.prompts_per_step, jax.process_count()
            while not acc.full:
                if seen and should_stop is not None and should_stop():
                    raise StopRequested()
                k = adv_lib.prompts_to_generate(per_batch, acc.groups_kept, acc.groups_seen, per_batch,
                                                last=len(seen) + 1 == cfg.rl.max_gen_batches)
                k = min(per_batch, -(-k // n_proc) * n_proc)   # every process decodes an equal share
                b = self.generate_and_score(step, len(seen), sample, prompts=k)
                seen.append(b)
                acc.add(b)
            batch = acc.take()
            extra = {"sampling/gen_batches": acc.last_stats["gen_batches"],
                     "sampling/generated_rows": sum(len(b["lengths"]) for b in seen),
                     "sampling/kept_group_frac": acc.last_stats["groups_kept"] / acc.last_stats["groups_seen"]}
        every = {k: np.concatenate([b[k] for b in seen]) for k in ("reward", "correct", "lengths", "finished")}
        metrics = {"reward/mean": float(every["reward"].mean()), "accuracy": float(every["correct"].mean()),
                   "response_len/mean": float(every["lengths"].mean()),
                   "response_len/max": int(every["lengths"].max()),
                   "response_len/clip_frac": float(1.0 - every["finished"].mean()),
                   "reward/batch_mean": float(batch["reward"].mean()), **extra}
        return batch, metrics
