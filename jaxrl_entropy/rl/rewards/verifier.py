"""math-verify equivalence of two answers, in killable worker processes.

This module does not import math-verify: the workers import it (it is heavy: sympy), and a hang
inside it must be killable from outside (its own timeouts use ``signal.alarm``, which works only
on a process's main thread, and it can still hang, e.g. on nested powers: Math-Verify#65).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from jaxrl_entropy.rl.rewards.pool import KillingPool

__all__ = ["MathVerifier", "math_verify_equivalent"]


def math_verify_equivalent(pred: str, gold: str, timeout_s: float = 5.0) -> bool:
    """math-verify's verdict on ``pred`` == ``gold`` (both answers as LaTeX, ``$`` dropped).

    Meant to run inside a :class:`MathVerifier` worker (see the module docstring).
    """
    import math_verify  # imported lazily: heavy (sympy), needed only in the workers

    limit = max(1, math.ceil(timeout_s))

    def wrap(s: str) -> str:
        return "\\boxed{" + s.replace("$", "") + "}"

    gold_parsed = math_verify.parse(wrap(gold), parsing_timeout=limit)
    pred_parsed = math_verify.parse(wrap(pred), parsing_timeout=limit)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=limit))


class MathVerifier:
    """math-verify equivalence in a pool of killable worker processes (:class:`KillingPool`).

    Every check has a hard wall-clock limit (``timeout_s``); a worker that runs past it (a hang)
    or dies is killed and replaced, and the check answers False ("not shown equal"), so a bad
    check never blocks the trainer and the verifier keeps working. Workers are spawned (not
    forked from the process that holds JAX's state) when the verifier is created, so their
    start-up overlaps other work; a worker's start-up (spawn + sympy import, about a second, also
    after a replacement) is bounded by ``startup_timeout_s``, not by ``timeout_s``.
    Thread-safe (calls are serialised).

    Args:
      timeout_s: hard limit per equivalence check, seconds.
      workers: number of worker processes; :meth:`equivalent_many` uses them in parallel.
      startup_timeout_s: limit for a worker to start and import math-verify.
      check_fn: ``fn(pred, gold, timeout_s) -> bool`` run in the workers; must be picklable (a
        module-level function). Default :func:`math_verify_equivalent`. Tests inject slow or
        crashing functions here.
      mp_context: ``"spawn"`` (default) or ``"forkserver"``.
    """

    def __init__(
        self,
        *,
        timeout_s: float = 5.0,
        workers: int = 2,
        startup_timeout_s: float = 120.0,
        check_fn: Callable[[str, str, float], bool] | None = None,
        mp_context: str = "spawn",
    ) -> None:
        fn = check_fn if check_fn is not None else math_verify_equivalent
        self.timeout_s = float(timeout_s)
        self._pool = KillingPool(
            fn,
            workers=workers,
            timeout_s=timeout_s,
            startup_timeout_s=startup_timeout_s,
            # the default check pays its sympy import before the first timed call
            warm_up=("1", "1", timeout_s) if check_fn is None else None,
            mp_context=mp_context,
            name="MathVerifier",
        )

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current workers."""
        return self._pool.worker_pids

    def equivalent(self, pred: str, gold: str) -> bool:
        """Whether math-verify shows ``pred`` equals ``gold``; False on timeout, error or crash."""
        return self.equivalent_many([(pred, gold)])[0]

    def equivalent_many(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """:meth:`equivalent` for many ``(pred, gold)`` pairs, spread over the workers."""
        calls = [(str(pred), str(gold), self.timeout_s) for pred, gold in pairs]
        return [bool(r) for r in self._pool.map(calls, default=False)]

    def close(self) -> None:
        """Stop the workers. Safe to call twice; using the verifier afterwards raises."""
        self._pool.close()

    def __enter__(self) -> "MathVerifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
