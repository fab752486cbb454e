"""mean@k / pass@k evaluation: k sampled responses per problem, scored by the trainer's reward."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from jaxrl_entropy import parallel, stats
from jaxrl_entropy.data.pipeline import PromptBatcher
from jaxrl_entropy.data.truncation import encoder_truncation
from jaxrl_entropy.rl.rewards import score_responses


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    k: int = 8
    batch_prompts: int = 64
    max_problems: int = 0                 # 0 = all
    max_prompt_len: int = 1024
    tail_chars: int = 300
    truncation: str = "error"             # over-long prompts: "error", or "left" (keep the end)


def decode_responses(tokenizer, tokens_BxN: np.ndarray, lengths_B: np.ndarray) -> list[str]:
    return tokenizer.batch_decode([row[:n].tolist() for row, n in zip(tokens_BxN, lengths_B)],
                                  skip_special_tokens=True)


def score_benchmark(sample: Callable[[np.ndarray, np.ndarray, int], Any], tokenizer,
                       records: Sequence[dict], spec: EvalSpec, *, verifier=None, progress=None,
                       should_stop: Callable[[], bool] | None = None) -> dict:
    """Score k samples of every problem; returns mean@k, pass@k (unbiased, k samples) and counts.

    `sample(prompt_ids [B, P], prompt_mask [B, P], call_index)` returns an object with `tokens`
    and `lengths` (the sampler's output); rows are each prompt repeated k times.
    `should_stop()` is asked between batches (a collective on several processes); True raises
    `preemption.StopRequested` (a partial evaluation is no result).
    """
    records = list(records)[: spec.max_problems or None]
    if not records:
        raise ValueError("evaluation benchmark has no problems")
    n = len(records)
    batch = spec.batch_prompts
    # whole batches keep one compiled (and evenly sharded) shape: pad by cycling through the
    # problems; the padding is scored but dropped
    padded = [records[i % n] for i in range(-(-n // batch) * batch)]
    batcher = PromptBatcher(padded, tokenizer, batch_size=batch, max_prompt_len=spec.max_prompt_len,
                            seed=0, shuffle=False, num_epochs=1, shard_index=0, shard_count=1,
                            truncation=spec.truncation)
    correct = np.zeros((len(padded), spec.k), bool)
    for call, b in enumerate(batcher):
        if call and should_stop is not None and should_stop():
            from jaxrl_entropy.rundir.preemption import StopRequested
            raise StopRequested()
        ids = np.repeat(b["input_ids"], spec.k, axis=0)
        mask = np.repeat(b["attention_mask"], spec.k, axis=0)
        out = sample(ids, mask, call)
        tokens, lengths = parallel.to_host(out.tokens), parallel.to_host(out.lengths)
        lo, hi, _ = parallel.process_rows(len(tokens))   # each process scores its share of the rows
        texts = decode_responses(tokenizer, tokens[lo:hi], lengths[lo:hi])
        truths = [t for t in b["ground_truth"] for _ in range(spec.k)][lo:hi]
        results = score_responses(texts, truths, verifier=verifier, tail_chars=spec.tail_chars)
        row_correct, = parallel.gather_rows([np.array([r.correct for r in results], bool)], len(tokens))
        idx = np.asarray(b["record_index"])
        correct[idx] = row_correct.reshape(-1, spec.k)
        if progress is not None:
            progress(int(np.sum(idx < n)))  # padding rows are not problems
    correct = correct[:n]
    return {
        f"mean@{spec.k}": stats.mean_at_k(correct),
        f"pass@{spec.k}": float(np.mean([stats.pass_at_k(spec.k, int(c), spec.k) for c in correct.sum(1)])),
        "num_problems": n,
        "correct": correct,
    }


def score_benchmarks(sample, tokenizer, benchmarks: dict[str, Sequence[dict]], spec: EvalSpec, *, verifier=None,
                     progress=None, should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """All benchmarks → flat metrics `eval/<name>/mean@k`, `eval/<name>/pass@k`, and
    `eval/accuracy` = the unweighted average of the benchmarks' mean@k."""
    metrics: dict[str, float] = {}
    means = []
    for name, records in benchmarks.items():
        if means and should_stop is not None and should_stop():
            from jaxrl_entropy.rundir.preemption import StopRequested
            raise StopRequested()
        res = score_benchmark(sample, tokenizer, records, spec, verifier=verifier, progress=progress,
                                 should_stop=should_stop)
        metrics[f"eval/{name}/mean@{spec.k}"] = res[f"mean@{spec.k}"]
        metrics[f"eval/{name}/pass@{spec.k}"] = res[f"pass@{spec.k}"]
        means.append(res[f"mean@{spec.k}"])
    metrics["eval/accuracy"] = float(np.mean(means))
    return metrics


def spec_for(cfg: ml_collections.ConfigDict, mesh) -> EvalSpec:
    """Rows per sampling call ≈ one rollout batch, and a multiple of the mesh's data-parallel size."""
    e = cfg.eval
    d = parallel.batch_divisor(mesh)
    unit = d // math.gcd(d, e.k)
    batch = max(1, cfg.rl.prompts_per_step * cfg.rl.group_size // e.k)
    return EvalSpec(k=e.k, batch_prompts=-(-batch // unit) * unit, max_problems=e.max_problems,
                    max_prompt_len=cfg.data.max_prompt_len,
                    # the sets went through data.truncation (data_setup.fit_prompts) already
                    truncation=encoder_truncation(cfg.data.truncation))


def sampling_params(cfg: ml_collections.ConfigDict, eos_ids: tuple[int, ...], pad_id: int):
    from jaxrl_entropy.models.sampler import SamplingParams
    e = cfg.eval
    return SamplingParams(max_new_tokens=e.max_new_tokens or cfg.rollout.max_new_tokens, temperature=e.temperature,
                          top_p=e.top_p, eos_ids=eos_ids, pad_id=pad_id)


def num_problems(benchmarks: dict[str, Sequence[dict]], spec: EvalSpec) -> int:
    return sum(min(len(r), spec.max_problems or len(r)) for r in benchmarks.values())


def evaluate_policy(cfg: ml_collections.ConfigDict, sample_policy, params, step: int, tokenizer,
                    benchmarks: dict[str, Sequence[dict]], mesh, eos_ids: tuple[int, ...], *, verifier=None,
                    progress=None, should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """The library's evaluation entry point (the trainer and the `eval` command come through it):
    `score_benchmarks` for the policy `params`, sampled by `sample_policy(params, ids, mask, key,
    sampling_params)` (a `rollout.PolicySampler`) with the run's evaluation stream of `step`;
    `should_stop`: see `score_benchmark`."""
    import jax

    from jaxrl_entropy.training import rng
    spec = spec_for(cfg, mesh)
    sp = sampling_params(cfg, eos_ids, tokenizer.pad_token_id)
    base = rng.step_key(cfg.seed, step, rng.EVAL)
    return score_benchmarks(lambda ids, m, i: sample_policy(params, ids, m, jax.random.fold_in(base, i), sp),
                    tokenizer, benchmarks, spec, verifier=verifier, progress=progress, should_stop=should_stop)


def format_table(metrics: dict[str, float], k: int) -> str:
    """Markdown table: one row per benchmark, then the average."""
    names = sorted({key.split("/")[1] for key in metrics if key.count("/") == 2})
    lines = [f"| benchmark | mean@{k} | pass@{k} |", "|---|---|---|"]
    for n in names:
        lines.append(f"| {n} | {metrics[f'eval/{n}/mean@{k}']:.4f} | {metrics[f'eval/{n}/pass@{k}']:.4f} |")
    lines.append(f"| **average** | {metrics['eval/accuracy']:.4f} | |")
    return "\n".join(lines)


def dump_json(metrics: dict[str, float], path: str) -> None:
    with open(path, "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
