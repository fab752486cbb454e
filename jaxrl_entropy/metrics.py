"""Metric sinks: `metrics.jsonl` always (one JSON object per line, flushed), TensorBoard when
tensorboardX is installed. A killed job loses at most the line being written."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import numpy as np

from jaxrl_entropy import fileio


def _plain(value: Any):
    if isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0:
        value = value.item()
    elif hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; analyze reads null as missing
    return value


def _eval_steps(path: str) -> set[int]:
    steps: set[int] = set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # the half-written last line of a killed job
                    continue
                if "eval/accuracy" in row:
                    steps.add(int(row["step"]))
    return steps


class MetricsWriter:
    """`metrics.jsonl` (+ TensorBoard) in `workdir`. For a remote workdir (`gs://...`) both are
    written to a local mirror (`~/.cache/jaxrl-entropy/<run>`) and `metrics.jsonl` is uploaded
    whole by `sync()` (object stores cannot append), which the trainer calls at every checkpoint."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.start = time.time()
        self._tb = None
        self._remote = fileio.join(workdir, "metrics.jsonl") if fileio.is_remote(workdir) else None
        if not enabled:
            return
        local = workdir
        if self._remote:
            tag = workdir.split("://", 1)[1].strip("/").replace("/", "_")
            local = os.path.join(os.path.expanduser("~/.cache/jaxrl-entropy"), tag)
            if fileio.exists(self._remote):  # resuming: continue the uploaded history
                os.makedirs(local, exist_ok=True)
                fileio.write_text(os.path.join(local, "metrics.jsonl"), fileio.read_text(self._remote))
        os.makedirs(local, exist_ok=True)
        self._path = os.path.join(local, "metrics.jsonl")
        self._eval_steps = _eval_steps(self._path)
        self._file = open(self._path, "a", buffering=1)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(local, "tensorboard"))
            except ImportError:
                self._tb = None

    def has_eval(self, step: int) -> bool:
        """Whether an evaluation line for `step` is already in `metrics.jsonl` (a restarted run
        that had finished does not evaluate again)."""
        return self.enabled and step in self._eval_steps

    def sync(self) -> None:
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
