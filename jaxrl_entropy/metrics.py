"""Metric sinks: `metrics.jsonl` always (one JSON object per line, flushed), TensorBoard when
tensorboardX is installed. A killed job loses at most the line being written."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import numpy as np


def _plain(value: Any):
    if isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0:
        value = value.item()
    elif hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; analyze reads null as missing
    return value


class MetricsWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.start = time.time()
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:
                self._tb = None

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        row = {"step": int(step), "time": round(time.time() - self.start, 3)}
        row.update({k: _plain(v) for k, v in sorted(metrics.items())})
        if not self.enabled:
            return row
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
            self._file.close()
            if self._tb is not None:
                self._tb.close()
