"""Tests for the rule-based math reward (jaxrl_entropy.rl.rewards).

Oracles: expected strings and numbers written by hand from the rules (DAPO normalisation, the
overlong formula), and math-verify's own verdicts on pairs whose equivalence is known.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from jaxrl_entropy.rl.rewards import (
    MathVerifier,
    RewardResult,
    extract_answer,
    extract_boxed,
    math_reward,
    normalize_final_answer,
    overlong_penalty,
    score_responses,
)

# Worker functions for MathVerifier must be module-level (spawned workers unpickle them by name).


def _sleepy_check(pred: str, gold: str, timeout_s: float) -> bool:
    """Hangs on "hang", dies on "crash", else exact string equality."""
    if pred == "hang":
        time.sleep(600)
    if pred == "crash":
        os._exit(3)
    if pred == "raise":
        raise RuntimeError("checker error")
    return pred == gold


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


def test_extract_answer_prefers_box_then_answer_line():
    assert extract_answer("Answer: 4\nso \\boxed{5}") == "5"
    assert extract_answer("work...\nAnswer: 42\n") == "42"
    assert extract_answer("answer:   7 ") == "7"  # case-insensitive, stripped
    assert extract_answer("Answer: 1\nthen\nANSWER: 2\nend") == "2"  # last line wins
    assert extract_answer("nothing to see") is None
    assert extract_answer("Answer:\n") is None


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
        (r"\mbox{ inches}", ""),
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
# Hostile inputs: bounded time, no exception
# ------------------------------------------------------------------------------------------

_NESTED_POWER = "2^{" * 5000 + "2" + "}" * 5000

_HOSTILE = [
    ("\\boxed{" + _NESTED_POWER + "}", "5"),
    ("x" * 1_000_000 + "\\boxed{3}", "3"),
    ("\\boxed{" + "{" * 10_000, "1"),
    ("}" * 10_000 + "{" * 10_000, "1"),
    ("\\boxedx" * 150_000, "1"),
    ("\\text{" * 10_000, "\\text{" * 10_000),
    ("答案是 \\boxed{π} ✓", "π"),
    ("", ""),
    (None, None),
    ("Answer: " + "1," * 200_000, "1"),
    ("\\frac{" * 50_000, "\\frac" * 50_000),
]


@pytest.mark.parametrize("tail_chars", [300, None])
@pytest.mark.parametrize("case", range(len(_HOSTILE)))
def test_hostile_inputs_are_fast_and_safe(case, tail_chars):
    response, gold = _HOSTILE[case]
    t0 = time.perf_counter()
    result = math_reward(response, gold, tail_chars=tail_chars)
    normalize_final_answer(response)
    elapsed = time.perf_counter() - t0
    assert isinstance(result, RewardResult)
    assert elapsed < 2.0, f"case {case} took {elapsed:.2f}s"


def test_hostile_expected_verdicts():
    assert math_reward(_HOSTILE[1][0], "3").correct  # megabyte response, box at the end
    assert math_reward(_HOSTILE[6][0], "π").correct  # non-ASCII
    assert not math_reward(_HOSTILE[0][0], "5").correct
    assert math_reward(_HOSTILE[2][0], "1").extracted is None


# ------------------------------------------------------------------------------------------
# MathVerifier
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(timeout_s=2.0, workers=2) as v:
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


def test_verifier_nested_powers_time_out(verifier):
    # Warm both workers first: worker start-up (spawn + sympy import) is outside the per-call limit.
    assert verifier.equivalent_many([("1", "1"), ("2", "2")]) == [True, True]
    t0 = time.perf_counter()
    assert not verifier.equivalent("2^{" * 12 + "2" + "}" * 12, "5")
    assert time.perf_counter() - t0 < verifier.timeout_s + 2.5
    assert verifier.equivalent(r"\frac{1}{2}", "0.5")  # a fresh worker took over


def test_verifier_hang_crash_and_error_with_injected_worker():
    with MathVerifier(timeout_s=0.5, workers=1, check_fn=_sleepy_check) as v:
        assert v.equivalent("a", "a")  # warm: the start-up is not part of the timed calls
        t0 = time.perf_counter()
        assert not v.equivalent("hang", "hang")
        assert time.perf_counter() - t0 < 0.5 + 2.0
        assert v.equivalent("b", "b")  # replaced worker answers
        assert not v.equivalent("crash", "crash")
        assert v.equivalent("c", "c")
        assert not v.equivalent("raise", "raise")
        assert v.equivalent("d", "d")


def test_verifier_many_with_hang_in_the_middle():
    with MathVerifier(timeout_s=0.5, workers=2, check_fn=_sleepy_check) as v:
        got = v.equivalent_many([("a", "a"), ("hang", "x"), ("b", "c"), ("crash", "x"), ("d", "d")])
        assert got == [True, False, False, False, True]
    with pytest.raises(RuntimeError, match="close"):
        v.equivalent("a", "a")


def test_verifier_rejects_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifier(timeout_s=0)
    with pytest.raises(ValueError, match="workers"):
        MathVerifier(workers=0)
    with pytest.raises(ValueError, match="fork"):
        MathVerifier(mp_context="fork")
