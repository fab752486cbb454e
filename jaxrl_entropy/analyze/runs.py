"""Loading run directories (local or `gs://...`): which directories are runs, their variant and
seed, their metric records."""
from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxrl_entropy.rundir import fileio, metrics

CONFIG_FILE = "config.json"
#: How many history problems an error message lists before it says "and N more".
_SHOWN_PROBLEMS = 3

_SEED_SUFFIX = re.compile(r"^(?P<name>.+?)[_\-.]seed[_\-]?(?P<seed>\d+)$")


@dataclasses.dataclass
class Run:
    """One run directory: its variant label, seed and metric records (in file order).

    `problems` lists what makes the history more than one job's record (see
    `metrics.history_problems`); it is non-empty only for runs loaded with `keep_last=True`.
    """

    path: str
    name: str
    seed: int
    records: list[dict[str, Any]]
    problems: list[str] = dataclasses.field(default_factory=list)
    config: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)  # its config.json
    _series: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(
        default_factory=dict, repr=False, compare=False)


def _name_and_seed_from_dir(path: str) -> tuple[str, int]:
    base = fileio.basename(path)
    m = _SEED_SUFFIX.match(base)
    if m:  # e.g. "anchor_seed3" → ("anchor", 3)
        return m.group("name"), int(m.group("seed"))
    return base, 0


def _read_config(run_dir: str) -> dict[str, Any]:
    path = fileio.join(run_dir, CONFIG_FILE)
    if not fileio.exists(path):
        return {}
    try:
        cfg = json.loads(fileio.read_text(path))
    except ValueError as e:
        warnings.warn(f"{path}: not valid JSON ({e}); using the directory name as variant")
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _history_error(path: str, problems: Sequence[str]) -> ValueError:
    shown = "\n  ".join(problems[:_SHOWN_PROBLEMS])
    more = f"\n  ... and {len(problems) - _SHOWN_PROBLEMS} more" if len(problems) > _SHOWN_PROBLEMS else ""
    return ValueError(
        f"{path} is not the record of one job:\n  {shown}{more}\n"
        "Either two jobs wrote this run directory at once (run one job per --workdir; their lines "
        "cannot be told apart), or the run was resumed by a version that did not cut metrics.jsonl "
        "back to its checkpoint. For the latter, analyse it with each step's last record: "
        "`jaxrl-entropy analyze --keep-last ...` (run_analyze(..., keep_last=True))."
    )


def load_run(run_dir: str, *, keep_last: bool = False) -> Run:
    """Loads one run directory: `metrics.jsonl` and, optionally, `config.json`.

    Variant and seed come from `config.json` (`"name"`, `"seed"`); when missing, the directory
    name is the variant (a trailing `_seed<N>` is split off as the seed) and the seed is 0.

    Raises:
      FileNotFoundError: no `metrics.jsonl` in `run_dir`.
      ValueError: a line in the middle of the file is not JSON, or (unless `keep_last`) the history
        is not one job's record: a step goes backwards or a training step is recorded twice.
    """
    metrics_path = fileio.join(run_dir, metrics.METRICS_FILE)
    if not fileio.isfile(metrics_path):
        raise FileNotFoundError(
            f"run directory {run_dir!r} has no {metrics.METRICS_FILE}; pass the directory that the "
            "trainer wrote (its --workdir), or a directory whose sub-directories are such runs"
        )
    lines = metrics.read_lines(metrics_path)
    problems = metrics.history_problems(lines, metrics_path)
    if problems and not keep_last:
        raise _history_error(metrics_path, problems)
    if problems:
        warnings.warn(f"{metrics_path}: {len(problems)} history problem(s), the first: {problems[0]}; "
                      "a step recorded more than once keeps its last record (--keep-last)")
    name, seed = _name_and_seed_from_dir(run_dir)
    cfg = _read_config(run_dir)
    if isinstance(cfg.get("name"), str) and cfg["name"]:
        name = cfg["name"]
    if isinstance(cfg.get("seed"), (int, float)) and not isinstance(cfg.get("seed"), bool):
        seed = int(cfg["seed"])
    return Run(path=run_dir, name=name, seed=seed, records=[ln.record for ln in lines], problems=problems,
               config=cfg)


def discover(run_dirs: Sequence[str]) -> list[str]:
    """Run directories: each argument itself, or (if it has no metrics file) its sub-directories
    that have one, sorted by name."""
    found = []
    for d in run_dirs:
        if not fileio.isdir(d):
            raise FileNotFoundError(f"run directory {d!r} does not exist")
        if fileio.isfile(fileio.join(d, metrics.METRICS_FILE)):
            found.append(d)
            continue
        subs = [fileio.join(d, s) for s in fileio.listdir(d)
                if fileio.isfile(fileio.join(d, s, metrics.METRICS_FILE))]
        if not subs:
            raise FileNotFoundError(
                f"run directory {d!r} has no {metrics.METRICS_FILE} (nor do its sub-directories); pass "
                "the directory that the trainer wrote (its --workdir)"
            )
        found.extend(subs)
    return found
