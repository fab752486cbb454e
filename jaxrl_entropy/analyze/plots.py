"""The PNGs: metrics over steps, one line (mean ± std across seeds) per variant or token subset.

Each plot function returns the path it wrote, or None when no run holds its metrics.
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from jaxrl_entropy.rundir import fileio
from jaxrl_entropy.analyze.aggregate import aggregate, complement_geometry, next_step_cos_prev, series
from jaxrl_entropy.analyze.layout import ENTROPY_QUANTILES, THRESHOLD_METRICS, TRAINING_PLOT_METRICS, Layout

#: Series with at most this many points get markers, so a sparse eval curve stays visible.
_MARKER_MAX_POINTS = 30


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _band(ax, steps, mean, std, label, color, linestyle="-") -> None:
    marker = "o" if steps.size <= _MARKER_MAX_POINTS else None
    ax.plot(steps, mean, label=label, color=color, linestyle=linestyle, linewidth=1.5,
            marker=marker, markersize=3)
    ok = np.isfinite(std) & np.isfinite(mean)
    if ok.any():
        ax.fill_between(steps, mean - std, mean + std, where=ok, color=color, alpha=0.2, linewidth=0)


def _save(fig: Figure, path: str) -> str:
    """Writes `fig` as a PNG to `path` (local or remote)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    data = buf.getvalue()
    try:  # a 256-colour palette: line plots look the same at a third of the size
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        buf = io.BytesIO()
        small.save(buf, format="png", optimize=True)
        data = buf.getvalue()
    except ImportError:
        pass
    fileio.write_bytes(path, data)
    return path


def _any_data(lay: Layout, variant: str, keys: Sequence[str]) -> bool:
    return any(series(r, k)[0].size for r in lay.groups[variant] for k in keys)


def metric_panels(lay: Layout, keys: Sequence[str], title: str, path: str, ncols: int = 3) -> str | None:
    """One panel per metric, one line (mean ± std across seeds) per variant."""
    keys = [k for k in keys if any(_any_data(lay, v, [k]) for v in lay.variants)]
    if not keys:
        return None
    ncols = min(ncols, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colors = dict(zip(lay.variants, _colors(len(lay.variants))))
    for ax, key in zip(axes.flat, keys):
        for v in lay.variants:
            steps, mean, std = aggregate(lay.groups[v], key)
            if steps.size:
                _band(ax, steps, mean, std, f"{v} (n={len(lay.groups[v])})", colors[v])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, path)


def entropy_plot(lay: Layout, path: str) -> str | None:
    """One panel per variant: q10–q90 and q25–q75 bands, median, anchor/explorer thresholds."""
    keys = [*THRESHOLD_METRICS, *(f"entropy/q{q}" for q in ENTROPY_QUANTILES)]
    with_data = [v for v in lay.variants if _any_data(lay, v, keys)]
    if not with_data:
        return None
    fig = Figure(figsize=(5.0 * len(with_data), 3.8), layout="constrained")
    axes = fig.subplots(1, len(with_data), squeeze=False, sharey=True)[0]
    for ax, v in zip(axes, with_data):
        agg = {k: aggregate(lay.groups[v], k) for k in keys}
        for lo, hi, alpha in (("q10", "q90", 0.15), ("q25", "q75", 0.3)):
            s_lo, m_lo, _ = agg[f"entropy/{lo}"]
            s_hi, m_hi, _ = agg[f"entropy/{hi}"]
            if s_lo.size and np.array_equal(s_lo, s_hi):
                ax.fill_between(s_lo, m_lo, m_hi, color="gray", alpha=alpha, linewidth=0, label=f"{lo}–{hi}")
        s, m, _ = agg["entropy/q50"]
        if s.size:
            ax.plot(s, m, color="black", linewidth=1.2, label="median")
        for key, color, label in zip(THRESHOLD_METRICS, ("tab:blue", "tab:red"),
                                     ("anchor threshold", "explorer threshold")):
            s, m, sd = agg[key]
            if s.size:
                _band(ax, s, m, sd, label, color, linestyle="--")
        ax.set_title(f"{v} (n={len(lay.groups[v])})")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("normalised attention entropy")
    fig.suptitle("Attention-entropy distribution over training (mean across seeds)")
    return _save(fig, path)


def _finish_panel(ax, title: str, xlabel: str | None) -> None:
    """Title, grid, the x label (bottom row only) and a legend where lines were drawn."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ax.lines:
        ax.legend(fontsize=8)


def _main_subsets(lay: Layout) -> list[str]:
    """The training split's subsets (anchor, explorer, random, full); `random@f` and `<split>@L<i>`
    have plots of their own."""
    return [s for s in lay.subsets if "@" not in s]


def geometry_plot(lay: Layout, path: str) -> str | None:
    """Rows: geometry metrics; columns: variants; one line per token subset."""
    subsets = _main_subsets(lay)
    keys = [f"geometry/{s}/{m}" for s in subsets for m in lay.geo_metrics]
    with_data = [v for v in lay.variants if _any_data(lay, v, keys)]
    if not with_data:
        return None
    metrics = lay.geo_metrics
    fig = Figure(figsize=(5.0 * len(with_data), 3.2 * len(metrics)), layout="constrained")
    axes = fig.subplots(len(metrics), len(with_data), squeeze=False, sharex="col")
    colors = dict(zip(subsets, _colors(len(subsets))))
    for j, v in enumerate(with_data):
        for i, m in enumerate(metrics):
            ax = axes[i, j]
            for s in subsets:
                steps, mean, std = aggregate(lay.groups[v], f"geometry/{s}/{m}")
                if steps.size:
                    _band(ax, steps, mean, std, s, colors[s])
            _finish_panel(ax, f"{v}: {m}", "step" if i == len(metrics) - 1 else None)
    fig.suptitle("Gradient geometry per token subset (mean ± std across seeds)")
    return _save(fig, path)


def token_curve_points(lay: Layout, variant: str, measure: str = "cos_full"
                       ) -> list[tuple[str, float, float, float]]:
    """(subset, mean tokens, mean `measure`, std of the runs' means) for every subset of `variant`
    that logged `geometry/<subset>/tokens`: each run's mean over its probes, then the mean (and the
    std, ddof=1; NaN for one run) across runs. Sorted by tokens. `measure`: "cos_full" or
    "cos_rest" (against the other tokens only, `aggregate.complement_geometry`)."""
    points = []
    for s in lay.subsets:
        if "@L" in s:  # another layer's split: `layer_plot`
            continue
        tokens, vals = [], []
        for run in lay.groups[variant]:
            t = series(run, f"geometry/{s}/tokens")[1]
            if measure == "cos_full":
                c = series(run, f"geometry/{s}/cos_full")[1]
                v = float(np.nanmean(c)) if c.size and np.isfinite(c).any() else None
            else:
                v = complement_geometry(run, s).get(measure)
            if t.size and v is not None:
                tokens.append(float(np.mean(t)))
                vals.append(v)
        if tokens:
            points.append((s, float(np.mean(tokens)), float(np.mean(vals)),
                           float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan))
    return sorted(points, key=lambda p: p[1])


def token_curve_plot(lay: Layout, path: str) -> str | None:
    """Against the tokens each subset holds (per probed micro-batch), one column per variant: top,
    cos_full (random subsets of several sizes, `train.geometry_random_fractions`, draw the curve a
    subset of that size reaches by chance; anchors and explorers sit above or below it); bottom,
    cos_rest, the alignment with the other tokens without the subset's own share of the sum."""
    per_variant = {v: pts for v in lay.variants if len(pts := token_curve_points(lay, v)) > 1}
    if not per_variant:
        return None
    fig = Figure(figsize=(max(6.5, 5.0 * len(per_variant)), 6.8), layout="constrained")
    axes = fig.subplots(2, len(per_variant), squeeze=False, sharex="col")
    for j, v in enumerate(per_variant):
        for i, measure in enumerate(("cos_full", "cos_rest")):
            ax = axes[i, j]
            pts = token_curve_points(lay, v, measure)
            rand = [p for p in pts if p[0] == "random" or p[0].startswith("random@") or p[0] == "full"]
            if len(rand) > 1:
                ax.errorbar([p[1] for p in rand], [p[2] for p in rand], yerr=[p[3] for p in rand],
                            color="0.4", marker="o", markersize=4, capsize=2, label="random subsets (and full)")
            others = [p for p in pts if p not in rand]
            for (name, x, y, sd), color in zip(others, _colors(len(others))):
                ax.errorbar([x], [y], yerr=[sd], color=color, marker="s", markersize=6, capsize=2, label=name)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # the minor ticks' labels overlap
            ax.set_ylabel("cos with the full gradient" if measure == "cos_full"
                          else "cos with the other tokens' gradient")
            ax.set_title(f"{v}: {measure}")
            ax.grid(alpha=0.3)
            if i == 1:
                ax.set_xlabel("tokens in the subset (per probed micro-batch)")
            if ax.lines:
                ax.legend(fontsize=8)
    fig.suptitle("Alignment against subset size\n(mean over probes, ± std across seeds)")
    return _save(fig, path)


def layer_points(lay: Layout, variant: str, split: str, metric: str = "cos_full"
                 ) -> list[tuple[int, float, float]]:
    """(probe layer, mean, std across runs) of `split@L<i>` (`anchor` or `explorer` as layer i's
    entropy alone picks them, `train.geometry_layers`): each run's mean over its probes first."""
    points = []
    for s in lay.subsets:
        if not (s.startswith(split + "@L") and s[len(split) + 2:].isdigit()):
            continue
        per_run = _per_run_means(lay, variant, s, metric)
        if per_run:
            points.append((int(s[len(split) + 2:]), float(np.mean(per_run)),
                           float(np.std(per_run, ddof=1)) if len(per_run) > 1 else math.nan))
    return sorted(points)


def _per_run_means(lay: Layout, variant: str, subset: str, metric: str) -> list[float]:
    """Each run's mean over its probes of one geometry metric of one subset (cos_rest derived)."""
    if metric == "cos_rest":
        return [v for r in lay.groups[variant] if (v := complement_geometry(r, subset).get(metric)) is not None]
    return [float(np.nanmean(v)) for r in lay.groups[variant]
            if (v := series(r, f"geometry/{subset}/{metric}")[1]).size and np.isfinite(v).any()]


def layer_plot(lay: Layout, path: str) -> str | None:
    """cos_full (top) and gradient norm (bottom) of anchors and explorers as each probe layer's
    entropy splits them, against the layer, one column per variant: does the split depend on the
    layer it is read from?"""
    with_data = [v for v in lay.variants if layer_points(lay, v, "anchor")]
    if not with_data:
        return None
    metrics = ("cos_full", "cos_rest", "norm")
    fig = Figure(figsize=(max(6.5, 4.6 * len(with_data)), 8.4), layout="constrained")
    axes = fig.subplots(len(metrics), len(with_data), squeeze=False, sharex="col")
    colors = dict(zip(("anchor", "explorer"), _colors(2)))
    for j, v in enumerate(with_data):
        for i, metric in enumerate(metrics):
            ax = axes[i, j]
            for split in ("anchor", "explorer"):
                pts = layer_points(lay, v, split, metric)
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                                capsize=3, color=colors[split], label=f"{split} (that layer's entropy)")
            reference = _per_run_means(lay, v, "random", metric)
            if reference:  # a random subset of the same size, for scale
                ax.axhline(float(np.mean(reference)), color="0.5", linestyle="--", linewidth=1,
                           label="random (same size)")
            ax.xaxis.get_major_locator().set_params(integer=True)
            _finish_panel(ax, f"{v}: {metric}", "probe layer" if i == len(metrics) - 1 else None)
    fig.suptitle("Anchors vs explorers split by each layer's attention entropy\n(mean over probes, ± std across seeds)")
    return _save(fig, path)


VOLATILITY_SUBSETS = ("anchor", "random", "explorer", "full")


def volatility_points(lay: Layout, variant: str) -> dict[str, dict[str, tuple[float, float]]]:
    """{measure: {subset: (mean, std across runs)}} of the direction's stability: `cos_prev_1step`
    (with the subset's own gradient one optimiser step earlier) and `cos_halves` (between two
    disjoint halves of one batch), each run's mean over its probes first."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for measure in ("cos_prev_1step", "cos_halves"):
        for s in VOLATILITY_SUBSETS:
            if s not in lay.subsets:
                continue
            per_run = []
            for r in lay.groups[variant]:
                if measure == "cos_prev_1step":
                    v = next_step_cos_prev(r, s).get(measure)
                else:
                    x = series(r, f"geometry/{s}/{measure}")[1]
                    v = float(np.nanmean(x)) if x.size and np.isfinite(x).any() else None
                if v is not None:
                    per_run.append(v)
            if per_run:
                out.setdefault(measure, {})[s] = (float(np.mean(per_run)),
                                                  float(np.std(per_run, ddof=1)) if len(per_run) > 1 else math.nan)
    return out


def volatility_plot(lay: Layout, path: str) -> str | None:
    """Bars per token subset, one panel per variant: how stable a subset's gradient direction is
    from one optimiser step to the next and between two halves of one batch (the paper's "explorer
    gradients are more volatile")."""
    per_variant = {v: pts for v in lay.variants if (pts := volatility_points(lay, v))}
    if not per_variant:
        return None
    fig = Figure(figsize=(max(6.5, 5.0 * len(per_variant)), 4.0), layout="constrained")
    axes = fig.subplots(1, len(per_variant), squeeze=False)[0]
    for ax, (v, pts) in zip(axes, per_variant.items()):
        measures = list(pts)
        width = 0.8 / len(measures)
        for i, (measure, color) in enumerate(zip(measures, _colors(len(measures)))):
            subsets = list(pts[measure])
            xs = np.arange(len(subsets)) + (i - (len(measures) - 1) / 2) * width
            ax.bar(xs, [pts[measure][s][0] for s in subsets], width, yerr=[pts[measure][s][1] for s in subsets],
                   capsize=3, color=color, label=measure)
            ax.set_xticks(np.arange(len(subsets)), subsets)
        ax.axhline(0.0, color="0.3", linewidth=0.8)
        ax.set_ylabel("cosine")
        ax.set_title(v)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle("Stability of each subset's gradient direction\n(mean over probes, ± std across seeds)")
    return _save(fig, path)


def plot_all(lay: Layout, out_dir: str) -> list[str]:
    """Every plot whose metrics exist, written to `out_dir`; returns their paths."""
    specs: list[tuple[str, Callable[[str], str | None]]] = [
        ("reward.png", lambda p: metric_panels(lay, ["reward/mean", "eval/accuracy"],
                                               "Reward and accuracy (mean ± std across seeds)", p, ncols=2)),
        ("eval_benchmarks.png", lambda p: metric_panels(lay, [k for k in lay.main_cols if k != "eval/accuracy"],
                                                        "Per-benchmark eval accuracy (mean ± std across seeds)", p)),
        ("training.png", lambda p: metric_panels(lay, list(TRAINING_PLOT_METRICS),
                                                 "Training health (mean ± std across seeds)", p)),
        ("entropy_thresholds.png", lambda p: entropy_plot(lay, p)),
        ("gradient_geometry.png", lambda p: geometry_plot(lay, p)),
        ("geometry_vs_tokens.png", lambda p: token_curve_plot(lay, p)),
        ("geometry_by_layer.png", lambda p: layer_plot(lay, p)),
        ("geometry_volatility.png", lambda p: volatility_plot(lay, p)),
    ]
    return [p for name, make in specs if (p := make(fileio.join(out_dir, name)))]
