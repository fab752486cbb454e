"""`metrics.jsonl`: the one reader and the one writer of a run's metric history.

The file holds one JSON object per line, each with a numeric `"step"`. The trainer writes one line
per logged training step (it holds `loss`; an evaluation due at that step shares the line), plus
lines without training metrics: the final evaluation and a warm-up-only report. Evaluation at
step `s` measures the parameters after `s` updates, as does the checkpoint of step `s`.

The writer also feeds TensorBoard when tensorboardX is installed. A killed job loses at most the
line being written; a resumed job first cuts the file back to what its checkpoint covers
(`MetricsWriter(..., resume_step=...)`), so a re-run step is never recorded twice.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxrl_entropy.rundir import fileio

__all__ = ["METRICS_FILE", "TRAIN_STEP_KEY", "Line", "parse_lines", "read_lines", "read_metrics",
           "history_problems", "lines_before", "MetricsWriter"]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
#: Every line that records a training step holds this key; lines without it (final evaluation,
#: warm-up report) record no step that a resumed run would run again.
TRAIN_STEP_KEY = "loss"


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class Line:
    """One record of a metrics file: its 1-based line number, its text and the parsed object."""

    lineno: int
    text: str
    record: dict[str, Any]

    @property
    def step(self) -> float:
        return self.record["step"]


def _is_step(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_lines(text: str, source: str, *, strict: bool = True) -> list[Line]:
    """Parses the text of a metrics file.

    Blank lines are ignored. A last line that is not a valid JSON object (a job killed mid-write)
    is dropped with a warning. An invalid line anywhere else is an error naming `source` and the
    line (`strict`), or is dropped with a warning (`strict=False`, for the writer, which must not
    stop a training job over a damaged history). Records without a numeric `"step"` are dropped
    with a warning.
    """
    numbered = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    out = []
    for pos, (lineno, ln) in enumerate(numbered):
        try:
            rec = json.loads(ln)
            if not isinstance(rec, dict):
                raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
        except ValueError as e:
            where = f"{source}:{lineno}"
            if pos == len(numbered) - 1:
                warnings.warn(f"{where}: skipping the last line, which is not valid JSON (probably "
                              f"truncated when the job stopped): {e}", stacklevel=2)
                continue
            msg = f"{where}: line is not a valid JSON object ({e})"
            if "Extra data" in str(e) or ln.find('{"step"', 1) > 0:
                msg += ("; it holds two records run together: a job appended onto a half-written line "
                        "(a resume before metrics.jsonl was cut back on resume) or two jobs wrote this "
                        "file at once")
            if strict:
                raise ValueError(msg + "; fix or delete that line") from None
            warnings.warn(msg + "; dropping it", stacklevel=2)
            continue
        if not _is_step(rec.get("step")):
            warnings.warn(f"{source}:{lineno}: skipping a record without a numeric 'step'", stacklevel=2)
            continue
        out.append(Line(lineno, ln, rec))
    return out


def read_lines(path: str, *, strict: bool = True) -> list[Line]:
    """The records of a metrics file (local or `gs://...`) with their line numbers; see `parse_lines`."""
    return parse_lines(fileio.read_text(path, errors="replace"), path, strict=strict)


def read_metrics(path: str, *, strict: bool = True) -> list[dict[str, Any]]:
    """The records of a metrics file (local or `gs://...`), in file order."""
    return [ln.record for ln in read_lines(path, strict=strict)]


def history_problems(lines: Sequence[Line], source: str) -> list[str]:
    """What makes a history something other than one job's record, in file order.

    - a step going backwards: a job resumed without cutting the file back (one jump per resume),
      or two jobs appending to one file (jumps back and forth);
    - a training step recorded twice (two lines with `TRAIN_STEP_KEY` at one step): a re-run step,
      or two jobs that started together.

    Two evaluations of one step are no problem: they measure the same parameters (a finished run
    continued with more steps evaluates its last step again).

    Returns one message per problem, each naming `source` and the lines; [] for a clean history.
    """
    problems: list[str] = []
    trained_at: dict[float, int] = {}
    top: Line | None = None
    for ln in lines:
        if top is not None and ln.step < top.step:
            problems.append(f"{source}:{ln.lineno}: step goes back from {top.step:g} (line {top.lineno}) "
                            f"to {ln.step:g}")
        if top is None or ln.step >= top.step:
            top = ln
        if TRAIN_STEP_KEY in ln.record:
            if ln.step in trained_at:
                problems.append(f"{source}:{ln.lineno}: training step {ln.step:g} recorded again "
                                f"(first at line {trained_at[ln.step]})")
            else:
                trained_at[ln.step] = ln.lineno
    return problems


def lines_before(lines: Sequence[Line], resume_step: int) -> list[Line]:
    """The lines a run restored from the checkpoint of `resume_step` keeps.

    That run starts again at step `resume_step` and records it and every later step anew, so their
    lines go; a line of `resume_step` itself stays when it records no training step (the final
    evaluation of a finished run, which the trainer does not repeat: `MetricsWriter.has_eval`).
    """
    return [ln for ln in lines
            if ln.step < resume_step or (ln.step == resume_step and TRAIN_STEP_KEY not in ln.record)]


# ----------------------------------------------------------------------------- writing


def _plain(value: Any):
    if isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0:
        value = value.item()
    elif hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; analyze reads null as missing
    return value


def _text(lines: Sequence[Line]) -> str:
    return "".join(ln.text + "\n" for ln in lines)


def _tensorboard(logdir: str, purge_step: int | None):
    try:
        SummaryWriter = _import_summary_writer()
    except ImportError:
        return None
    return SummaryWriter(logdir, purge_step=purge_step)


def _import_summary_writer():
    """tensorboardX's writer, imported without torch: it imports torch, when installed, only to
    accept torch tensors (we log Python floats), which costs ~4 s at every start. A process that
    already imported torch keeps it; a later `import torch` works as usual."""
    import sys

    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` → ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """`metrics.jsonl` (+ TensorBoard) in `workdir`.

    For a remote workdir (`gs://...`) both are written to a local mirror
    (`~/.cache/jaxrl-entropy/<run>`) and `metrics.jsonl` is uploaded whole by `sync()` (object
    stores cannot append), which the trainer calls at every checkpoint.

    Args:
      workdir: the run directory, local or remote.
      tensorboard: also write TensorBoard events (when tensorboardX is installed).
      enabled: False on all processes but one of a multi-host job: nothing is written.
      resume_step: the step of the checkpoint the run restored (0 for a fresh start). The history
        is cut back to `lines_before(resume_step)` first, so the steps the run will do again are
        not recorded twice; TensorBoard is told to drop its events from that step on. None keeps
        the whole history (only a half-written last line goes, so that nothing is appended to it).
    """

    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.start = time.time()
        self._tb = None
        self._remote = fileio.join(workdir, METRICS_FILE) if fileio.is_remote(workdir) else None
        if not enabled:
            return
        local = workdir
        if self._remote:
            tag = workdir.split("://", 1)[1].strip("/").replace("/", "_")
            local = os.path.join(os.path.expanduser("~/.cache/jaxrl-entropy"), tag)
        os.makedirs(local, exist_ok=True)
        self._path = os.path.join(local, METRICS_FILE)
        kept, dropped = self._restore_history(resume_step)
        self._eval_steps = {int(ln.step) for ln in kept if "eval/accuracy" in ln.record}
        self._file = open(self._path, "a", buffering=1)
        if tensorboard:
            # TensorBoard drops the earlier event files' points from `purge_step` on.
            self._tb = _tensorboard(os.path.join(local, "tensorboard"), resume_step if dropped else None)

    def _restore_history(self, resume_step: int | None) -> tuple[list[Line], int]:
        """Writes the kept history to the local file (and, if it changed, to the remote one);
        returns (kept lines, number of lines dropped)."""
        # The history lives in the workdir: a remote one's overrides whatever an earlier job left
        # in the local mirror (and its absence means a fresh history, not the mirror's).
        source = self._remote or self._path
        text = fileio.read_text(source, errors="replace") if fileio.exists(source) else ""
        lines = parse_lines(text, source, strict=False)
        kept = lines if resume_step is None else lines_before(lines, resume_step)
        new_text = _text(kept)
        if new_text != text or self._remote:
            fileio.write_text(self._path, new_text)
        if self._remote and new_text != text:  # the bucket shows nothing the run will do again
            fileio.write_text(self._remote, new_text)
        dropped = len(lines) - len(kept)
        if dropped:
            log.info("%s: dropped %d line(s) of steps >= %s that this run records again",
                     source, dropped, resume_step)
        return kept, dropped

    def has_eval(self, step: int) -> bool:
        """Whether an evaluation line for `step` is already in `metrics.jsonl` (a restarted run
        that had finished does not evaluate again)."""
        return self.enabled and step in self._eval_steps

    def sync(self) -> None:
        """Uploads the local mirror of a remote workdir's `metrics.jsonl` (no-op when local)."""
        if self.enabled and self._remote:
            self._file.flush()
            fileio.write_text(self._remote, fileio.read_text(self._path))

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        row = {"step": int(step), "time": round(time.time() - self.start, 3)}
        row.update({k: _plain(v) for k, v in sorted(metrics.items())})
        if not self.enabled:
            return row
        if "eval/accuracy" in row:
            self._eval_steps.add(row["step"])
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k.replace("@", "_at_"), v, step)  # TB tags allow no "@"
            self._tb.flush()
        return row

    def close(self):
        if self.enabled:
            self.sync()
            self._file.close()
            if self._tb is not None:
                self._tb.close()
