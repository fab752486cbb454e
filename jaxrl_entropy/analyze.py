"""`jaxrl-entropy analyze`: plots and tables from one or more run directories.

Each run directory holds `metrics.jsonl` (one JSON object per line, each with `"step"`; training
and eval metrics may sit on separate lines) and, optionally, `config.json` (the run's config,
with `"name"` = the variant label such as "full", "random", "anchor", "explorer", "soft", and
`"seed"`). Runs are grouped by variant; seeds give the spread. Outputs, in `out_dir`:

- `reward.png`            reward/mean and eval/accuracy over steps, mean ± std across seeds
- `eval_benchmarks.png`   eval/<bench>/mean@k over steps
- `training.png`          response length, gradient norm, clip fraction, loss, train accuracy
- `entropy_thresholds.png` anchor / explorer thresholds and entropy quantiles over steps
- `gradient_geometry.png` geometry/<subset>/{cos_full, norm, cos_prev} over steps
- `report.md`             tables: final eval per variant (mean ± std, runs), paired tests against
                          "full" on matching seeds, training tail, entropy dynamics, gradient geometry
- `summary.json`          the same numbers, machine-readable (NaN written as null)

A plot is drawn only when its metrics exist in at least one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from jaxrl_entropy import stats

__all__ = ["Run", "load_metrics", "load_run", "series", "aggregate", "final_eval", "run_analyze", "main"]

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
BASELINE = "full"
#: Variants listed first, in this order; other names follow in order of appearance.
VARIANT_ORDER = ("full", "random", "anchor", "explorer", "soft")
SUBSET_ORDER = ("anchor", "explorer", "random", "full")
GEOMETRY_METRICS = ("cos_full", "norm", "cos_prev")
# pairs of token subsets compared within each run (the paper's anchor vs explorer claims)
SUBSET_CONTRASTS = (("anchor", "explorer"), ("anchor", "random"), ("explorer", "random"))
TRAIN_TAIL_METRICS = ("reward/mean", "accuracy", "response_len/mean", "grad_norm", "clip_frac")
TRAINING_PLOT_METRICS = ("response_len/mean", "grad_norm", "clip_frac", "loss", "accuracy")
ENTROPY_TABLE_METRICS = (
    "entropy/spearman_pred",
    "entropy/spearman_pos",
    "controls/partial_corr_pred",
    "controls/partial_corr_pos",
)
#: Controls logged with the gradient geometry: is a token's gradient alignment with the full-token
#: update explained by its attention entropy beyond position, predictive entropy and length?
CONTROL_TABLE_METRICS = (
    "controls/align_raw_corr",
    "controls/align_partial_corr",
    "controls/align_partial_spearman",
    "controls/matched_anchor_align",
    "controls/matched_explorer_align",
)
#: Training metrics are summarised over this many last logged steps (single steps are noisy).
TAIL_STEPS = 10

_MEAN_AT_K = re.compile(r"^eval/(?P<bench>.+)/mean@(?P<k>\d+)$")
_PASS_AT_K = re.compile(r"^eval/(?P<bench>.+)/pass@(?P<k>\d+)$")
_GEOMETRY = re.compile(r"^geometry/(?P<subset>[^/]+)/(?P<metric>[^/]+)$")
_SEED_SUFFIX = re.compile(r"^(?P<name>.+?)[_\-.]seed[_\-]?(?P<seed>\d+)$")


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass
class Run:
    """One run directory: its variant label, seed and metric records (in file order)."""

    path: str
    name: str
    seed: int
    records: list[dict[str, Any]]
    _series: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(
        default_factory=dict, repr=False, compare=False)

    @property
    def label(self) -> str:
        return os.path.basename(os.path.normpath(self.path))


def load_metrics(path: str) -> list[dict[str, Any]]:
    """Reads a metrics JSONL file.

    Blank lines are ignored. A last line that is not valid JSON (a job killed mid-write) is
    skipped with a warning; an invalid line anywhere else is an error naming the file and line.
    Lines without a numeric `"step"` are skipped with a warning.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    records = []
    for pos, (lineno, line) in enumerate(numbered):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
        except ValueError as e:
            if pos == len(numbered) - 1:
                warnings.warn(
                    f"{path}:{lineno}: skipping the last line, which is not valid JSON "
                    f"(probably truncated when the job stopped): {e}",
                    stacklevel=2,
                )
                continue
            raise ValueError(
                f"{path}:{lineno}: line is not a valid JSON object ({e}); fix or delete that line"
            ) from None
        step = rec.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
            warnings.warn(f"{path}:{lineno}: skipping a record without a numeric 'step'", stacklevel=2)
            continue
        records.append(rec)
    return records


def _name_and_seed_from_dir(path: str) -> tuple[str, int]:
    base = os.path.basename(os.path.normpath(path))
    m = _SEED_SUFFIX.match(base)
    if m:  # e.g. "anchor_seed3" → ("anchor", 3)
        return m.group("name"), int(m.group("seed"))
    return base, 0


def load_run(run_dir: str) -> Run:
    """Loads one run directory (see the module docstring for the layout).

    Variant and seed come from `config.json` (`"name"`, `"seed"`); when missing, the directory
    name is the variant (a trailing `_seed<N>` is split off as the seed) and the seed is 0.
    """
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(metrics_path):
        raise FileNotFoundError(
            f"run directory {run_dir!r} has no {METRICS_FILE}; pass the directory that the "
            "trainer wrote (its --workdir), or a directory whose sub-directories are such runs"
        )
    records = load_metrics(metrics_path)
    dir_name, dir_seed = _name_and_seed_from_dir(run_dir)
    name, seed = dir_name, dir_seed
    cfg_path = os.path.join(run_dir, CONFIG_FILE)
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        except ValueError as e:
            warnings.warn(f"{cfg_path}: not valid JSON ({e}); using the directory name as variant")
            cfg = {}
        if isinstance(cfg, dict):
            if isinstance(cfg.get("name"), str) and cfg["name"]:
                name = cfg["name"]
            if isinstance(cfg.get("seed"), (int, float)) and not isinstance(cfg.get("seed"), bool):
                seed = int(cfg["seed"])
    return Run(path=run_dir, name=name, seed=seed, records=records)


def _discover(run_dirs: Sequence[str]) -> list[str]:
    """Run directories: each argument itself, or (if it has no metrics file) its sub-directories
    that have one, sorted by name."""
    found = []
    for d in run_dirs:
        if not os.path.isdir(d):
            raise FileNotFoundError(f"run directory {d!r} does not exist")
        if os.path.isfile(os.path.join(d, METRICS_FILE)):
            found.append(d)
            continue
        subs = sorted(
            os.path.join(d, s)
            for s in os.listdir(d)
            if os.path.isfile(os.path.join(d, s, METRICS_FILE))
        )
        if not subs:
            raise FileNotFoundError(
                f"run directory {d!r} has no {METRICS_FILE} (nor do its sub-directories); pass "
                "the directory that the trainer wrote (its --workdir)"
            )
        found.extend(subs)
    return found


# ----------------------------------------------------------------------------- series


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def series(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric in a run, sorted by step; a step logged twice (e.g. after
    a resume) keeps its last value. Non-numeric values are ignored; NaN is kept."""
    if key in run._series:
        return run._series[key]
    by_step: dict[float, float] = {}
    for rec in run.records:
        v = rec.get(key)
        if _is_number(v):
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
    vals = np.full((len(per_run), all_steps.size), np.nan)
    for i, (s, v) in enumerate(per_run):
        vals[i, np.searchsorted(all_steps, s)] = v
    finite = np.isfinite(vals)
    n = finite.sum(axis=0)
    total = np.where(finite, vals, 0.0).sum(axis=0)
    mean = np.divide(total, n, out=np.full(all_steps.size, np.nan), where=n > 0)
    dev2 = np.where(finite, (vals - mean) ** 2, 0.0).sum(axis=0)
    std = np.sqrt(np.divide(dev2, n - 1, out=np.full(all_steps.size, np.nan), where=n > 1))
    return all_steps, mean, std


def _keys(runs: Sequence[Run]) -> list[str]:
    seen: dict[str, None] = {}
    for r in runs:
        for rec in r.records:
            for k, v in rec.items():
                if _is_number(v):
                    seen.setdefault(k, None)
    return list(seen)


def final_eval(run: Run) -> tuple[float | None, dict[str, float]]:
    """(step, metrics) of the run's last record that holds an `eval/...` metric."""
    for rec in reversed(run.records):
        ev = {k: float(v) for k, v in rec.items() if k.startswith("eval/") and _is_number(v)}
        if ev:
            return float(rec["step"]), ev
    return None, {}


def _tail_mean(run: Run, key: str, n: int = TAIL_STEPS) -> float:
    _, v = series(run, key)
    v = v[np.isfinite(v)][-n:]
    return float(v.mean()) if v.size else float("nan")


def _last(run: Run, key: str) -> float:
    _, v = series(run, key)
    v = v[np.isfinite(v)]
    return float(v[-1]) if v.size else float("nan")


# ----------------------------------------------------------------------------- ordering


def _variant_order(names: Sequence[str]) -> list[str]:
    return _canonical(list(dict.fromkeys(names)), VARIANT_ORDER)


def _eval_columns(keys: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """(accuracy + mean@k columns, pass@k columns, other eval keys), in a stable order."""
    def bench_key(k: str, pat: re.Pattern) -> tuple[str, int]:
        m = pat.match(k)
        return (m.group("bench"), int(m.group("k")))

    mean_k = sorted((k for k in keys if _MEAN_AT_K.match(k)), key=lambda k: bench_key(k, _MEAN_AT_K))
    pass_k = sorted((k for k in keys if _PASS_AT_K.match(k)), key=lambda k: bench_key(k, _PASS_AT_K))
    main_cols = (["eval/accuracy"] if "eval/accuracy" in keys else []) + mean_k
    other = sorted(k for k in keys if k.startswith("eval/") and k not in main_cols and k not in pass_k)
    return main_cols, pass_k, other


def _geometry_layout(keys: Sequence[str]) -> tuple[list[str], list[str]]:
    subsets, metrics = [], []
    for k in keys:
        m = _GEOMETRY.match(k)
        if m:
            subsets.append(m.group("subset"))
            metrics.append(m.group("metric"))
    subsets = list(dict.fromkeys(subsets))
    metrics = list(dict.fromkeys(metrics))
    return _canonical(subsets, SUBSET_ORDER), _canonical(metrics, GEOMETRY_METRICS)


def _canonical(names: Sequence[str], order: Sequence[str]) -> list[str]:
    """`names` with those in `order` first (in that order), the rest after, as they came."""
    return [x for x in order if x in names] + [x for x in names if x not in order]


# ----------------------------------------------------------------------------- plots


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _band(ax, steps, mean, std, label, color, linestyle="-") -> None:
    # Sparse series (eval every N steps) get markers so single points stay visible.
    marker = "o" if steps.size <= 30 else None
    ax.plot(steps, mean, label=label, color=color, linestyle=linestyle, linewidth=1.5,
            marker=marker, markersize=3)
    ok = np.isfinite(std) & np.isfinite(mean)
    if ok.any():
        ax.fill_between(steps, mean - std, mean + std, where=ok, color=color, alpha=0.2, linewidth=0)


def _save(fig: Figure, path: str) -> str:
    fig.savefig(path, dpi=110)
    try:  # a 256-colour palette: line plots look the same at a third of the size
        from PIL import Image
        with Image.open(path) as im:
            small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        small.save(path, optimize=True)
    except ImportError:
        pass
    return path


def _metric_panels(groups, variants, keys, title, path, ncols=3) -> str | None:
    """One panel per metric, one line (mean ± std across seeds) per variant."""
    keys = [k for k in keys if any(series(r, k)[0].size for v in variants for r in groups[v])]
    if not keys:
        return None
    ncols = min(ncols, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colors = dict(zip(variants, _colors(len(variants))))
    for ax, key in zip(axes.flat, keys):
        for v in variants:
            steps, mean, std = aggregate(groups[v], key)
            if steps.size:
                _band(ax, steps, mean, std, f"{v} (n={len(groups[v])})", colors[v])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, path)


def _entropy_plot(groups, variants, path) -> str | None:
    """One panel per variant: q10–q90 and q25–q75 bands, median, anchor/explorer thresholds."""
    keys = ["entropy/anchor_threshold", "entropy/explorer_threshold"] + [
        f"entropy/q{q}" for q in (10, 25, 50, 75, 90)
    ]
    with_data = [v for v in variants if any(series(r, k)[0].size for r in groups[v] for k in keys)]
    if not with_data:
        return None
    fig = Figure(figsize=(5.0 * len(with_data), 3.8), layout="constrained")
    axes = fig.subplots(1, len(with_data), squeeze=False, sharey=True)[0]
    for ax, v in zip(axes, with_data):
        agg = {k: aggregate(groups[v], k) for k in keys}
        for lo, hi, alpha in (("q10", "q90", 0.15), ("q25", "q75", 0.3)):
            s_lo, m_lo, _ = agg[f"entropy/{lo}"]
            s_hi, m_hi, _ = agg[f"entropy/{hi}"]
            if s_lo.size and s_lo.size == s_hi.size and np.array_equal(s_lo, s_hi):
                ax.fill_between(s_lo, m_lo, m_hi, color="gray", alpha=alpha, linewidth=0,
                                label=f"{lo}–{hi}")
        s, m, _ = agg["entropy/q50"]
        if s.size:
            ax.plot(s, m, color="black", linewidth=1.2, label="median")
        for key, color, label in (
            ("entropy/anchor_threshold", "tab:blue", "anchor threshold"),
            ("entropy/explorer_threshold", "tab:red", "explorer threshold"),
        ):
            s, m, sd = agg[key]
            if s.size:
                _band(ax, s, m, sd, label, color, linestyle="--")
        ax.set_title(f"{v} (n={len(groups[v])})")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("normalised attention entropy")
    fig.suptitle("Attention-entropy distribution over training (mean across seeds)")
    return _save(fig, path)


def _geometry_plot(groups, variants, subsets, metrics, path) -> str | None:
    """Rows: geometry metrics; columns: variants; one line per token subset."""
    with_data = [
        v for v in variants
        if any(series(r, f"geometry/{s}/{m}")[0].size for r in groups[v] for s in subsets for m in metrics)
    ]
    if not with_data:
        return None
    fig = Figure(figsize=(5.0 * len(with_data), 3.2 * len(metrics)), layout="constrained")
    axes = fig.subplots(len(metrics), len(with_data), squeeze=False, sharex="col")
    colors = dict(zip(subsets, _colors(len(subsets))))
    for j, v in enumerate(with_data):
        for i, m in enumerate(metrics):
            ax = axes[i, j]
            for s in subsets:
                steps, mean, std = aggregate(groups[v], f"geometry/{s}/{m}")
                if steps.size:
                    _band(ax, steps, mean, std, s, colors[s])
            ax.set_title(f"{v}: {m}")
            ax.grid(alpha=0.3)
            if i == len(metrics) - 1:
                ax.set_xlabel("step")
            if ax.lines:
                ax.legend(fontsize=8)
    fig.suptitle("Gradient geometry per token subset (mean ± std across seeds)")
    return _save(fig, path)


# ----------------------------------------------------------------------------- tables


def _fmt(x: float, spec: str = ".4f") -> str:
    return "—" if x is None or not math.isfinite(x) else format(x, spec)


def _fmt_summary(s: dict[str, float], spec: str = ".4f") -> str:
    if s["n"] == 0:
        return "—"
    if s["n"] == 1:
        return _fmt(s["mean"], spec)
    return f"{_fmt(s['mean'], spec)} ± {_fmt(s['std'], spec)}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _summary_with_values(values: Sequence[float]) -> dict[str, Any]:
    s = stats.summarize(values)
    return {**s, "values": [float(v) for v in values]}


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


# ----------------------------------------------------------------------------- analysis


def _run_geometry(run: Run, subset: str, metrics: Sequence[str]) -> dict[str, float]:
    """One run's gradient geometry of one token subset: the mean over logged steps of each metric,
    and its volatility over training (std of cos_full, coefficient of variation of the norm: the
    paper's "larger but more volatile" explorer gradients)."""
    out: dict[str, float] = {}
    for m in metrics:
        x = series(run, f"geometry/{subset}/{m}")[1]
        x = x[np.isfinite(x)]
        if not x.size:
            continue
        out[m] = float(x.mean())
        if m == "cos_full":
            out["cos_full_sd_over_steps"] = float(x.std(ddof=1)) if x.size > 1 else float("nan")
        if m == "norm":
            out["norm_cv_over_steps"] = (float(x.std(ddof=1) / abs(x.mean())) if x.size > 1 and x.mean() != 0
                                         else float("nan"))
    return out


def run_analyze(run_dirs: list[str], out_dir: str | None = None) -> dict:
    """Analyses run directories; writes plots, `report.md` and `summary.json` to `out_dir`.

    Args:
      run_dirs: run directories (each with metrics.jsonl), or parents whose sub-directories are runs.
      out_dir: output directory; default `<first run's parent>/analysis`.

    Returns:
      The summary written to `summary.json` (NaN as None), with `out_dir` and `files` added.
    """
    if not run_dirs:
        raise ValueError("analyze: give at least one run directory")
    paths = _discover(run_dirs)
    runs = [load_run(p) for p in paths]
    if out_dir is None:
        out_dir = os.path.join(os.path.dirname(os.path.abspath(os.path.normpath(paths[0]))), "analysis")
    os.makedirs(out_dir, exist_ok=True)

    variants = _variant_order([r.name for r in runs])
    groups = {v: sorted((r for r in runs if r.name == v), key=lambda r: (r.seed, r.path)) for v in variants}
    keys = _keys(runs)
    main_cols, pass_cols, other_eval = _eval_columns(keys)
    subsets, geo_metrics = _geometry_layout(keys)

    # --- final eval and gradient geometry per run, then per variant
    finals = {r.path: final_eval(r) for r in runs}
    geometry = {(r.path, s): _run_geometry(r, s, geo_metrics) for r in runs for s in subsets}
    summary_variants: dict[str, Any] = {}
    for v in variants:
        rs = groups[v]
        entry: dict[str, Any] = {"n_runs": len(rs), "seeds": [r.seed for r in rs],
                                 "runs": [r.path for r in rs]}
        entry["final"] = {
            k: _summary_with_values([finals[r.path][1][k] for r in rs if k in finals[r.path][1]])
            for k in main_cols + pass_cols + other_eval
        }
        entry["train_tail"] = {
            k: _summary_with_values([_tail_mean(r, k) for r in rs if series(r, k)[0].size])
            for k in TRAIN_TAIL_METRICS if k in keys
        }
        ent = {}
        for k in ("entropy/anchor_threshold", "entropy/explorer_threshold"):
            if k in keys:
                ent[f"{k} (final)"] = _summary_with_values([_last(r, k) for r in rs if series(r, k)[0].size])
        for k in ENTROPY_TABLE_METRICS:
            if k in keys:
                ent[f"{k} (mean over steps)"] = _summary_with_values(
                    [float(np.nanmean(series(r, k)[1])) for r in rs if np.isfinite(series(r, k)[1]).any()]
                )
        entry["entropy"] = ent
        entry["controls"] = {
            k: _summary_with_values(
                [float(np.nanmean(series(r, k)[1])) for r in rs if np.isfinite(series(r, k)[1]).any()])
            for k in CONTROL_TABLE_METRICS if k in keys
        }
        geo: dict[str, Any] = {}
        for s in subsets:
            per_run = [g for g in (geometry[r.path, s] for r in rs) if g]
            cols = list(dict.fromkeys(k for g in per_run for k in g))
            if cols:
                geo[s] = {k: _summary_with_values([g[k] for g in per_run if k in g]) for k in cols}
        entry["geometry"] = geo
        summary_variants[v] = entry

    # --- paired tests against the baseline on matching seeds
    paired: list[dict[str, Any]] = []
    paired_notes: list[str] = []
    if BASELINE in groups:
        def by_seed(rs: Sequence[Run]) -> dict[int, Run]:
            out: dict[int, Run] = {}
            for r in rs:
                if r.seed in out:
                    warnings.warn(f"variant {r.name!r} has two runs with seed {r.seed} "
                                  f"({out[r.seed].path}, {r.path}); pairing uses the first")
                    continue
                out[r.seed] = r
            return out

        base = by_seed(groups[BASELINE])
        for v in variants:
            if v == BASELINE:
                continue
            other = by_seed(groups[v])
            seeds = sorted(set(base) & set(other))
            if len(seeds) < 2:
                paired_notes.append(f"{v}: {len(seeds)} seed(s) shared with '{BASELINE}'; "
                                    "a paired test needs at least 2")
                continue
            for k in main_cols:
                a = [finals[other[s].path][1].get(k, float("nan")) for s in seeds]
                b = [finals[base[s].path][1].get(k, float("nan")) for s in seeds]
                res = stats.paired_test(a, b)
                if res["n"] == 0:
                    continue
                paired.append({"variant": v, "baseline": BASELINE, "metric": k, "seeds": seeds, **res})
    elif len(variants) > 1:
        paired_notes.append(f"no run is named '{BASELINE}'; paired tests compare each variant "
                            f"with the '{BASELINE}' baseline on matching seeds")

    # --- anchor vs explorer (vs random) within the same runs: one pair per run
    contrasts: list[dict[str, Any]] = []
    for a, b in SUBSET_CONTRASTS:
        if a not in subsets or b not in subsets:
            continue
        ga = [geometry[r.path, a] for r in runs]
        gb = [geometry[r.path, b] for r in runs]
        for k in dict.fromkeys(k for g in ga for k in g):
            res = stats.paired_test([g.get(k, float("nan")) for g in ga], [g.get(k, float("nan")) for g in gb])
            if res["n"]:
                contrasts.append({"a": a, "b": b, "metric": k, **res})

    # --- plots
    files: list[str] = []
    plot_specs = [
        lambda: _metric_panels(groups, variants, ["reward/mean", "eval/accuracy"],
                               "Reward and accuracy (mean ± std across seeds)",
                               os.path.join(out_dir, "reward.png"), ncols=2),
        lambda: _metric_panels(groups, variants, [k for k in main_cols if k != "eval/accuracy"],
                               "Per-benchmark eval accuracy (mean ± std across seeds)",
                               os.path.join(out_dir, "eval_benchmarks.png")),
        lambda: _metric_panels(groups, variants, list(TRAINING_PLOT_METRICS),
                               "Training health (mean ± std across seeds)",
                               os.path.join(out_dir, "training.png")),
        lambda: _entropy_plot(groups, variants, os.path.join(out_dir, "entropy_thresholds.png")),
        lambda: _geometry_plot(groups, variants, subsets, geo_metrics,
                               os.path.join(out_dir, "gradient_geometry.png")),
    ]
    for make in plot_specs:
        p = make()
        if p:
            files.append(p)

    summary = {
        "runs": [
            {"path": r.path, "variant": r.name, "seed": r.seed, "records": len(r.records),
             "last_step": max((float(x["step"]) for x in r.records), default=None),
             "final_eval_step": finals[r.path][0]}
            for v in variants for r in groups[v]
        ],
        "variants": summary_variants,
        "paired_tests": paired,
        "paired_notes": paired_notes,
        "subset_contrasts": contrasts,
    }
    report_path = os.path.join(out_dir, "report.md")
    with open(report_path, "w", encoding="utf-8") as f:
        f.write(_render_report(summary, variants, main_cols, pass_cols, subsets, geo_metrics, files))
    files.append(report_path)
    summary_path = os.path.join(out_dir, "summary.json")
    files.append(summary_path)
    summary = _json_safe({**summary, "out_dir": out_dir, "files": files})
    with open(summary_path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
    return summary


def _render_report(summary, variants, main_cols, pass_cols, subsets, geo_metrics, files) -> str:
    V = summary["variants"]
    lines = ["# Run analysis", ""]
    lines += ["## Runs", ""]
    lines += _table(
        ["variant", "seed", "run", "records", "last step", "final eval step"],
        [[r["variant"], str(r["seed"]), f"`{r['path']}`", str(r["records"]),
          _fmt(r["last_step"], "g") if r["last_step"] is not None else "—",
          _fmt(r["final_eval_step"], "g") if r["final_eval_step"] is not None else "—"]
         for r in summary["runs"]],
    )
    lines += ["", "## Final evaluation", "",
              "Final = the last eval line of each run; cells are mean ± std (ddof=1) across runs.", ""]
    if main_cols:
        lines += _table(
            ["variant", "runs", *main_cols],
            [[v, str(V[v]["n_runs"]), *(_fmt_summary(V[v]["final"][k]) for k in main_cols)]
             for v in variants],
        )
    else:
        lines += ["No eval metrics (`eval/accuracy`, `eval/<bench>/mean@k`) found."]
    if pass_cols:
        lines += ["", "### pass@k", ""]
        lines += _table(
            ["variant", "runs", *pass_cols],
            [[v, str(V[v]["n_runs"]), *(_fmt_summary(V[v]["final"][k]) for k in pass_cols)]
             for v in variants],
        )

    lines += ["", f"## Paired tests against '{BASELINE}'", "",
              "Differences (variant − baseline) of the final eval metrics on seeds both variants ran; "
              "paired t-test, and Wilcoxon signed-rank with ≥ 6 pairs.", ""]
    if summary["paired_tests"]:
        lines += _table(
            ["variant", "metric", "pairs", "mean diff", "t", "p (t)", "p (Wilcoxon)"],
            [[p["variant"], p["metric"], str(p["n"]), _fmt(p["mean_diff"], "+.4f"), _fmt(p["t"], ".3f"),
              _fmt(p["p_t"], ".4g"), _fmt(p["p_wilcoxon"], ".4g")] for p in summary["paired_tests"]],
        )
    for note in summary["paired_notes"]:
        lines += [f"- {note}"]
    if not summary["paired_tests"] and not summary["paired_notes"]:
        lines += ["No variant to compare."]

    tail_keys = [k for k in TRAIN_TAIL_METRICS if any(k in V[v]["train_tail"] for v in variants)]
    if tail_keys:
        lines += ["", f"## Training (mean of the last {TAIL_STEPS} logged steps)", ""]
        lines += _table(
            ["variant", "runs", *tail_keys],
            [[v, str(V[v]["n_runs"]),
              *(_fmt_summary(V[v]["train_tail"][k], ".4g") if k in V[v]["train_tail"] else "—"
                for k in tail_keys)] for v in variants],
        )

    ent_keys = list(dict.fromkeys(k for v in variants for k in V[v]["entropy"]))
    if ent_keys:
        lines += ["", "## Entropy dynamics", ""]
        lines += _table(
            ["variant", *ent_keys],
            [[v, *(_fmt_summary(V[v]["entropy"][k], ".4g") if k in V[v]["entropy"] else "—"
                   for k in ent_keys)] for v in variants],
        )

    ctl_keys = list(dict.fromkeys(k for v in variants for k in V[v].get("controls", {})))
    if ctl_keys:
        lines += ["", "## Controls", "",
                  "Per run, the mean over the steps where geometry was logged of: the correlation of "
                  "attention entropy with each token's gradient alignment (projection of its gradient "
                  "on the full-token gradient), raw and partial (position, predictive entropy and "
                  "response length regressed out); and the mean alignment of anchors vs explorers "
                  "matched on position and predictive-entropy bins. Cells: mean ± std across runs.", ""]
        lines += _table(
            ["variant", *ctl_keys],
            [[v, *(_fmt_summary(V[v]["controls"][k], ".4g") if k in V[v].get("controls", {}) else "—"
                   for k in ctl_keys)] for v in variants],
        )

    if subsets:
        cols = list(geo_metrics)
        extra = [c for c in ("cos_full_sd_over_steps", "norm_cv_over_steps")
                 if any(c in V[v]["geometry"].get(s, {}) for v in variants for s in subsets)]
        lines += ["", "## Gradient geometry", "",
                  "Per run, the mean over logged steps (and, for volatility, the std of cos_full "
                  "and the coefficient of variation of the norm over steps); cells are mean ± std "
                  "across runs.", ""]
        rows = []
        for v in variants:
            for s in subsets:
                g = V[v]["geometry"].get(s)
                if not g:
                    continue
                n = max(g[c]["n"] for c in g)
                cells = [_fmt_summary(g[c], ".4g") if c in g else "—" for c in cols + extra]
                rows.append([v, s, str(n), *cells])
        lines += _table(["variant", "subset", "runs", *cols, *extra], rows)

    if summary["subset_contrasts"]:
        lines += ["", "## Subset contrasts (paired over runs)", "",
                  "Each run contributes one pair: the two subsets' gradient geometry measured on the same "
                  "batches (per-run mean over logged steps, or its volatility over steps). Differences "
                  "a − b over all runs analysed; paired t-test, Wilcoxon with ≥ 6 pairs.", ""]
        lines += _table(
            ["a − b", "metric", "pairs", "mean a − b", "t", "p (t)", "p (Wilcoxon)"],
            [[f"{c['a']} − {c['b']}", c["metric"], str(c["n"]), _fmt(c["mean_diff"], "+.4g"),
              _fmt(c["t"], ".3f"), _fmt(c["p_t"], ".4g"), _fmt(c["p_wilcoxon"], ".4g")]
             for c in summary["subset_contrasts"]],
        )

    if files:
        lines += ["", "## Plots", ""]
        lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in files]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """`jaxrl-entropy analyze RUN_DIR [RUN_DIR ...] [--out DIR]`; argv excludes the subcommand."""
    parser = argparse.ArgumentParser(
        prog="jaxrl-entropy analyze",
        description="Plots and tables (report.md, summary.json) from training run directories.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directory with metrics.jsonl (or a parent of several)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output directory (default: <first run's parent>/analysis)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        summary = run_analyze(args.run_dirs, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"jaxrl-entropy analyze: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(summary['files'])} files to {summary['out_dir']}")
    for p in summary["files"]:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
