"""Rule-based math reward (DAPO style) with an optional, killable math-verify check.

The reward of a response is decided from its *tail* only (the last ``tail_chars`` characters,
300 by default as in verl's ``math_dapo``): the final answer is the last answer statement there,
the last ``\\boxed{...}`` or the last ``Answer: ...`` line, whichever comes later. Prediction and
ground truth are both put through DAPO's normalisation and compared as strings, units apart;
when a :class:`MathVerifier` is given, answers that differ as strings are also checked for
mathematical equivalence with math-verify in worker processes that are killed when they run past
their time limit. ``docs/design-notes.md`` ("Reward") lists every departure from verl 0.9.1's
``math_dapo.compute_score``, with an example each; ``tests/fixtures/reward_corpus.jsonl`` holds
hand-labelled pairs that pin the behaviour.

Modules (one job each):

- :mod:`.extract`: finding the final answer (``extract_answer``, ``extract_boxed``);
- :mod:`.normalize`: normalisation and the string comparison (``normalize_final_answer``,
  ``answers_match``, ``units_conflict``);
- :mod:`.pool`: spawned worker processes with a hard per-call limit (``KillingPool``);
- :mod:`.verifier`: math-verify in that pool (``MathVerifier``, ``math_verify_equivalent``);
- :mod:`.score`: the reward (``math_reward``, ``score_responses``, ``RewardResult``) and DAPO's
  ``overlong_penalty``.

Nothing here imports jax or math-verify at import time: the verifier's worker processes import
this package, and they must start fast.
"""

from jaxrl_entropy.rl.rewards.extract import DEFAULT_TAIL_CHARS, extract_answer, extract_boxed
from jaxrl_entropy.rl.rewards.normalize import answers_match, normalize_final_answer, units_conflict
from jaxrl_entropy.rl.rewards.pool import KillingPool
from jaxrl_entropy.rl.rewards.score import (
    RewardResult,
    math_reward,
    overlong_penalty,
    score_responses,
)
from jaxrl_entropy.rl.rewards.verifier import MathVerifier, math_verify_equivalent

__all__ = [
    "DEFAULT_TAIL_CHARS",
    "KillingPool",
    "MathVerifier",
    "RewardResult",
    "answers_match",
    "extract_answer",
    "extract_boxed",
    "math_reward",
    "math_verify_equivalent",
    "normalize_final_answer",
    "overlong_penalty",
    "score_responses",
    "units_conflict",
]
