"""The reward of a response: find the final answer, compare it with the ground truth, score ±1.

Plus DAPO's overlong shaping, a separate vectorised term the trainer adds to the scores.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from jaxrl_entropy.rl.rewards.extract import DEFAULT_TAIL_CHARS, extract_answer
from jaxrl_entropy.rl.rewards.normalize import answers_match, normalize_final_answer, units_conflict
from jaxrl_entropy.rl.rewards.verifier import MathVerifier

__all__ = ["RewardResult", "math_reward", "overlong_penalty", "score_responses"]


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """The reward of one response.

    Attributes:
      score: ``correct_score`` (DAPO: +1.0) when correct, else ``incorrect_score`` (DAPO: -1.0).
      correct: whether the final answer matched the ground truth.
      extracted: the normalised extracted answer; None when no answer was found in the tail.
    """

    score: float
    correct: bool
    extracted: str | None


def math_reward(
    response: str,
    ground_truth: str,
    *,
    tail_chars: int | None = DEFAULT_TAIL_CHARS,
    verifier: MathVerifier | None = None,
    correct_score: float = 1.0,
    incorrect_score: float = -1.0,
) -> RewardResult:
    """DAPO's rule-based math reward of one response.

    Correct iff a final answer is found in the tail (:func:`extract_answer`) and either it matches
    the ground truth as a string (:func:`answers_match`: equal normalised forms, no conflicting
    units) or, with ``verifier``, math-verify shows them equivalent. A ground truth that
    normalises to the empty string is never matched; non-string ground truths (``42``) are
    coerced with ``str``.
    """
    return score_responses(
        [response],
        [ground_truth],
        verifier=verifier,
        tail_chars=tail_chars,
        correct_score=correct_score,
        incorrect_score=incorrect_score,
    )[0]


def score_responses(
    responses: Sequence[str],
    ground_truths: Sequence[Any],
    *,
    verifier: MathVerifier | None = None,
    tail_chars: int | None = DEFAULT_TAIL_CHARS,
    correct_score: float = 1.0,
    incorrect_score: float = -1.0,
) -> list[RewardResult]:
    """:func:`math_reward` for a batch; math-verify checks run in parallel over the workers.

    math-verify is asked only about pairs that differ as strings, have an answer and a
    non-empty ground truth, and carry no conflicting units (math-verify ignores units).
    """
    if len(responses) != len(ground_truths):
        raise ValueError(
            f"score_responses: got {len(responses)} responses but {len(ground_truths)} ground "
            "truths; pass one ground truth per response (repeat a prompt's answer G times)."
        )
    extracted: list[str | None] = []
    correct: list[bool] = []
    to_verify: list[int] = []
    raw_pairs: list[tuple[str, str]] = []
    for i, (response, gt) in enumerate(zip(responses, ground_truths)):
        raw = extract_answer(response, tail_chars=tail_chars)
        gold_raw = "" if gt is None else str(gt)
        pred = normalize_final_answer(raw) if raw is not None else None
        extracted.append(pred)
        ok = answers_match(raw, gold_raw)
        correct.append(ok)
        if (
            not ok
            and verifier is not None
            and pred
            and normalize_final_answer(gold_raw)
            and not units_conflict(raw, gold_raw)
        ):
            to_verify.append(i)
            raw_pairs.append((raw, gold_raw))
    if to_verify:
        for i, ok in zip(to_verify, verifier.equivalent_many(raw_pairs)):
            correct[i] = ok
    return [
        RewardResult(float(correct_score if ok else incorrect_score), ok, pred)
        for ok, pred in zip(correct, extracted)
    ]


def overlong_penalty(
    lengths: Any, *, max_len: int, buffer_len: int, factor: float = 1.0
) -> np.ndarray:
    """DAPO's soft overlong punishment, to be added to the rewards.

    ``exceed = len − (max_len − buffer_len)``; ``penalty = min(0, −exceed / buffer_len · factor)``.
    Lengths up to ``max_len − buffer_len`` get 0; the penalty reaches ``−factor`` at ``max_len``.

    Args:
      lengths: response lengths in tokens, any shape (e.g. ``[B]``).
      max_len: maximum response length (the rollout's token budget).
      buffer_len: width of the linear penalty ramp before ``max_len``.
      factor: penalty at ``max_len``.
    Returns:
      float32 array shaped like ``lengths``, all entries <= 0.
    """
    if not 0 < buffer_len <= max_len:
        raise ValueError(
            f"overlong_penalty: buffer_len must satisfy 0 < buffer_len <= max_len, got "
            f"buffer_len={buffer_len}, max_len={max_len}; fix the overlong-buffer settings."
        )
    lengths_f = np.asarray(lengths, dtype=np.float64)
    exceed = lengths_f - (max_len - buffer_len)
    return np.minimum(0.0, -exceed / buffer_len * factor).astype(np.float32)
