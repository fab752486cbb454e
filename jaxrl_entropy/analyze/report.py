"""`report.md`: the summary's numbers as markdown tables, one section per question."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from jaxrl_entropy.rundir import fileio
from jaxrl_entropy.analyze.layout import TAIL_STEPS, TRAIN_TAIL_METRICS, Layout

_VOLATILITY = ("cos_rest", "self_share", "cos_full_sd_over_steps", "norm_cv_over_steps", "cos_prev_1step")


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "—" if x is None or not math.isfinite(x) else format(x, spec)


def _fmt_summary(s: dict[str, Any], spec: str = ".4f") -> str:
    """`mean ± std` across runs; the mean alone for one run; — for none."""
    if s["n"] == 0:
        return "—"
    if s["n"] == 1:
        return _fmt(s["mean"], spec)
    return f"{_fmt(s['mean'], spec)} ± {_fmt(s['std'], spec)}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _section(title: str, *intro: str) -> list[str]:
    return ["", title, "", *((" ".join(intro), "") if intro else ())]


def _per_variant_table(V, variants, field: str, keys: Sequence[str], spec: str, with_runs: bool) -> list[str]:
    rows = [[v, *([str(V[v]["n_runs"])] if with_runs else []),
             *(_fmt_summary(V[v][field][k], spec) if k in V[v][field] else "—" for k in keys)]
            for v in variants]
    return _table(["variant", *(["runs"] if with_runs else []), *keys], rows)


def _runs(summary) -> list[str]:
    lines = ["## Runs", ""]
    lines += _table(
        ["variant", "seed", "run", "records", "last step", "final eval step"],
        [[r["variant"], str(r["seed"]), f"`{r['path']}`", str(r["records"]), _fmt(r["last_step"], "g"),
          _fmt(r["final_eval_step"], "g")] for r in summary["runs"]],
    )
    damaged = [r for r in summary["runs"] if r["history_problems"]]
    if damaged:
        lines += _section("### History problems",
                          "These runs' metrics.jsonl is not one job's record (analysed with --keep-last: "
                          "a step recorded more than once keeps its last record). First problem of each:")
        lines += [f"- `{r['path']}`: {len(r['history_problems'])} problem(s); {r['history_problems'][0]}"
                  for r in damaged]
    return lines


def _final_eval(V, lay: Layout) -> list[str]:
    lines = _section("## Final evaluation",
                     "Final = the last eval line of each run; cells are mean ± std (ddof=1) across runs.")
    if lay.main_cols:
        lines += _per_variant_table(V, lay.variants, "final", lay.main_cols, ".4f", True)
    else:
        lines += ["No eval metrics (`eval/accuracy`, `eval/<bench>/mean@k`) found."]
    if lay.pass_cols:
        lines += _section("### pass@k") + _per_variant_table(V, lay.variants, "final", lay.pass_cols, ".4f", True)
    return lines


def _test_rows(tests, label, spec: str, one_sided: bool = False) -> list[list[str]]:
    return [[*label(p), str(p["n"]), _fmt(p["mean_diff"], spec), _fmt(p["t"], ".3f"), _fmt(p["p_t"], ".4g"),
             *([_fmt(p.get("p_greater"), ".4g")] if one_sided else []), _fmt(p["p_wilcoxon"], ".4g")] for p in tests]


def _paired(summary) -> list[str]:
    lines = _section(f"## Paired tests against '{summary['baseline']}'",
                     "Differences (variant − baseline) of the final eval metrics on seeds both variants ran;",
                     "paired t-test (two-sided, and one-sided for variant > baseline), and Wilcoxon "
                     "signed-rank with ≥ 6 pairs.")
    if summary["paired_tests"]:
        lines += _table(["variant", "metric", "pairs", "mean diff", "t", "p (t)", "p (t, variant > base)",
                         "p (Wilcoxon)"],
                        _test_rows(summary["paired_tests"], lambda p: [p["variant"], p["metric"]], "+.4f", True))
    lines += [f"- {note}" for note in summary["paired_notes"]]
    if not summary["paired_tests"] and not summary["paired_notes"]:
        lines += ["No variant to compare."]
    return lines


def _training_and_entropy(V, lay: Layout) -> list[str]:
    lines: list[str] = []
    tail_keys = [k for k in TRAIN_TAIL_METRICS if any(k in V[v]["train_tail"] for v in lay.variants)]
    if tail_keys:
        lines += _section(f"## Training (mean of the last {TAIL_STEPS} logged steps)")
        lines += _per_variant_table(V, lay.variants, "train_tail", tail_keys, ".4g", True)
    ent_keys = list(dict.fromkeys(k for v in lay.variants for k in V[v]["entropy"]))
    if ent_keys:
        lines += _section("## Entropy dynamics") + _per_variant_table(V, lay.variants, "entropy", ent_keys, ".4g", False)
    ctl_keys = list(dict.fromkeys(k for v in lay.variants for k in V[v]["controls"]))
    if ctl_keys:
        lines += _section(
            "## Controls",
            "Per run, the mean over the steps where geometry was logged of: the correlation of "
            "attention entropy with each token's gradient alignment (projection of its gradient "
            "on the full-token gradient), raw and partial (position, predictive entropy and "
            "response length regressed out); and the mean alignment of anchors vs explorers "
            "matched on position and predictive-entropy bins. Cells: mean ± std across runs.")
        lines += _per_variant_table(V, lay.variants, "controls", ctl_keys, ".4g", False)
    return lines


def _geometry(summary, lay: Layout) -> list[str]:
    V = summary["variants"]
    lines: list[str] = []
    if lay.subsets:
        cols = list(lay.geo_metrics)
        extra = [c for c in _VOLATILITY if any(c in V[v]["geometry"].get(s, {}) for v in lay.variants for s in lay.subsets)]
        lines += _section("## Gradient geometry",
                          "Per run, the mean over logged steps (and, for volatility, the std of cos_full "
                          "and the coefficient of variation of the norm over steps); cells are mean ± std "
                          "across runs. cos_rest: the subset's gradient against that of all the batch's "
                          "other tokens; self_share: the subset's own part of cos_full "
                          "(cos_full = self_share + the other tokens' part; `stats.complement_cosine`). "
                          "cos_prev_1step: against the same subset's gradient one optimiser step earlier.")
        rows = []
        for v in lay.variants:
            for s in lay.subsets:
                g = V[v]["geometry"].get(s)
                if g:
                    n = max(g[c]["n"] for c in g)
                    rows.append([v, s, str(n), *(_fmt_summary(g[c], ".4g") if c in g else "—" for c in cols + extra)])
        lines += _table(["variant", "subset", "runs", *cols, *extra], rows)
    if summary["subset_contrasts"]:
        lines += _section("## Subset contrasts (paired over runs)",
                          "Each run contributes one pair: the two subsets' gradient geometry measured on the "
                          "same batches (per-run mean over logged steps, or its volatility over steps). "
                          "Differences a − b over all runs analysed; paired t-test, Wilcoxon with ≥ 6 pairs.")
        lines += _table(["a − b", "metric", "pairs", "mean a − b", "t", "p (t)", "p (Wilcoxon)"],
                        _test_rows(summary["subset_contrasts"], lambda c: [f"{c['a']} − {c['b']}", c["metric"]],
                                   "+.4g"))
    return lines


def render_report(summary: dict[str, Any], lay: Layout, plots: Sequence[str]) -> str:
    """The markdown report of `summary` (from `summarize_runs`), linking the `plots` by file name."""
    V = summary["variants"]
    lines = ["# Run analysis", ""]
    lines += _runs(summary)
    lines += _final_eval(V, lay)
    lines += _paired(summary)
    lines += _training_and_entropy(V, lay)
    lines += _geometry(summary, lay)
    if plots:
        lines += _section("## Plots") + [f"![{fileio.basename(p)}]({fileio.basename(p)})" for p in plots]
    return "\n".join(lines) + "\n"
