"""`jaxrl-entropy analyze`: load the runs, compute the summary, draw the plots, write the report."""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import numpy as np

from jaxrl_entropy.rundir import fileio
from jaxrl_entropy.analyze.aggregate import summarize_runs
from jaxrl_entropy.analyze.layout import BASELINE, layout_of
from jaxrl_entropy.analyze.plots import plot_all
from jaxrl_entropy.analyze.report import render_report
from jaxrl_entropy.analyze.runs import discover, load_run

REPORT_FILE = "report.md"
SUMMARY_FILE = "summary.json"


def _json_safe(obj: Any) -> Any:
    """`obj` with NaN/inf as None (JSON has neither) and numpy scalars as Python ones."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def run_analyze(run_dirs: list[str], out_dir: str | None = None, *, keep_last: bool = False,
                baseline: str = BASELINE) -> dict:
    """Analyses run directories (local or `gs://...`); writes plots, `report.md` and `summary.json`.

    Args:
      run_dirs: run directories (each with metrics.jsonl), or parents whose sub-directories are runs.
      out_dir: output directory; default `<first run's parent>/analysis`.
      keep_last: analyse histories that are not one job's record (a step going backwards, a
        training step recorded twice) with each step's last record, instead of refusing them.
      baseline: the variant (`config.name`) every other variant is paired with, seed by seed.

    Returns:
      The summary written to `summary.json` (NaN as None), with `out_dir` and `files` added.
    """
    if not run_dirs:
        raise ValueError("analyze: give at least one run directory")
    paths = discover(run_dirs)
    runs = [load_run(p, keep_last=keep_last) for p in paths]
    if out_dir is None:
        out_dir = fileio.join(fileio.parent(paths[0]), "analysis")
    lay = layout_of(runs)
    if baseline != BASELINE and baseline not in lay.groups:   # before anything is written
        raise ValueError(f"analyze: --baseline {baseline!r} names no variant of these runs (they are: "
                         f"{', '.join(lay.variants)}); give one of those, or leave it out for '{BASELINE}'")
    fileio.makedirs(out_dir)
    summary = summarize_runs(runs, lay, baseline)
    files = plot_all(lay, out_dir)
    report_path = fileio.join(out_dir, REPORT_FILE)
    fileio.write_text(report_path, render_report(summary, lay, files))
    summary_path = fileio.join(out_dir, SUMMARY_FILE)
    files += [report_path, summary_path]
    summary = _json_safe({**summary, "out_dir": out_dir, "files": files})
    fileio.write_text(summary_path, json.dumps(summary, indent=2, allow_nan=False))
    return summary


def main(argv: list[str] | None = None) -> int:
    """`jaxrl-entropy analyze RUN_DIR [RUN_DIR ...] [--out DIR] [--keep-last] [--baseline NAME]`; argv
    excludes the subcommand."""
    parser = argparse.ArgumentParser(
        prog="jaxrl-entropy analyze",
        description="Plots and tables (report.md, summary.json) from training run directories "
                    "(local or gs://).",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directory with metrics.jsonl (or a parent of several)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output directory (default: <first run's parent>/analysis)")
    parser.add_argument("--keep-last", action="store_true",
                        help="analyse a metrics.jsonl whose steps go backwards or repeat (a run resumed "
                             "before resumes cut the file back) with each step's last record; without "
                             "it such a history is an error")
    parser.add_argument("--baseline", default=BASELINE, metavar="NAME",
                        help=f"the variant the paired tests compare every other one with (default "
                             f"'{BASELINE}'), e.g. explorer to test explorer_lr3e-5 against it")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        summary = run_analyze(args.run_dirs, args.out, keep_last=args.keep_last, baseline=args.baseline)
    except (FileNotFoundError, ValueError) as e:
        print(f"jaxrl-entropy analyze: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(summary['files'])} files to {summary['out_dir']}")
    for p in summary["files"]:
        print(f"  {p}")
    return 0
