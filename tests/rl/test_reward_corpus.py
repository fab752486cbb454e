"""The reward against a hand-labelled corpus (tests/fixtures/reward_corpus.jsonl).

Oracle: the hand labels (labelling policy in tests/fixtures/README.md), decided per pair
independently of any implementation. Every disagreement is listed below with its reason; an
unlisted disagreement, or a listed pair that now agrees, fails the test (update the list, the
label, or the code, and say why). Agreement with math-verify (reading the whole response, its
own way) and the departures from verl 0.9.1's ``math_dapo`` (stored verdicts) are pinned the same
way.
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import REPO_ROOT
from jaxrl_entropy.rl.rewards import KillingPool, MathVerifier, score_responses

_ROOT = REPO_ROOT
_CORPUS = _ROOT / "tests" / "fixtures" / "reward_corpus.jsonl"
_DESIGN_NOTES = _ROOT / "docs" / "design-notes.md"


def _both(*names: str) -> list[str]:
    """The `box:` and `answer:` variants of answer-level pairs."""
    return [f"{form}:{n}" for n in names for form in ("box", "answer")]


# Our verdict without math-verify (`rl.math_verify=False`, the default) vs the labels.
KNOWN_STRING_DISAGREEMENTS: dict[str, list[str]] = {
    "equal values written differently: the string comparison cannot see it (math-verify can)": [
        *_both(
            "neg-zero", "power-of-ten", "decimal-trailing-zero", "decimal-leading-dot",
            "explicit-plus", "slash-frac", "decimal-frac", "unreduced-frac", "neg-numerator",
            "neg-decimal-frac", "mixed-number", "rationalised", "sqrt-simplified", "pi-slash",
            "set-order", "list-order", "plain-and", "expanded", "commuted", "factored",
            "sqrt-power", "choice-bare-letter",
        ),
        "qwen:decimal-frac", "qwen:expanded", "dapo:leading-zero",
    ],  # fmt: skip
    "an Answer line holding a sentence ('The answer is 42.') is compared whole": ["dapo:sentence"],
    "hedging ('\\boxed{4} or \\boxed{5}') is not detected: the last box is the answer": [
        "form:box-hedge"
    ],
    "a prose 'answer:' after the box ('Verification of the answer: 2+3=5') is read as a later "
    "Answer line": ["form:prose-answer-colon-after-box"],
}

# Our verdict with math-verify (`rl.math_verify=True`) vs the labels.
KNOWN_VERIFIER_DISAGREEMENTS: dict[str, list[str]] = {
    "math-verify compares numbers to 6 significant digits: 0.3333333 = 1/3": _both(
        "long-rounded-third"
    ),
    "hedging ('\\boxed{4} or \\boxed{5}') is not detected: the last box is the answer": [
        "form:box-hedge"
    ],
}

# math-verify alone (math_verify.parse on the whole response, verify against \boxed{gt}) vs the
# labels: a reference, not our reward.
KNOWN_MATH_VERIFY_DISAGREEMENTS: dict[str, list[str]] = {
    "reads an answer that is not in the required format or not at the end (prose, a bare "
    "number, outside the last 300 characters, before a truncated box)": [
        "demo:no-box", "form:prose-only", "form:prose-equation", "form:bare-number",
        "form:box-too-early", "form:answer-too-early", "form:last-box-unclosed",
    ],
    "prefers a \\boxed{} anywhere over a later Answer line": ["form:box-then-answer"],
    "takes the first of two answers ('Answer: 5 or 6')": ["form:answer-hedge"],
    "ignores units: 2 minutes = 2 seconds, 3 km = 3 m": [
        *_both("unit-minutes-seconds", "unit-hours-minutes", "unit-km-m"),
        "qwen:unit-minutes-seconds",
    ],
    "compares numbers to 6 significant digits: 0.3333333 = 1/3": _both("long-rounded-third"),
    "does not read LaTeX or words on an Answer line outside $...$ (or misreads them)": [
        "answer:explicit-plus", "answer:frac-shorthand", "answer:rationalised",
        "answer:pi-slash", "answer:currency-escaped", "answer:tuple", "answer:interval",
        "answer:text-and", "answer:plain-and", "answer:expanded", "answer:lone-a",
        "answer:sqrt-power", "answer:choice", "answer:article",
    ],
    "keeps the article in '\\text{an equilateral triangle}'": ["box:article"],
    "does not read a thin-space digit group (1\\,000)": _both("thousands-thinspace"),
    "reads '\\boxed{8 1}' as something other than 81 (TeX ignores the space)": [
        "demo:spaced-digits"
    ],
    "does not read \\fbox{}": ["form:fbox"],
}  # fmt: skip


def _load() -> list[dict]:
    with open(_CORPUS, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    return _load()


def _flatten(known: dict[str, list[str]]) -> set[str]:
    ids = [i for group in known.values() for i in group]
    assert len(ids) == len(set(ids)), "a pair is listed twice"
    return set(ids)


def _check_against_labels(corpus, verdicts, known: dict[str, list[str]], what: str) -> None:
    ids = {r["id"] for r in corpus}
    listed = _flatten(known)
    assert listed <= ids, f"{what}: listed pairs not in the corpus: {sorted(listed - ids)}"
    differ = {r["id"] for r, v in zip(corpus, verdicts) if v != r["label"]}
    by_id = {r["id"]: r for r in corpus}
    unexpected = [
        f"{i}: label={by_id[i]['label']} response={by_id[i]['response'][-80:]!r} "
        f"gt={by_id[i]['ground_truth']!r}"
        for i in sorted(differ - listed)
    ]
    assert not unexpected, f"{what}: new disagreements with the hand labels:\n" + "\n".join(
        unexpected
    )
    assert not listed - differ, (
        f"{what}: listed as disagreeing but now agree with the labels (remove them from the "
        f"list): {sorted(listed - differ)}"
    )


def test_corpus_is_well_formed(corpus):
    ids = [r["id"] for r in corpus]
    assert len(ids) == len(set(ids))
    assert len(corpus) >= 250
    for r in corpus:
        assert set(r) >= {"id", "response", "ground_truth", "label", "tags", "verl"}, r["id"]
        assert isinstance(r["label"], bool) and isinstance(r["verl"], bool), r["id"]
        assert isinstance(r["response"], str), r["id"]
    tags = {t for r in corpus for t in r["tags"]}
    assert {"box", "answer-line", "demo", "dapo", "qwen", "form", "junk"} <= tags
    # Both verdicts are well represented.
    labels = [r["label"] for r in corpus]
    assert 0.2 < sum(labels) / len(labels) < 0.8


def test_string_verdicts_match_hand_labels(corpus):
    got = score_responses([r["response"] for r in corpus], [r["ground_truth"] for r in corpus])
    _check_against_labels(corpus, [g.correct for g in got], KNOWN_STRING_DISAGREEMENTS, "string")


def test_verifier_verdicts_match_hand_labels(corpus):
    with MathVerifier(timeout_s=10.0, workers=2) as verifier:
        got = score_responses(
            [r["response"] for r in corpus],
            [r["ground_truth"] for r in corpus],
            verifier=verifier,
        )
    _check_against_labels(
        corpus, [g.correct for g in got], KNOWN_VERIFIER_DISAGREEMENTS, "with math-verify"
    )


def _math_verify_whole_response(response: str, gold: str, timeout_s: float) -> bool:
    """math-verify's own verdict: its extraction on the whole response (run in a worker)."""
    import math_verify

    limit = max(1, int(timeout_s))
    gold_parsed = math_verify.parse("\\boxed{" + gold + "}", parsing_timeout=limit)
    pred_parsed = math_verify.parse(response, parsing_timeout=limit)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=limit))


def test_math_verify_agreement_with_hand_labels(corpus):
    with KillingPool(_math_verify_whole_response, workers=2, timeout_s=10.0) as pool:
        got = pool.map(
            [(r["response"], str(r["ground_truth"]), 10.0) for r in corpus], default=False
        )
    _check_against_labels(corpus, got, KNOWN_MATH_VERIFY_DISAGREEMENTS, "math-verify alone")


def test_departures_from_verl_are_tagged_and_documented(corpus):
    """Where our verdict (string level) differs from verl 0.9.1's, the pair names the reason."""
    got = score_responses([r["response"] for r in corpus], [r["ground_truth"] for r in corpus])
    differ = {r["id"] for r, g in zip(corpus, got) if g.correct != r["verl"]}
    tagged = {r["id"] for r in corpus if r.get("verl_departure")}
    assert differ == tagged, (
        f"untagged departures: {sorted(differ - tagged)}; tagged but agreeing: "
        f"{sorted(tagged - differ)}"
    )
    notes = _DESIGN_NOTES.read_text(encoding="utf-8")
    documented = set(re.findall(r"`verl:([a-z-]+)`", notes))
    used = {r["verl_departure"] for r in corpus if r.get("verl_departure")}
    missing = sorted(used - documented)
    assert not missing, f"departures not documented in docs/design-notes.md: {missing}"
    # Every departure is a fix: where we differ from verl, we agree with the hand label.
    by_id = {r["id"]: r for r in corpus}
    worse = sorted(i for i in differ if by_id[i]["verl"] == by_id[i]["label"])
    assert not worse, f"departures that disagree with the hand label: {worse}"
