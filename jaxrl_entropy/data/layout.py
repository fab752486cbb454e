"""Where a data file keeps its prompt and its answer, and the prompt template for plain problems.

verl's layout (DAPO-Math-17k, verl's AIME files) keeps the prompt as chat messages in `prompt`, with
DAPO's instruction already around the problem, and the answer in `reward_model.ground_truth`. Other
sources keep a bare problem and answer (MATH-500: `problem`, `answer`). `RowLayout` names the two
columns and the template that turns a bare problem into the paper's prompt.

No imports beyond the standard library: the config schema (`config.py`) names the templates
from here without loading the data pipeline.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

PLACEHOLDER = "{problem}"
# The paper's prompt: DAPO's instruction, as DAPO-Math-17k's user messages hold it around the problem.
DAPO_TEMPLATE = ("Solve the following math problem step by step. The last line of your response should be of the "
                 "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
                 f"{PLACEHOLDER}\n\n"
                 'Remember to put your answer on its own line after "Answer:".')
TEMPLATES = {"dapo": DAPO_TEMPLATE}

VERL_PROMPT_KEY = "prompt"
VERL_ANSWER_KEY = "reward_model.ground_truth"

# Column names other sources use, tried in this order when a file lacks the configured column, to
# suggest the setting in the error message (never used silently).
_PROMPT_GUESSES = ("problem", "question", "prompt", "input", "query")
_ANSWER_GUESSES = ("answer", "final_answer", "ground_truth", "expected_answer", "target")


def resolve_template(template: str) -> str:
    """The template text: "" (none: a plain prompt is used as it is), a name of `TEMPLATES`
    ("dapo"), or a text holding `{problem}` once.

    Raises:
      ValueError: anything else, naming the choices.
    """
    if template in ("", *TEMPLATES):
        return TEMPLATES.get(template, "")
    if template.count(PLACEHOLDER) != 1:
        raise ValueError(f"prompt template {template[:60]!r} must be '' (none), one of {sorted(TEMPLATES)}, or a "
                         f"text holding {PLACEHOLDER} exactly once (where the problem goes)")
    return template


def apply_template(template_text: str, problem: str) -> str:
    """`problem` put into `template_text` (resolved); plain replacement, so LaTeX braces in the
    problem or the template need no escaping. An empty template leaves the problem as it is."""
    return template_text.replace(PLACEHOLDER, problem) if template_text else problem


def get_field(row: dict[str, Any], key: str) -> Any:
    """`row`'s value at a dotted `key` ("reward_model.ground_truth"); None when any part is absent."""
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """The columns of a data file and what to do with a plain prompt.

    prompt_key: the column holding the prompt: a string, or chat messages.
    answer_key: the column holding the answer, dotted for a nested field.
    template: the resolved template text for plain-string prompts ("" = none; see `resolve_template`).
    settings: how the user sets these three, for messages: "--config.data." (train files: the
      config keys `data.prompt_key`, `data.answer_key`, `data.prompt_template`), "--" (the
      `prepare-data` flags of the same names), or "" (no setting: the file must be in verl's layout,
      e.g. an `eval.benchmarks` file; messages point to `prepare-data`).
    """
    prompt_key: str = VERL_PROMPT_KEY
    answer_key: str = VERL_ANSWER_KEY
    template: str = ""
    settings: str = ""

    def __post_init__(self):
        for name in ("prompt_key", "answer_key"):
            if not getattr(self, name) or any(not p for p in getattr(self, name).split(".")):
                raise ValueError(f"{name}={getattr(self, name)!r} must name a column (dotted for a nested field)")

    @property
    def is_verl(self) -> bool:
        return (self.prompt_key, self.answer_key, self.template) == (VERL_PROMPT_KEY, VERL_ANSWER_KEY, "")

    def columns(self) -> tuple[str, str]:
        """The top-level columns the layout reads: (prompt column, answer column)."""
        return self.prompt_key.split(".", 1)[0], self.answer_key.split(".", 1)[0]

    def setting(self, name: str) -> str:
        """How the user writes setting `name` ("prompt_key"): "--config.data.prompt_key"."""
        return f"{self.settings}{name}"

    def missing_column_message(self, path: str, found: Iterable[str]) -> str | None:
        """None when `path`'s columns `found` hold what the layout reads; else what is missing,
        the columns there are, and the settings (or the `prepare-data` command) that fix it."""
        found = list(found)
        prompt_col, answer_col = self.columns()
        missing = [(what, col) for what, col in (("prompt", prompt_col), ("answer", answer_col)) if col not in found]
        if not missing:
            return None
        said = " and ".join(f"no {what} column {col!r}" for what, col in missing)
        guess_prompt = next((c for c in _PROMPT_GUESSES if c in found), "<column>")
        guess_answer = next((c for c in _ANSWER_GUESSES if c in found), "<column>")
        flags = (f"prompt_key={guess_prompt} answer_key={guess_answer} prompt_template=dapo")
        convert = ("jaxrl-entropy prepare-data --in=" + path + " --out=<name>.parquet " +
                   " ".join(f"--{f}" for f in flags.split()) + " --data_source=<name>")
        if self.settings.startswith("--config."):
            fix = (f"Name its columns: {' '.join(self.settings + f for f in flags.split())} (the template "
                   f"only for a bare problem text), or convert it once: {convert}")
        elif self.settings:
            fix = f"Name its columns: {' '.join(self.settings + f for f in flags.split())}"
        else:
            fix = f"It must be in verl's layout here: convert it once with {convert}"
        return (f"{path}: {said} (columns found: {', '.join(found) or 'none'}). {fix} "
                "(the sources and their columns: docs/data.md).")
