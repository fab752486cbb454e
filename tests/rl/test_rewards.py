"""Tests for the rule-based math reward (jaxrl_entropy.rl.rewards).

Oracles: expected strings and numbers written by hand from the rules (DAPO normalisation, the
overlong formula), math-verify's own verdicts on pairs whose equivalence is known, and observable
process facts (a killed worker's pid is gone, a spawned worker has not imported jax). No test
times anything: hangs are bounded by the pool's own limit, and a generous guard only turns a
real hang into a failure instead of a stuck suite. The hand-labelled corpus is in
test_reward_corpus.py.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Callable

import numpy as np
import pytest

from jaxrl_entropy.rl.rewards import (
    KillingPool,
    MathVerifier,
    RewardResult,
    answers_match,
    extract_answer,
    extract_boxed,
    math_reward,
    normalize_final_answer,
    overlong_penalty,
    score_responses,
    units_conflict,
)

# Worker functions must be module-level (spawned workers unpickle them by name).


def _sleepy_check(pred: str, gold: str, timeout_s: float) -> bool:
    """Blocks forever on "hang", dies on "crash", raises on "raise", else string equality."""
    if pred == "hang":
        threading.Event().wait()  # never set: only a kill ends this call
    if pred == "crash":
        os._exit(3)
    if pred == "raise":
        raise RuntimeError("checker error")
    return pred == gold


def _probe(what: str) -> Any:
    """Facts about the worker process."""
    if what == "pid":
        return os.getpid()
    if what == "jax imported":
        return "jax" in sys.modules
    raise ValueError(what)


# A guard, not a timing: every call below ends within a few seconds when the pool works; the
# guard only turns a real hang into a failure instead of a stuck test suite.
_HANG_GUARD_S = 120.0


def _finishes(fn: Callable[[], Any]) -> Any:
    """``fn()``'s result; fails the test if ``fn`` has not returned within the hang guard."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(_HANG_GUARD_S)
    assert not t.is_alive(), f"did not return within {_HANG_GUARD_S}s: the pool is stuck"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A killed child that was reaped no longer exists; an unreaped one is a zombie.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# ------------------------------------------------------------------------------------------
# Extraction
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so the answer is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{\sqrt{\frac{a}{b}}}", r"\sqrt{\frac{a}{b}}"),
        (r"first \boxed{1}, then \boxed{2}, finally \boxed{3}", "3"),
        (r"$\boxed 5$ done", "5"),
        (r"\boxed7", "7"),
        (r"\boxed {12}", "12"),
        (r"\fbox{x+1}", "x+1"),
        (r"\boxed{1} and \fbox{2}", "2"),
        (r"\fbox{1} and \boxed{2}", "2"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not count
        (r"\boxed{}", ""),
    ],
)
def test_extract_boxed_finds_last_box(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no box here",
        r"\boxed{\frac{1}{2}",  # never closed
        r"\boxed{1} then \boxed{2",  # the LAST box is unbalanced: no fallback to an earlier one
        r"\boxeds{3}",  # another command name
        "\\boxed",
    ],
)
def test_extract_boxed_none(text):
    assert extract_boxed(text) is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("work...\nAnswer: 42\n", "42"),
        ("answer:   7 ", "7"),  # case-insensitive, stripped
        ("answer : 7", "7"),
        ("Answer: 1\nthen\nANSWER: 2\nend", "2"),  # the last line wins
        ("Answer:\n5", "5"),  # the content may start on the next line (as verl reads it)
        ("Answer:\n\n  5\n", "5"),
        ("Answer: 5\nAnswer:", "5"),  # an empty trailing `Answer:` states nothing
        ("Answer: 5\n\nAnswer:\n", "5"),
        ("Answer:\nAnswer: 5", "5"),
        ("**Answer:** 5", "5"),  # markdown emphasis is not part of the answer
        ("Answer: **5**", "5"),
        ("Answer: x = 5.", "x = 5."),  # raw: normalisation comes later
        # The later statement wins, box or Answer line.
        ("Answer: 4\nso \\boxed{5}", "5"),
        ("\\boxed{4}\nwait, no.\nAnswer: 5", "5"),
        # A box inside an Answer line is that line's answer, and vice versa.
        ("Answer: \\boxed{5} cm", "5"),
        ("Answer: 4 \\boxed{5}", "5"),
        ("\\boxed{Answer: 5}", "Answer: 5"),
        # A truncated final box is no answer, even after a complete statement.
        ("Answer: 5\n\\boxed{5", None),
        ("nothing to see", None),
        ("Answer:\n", None),
        ("Answer:", None),
        ("", None),
    ],
)
def test_extract_answer_takes_the_last_statement(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_only_reads_the_tail():
    response = "\\boxed{7}" + "x" * 400
    assert extract_answer(response) is None  # default tail 300
    assert extract_answer(response, tail_chars=500) == "7"
    assert extract_answer(response, tail_chars=None) == "7"
    # A box whose opening lies before the tail cannot be read (its tail is just "zz...z}").
    cut = "y" * 50 + "\\boxed{" + "z" * 300 + "}"
    assert extract_answer(cut) is None
    assert extract_answer("\\boxed{3}" + "w" * 100, tail_chars=100) is None


# ------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("x = 5", "5"),  # last part after "="
        ("y=2x=10", "10"),
        ("5 square units", "5"),
        ("12 cm", "12"),
        ("12cm", "12"),
        (r"10 \text{ cm}^2", "10"),  # unit with its power
        (r"10\text{m}", "10"),  # \text{m} is metres
        ("4 meters", "4"),
        ("1 meter", "1"),
        ("3 inches", "3"),
        ("1 inch", "1"),
        ("7 miles", "7"),
        ("6 feet", "6"),
        ("1 foot", "1"),
        (r"90^\circ", "90"),
        (r"90^{\circ}", "90"),
        ("45 degrees", "45"),
        (r"\mbox{ inches}", "inches"),  # a unit word alone is the answer: kept
        (r"\text{hours}", "hours"),
        (r"$\text{hours}$", "hours"),
        (r"5 \text{ hours}", "5"),
        (r"2 \text{ days}", "2"),
        (r"\text{m}", "m"),
        ("12 ways", "12"),
        (r"3 \text{ and } 4", "3,4"),  # spaces inside the braces (verl removes them first)
        (r"3, \text{ and } 4", "3,4"),
        (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
        (r"1\ 000", "1000"),  # a control space
        (r"5^{\mathrm{th}}", "5"),  # an ordinal
        (r"5\text{s}", "5"),
        ('"yes"', "yes"),
        (r"\text{(A)}", "(A)"),
        (r"\textbf{17}", "17"),
        (r"\overline{AB}", "AB"),
        (r"\boxed{12}", "12"),
        (r"\text{\textbf{7}}", "7"),
        (r"\dfrac{3}{4}", r"\frac{3}{4}"),
        (r"\tfrac{3}{4}", r"\frac{3}{4}"),
        (r"\frac12", r"\frac{1}{2}"),
        (r"\fracab", r"\frac{a}{b}"),
        (r"\frac 1 2", r"\frac{1}{2}"),
        (r"\frac{1}2", r"\frac{1}{2}"),
        (r"\frac1{2}", r"\frac{1}{2}"),
        (r"\frac{12}{35}", r"\frac{12}{35}"),
        (r"\sqrta", r"\sqrt{a}"),
        (r"\sqrt2/2", r"\sqrt{2}/2"),
        (r"\sqrt[3]{2}", r"\sqrt[3]{2}"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"\left[0, \infty\right)", r"[0,\infty)"),
        (r"\rightarrow", r"\rightarrow"),  # \right only as a whole command
        (r"1,\!000", "1000"),
        ("1,000", "1000"),
        ("1,000,000", "1000000"),
        ("-12,345.5", "-12345.5"),
        ("1{,}000", "1000"),
        ("1,2", "1,2"),  # a pair, not a grouped number
        ("(1,000, 2)", "(1,000,2)"),  # commas kept: not a single number
        (r"\$1,000", "1000"),
        ("5.00", "5"),
        ("5.0", "5"),
        ("-3.0", "-3"),
        ("5.05", "5.05"),
        ("$5$.", "5"),
        ("The answer is $7$ apples", "7"),
        ("  42  ", "42"),
        ("42.", "42"),
        (r"\text{1 and 2}", "1and2"),
        (r"1 \text{and} 2", "1,2"),
        (r"1,\text{and} 2", "1,2"),
        ("an equilateral triangle", "equilateraltriangle"),
        ("a + b", "a+b"),  # a lone `a` is a variable
        (r"\lcm(3, 4)", r"\lcm(3,4)"),  # `cm` inside a command name stays
        (r"50\%", "50"),
        (r"1\,000", "1000"),
        (r"\displaystyle \frac{\pi}{2}", r"\frac{\pi}{2}"),
        ("", ""),
    ],
)
def test_normalize_final_answer(raw, expected):
    assert normalize_final_answer(raw) == expected


@pytest.mark.parametrize(
    "pred, gold, conflict",
    [
        (r"2 \text{ minutes}", r"2 \text{ seconds}", True),
        (r"2 \text{ hours}", r"2 \text{ minutes}", True),
        (r"3 \text{ km}", r"3\text{ m}", True),
        ("5 feet", "5 inches", True),
        ("12 dollars", "12 cents", True),
        (r"3 \text{ meters}", r"3\text{ m}", False),  # the same unit
        ("1 inch", "1 inches", False),
        ("5 cm", "5", False),  # a bare number takes the question's unit
        ("5", "5 cm", False),
        ("5 square units", "5 units", False),  # counted words are no units
        ("12 ways", "12 students", False),
        (r"\lcm(3, 4)", "12 cm", False),  # `cm` inside a command name is no unit
    ],
)
def test_units_conflict(pred, gold, conflict):
    assert units_conflict(pred, gold) is conflict
    assert units_conflict(gold, pred) is conflict


def test_answers_match():
    assert answers_match(r"\dfrac{1}{2}", r"\frac12")
    assert answers_match("5 cm", "5")
    assert answers_match(r"\text{hours}", r"\text{hours}")
    assert not answers_match(r"\text{minutes}", r"\text{hours}")
    assert not answers_match(r"2 \text{ minutes}", r"2 \text{ seconds}")
    assert not answers_match(None, "5")
    assert not answers_match("", "")  # an empty ground truth matches nothing
    assert not answers_match("5", None)
    assert answers_match("42", 42)


def test_normalize_coerces_non_strings():
    assert normalize_final_answer(42) == "42"
    assert normalize_final_answer(2.0) == "2"
    assert normalize_final_answer(None) == ""


# ------------------------------------------------------------------------------------------
# math_reward / score_responses
# ------------------------------------------------------------------------------------------


def test_math_reward_correct_and_incorrect():
    r = math_reward(r"... so \boxed{\dfrac{1}{2}}", r"\frac12")
    assert r == RewardResult(score=1.0, correct=True, extracted=r"\frac{1}{2}")
    r = math_reward(r"\boxed{3}", "4")
    assert r == RewardResult(score=-1.0, correct=False, extracted="3")
    r = math_reward("I do not know", "4")
    assert r == RewardResult(score=-1.0, correct=False, extracted=None)
    r = math_reward("Answer: 1,000 meters", "1000")
    assert r.correct and r.score == 1.0
    r = math_reward(r"\boxed{3}", "3", correct_score=1.0, incorrect_score=0.0)
    assert r.score == 1.0
    r = math_reward(r"\boxed{4}", "3", correct_score=1.0, incorrect_score=0.0)
    assert r.score == 0.0


def test_math_reward_ground_truth_types():
    assert math_reward(r"\boxed{42}", 42).correct  # int ground truth
    assert math_reward(r"\boxed{0.5}", 0.5).correct  # float ground truth
    assert math_reward(r"\boxed{2}", 2.0).correct  # 2.0 and 2 normalise alike
    assert not math_reward(r"\boxed{None}", None).correct  # no ground truth: never correct
    assert not math_reward(r"\boxed{}", "").correct  # empty matches nothing
    assert math_reward(r"\boxed{x=5}", r"\boxed{5}").correct


def test_score_responses_batch():
    results = score_responses(
        [r"\boxed{1}", "Answer: 2", "nothing", r"\boxed{4}"], ["1", "3", "3", 4]
    )
    assert [r.score for r in results] == [1.0, -1.0, -1.0, 1.0]
    assert [r.extracted for r in results] == ["1", "2", None, "4"]
    with pytest.raises(ValueError, match="ground truth"):
        score_responses(["a", "b"], ["1"])
    assert score_responses([], []) == []


# ------------------------------------------------------------------------------------------
# Overlong shaping
# ------------------------------------------------------------------------------------------


def test_overlong_penalty_hand_values():
    # max_len 20, buffer 4: the ramp starts at 16 and reaches -factor at 20.
    got = overlong_penalty(np.array([0, 10, 16, 17, 18, 20]), max_len=20, buffer_len=4)
    np.testing.assert_allclose(got, [0.0, 0.0, 0.0, -0.25, -0.5, -1.0], atol=1e-7)
    got = overlong_penalty([18, 20], max_len=20, buffer_len=4, factor=0.5)
    np.testing.assert_allclose(got, [-0.25, -0.5], atol=1e-7)
    got = overlong_penalty(np.array([[16, 19], [4, 20]]), max_len=20, buffer_len=4)
    assert got.shape == (2, 2)
    np.testing.assert_allclose(got, [[0.0, -0.75], [0.0, -1.0]], atol=1e-7)
    # DAPO's own setting: L_max 20480, buffer 4096 -> 18432 tokens is half-way down the ramp.
    np.testing.assert_allclose(
        overlong_penalty([18432], max_len=20480, buffer_len=4096), [-0.5], atol=1e-7
    )


@pytest.mark.parametrize("buffer_len", [0, -1, 21])
def test_overlong_penalty_rejects_bad_buffer(buffer_len):
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty([1], max_len=20, buffer_len=buffer_len)


# ------------------------------------------------------------------------------------------
# Hostile inputs: no exception, no hang (the code is linear; the guard only catches a blow-up)
# ------------------------------------------------------------------------------------------

_NESTED_POWER = "2^{" * 5000 + "2" + "}" * 5000

_HOSTILE = [
    ("\\boxed{" + _NESTED_POWER + "}", "5"),
    ("x" * 200_000 + "\\boxed{3}", "3"),
    ("\\boxed{" + "{" * 10_000, "1"),
    ("}" * 10_000 + "{" * 10_000, "1"),
    ("\\boxedx" * 30_000, "1"),
    ("\\text{" * 10_000, "\\text{" * 10_000),
    ("答案是 \\boxed{π} ✓", "π"),
    ("", ""),
    (None, None),
    ("Answer: " + "1," * 50_000, "1"),
    ("\\frac{" * 20_000, "\\frac" * 20_000),
    ("Answer:" * 30_000, "1"),  # many markers on one line
    ("Answer:" + " " * 200_000, "1"),
    ("answer\n:\n" * 20_000, "1"),
    (" minutes 2 cm" * 20_000, " hours 2 km" * 20_000),
    ("**" * 100_000, "1"),
]


def _hostile_case(case: int) -> str:
    """Runs every entry point on one hostile input (in a pool worker); "ok" or the error."""
    response, gold = _HOSTILE[case]
    try:
        results = [math_reward(response, gold), math_reward(response, gold, tail_chars=None)]
        normalize_final_answer(response)
        units_conflict(response, gold)
    except Exception as e:  # noqa: BLE001 - reported to the test
        return f"{type(e).__name__}: {e}"
    return "ok" if all(isinstance(r, RewardResult) for r in results) else "not a RewardResult"


def test_hostile_inputs_are_safe():
    # Each case runs in a killable worker: regexes hold the GIL, so only a process can be stopped.
    # The limit is a hang guard, far above the ~1 s a megabyte input takes, not a timing.
    with KillingPool(_hostile_case, workers=2, timeout_s=_HANG_GUARD_S) as pool:
        got = pool.map([(i,) for i in range(len(_HOSTILE))], default="killed: ran past the guard")
    assert got == ["ok"] * len(_HOSTILE), [(i, g) for i, g in enumerate(got) if g != "ok"]


def test_hostile_expected_verdicts():
    assert math_reward(_HOSTILE[1][0], "3").correct  # a long response, box at the end
    assert math_reward(_HOSTILE[6][0], "π").correct  # non-ASCII
    assert not math_reward(_HOSTILE[0][0], "5").correct
    assert math_reward(_HOSTILE[2][0], "1").extracted is None
    assert math_reward(_HOSTILE[11][0], "1").extracted is None  # no content after any marker


# ------------------------------------------------------------------------------------------
# MathVerifier and its pool
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(timeout_s=5.0, workers=2) as v:
        yield v


def test_verifier_equivalences(verifier):
    assert verifier.equivalent(r"\frac{1}{2}", "0.5")
    assert verifier.equivalent("0.5", r"\frac{1}{2}")
    assert not verifier.equivalent("2", "3")
    pairs = [("x+1", "1+x"), ("2", "3"), (r"\sqrt{2}/2", r"\frac{1}{\sqrt{2}}")]
    assert verifier.equivalent_many(pairs) == [True, False, True]


def test_math_reward_uses_verifier(verifier):
    assert not math_reward(r"\boxed{0.5}", r"\frac{1}{2}").correct  # strings differ
    r = math_reward(r"\boxed{0.5}", r"\frac{1}{2}", verifier=verifier)
    assert r.correct and r.score == 1.0 and r.extracted == "0.5"
    assert not math_reward(r"\boxed{0.6}", r"\frac{1}{2}", verifier=verifier).correct
    results = score_responses(
        [r"\boxed{0.5}", r"\boxed{2}", "nothing"], [r"\frac{1}{2}", "3", "1"], verifier=verifier
    )
    assert [r.correct for r in results] == [True, False, False]


def test_unit_conflict_is_decisive_with_verifier(verifier):
    # math-verify ignores units and would call these equal; a unit conflict is never sent to it.
    assert verifier.equivalent(r"2 \text{ minutes}", r"2 \text{ seconds}")
    r = math_reward(r"\boxed{2 \text{ minutes}}", r"2 \text{ seconds}", verifier=verifier)
    assert not r.correct


def test_verifier_nested_powers_are_killed(verifier):
    # Warm both workers first: worker start-up (spawn + sympy import) is outside the per-call limit.
    assert _finishes(lambda: verifier.equivalent_many([("1", "1"), ("2", "2")])) == [True, True]
    assert not _finishes(lambda: verifier.equivalent("2^{" * 12 + "2" + "}" * 12, "5"))
    assert _finishes(lambda: verifier.equivalent(r"\frac{1}{2}", "0.5"))  # the pool still works


def test_hang_is_killed_and_the_pool_keeps_working():
    with MathVerifier(timeout_s=2.0, workers=1, check_fn=_sleepy_check) as v:
        assert _finishes(lambda: v.equivalent("a", "a"))
        (before,) = v.worker_pids
        assert not _finishes(lambda: v.equivalent("hang", "hang"))  # killed: counts as False
        (after,) = v.worker_pids
        assert after != before and _dead(before)
        assert _finishes(lambda: v.equivalent("b", "b"))  # the fresh worker answers


def test_crash_is_replaced_and_an_exception_is_just_false():
    with MathVerifier(timeout_s=30.0, workers=1, check_fn=_sleepy_check) as v:
        assert _finishes(lambda: v.equivalent("a", "a"))
        (first,) = v.worker_pids
        assert not _finishes(lambda: v.equivalent("raise", "raise"))
        assert v.worker_pids == [first]  # an exception is an answer: the worker is kept
        assert not _finishes(lambda: v.equivalent("crash", "crash"))
        (second,) = v.worker_pids
        assert second != first and _dead(first)
        assert _finishes(lambda: v.equivalent("c", "c"))


def test_many_with_hang_and_crash_in_the_middle():
    with MathVerifier(timeout_s=2.0, workers=2, check_fn=_sleepy_check) as v:
        got = _finishes(
            lambda: v.equivalent_many(
                [("a", "a"), ("hang", "x"), ("b", "c"), ("crash", "x"), ("d", "d")]
            )
        )
        assert got == [True, False, False, False, True]
    with pytest.raises(RuntimeError, match="close"):
        v.equivalent("a", "a")


def test_idle_worker_killed_from_outside_is_replaced():
    # The OOM killer may take a worker that is doing nothing; the next calls must still be
    # answered. One worker, so the next call must go through the dead one (whichever way the
    # race with the kill goes: seen dead, or the send lands and the pipe closes, or the send fails).
    with MathVerifier(timeout_s=30.0, workers=1, check_fn=_sleepy_check) as v:
        assert _finishes(lambda: v.equivalent("a", "a"))
        (victim,) = v.worker_pids
        os.kill(victim, signal.SIGKILL)
        got = _finishes(lambda: v.equivalent_many([("c", "c"), ("e", "f"), ("g", "g")]))
        assert got == [True, False, True]
        assert v.worker_pids != [victim] and _dead(victim)


def test_workers_are_spawned_not_forked():
    import jax  # noqa: F401 - the parent holds jax; a forked child would inherit the module

    with KillingPool(_probe, workers=1, timeout_s=30.0) as pool:
        pid, has_jax = _finishes(lambda: pool.map([("pid",), ("jax imported",)], default=None))
    assert pid != os.getpid()
    assert has_jax is False


def test_pool_gives_up_after_repeated_start_failures():
    # Every worker dies in its warm-up: after 3 failed starts per worker the pool stops trying
    # and answers the default at once (the trainer goes on without math-verify).
    with KillingPool(
        _sleepy_check, workers=1, timeout_s=30.0, warm_up=("crash", "crash", 0.0)
    ) as pool:
        assert _finishes(lambda: pool.map([("a", "a", 0.0)], default="none")) == ["none"]
        assert pool.broken
        assert pool.map([("b", "b", 0.0)], default=False) == [False]


def test_pool_default_for_unpicklable_arguments():
    with KillingPool(_sleepy_check, workers=1, timeout_s=30.0) as pool:
        got = _finishes(lambda: pool.map([(lambda: 0, "x", 0.0), ("a", "a", 0.0)], default=None))
    assert got == [None, True]


def test_verifier_rejects_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifier(timeout_s=0)
    with pytest.raises(ValueError, match="workers"):
        MathVerifier(workers=0)
    with pytest.raises(ValueError, match="fork"):
        MathVerifier(mp_context="fork")
    with pytest.raises(ValueError, match="startup_timeout_s"):
        MathVerifier(startup_timeout_s=0)
