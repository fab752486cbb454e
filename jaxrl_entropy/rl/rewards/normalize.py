"""DAPO's final-answer normalisation (our re-implementation) and the string comparison of answers.

Two answers are equal when their normalised forms are equal strings and they carry no
conflicting units (:func:`answers_match`). The normalisation follows verl's ``math_dapo``
(itself Minerva's) with the fixes listed in ``docs/design-notes.md`` ("Reward").
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["answers_match", "normalize_final_answer", "units_conflict"]

# Commands whose braced argument is kept and whose name and braces are dropped.
_UNWRAP_COMMANDS = (
    "text",
    "textbf",
    "textit",
    "textrm",
    "mathrm",
    "mathbf",
    "mbox",
    "overline",
    "boxed",
    "fbox",
)
_UNWRAP_RE = re.compile(r"\\(?:" + "|".join(_UNWRAP_COMMANDS) + r")\s*\{")

# Units of measurement, by canonical name. They are dropped from an answer (`5 cm` is `5`), and
# two answers that both carry units must carry the same ones (`2 minutes` is not `2 seconds`).
_MEASURE_UNITS = {
    "second": ("seconds", "second"),
    "minute": ("minutes", "minute"),
    "hour": ("hours", "hour"),
    "day": ("days",),
    "mm": ("mm",),
    "cm": ("cm",),
    "km": ("km",),
    "m": ("meters", "meter", "metres", "metre"),  # and `\text{m}`, see _METRE_RE
    "inch": ("inches", "inch"),
    "foot": ("feet", "foot"),
    "mile": ("miles", "mile"),
    "mph": ("mph",),
    "dollar": ("dollars", "dollar"),
    "cent": ("cents",),
    "gram": ("gm",),
    "pound": ("pounds",),
}
_UNIT_OF_WORD = {w: unit for unit, words in _MEASURE_UNITS.items() for w in words}
# Words dropped without a unit's meaning (what is counted, not a measure; verl's list).
_FILLER_WORDS = (
    "square", "cubic", "ways", "integers", "units", "unit", "points", "digits", "degrees",
    "degree", "meals", "edges", "students", "multiples",
)  # fmt: skip
_POWER = r"(?:\^\{?[23]\}?)?"
# Longest words first so that `inches` is not read as `inch` + `es`.
_DROPPED_WORDS = sorted((*_UNIT_OF_WORD, *_FILLER_WORDS), key=len, reverse=True)
# Whole words only (`cm` in `\lcm` and `a` in `a+b` stay). An optional power right after a
# unit (`cm^2`, `m^{3}`) goes with it so that `5 cm^2` does not become `5^2`.
_UNIT_RE = re.compile(
    r"(?<![A-Za-z\\])(" + "|".join(_DROPPED_WORDS) + r")" + _POWER + r"(?![A-Za-z])"
)
# `\text{m}` is the metre; a bare `m` is a variable and is kept.
_METRE_RE = re.compile(r"\\(?:text|mathrm|mbox)\s*\{\s*m\s*\}" + _POWER)
# Articles before a word of two or more letters ("an equilateral triangle"); a lone `a` is a
# variable (`a + b`), so it is kept.
_ARTICLE_RE = re.compile(r"(?<![A-Za-z\\])(?:an|a)\s+(?=[A-Za-z]{2})")
# `1 \text{and} 2`, `1, \text{ and } 2`: a list of answers. The pattern starts with a literal
# backslash (a leading `,?\s*` would rescan long runs of spaces from every position).
_TEXT_AND_RE = re.compile(r"\\(?:text|mbox|textrm)\s*\{\s*and\s*\}")
# What is left of an answer after its units are dropped must hold a digit, a letter or a command;
# otherwise the unit words were the answer (`\text{hours}`) and are kept.
_SUBSTANCE_RE = re.compile(r"[0-9A-Za-z\\]")
# A control space `\ `, but not the row break `\\` followed by a space (matrices, cases).
_CONTROL_SPACE_RE = re.compile(r"(?<!\\)\\ ")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_BARE_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?=\s+[^\s{])")  # `\boxed 5`
_WHITESPACE_RE = re.compile(r"\s+")
_FRAC_TWO_RE = re.compile(r"\\frac([^{}\\])([^{}\\])")  # \frac12 -> \frac{1}{2}
_FRAC_NUM_RE = re.compile(r"\\frac([^{}\\])\{")  # \frac1{2} -> \frac{1}{2}
_FRAC_DEN_RE = re.compile(r"\\frac\{([^{}]*)\}([^{}\\])")  # \frac{1}2 -> \frac{1}{2}
_SQRT_RE = re.compile(r"\\sqrt([^{\[\\])")  # \sqrt2 -> \sqrt{2}
_GROUPED_NUMBER_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_INTEGER_DOT_ZERO_RE = re.compile(r"([+-]?\d+)\.0+")

# Plain substitutions, applied in order (before whitespace is removed).
_SUBSTITUTIONS = (
    ("\\$", ""),  # an escaped dollar is currency, not math mode
    ("^{\\mathrm{th}}", ""),  # ordinals: 5^{\mathrm{th}}
    ("\\mathrm{th}", ""),
    ("\\text{s}", ""),  # a plural ending: 5 \text{s}
    ('"', ""),
    ("dfrac", "frac"),
    ("tfrac", "frac"),
    ("\\displaystyle", ""),
    ("^{\\circ}", ""),
    ("^\\circ", ""),
    ("°", ""),
    ("\\%", ""),
    ("%", ""),
    ("{,}", ","),
    ("\\!", ""),
    ("\\,", ""),
    ("\\;", ""),
    ("\\:", ""),
    ("~", ""),
    ("\\ldots", ""),
    ("\\dots", ""),
)


def _unwrap_commands(s: str) -> str:
    """Replace every ``\\text{X}``-like group (see ``_UNWRAP_COMMANDS``) by ``X``, nested ones too.

    Linear time: one pass matches all braces, a second drops the command names and their
    braces. A command whose brace is never closed is left as it is.
    """
    if "\\" not in s:
        return s
    match: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            match[stack.pop()] = i
        i += 1
    drop = np.zeros(n, dtype=bool)
    changed = False
    for m in _UNWRAP_RE.finditer(s):
        open_idx = m.end() - 1
        close_idx = match.get(open_idx)
        if close_idx is None:
            continue
        drop[m.start() : m.end()] = True
        drop[close_idx] = True
        changed = True
    if not changed:
        return s
    return "".join(c for c, d in zip(s, drop) if not d)


def _text_and_to_comma(s: str) -> str:
    """``1 \\text{and} 2`` and ``1, \\text{ and } 2`` -> ``1, 2`` (linear time)."""
    parts: list[str] = []
    last = 0
    for m in _TEXT_AND_RE.finditer(s):
        before = s[last : m.start()].rstrip()
        parts.append(before[:-1] if before.endswith(",") else before)
        parts.append(",")
        last = m.end()
    if not parts:
        return s
    parts.append(s[last:])
    return "".join(parts)


def _prepare(answer: object) -> str:
    """The steps before unit removal: last ``=`` part, substitutions, commands unwrapped."""
    if answer is None:
        return ""
    s = answer if isinstance(answer, str) else str(answer)
    s = s.split("=")[-1]
    if "and" in s:
        s = _text_and_to_comma(s)
    for before, after in _SUBSTITUTIONS:
        if before in s:
            s = s.replace(before, after)
    s = _CONTROL_SPACE_RE.sub("", s)
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _BARE_BOX_RE.sub("", s)
    return s


def _units(prepared: str) -> frozenset[str]:
    """Canonical units of measurement in a prepared answer (``\\text{m}`` counts as ``m``)."""
    words = (m.group(1) for m in _UNIT_RE.finditer(_unwrap_commands(prepared)))
    found = {_UNIT_OF_WORD[w] for w in words if w in _UNIT_OF_WORD}
    if _METRE_RE.search(prepared):
        found.add("m")
    return frozenset(found)


def normalize_final_answer(answer: str) -> str:
    """DAPO's final-answer normalisation (our re-implementation, with fixes).

    In order: keep the part after the last ``=``; rewrite ``\\text{and}`` (spaces allowed inside
    the braces) to ``,``, drop currency ``\\$``, ordinal ``\\mathrm{th}``, ``\\text{s}`` and
    double quotes, ``dfrac``/``tfrac`` -> ``frac``, drop
    ``\\displaystyle``, degree marks, percent signs, LaTeX spacing (``\\!``, ``\\,``, ``\\;``,
    ``\\ ``, ``~``) and ``\\ldots``; drop ``\\left`` and ``\\right``; drop ``\\text{m}``
    (metres); unwrap ``\\text{}``, ``\\textbf{}``, ``\\mathrm{}``, ``\\mbox{}``, ``\\overline{}``,
    ``\\boxed{}``, ``\\fbox{}``; drop unit and filler words (``cm``, ``meters``, ``hours``,
    ``units``, ``square``, ``degrees``, ...) unless nothing else is left (a ground truth of
    ``\\text{hours}`` stays ``hours``), and articles; keep what is inside the first ``$...$`` pair
    and drop other ``$``; remove all whitespace; fix ``\\fracab`` -> ``\\frac{a}{b}`` and
    ``\\sqrta`` -> ``\\sqrt{a}``; drop a trailing period; ``1,000`` -> ``1000`` when the whole
    answer is a digit-grouped number; ``5.00`` -> ``5``.

    Unlike verl's version, words are removed only as whole words (``a`` in ``a+b`` and ``cm`` in
    ``\\lcm`` survive) and ``1,2`` is not taken for ``12``. Units are compared separately by
    :func:`answers_match`. Never raises; ``None`` gives ``""``, non-strings are coerced with ``str``.
    """
    s = _prepare(answer)
    without_metre = _METRE_RE.sub("", s)
    s = _unwrap_commands(without_metre if _SUBSTANCE_RE.search(without_metre) else s)
    without_units = _UNIT_RE.sub("", s)
    if _SUBSTANCE_RE.search(without_units):
        s = without_units
    s = _ARTICLE_RE.sub("", s)
    if s.count("$") >= 2:
        first = s.index("$")
        s = s[first + 1 : s.index("$", first + 1)]
    s = s.replace("$", "")
    s = _WHITESPACE_RE.sub("", s)
    if "\\frac" in s:
        s = _FRAC_NUM_RE.sub(r"\\frac{\1}{", s)
        s = _FRAC_TWO_RE.sub(r"\\frac{\1}{\2}", s)
        s = _FRAC_DEN_RE.sub(r"\\frac{\1}{\2}", s)
    if "\\sqrt" in s:
        s = _SQRT_RE.sub(r"\\sqrt{\1}", s)
    if len(s) > 1 and s.endswith("."):
        s = s[:-1]
    if _GROUPED_NUMBER_RE.fullmatch(s):
        s = s.replace(",", "")
    m = _INTEGER_DOT_ZERO_RE.fullmatch(s)
    if m:
        s = m.group(1)
    return s.strip()


def units_conflict(pred: str, gold: str) -> bool:
    """Whether both answers name units of measurement and the units differ.

    ``2 \\text{ minutes}`` vs ``2 \\text{ seconds}`` conflict; ``5 cm`` vs ``5`` do not (a bare
    number takes the question's unit); ``5 meters`` vs ``5 \\text{m}`` do not (the same unit).
    A conflict is decisive: math-verify, which ignores units, is not asked.
    """
    pred_units = _units(_prepare(pred))
    gold_units = _units(_prepare(gold))
    return bool(pred_units) and bool(gold_units) and pred_units != gold_units


def answers_match(pred: str | None, gold: object) -> bool:
    """String-level verdict: equal non-empty normalised forms and no conflicting units.

    ``pred`` is a raw extracted answer (None: no answer was found), ``gold`` a raw ground truth
    (non-strings are coerced with ``str``). A ground truth that normalises to ``""`` is never
    matched.
    """
    if pred is None or gold is None:
        return False
    gold_text = gold if isinstance(gold, str) else str(gold)
    gold_norm = normalize_final_answer(gold_text)
    if not gold_norm or normalize_final_answer(pred) != gold_norm:
        return False
    return not units_conflict(pred, gold_text)
