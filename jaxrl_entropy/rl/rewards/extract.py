"""Finding the final answer in a response: the last ``\\boxed{}`` or ``Answer:`` line of its tail.

Pure string code, linear in the length of the text (responses are untrusted model output).
"""

from __future__ import annotations

import re

__all__ = ["DEFAULT_TAIL_CHARS", "extract_answer", "extract_boxed"]

# verl's `math_dapo` reads the last 300 characters ("the longest answer in MATH-500 has 159").
DEFAULT_TAIL_CHARS = 300

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BOX_BARE_ARG_RE = re.compile(r"[^\s$]+")
# `Answer:` anywhere (case-insensitive, as verl); the content is found separately, see below.
_ANSWER_RE = re.compile(r"answer\s*:", re.IGNORECASE)
# Skipped between the colon and the content: blank space and line breaks (verl reads `Answer:\n5`
# as 5) and markdown emphasis (`**Answer:** 5`, `Answer: **5**`).
_ANSWER_LEAD = " \t\r\n*"


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


def _last_box(text: str) -> tuple[int, int, str | None] | None:
    """(start, end, content) of the last box; content None (and end ``len(text)``) when unclosed.

    ``end`` is the index just past the box's argument.
    """
    found = _last_box_command(text)
    if found is None:
        return None
    start, cmd = found
    i = start + len(cmd)
    n = len(text)
    j = i
    while j < n and text[j].isspace():
        j += 1
    if j >= n:
        return start, n, None
    if text[j] == "{":
        close = _balanced_group_end(text, j)
        if close is None:
            return start, n, None
        return start, close + 1, text[j + 1 : close]
    if j > i:
        # `\boxed 5`: the argument is the next token.
        m = _BOX_BARE_ARG_RE.match(text, j)
        if m is None:
            return start, n, None
        return start, m.end(), m.group(0)
    # `\boxed5`: TeX takes the single next character as the argument.
    if text[j] in "}$\\":
        return start, n, None
    return start, j + 1, text[j]


def extract_boxed(text: str) -> str | None:
    """Content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Braces nest (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``); ``\\boxed 5`` (no braces) gives
    the token after the space, up to the next whitespace or ``$``, and ``\\boxed5`` the single
    character after the command, as TeX reads it. Returns None when there is no
    box or when the last box is never closed (unbalanced braces); never raises.
    """
    if not isinstance(text, str) or not text:
        return None
    box = _last_box(text)
    return None if box is None else box[2]


def _last_answer_line(text: str) -> tuple[int, str] | None:
    """(content start, content) of the last ``Answer:`` that has content, or None.

    The content is the rest of the line after the colon, or, when that is blank, the next
    non-blank line (verl's ``Answer\\s*:\\s*([^\\n]+)``). An ``Answer:`` followed only by blanks
    or by the next ``Answer:`` states nothing. Linear time: a candidate is rejected by looking at
    one position, and only the chosen one's line is read.
    """
    n = len(text)
    for m in reversed(list(_ANSWER_RE.finditer(text))):
        i = m.end()
        while i < n and text[i] in _ANSWER_LEAD:
            i += 1
        if i >= n or _ANSWER_RE.match(text, i):  # nothing, or only the next `Answer:`
            continue
        end = text.find("\n", i)
        content = text[i : n if end < 0 else end].rstrip().rstrip("*").rstrip()
        if content:
            return i, content
    return None


def extract_answer(response: str, *, tail_chars: int | None = DEFAULT_TAIL_CHARS) -> str | None:
    """The raw (not normalised) final answer from the last ``tail_chars`` characters.

    The final answer is the LAST answer statement of the tail, by position: the last
    ``\\boxed{}``/``\\fbox{}`` or the last ``Answer: ...`` line (case-insensitive; the content may
    start on the next line; markdown ``**`` around it is dropped), whichever comes later. An
    ``Answer:`` line that starts inside the last box belongs to it (``\\boxed{Answer: 5}``), and a
    box inside an ``Answer:`` line is that line's answer (``Answer: \\boxed{5}`` gives ``5``).
    When the last statement is a box that is never closed (a truncated response) there is no
    answer: an earlier one does not count. Returns None when there is no answer;
    ``tail_chars=None`` (or <= 0) reads the whole response. Never raises.
    """
    if not isinstance(response, str):
        response = "" if response is None else str(response)
    tail = response[-tail_chars:] if tail_chars and tail_chars > 0 else response
    box = _last_box(tail)
    line = _last_answer_line(tail)
    if line is not None and (box is None or line[0] >= box[1]):
        return line[1]
    return None if box is None else box[2]
