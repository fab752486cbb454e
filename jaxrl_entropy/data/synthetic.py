"""The built-in synthetic arithmetic task of the CPU demo.

A prompt is an integer expression such as `23+58=`; the reference response is a short scratchpad
followed by the final answer in `\\boxed{}`, so it is scored by the same `math_reward` as real
maths and has tokens of different roles (copying the operands, column sums, carries, the answer):

    23+58: 3+8=11 c1, 2+5+1=8 so \\boxed{81}            (scratchpad="columns", ops="+")
    12-34*5: 34*5=170, 12-170=-158 so \\boxed{-158}      (scratchpad="steps")
    47*28: 47*8: 7*8=56 c5, 4*8+5=37 so 376; 47*2: 7*2=14 c1, 4*2+1=9 so 94, 940;
        376+940: 6+0=6, 7+4=11 c1, 3+9+1=13 so \\boxed{1316}     (scratchpad="long", one line here)

"long" is the long-reasoning variant: long multiplication digit by digit, each partial product's
carries, then the column addition of the shifted partial products; 3 × 3 digits give responses
of ~150 tokens with the demo's character tokenizer.

Records use verl's layout (`prompt`, `reward_model.ground_truth`, `data_source`, `extra_info`).
Splits are disjoint by construction: every expression belongs to exactly one split, chosen by a
stable hash of its text (independent of the seed), and `problem(index, split)` only emits
expressions of the requested split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from typing import Any

SPLITS = ("train", "test")
DIGITS = (1, 9)      # allowed range of `digits` (inclusive)
NUM_TERMS = (2, 8)   # allowed range of `num_terms` (inclusive)
_OPS = "+-*"
SCRATCHPADS = ("auto", "columns", "steps", "long", "none")
_MAX_DRAWS_PER_PROBLEM = 10_000
_EXPRESSION_RE = re.compile(r"^\d+([+\-*]\d+)+$")


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """Integer arithmetic with a scratchpad, parameterised by size and operators.

    Attributes:
      digits: digits of every operand (1 → 0..9; d > 1 → exactly d digits, no leading zero).
      num_terms: number of operands in the expression (>= 2).
      ops: operators to draw from, a non-empty subset of "+-*" (usual precedence applies).
      scratchpad: "columns" (column-wise addition with carries; needs ops == "+"), "steps" (one
        binary operation per step, in evaluation order), "long" (long multiplication digit by
        digit; needs ops == "*" and num_terms == 2), "none" (answer only), or "auto"
        (columns when ops == "+", else steps).
      heldout_fraction: share of all expressions that belong to the "test" split.
      chat: prompts as chat messages `[{"role": "user", ...}]` (True) or plain strings.
      seed: default generator seed of `problem` / `records`.
      data_source: the `data_source` field of every record.
    """

    digits: int = 2
    num_terms: int = 2
    ops: str = "+"
    scratchpad: str = "auto"
    heldout_fraction: float = 0.1
    chat: bool = True
    seed: int = 0
    data_source: str = "synthetic_arith"

    def __post_init__(self) -> None:
        if not DIGITS[0] <= self.digits <= DIGITS[1]:
            raise ValueError(f"ArithmeticTask.digits must be in {DIGITS[0]}..{DIGITS[1]}, got {self.digits}.")
        if not NUM_TERMS[0] <= self.num_terms <= NUM_TERMS[1]:
            raise ValueError(
                f"ArithmeticTask.num_terms must be in {NUM_TERMS[0]}..{NUM_TERMS[1]}, got {self.num_terms}."
            )
        if not self.ops or set(self.ops) - set(_OPS) or len(set(self.ops)) != len(self.ops):
            raise ValueError(
                f"ArithmeticTask.ops must be distinct characters from {_OPS!r}, got {self.ops!r}."
            )
        if self.scratchpad not in SCRATCHPADS:
            raise ValueError(
                f"ArithmeticTask.scratchpad must be one of {SCRATCHPADS}, got {self.scratchpad!r}."
            )
        if self.scratchpad == "long" and (self.ops != "*" or self.num_terms != 2):
            raise ValueError(
                "ArithmeticTask.scratchpad='long' is long multiplication of two numbers (ops='*', "
                f"num_terms=2); got ops={self.ops!r}, num_terms={self.num_terms}."
            )
        if self.scratchpad == "columns" and self.ops != "+":
            raise ValueError(
                "ArithmeticTask.scratchpad='columns' works for addition only (ops='+'); "
                f"got ops={self.ops!r}. Use scratchpad='steps' or 'auto'."
            )
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(
                f"ArithmeticTask.heldout_fraction must be in (0, 1), got {self.heldout_fraction}."
            )

    # ---------------------------------------------------------------- generation

    @property
    def num_expressions(self) -> int:
        """Number of distinct expressions over both splits."""
        values = 10 if self.digits == 1 else 9 * 10 ** (self.digits - 1)
        return values**self.num_terms * len(self.ops) ** (self.num_terms - 1)

    def split_of(self, expression: str) -> str:
        """The split an expression belongs to: a stable hash of its text, not of any seed."""
        digest = hashlib.blake2b(expression.encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2.0**64
        return "test" if u < self.heldout_fraction else "train"

    def _draw_expression(self, rng: random.Random) -> str:
        lo = 0 if self.digits == 1 else 10 ** (self.digits - 1)
        hi = 10**self.digits - 1
        parts = [str(rng.randint(lo, hi))]
        for _ in range(self.num_terms - 1):
            parts.append(rng.choice(self.ops))
            parts.append(str(rng.randint(lo, hi)))
        return "".join(parts)

    def problem(self, index: int, split: str, seed: int | None = None) -> dict[str, Any]:
        """The `index`-th problem of `split` (a verl-layout record); deterministic in (seed, split, index)."""
        _check_split(split)
        seed = self.seed if seed is None else seed
        # String seeds go through sha512 in `random.seed`: stable across runs and platforms.
        rng = random.Random(f"synthetic_arith/{seed}/{split}/{index}")
        for _ in range(_MAX_DRAWS_PER_PROBLEM):
            expression = self._draw_expression(rng)
            if self.split_of(expression) == split:
                return self._record(expression, index=index, split=split, seed=seed)
        raise ValueError(
            f"No {split!r} expression found in {_MAX_DRAWS_PER_PROBLEM} draws for {self}; the "
            "problem space is too small for this heldout_fraction. Raise `digits` or `num_terms`."
        )

    def max_records(self, split: str) -> int:
        """The most distinct problems `records(split, n)` may be asked for: 90% of the split's
        expected size, so that rejection sampling of new problems always ends quickly."""
        _check_split(split)
        expected = self.num_expressions * (
            self.heldout_fraction if split == "test" else 1.0 - self.heldout_fraction
        )
        return int(0.9 * expected)

    def records(self, split: str, n: int, seed: int | None = None) -> list[dict[str, Any]]:
        """`n` distinct problems of `split` (generator indices 0, 1, ... with repeats skipped)."""
        if n > self.max_records(split):
            raise ValueError(
                f"Asked for {n} distinct {split!r} problems but at most {self.max_records(split)} may "
                f"be drawn from this split (digits={self.digits}, num_terms={self.num_terms}, "
                f"ops={self.ops!r}). Lower n or raise digits/num_terms."
            )
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        index = 0
        while len(out) < n:
            record = self.problem(index, split, seed)
            expression = record["extra_info"]["expression"]
            if expression not in seen:
                seen.add(expression)
                out.append(record)
            index += 1
        return out

    def _record(self, expression: str, *, index: int, split: str, seed: int) -> dict[str, Any]:
        content = f"{expression}="
        prompt: Any = [{"role": "user", "content": content}] if self.chat else content
        return {
            "prompt": prompt,
            "reward_model": {"ground_truth": str(evaluate(expression)), "style": "rule"},
            "data_source": self.data_source,
            "extra_info": {"index": index, "split": split, "seed": seed, "expression": expression},
        }

    # ---------------------------------------------------------------- solutions

    def reference_solution(self, record: dict[str, Any]) -> str:
        """Scratchpad then `\\boxed{answer}` for a record of this task (no eos token)."""
        expression = _expression_of(record)
        answer = evaluate(expression)
        style = self.scratchpad
        if style == "auto":
            style = "columns" if set(expression) <= set("0123456789+") else "steps"
        if style == "none":
            return f"\\boxed{{{answer}}}"
        if style == "columns":
            work = ", ".join(column_addition_steps([int(t) for t in expression.split("+")]))
        elif style == "long":
            a, b = (int(t) for t in expression.split("*"))
            return f"{expression}: {long_multiplication_work(a, b)} so \\boxed{{{answer}}}"
        else:
            work = ", ".join(evaluation_steps(expression))
        return f"{expression}: {work} so \\boxed{{{answer}}}"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}: use one of {SPLITS}.")


def _expression_of(record: dict[str, Any]) -> str:
    """The expression of a record: `extra_info.expression`, else the prompt text without '='."""
    expression = (record.get("extra_info") or {}).get("expression")
    if expression is None:
        prompt = record["prompt"]
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        expression = text.strip().removesuffix("=")
    if not _EXPRESSION_RE.match(expression):
        raise ValueError(
            f"Record is not a synthetic arithmetic problem: expression {expression!r} should look "
            "like '23+58' (non-negative integers joined by + - *)."
        )
    return expression


def _tokenize(expression: str) -> tuple[list[int], list[str]]:
    numbers = [int(n) for n in re.split(r"[+\-*]", expression)]
    ops = re.findall(r"[+\-*]", expression)
    return numbers, ops


def evaluation_steps(expression: str) -> list[str]:
    """Binary steps in evaluation order: all `*` left to right, then `+`/`-` left to right."""
    numbers, ops = _tokenize(expression)
    steps = []
    while "*" in ops:
        i = ops.index("*")
        value = numbers[i] * numbers[i + 1]
        steps.append(f"{numbers[i]}*{numbers[i + 1]}={value}")
        numbers[i : i + 2] = [value]
        del ops[i]
    while ops:
        op = ops.pop(0)
        value = numbers[0] + numbers[1] if op == "+" else numbers[0] - numbers[1]
        steps.append(f"{numbers[0]}{op}{numbers[1]}={value}")
        numbers[0:2] = [value]
    return steps


def evaluate(expression: str) -> int:
    """Value of an expression with `*` before `+`/`-` (the same order as the scratchpad)."""
    numbers, ops = _tokenize(expression)
    if not ops:
        return numbers[0]
    last = evaluation_steps(expression)[-1]
    return int(last.rsplit("=", 1)[1])


def column_addition_steps(terms: list[int]) -> list[str]:
    """Right-to-left column sums with carries, e.g. [23, 58] → ['3+8=11 c1', '2+5+1=8'].

    The last column names no carry: its sum already shows the answer's leading digits.
    """
    width = max(len(str(t)) for t in terms)
    columns = [str(t).zfill(width) for t in terms]
    steps, carry = [], 0
    for position in range(width - 1, -1, -1):
        parts = [c[position] for c in columns]
        if carry:
            parts.append(str(carry))
        total = sum(int(p) for p in parts)
        carry = total // 10
        note = f" c{carry}" if carry and position > 0 else ""
        steps.append("+".join(parts) + f"={total}" + note)
    return steps


def long_multiplication_work(a: int, b: int) -> str:
    """Long multiplication of `a` by `b`: one partial product per digit of `b` (right to left), each
    digit by digit with its carries, shifted by its place; then the column addition of the shifted
    partials (omitted when `b` has one digit). The final "so \\boxed{}" is the caller's.

    47*28 → "47*8: 7*8=56 c5, 4*8+5=37 so 376; 47*2: 7*2=14 c1, 4*2+1=9 so 94, 940;
    376+940: 6+0=6, 7+4=11 c1, 3+9+1=13"
    """
    partials, parts = [], []
    for place, digit in enumerate(int(d) for d in reversed(str(b))):
        steps, carry = [], 0
        a_digits = [int(d) for d in reversed(str(a))]
        for i, x in enumerate(a_digits):
            carry_in = carry
            total = x * digit + carry_in
            carry = total // 10
            # the last digit names no carry: its product already shows the leading digits
            steps.append(f"{x}*{digit}" + (f"+{carry_in}" if carry_in else "") + f"={total}"
                         + (f" c{carry}" if carry and i < len(a_digits) - 1 else ""))
        product = a * digit
        shifted = product * 10 ** place
        text = f"{a}*{digit}: {', '.join(steps)} so {product}"
        if place:
            text += f", {shifted}"
        parts.append(text)
        partials.append(shifted)
    work = "; ".join(parts)
    if len(partials) > 1:
        work += f"; {'+'.join(str(p) for p in partials)}: {', '.join(column_addition_steps(partials))}"
    return work
