"""Rule-based math reward (DAPO style) with an optional, killable math-verify check.

The reward of a response is decided from its *tail* only (the last ``tail_chars`` characters,
300 by default as in verl's ``math_dapo``): the final answer is the content of the last
``\\boxed{...}`` there, or else the last ``Answer: ...`` line. Prediction and ground truth are both
put through :func:`normalize_final_answer` and compared as strings; when a :class:`MathVerifier`
is given, answers that differ as strings are also checked for mathematical equivalence with
``math-verify`` in a separate process that is killed when it runs past its time limit.

DAPO's overlong shaping (:func:`overlong_penalty`) is a separate, vectorised function that the
trainer adds to the scores.

This module imports neither jax nor math-verify at import time: the verifier's worker processes
import it, and they must start fast.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import re
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    "MathVerifier",
    "RewardResult",
    "extract_answer",
    "extract_boxed",
    "math_reward",
    "math_verify_equivalent",
    "normalize_final_answer",
    "overlong_penalty",
    "score_responses",
]

_log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_LINE_RE = re.compile(r"answer\s*:[ \t]*([^\n]*)", re.IGNORECASE)


def _balanced_group_end(text: str, open_idx: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_idx``, or None when it is never closed.

    A backslash escapes the next character, so ``\\{`` and ``\\}`` (literal braces in LaTeX) do
    not count towards the nesting depth.
    """
    depth = 0
    i = open_idx
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _last_box_command(text: str) -> tuple[int, str] | None:
    """(start index, command) of the last ``\\boxed``/``\\fbox`` that is a whole command name.

    Linear in ``len(text)`` even with many look-alikes (``\\boxedx``): each command's search
    resumes left of its previous hit instead of rescanning the whole string.
    """
    found = {cmd: text.rfind(cmd) for cmd in _BOX_COMMANDS}
    while True:
        cmd = max(found, key=found.__getitem__)
        start = found[cmd]
        if start < 0:
            return None
        after = start + len(cmd)
        # `\boxeds` or `\fboxed` are other command names, not a box: look further left.
        if after < len(text) and text[after].isalpha():
            found[cmd] = text.rfind(cmd, 0, start)
            continue
        return start, cmd


def extract_boxed(text: str) -> str | None:
    """Content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Braces nest (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``); ``\\boxed 5`` (no braces) gives
    the token after the space, up to the next whitespace or ``$``, and ``\\boxed5`` the single
    character after the command, as TeX reads it. Returns None when there is no
    box or when the last box is never closed (unbalanced braces); never raises.
    """
    if not isinstance(text, str) or not text:
        return None
    found = _last_box_command(text)
    if found is None:
        return None
    start, cmd = found
    i = start + len(cmd)
    n = len(text)
    j = i
    while j < n and text[j].isspace():
        j += 1
    if j < n and text[j] == "{":
        close = _balanced_group_end(text, j)
        if close is None:
            return None
        return text[j + 1 : close]
    if j >= n:
        return None
    if j > i:
        # `\boxed 5`: the argument is the next token.
        m = re.compile(r"[^\s$]+").match(text, j)
        return m.group(0) if m else None
    # `\boxed5`: TeX takes the single next character as the argument.
    return None if text[j] in "}$\\" else text[j]


def extract_answer(response: str, *, tail_chars: int | None = 300) -> str | None:
    """The raw (not normalised) final answer from the last ``tail_chars`` characters.

    The last balanced ``\\boxed{}`` in the tail wins; without one, the content of the last
    ``Answer: ...`` line (case-insensitive, as verl's DAPO reward) is used. Returns None when
    neither is present. ``tail_chars=None`` (or <= 0) parses the whole response.
    """
    if not isinstance(response, str):
        response = "" if response is None else str(response)
    tail = response[-tail_chars:] if tail_chars and tail_chars > 0 else response
    boxed = extract_boxed(tail)
    if boxed is not None:
        return boxed
    last = None
    for m in _ANSWER_LINE_RE.finditer(tail):
        last = m
    if last is None:
        return None
    content = last.group(1).strip()
    return content or None


# --------------------------------------------------------------------------------------------
# DAPO normalisation
# --------------------------------------------------------------------------------------------

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

# Units and filler words (MATH / DAPO answers), removed as whole words. An optional power right
# after a unit (`cm^2`, `m^{3}`) goes with it so that `5 cm^2` does not become `5^2`.
_UNIT_WORDS = (
    "square", "cubic", "ways", "integers", "dollars", "dollar", "cents", "mph", "km", "cm", "mm",
    "gm", "inches", "inch", "feet", "foot", "miles", "mile", "meters", "meter", "metres", "metre",
    "units", "unit", "hours", "hour", "minutes", "minute", "seconds", "second", "days", "points",
    "digits", "degrees", "degree", "pounds", "meals", "edges", "students", "multiples",
)  # fmt: skip
_POWER = r"(?:\^\{?[23]\}?)?"
_UNIT_RE = re.compile(r"(?<![A-Za-z\\])(?:" + "|".join(_UNIT_WORDS) + r")" + _POWER + r"(?![A-Za-z])")
# `\text{m}` is the metre; a bare `m` is a variable and is kept.
_METRE_RE = re.compile(r"\\(?:text|mathrm|mbox)\s*\{\s*m\s*\}" + _POWER)
# Articles before a word of two or more letters ("an equilateral triangle"); a lone `a` is a
# variable (`a + b`), so it is kept.
_ARTICLE_RE = re.compile(r"(?<![A-Za-z\\])(?:an|a)\s+(?=[A-Za-z]{2})")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_WHITESPACE_RE = re.compile(r"\s+")
_FRAC_TWO_RE = re.compile(r"\\frac([^{}\\])([^{}\\])")  # \frac12 -> \frac{1}{2}
_FRAC_NUM_RE = re.compile(r"\\frac([^{}\\])\{")  # \frac1{2} -> \frac{1}{2}
_FRAC_DEN_RE = re.compile(r"\\frac\{([^{}]*)\}([^{}\\])")  # \frac{1}2 -> \frac{1}{2}
_SQRT_RE = re.compile(r"\\sqrt([^{\[\\])")  # \sqrt2 -> \sqrt{2}
_GROUPED_NUMBER_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_INTEGER_DOT_ZERO_RE = re.compile(r"([+-]?\d+)\.0+")

# Plain substitutions, applied in order (before whitespace is removed).
_SUBSTITUTIONS = (
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\$", ""),  # an escaped dollar is currency, not math mode
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
    ("\\ ", ""),
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


def normalize_final_answer(answer: str) -> str:
    """DAPO's final-answer normalisation (our re-implementation, with word-boundary fixes).

    In order: keep the part after the last ``=``; rewrite ``\\text{and}`` to ``,``, drop currency
    ``\\$``, ``dfrac``/``tfrac`` -> ``frac``, drop ``\\displaystyle``, degree marks, percent signs,
    LaTeX spacing (``\\!``, ``\\,``, ``\\;``, ``\\ ``, ``~``) and ``\\ldots``; drop ``\\left`` and
    ``\\right``; drop ``\\text{m}`` (metres); unwrap ``\\text{}``, ``\\textbf{}``, ``\\mathrm{}``,
    ``\\mbox{}``, ``\\overline{}``, ``\\boxed{}``, ``\\fbox{}``; drop unit and filler words (``cm``,
    ``meters``, ``inches``, ``feet``, ``miles``, ``units``, ``square``, ``degrees``, ...) and articles;
    keep what is inside the first ``$...$`` pair and drop other ``$``; remove all whitespace;
    fix ``\\fracab`` -> ``\\frac{a}{b}`` and ``\\sqrta`` -> ``\\sqrt{a}``; drop a trailing period;
    ``1,000`` -> ``1000`` when the whole answer is a digit-grouped number; ``5.00`` -> ``5``.

    Unlike verl's version, words are removed only as whole words (``a`` in ``a+b`` and ``cm`` in
    ``\\lcm`` survive) and ``1,2`` is not taken for ``12``.
    """
    if answer is None:
        return ""
    s = answer if isinstance(answer, str) else str(answer)
    s = s.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        if before in s:
            s = s.replace(before, after)
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _METRE_RE.sub("", s)
    s = re.sub(r"\\(?:boxed|fbox)(?=\s+[^\s{])", "", s)  # `\boxed 5`
    s = _unwrap_commands(s)
    s = _UNIT_RE.sub("", s)
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


# --------------------------------------------------------------------------------------------
# math-verify in killable worker processes
# --------------------------------------------------------------------------------------------


def math_verify_equivalent(pred: str, gold: str, timeout_s: float = 5.0) -> bool:
    """math-verify's verdict on ``pred`` == ``gold`` (both LaTeX without ``$``).

    Meant to run inside a :class:`MathVerifier` worker: math-verify's own timeouts use
    ``signal.alarm``, which works only on a process's main thread, and it can still hang.
    """
    import math_verify  # imported lazily: heavy (sympy), needed only in the workers

    limit = max(1, int(np.ceil(timeout_s)))

    def wrap(s: str) -> str:
        return "\\boxed{" + s.replace("$", "") + "}"

    gold_parsed = math_verify.parse(wrap(gold), parsing_timeout=limit)
    pred_parsed = math_verify.parse(wrap(pred), parsing_timeout=limit)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=limit))


_READY = "ready"


def _worker_main(conn: Any, check_fn: Callable[..., bool], timeout_s: float, warm_up: bool) -> None:
    """Worker loop: answer ``(pred, gold)`` requests with a bool until sent None or killed."""
    if warm_up:
        try:
            check_fn("1", "1", timeout_s)  # pays the sympy import before the first timed call
        except Exception:  # noqa: BLE001 - a failing warm-up shows up on real calls
            pass
    conn.send(_READY)
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        pred, gold = request
        try:
            result = bool(check_fn(pred, gold, timeout_s))
        except Exception:  # noqa: BLE001 - any failure of the checker means "not shown equal"
            result = False
        try:
            conn.send(result)
        except (EOFError, OSError):
            return


@dataclasses.dataclass
class _Worker:
    process: Any
    conn: Any
    state: str  # "starting" | "idle" | "busy"
    deadline: float
    task: int = -1


class MathVerifier:
    """math-verify equivalence in a pool of killable worker processes.

    Every call has a hard wall-clock limit (``timeout_s``); a worker that runs past it (a hang,
    e.g. nested powers, Math-Verify#65) or dies is killed and replaced, and the call answers
    False. Workers are started with the ``spawn`` context (``fork`` is unsafe once jax runs its
    threads) when the verifier is created, so their start-up overlaps other work. The per-call
    clock starts when a ready worker takes the pair: a worker's start-up (spawn + sympy import,
    about a second; also after a replacement) is bounded separately by ``startup_timeout_s``.
    Thread-safe (calls are serialised). Workers are daemons, so they also die with the trainer.

    Args:
      timeout_s: hard limit per equivalence check, seconds.
      workers: number of worker processes; :meth:`equivalent_many` uses them in parallel.
      startup_timeout_s: limit for a worker to start and import math-verify.
      check_fn: ``fn(pred, gold, timeout_s) -> bool`` run in the workers; must be picklable (a
        module-level function). Default :func:`math_verify_equivalent`. Tests inject slow or
        crashing functions here.
      mp_context: ``"spawn"`` (default) or ``"forkserver"``.
    """

    _MAX_START_FAILURES = 3

    def __init__(
        self,
        *,
        timeout_s: float = 5.0,
        workers: int = 2,
        startup_timeout_s: float = 120.0,
        check_fn: Callable[..., bool] | None = None,
        mp_context: str = "spawn",
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"MathVerifier: timeout_s must be > 0 seconds, got {timeout_s}.")
        if workers < 1:
            raise ValueError(f"MathVerifier: workers must be >= 1, got {workers}.")
        if mp_context not in ("spawn", "forkserver"):
            raise ValueError(
                f"MathVerifier: mp_context must be 'spawn' or 'forkserver', got {mp_context!r} "
                "('fork' is unsafe after jax has started its threads)."
            )
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self._check_fn = check_fn if check_fn is not None else math_verify_equivalent
        self._warm_up = check_fn is None
        self._ctx = multiprocessing.get_context(mp_context)
        self._lock = threading.Lock()
        self._closed = False
        self._start_failures = 0
        self._broken = False
        self._workers = [self._start_worker() for _ in range(workers)]

    # -- worker management -------------------------------------------------------------------

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, self._check_fn, self.timeout_s, self._warm_up),
            daemon=True,
            name="MathVerifier-worker",
        )
        process.start()
        child_conn.close()  # the parent keeps only its end: EOF then means the worker died
        return _Worker(process, parent_conn, "starting", time.monotonic() + self.startup_timeout_s)

    @staticmethod
    def _kill(worker: _Worker) -> None:
        try:
            worker.conn.close()
        except OSError:
            pass
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5.0)

    def _replace(self, idx: int) -> None:
        self._kill(self._workers[idx])
        self._workers[idx] = self._start_worker()

    # -- public API --------------------------------------------------------------------------

    def equivalent(self, pred: str, gold: str) -> bool:
        """Whether math-verify shows ``pred`` equals ``gold``; False on timeout, error or crash."""
        return self.equivalent_many([(pred, gold)])[0]

    def equivalent_many(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """:meth:`equivalent` for many ``(pred, gold)`` pairs, spread over the workers.

        Every pair starts as False and becomes True only when a worker answers True in time.
        """
        if self._closed:
            raise RuntimeError("MathVerifier: used after close(); create a new verifier.")
        results = [False] * len(pairs)
        if not pairs:
            return results
        with self._lock:
            pending = collections.deque(range(len(pairs)))
            while not self._broken:
                for idx, w in enumerate(self._workers):
                    if w.state == "idle" and pending:
                        w.task = pending.popleft()
                        pred, gold = pairs[w.task]
                        try:
                            w.conn.send((str(pred), str(gold)))
                        except (OSError, EOFError, ValueError):
                            self._fail(idx)  # the task stays False
                            continue
                        w.state, w.deadline = "busy", time.monotonic() + self.timeout_s
                waiting = [
                    (idx, w) for idx, w in enumerate(self._workers) if w.state in ("starting", "busy")
                ]
                if not pending and not any(w.state == "busy" for _, w in waiting):
                    break
                wait_s = max(0.0, min(w.deadline for _, w in waiting) - time.monotonic())
                ready = multiprocessing.connection.wait([w.conn for _, w in waiting], timeout=wait_s)
                now = time.monotonic()
                for idx, w in waiting:
                    if w.conn in ready:
                        try:
                            msg = w.conn.recv()
                        except (EOFError, OSError):  # the worker died (crash, OOM kill)
                            self._fail(idx)
                            continue
                        if w.state == "starting":
                            if msg == _READY:
                                w.state = "idle"
                                self._start_failures = 0
                            else:
                                self._fail(idx)
                        else:
                            results[w.task] = bool(msg)
                            w.state = "idle"
                    elif now >= w.deadline:  # a hang: kill it so it never blocks the trainer
                        self._fail(idx)
        return results

    def _fail(self, idx: int) -> None:
        """Kill worker ``idx`` and start a fresh one; give up after repeated start failures."""
        failed_at_start = self._workers[idx].state == "starting"
        self._replace(idx)
        if not failed_at_start:
            return
        self._start_failures += 1
        if self._start_failures >= self._MAX_START_FAILURES * len(self._workers):
            _log.error(
                "MathVerifier: workers failed to start %d times in a row; math-verify checks "
                "are off from now on (every check answers False). Check that `math-verify` is "
                "installed and imports in a fresh interpreter.",
                self._start_failures,
            )
            self._broken = True

    def close(self) -> None:
        """Stop the workers (politely, then by force). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, EOFError, ValueError):
                pass
        for w in self._workers:
            w.process.join(timeout=1.0)
            self._kill(w)

    def __enter__(self) -> "MathVerifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; daemon workers also die with the parent
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------


def _gold_text(ground_truth: Any) -> str:
    return "" if ground_truth is None else str(ground_truth)


def math_reward(
    response: str,
    ground_truth: str,
    *,
    tail_chars: int | None = 300,
    verifier: MathVerifier | None = None,
    correct_score: float = 1.0,
    incorrect_score: float = -1.0,
) -> RewardResult:
    """DAPO's rule-based math reward of one response.

    Correct iff an answer is found in the tail and its normalised form equals the normalised
    ground truth, or (with ``verifier``) math-verify shows them equivalent. A ground truth that
    normalises to the empty string is never matched. Non-string ground truths (``42``) are
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
    tail_chars: int | None = 300,
    correct_score: float = 1.0,
    incorrect_score: float = -1.0,
) -> list[RewardResult]:
    """:func:`math_reward` for a batch; math-verify checks run in parallel over the workers."""
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
        gold_raw = _gold_text(gt)
        gold = normalize_final_answer(gold_raw)
        pred = normalize_final_answer(raw) if raw is not None else None
        extracted.append(pred)
        ok = bool(gold) and pred == gold
        correct.append(ok)
        if not ok and verifier is not None and pred and gold:
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
