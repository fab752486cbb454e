"""The numbers: metric series per run, means across seeds, per-variant summaries and paired tests.

`summarize_runs` returns the `summary.json` content (before NaN becomes null).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxrl_entropy import stats
from jaxrl_entropy.analyze.layout import (
    BASELINE, CONTROL_TABLE_METRICS, ENTROPY_TABLE_METRICS, SUBSET_CONTRASTS, TAIL_STEPS,
    THRESHOLD_METRICS, TRAIN_TAIL_METRICS, Layout, is_number)
from jaxrl_entropy.analyze.runs import Run

#: run path → (step, eval metrics) of its last evaluation
Finals = dict[str, tuple[float | None, dict[str, float]]]
#: (run path, token subset) → that run's geometry summary of the subset
Geometry = dict[tuple[str, str], dict[str, float]]


def series(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps [S], values [S]) of one metric in a run, sorted by step; a step recorded twice keeps
    its last value (an evaluation repeated when a finished run is continued, or a `keep_last`
    history). Non-numeric values are ignored; NaN is kept."""
    if key in run._series:
        return run._series[key]
    by_step: dict[float, float] = {}
    for rec in run.records:
        v = rec.get(key)
        if is_number(v):
            by_step[float(rec["step"])] = float(v)
    steps = np.array(sorted(by_step), dtype=np.float64)
    values = np.array([by_step[s] for s in steps], dtype=np.float64)
    steps.flags.writeable = values.flags.writeable = False  # cached: shared between callers
    run._series[key] = (steps, values)
    return steps, values


def aggregate(runs: Sequence[Run], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Across-run mean and std (ddof=1) of a metric at every step any run logged it.

    Returns (steps [S], mean [S], std [S]); std is NaN where fewer than two runs have the step.
    """
    per_run = [series(r, key) for r in runs]
    all_steps = np.unique(np.concatenate([s for s, _ in per_run])) if per_run else np.zeros(0)
    vals_RxS = np.full((len(per_run), all_steps.size), np.nan)
    for i, (s, v) in enumerate(per_run):
        vals_RxS[i, np.searchsorted(all_steps, s)] = np.where(np.isfinite(v), v, np.nan)
    n_S = np.isfinite(vals_RxS).sum(axis=0)
    with warnings.catch_warnings():  # steps with < 1 (mean) or < 2 (std) finite values give NaN: intended
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(vals_RxS, axis=0)
        std = np.where(n_S > 1, np.nanstd(vals_RxS, axis=0, ddof=1), np.nan)
    return all_steps, mean, std


def final_eval(run: Run) -> tuple[float | None, dict[str, float]]:
    """(step, metrics) of the run's last record that holds an `eval/...` metric."""
    for rec in reversed(run.records):
        ev = {k: float(v) for k, v in rec.items() if k.startswith("eval/") and is_number(v)}
        if ev:
            return float(rec["step"]), ev
    return None, {}


def _finite(run: Run, key: str) -> np.ndarray:
    v = series(run, key)[1]
    return v[np.isfinite(v)]


def _run_geometry(run: Run, subset: str, metrics: Sequence[str]) -> dict[str, float]:
    """One run's gradient geometry of one token subset: the mean over logged steps of each metric,
    and its volatility over training (std of cos_full, coefficient of variation of the norm: the
    paper's "larger but more volatile" explorer gradients)."""
    out: dict[str, float] = {}
    for m in metrics:
        x = _finite(run, f"geometry/{subset}/{m}")
        if not x.size:
            continue
        out[m] = float(x.mean())
        spread = float(x.std(ddof=1)) if x.size > 1 else float("nan")
        if m == "cos_full":
            out["cos_full_sd_over_steps"] = spread
        if m == "norm":
            out["norm_cv_over_steps"] = spread / abs(out[m]) if out[m] != 0 else float("nan")
    out.update(next_step_cos_prev(run, subset))
    out.update(complement_geometry(run, subset))
    return out


def complement_geometry(run: Run, subset: str) -> dict[str, float]:
    """`cos_rest` (the subset's gradient against the gradient of every other token of the batch)
    and `self_share` (its own part of cos_full), each probe's value from the logged norm,
    proj_full and tokens (`stats.complement_cosine`), then the mean over probes. A subset of large
    per-token gradients dominates the full gradient and so looks aligned with it: cos_rest is
    the alignment without that self-overlap."""
    keys = [f"geometry/{subset}/norm", f"geometry/{subset}/proj_full", "geometry/full/norm",
            f"geometry/{subset}/tokens", "geometry/full/tokens"]
    if subset == "full" or not all(_logged(run, k) for k in keys):
        return {}
    cols = [_by_step(run, k) for k in keys]
    steps = sorted(set.intersection(*(set(c) for c in cols)))
    if not steps:
        return {}
    cos_rest, share = stats.complement_cosine(*(np.array([c[st] for st in steps]) for c in cols))
    out = {}
    for name, v in (("cos_rest", cos_rest), ("self_share", share)):
        v = v[np.isfinite(v)]
        if v.size:
            out[name] = float(v.mean())
    return out


def next_step_cos_prev(run: Run, subset: str) -> dict[str, float]:
    """`cos_prev_1step`: the mean `cos_prev` over the probes taken one optimiser step after the
    previous one (`geometry/steps_since_prev` = 1, from `train.geometry_consecutive`). Mixed with
    the probes `geometry_every` steps apart, a direction's step-to-step persistence would be
    averaged away."""
    cos_prev, gap = _by_step(run, f"geometry/{subset}/cos_prev"), _by_step(run, "geometry/steps_since_prev")
    x = np.array([v for step, v in cos_prev.items() if gap.get(step) == 1.0 and np.isfinite(v)])
    return {"cos_prev_1step": float(x.mean())} if x.size else {}


def _by_step(run: Run, key: str) -> dict[float, float]:
    """{step: value} of one metric (`series` as a mapping, to pair metrics logged at the same steps)."""
    return dict(zip(*(a.tolist() for a in series(run, key))))


def _summary_with_values(values: Sequence[float]) -> dict[str, Any]:
    return {**stats.summarize(values), "values": [float(v) for v in values]}


def _logged(run: Run, key: str) -> bool:
    return series(run, key)[0].size > 0


def _has_finite(run: Run, key: str) -> bool:
    return _finite(run, key).size > 0


def _tail_mean(run: Run, key: str) -> float:
    v = _finite(run, key)[-TAIL_STEPS:]
    return float(v.mean()) if v.size else float("nan")


def _last(run: Run, key: str) -> float:
    v = _finite(run, key)
    return float(v[-1]) if v.size else float("nan")


def _mean(run: Run, key: str) -> float:
    return float(_finite(run, key).mean())


def _variant_entry(rs: Sequence[Run], lay: Layout, finals: Finals, geometry: Geometry) -> dict[str, Any]:
    """One variant's tables: final eval, training tail, entropy, controls, geometry (each cell a
    `summarize` across the variant's runs, with the per-run values)."""
    entry: dict[str, Any] = {"n_runs": len(rs), "seeds": [r.seed for r in rs], "runs": [r.path for r in rs]}
    entry["final"] = {
        k: _summary_with_values([finals[r.path][1][k] for r in rs if k in finals[r.path][1]])
        for k in lay.main_cols + lay.pass_cols + lay.other_eval
    }
    entry["train_tail"] = {k: _summary_with_values([_tail_mean(r, k) for r in rs if _logged(r, k)])
                           for k in TRAIN_TAIL_METRICS if k in lay.keys}
    ent = {f"{k} (final)": _summary_with_values([_last(r, k) for r in rs if _logged(r, k)])
           for k in THRESHOLD_METRICS if k in lay.keys}
    ent.update({f"{k} (mean over steps)": _summary_with_values([_mean(r, k) for r in rs if _has_finite(r, k)])
                for k in ENTROPY_TABLE_METRICS if k in lay.keys})
    entry["entropy"] = ent
    entry["controls"] = {k: _summary_with_values([_mean(r, k) for r in rs if _has_finite(r, k)])
                         for k in CONTROL_TABLE_METRICS if k in lay.keys}
    geo: dict[str, Any] = {}
    for s in lay.subsets:
        per_run = [g for g in (geometry[r.path, s] for r in rs) if g]
        cols = list(dict.fromkeys(k for g in per_run for k in g))
        if cols:
            geo[s] = {k: _summary_with_values([g[k] for g in per_run if k in g]) for k in cols}
    entry["geometry"] = geo
    return entry


def _by_seed(rs: Sequence[Run]) -> dict[int, Run]:
    out: dict[int, Run] = {}
    for r in rs:
        if r.seed in out:
            warnings.warn(f"variant {r.name!r} has two runs with seed {r.seed} "
                          f"({out[r.seed].path}, {r.path}); pairing uses the first")
            continue
        out[r.seed] = r
    return out


def _paired_against_baseline(lay: Layout, finals: Finals, baseline: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Each variant's final eval metrics against the baseline's on the seeds both ran."""
    tests: list[dict[str, Any]] = []
    notes: list[str] = []
    if baseline not in lay.groups:
        if len(lay.variants) > 1:
            notes.append(f"no run is named '{baseline}'; paired tests compare each variant "
                         f"with the '{baseline}' baseline on matching seeds (--baseline NAME picks another)")
        return tests, notes
    base = _by_seed(lay.groups[baseline])
    for v in lay.variants:
        if v == baseline:
            continue
        other = _by_seed(lay.groups[v])
        seeds = sorted(set(base) & set(other))
        if len(seeds) < 2:
            notes.append(f"{v}: {len(seeds)} seed(s) shared with '{baseline}'; a paired test needs at least 2")
            continue
        for k in lay.main_cols:
            a = [finals[other[s].path][1].get(k, float("nan")) for s in seeds]
            b = [finals[base[s].path][1].get(k, float("nan")) for s in seeds]
            res = stats.paired_test(a, b)
            if res["n"]:
                tests.append({"variant": v, "baseline": baseline, "metric": k, "seeds": seeds, **res})
    return tests, notes


def _subset_contrasts(runs: Sequence[Run], lay: Layout, geometry: Geometry) -> list[dict[str, Any]]:
    """Anchor vs explorer (vs random) within the same runs: one pair per run."""
    out: list[dict[str, Any]] = []
    # and anchor vs explorer as each extra probe layer splits them (train.geometry_layers)
    per_layer = [(s, "explorer" + s[len("anchor"):]) for s in lay.subsets if s.startswith("anchor@")]
    for a, b in (*SUBSET_CONTRASTS, *per_layer):
        if a not in lay.subsets or b not in lay.subsets:
            continue
        ga = [geometry[r.path, a] for r in runs]
        gb = [geometry[r.path, b] for r in runs]
        for k in dict.fromkeys(k for g in ga for k in g):
            res = stats.paired_test([g.get(k, float("nan")) for g in ga], [g.get(k, float("nan")) for g in gb])
            if res["n"]:
                out.append({"a": a, "b": b, "metric": k, **res})
    return out


def summarize_runs(runs: Sequence[Run], lay: Layout, baseline: str = BASELINE) -> dict[str, Any]:
    """The summary: runs, per-variant tables, paired tests against the `baseline` variant, subset
    contrasts."""
    finals = {r.path: final_eval(r) for r in runs}
    geometry = {(r.path, s): _run_geometry(r, s, lay.geo_metrics) for r in runs for s in lay.subsets}
    paired, notes = _paired_against_baseline(lay, finals, baseline)
    return {
        "baseline": baseline,
        "runs": [
            {"path": r.path, "variant": r.name, "seed": r.seed, "records": len(r.records),
             "last_step": max((float(x["step"]) for x in r.records), default=None),
             "final_eval_step": finals[r.path][0], "history_problems": list(r.problems)}
            for v in lay.variants for r in lay.groups[v]
        ],
        "variants": {v: _variant_entry(lay.groups[v], lay, finals, geometry) for v in lay.variants},
        "paired_tests": paired,
        "paired_notes": notes,
        "subset_contrasts": _subset_contrasts(runs, lay, geometry),
    }
