"""`jaxrl-entropy analyze`: plots and tables from one or more run directories (local or `gs://`).

Each run directory holds `metrics.jsonl` (one JSON object per line, each with `"step"`; see
`jaxrl_entropy.rundir.metrics`) and, optionally, `config.json` (the run's config, with `"name"` = the
variant label such as "full", "random", "anchor", "explorer", "soft", and `"seed"`). Runs are
grouped by variant; seeds give the spread. Outputs, in `out_dir`:

- `reward.png`            reward/mean and eval/accuracy over steps, mean ± std across seeds
- `eval_benchmarks.png`   eval/<bench>/mean@k over steps
- `training.png`          response length, gradient norm, clip fraction, loss, train accuracy
- `entropy_thresholds.png` anchor / explorer thresholds and entropy quantiles over steps
- `gradient_geometry.png` geometry/<subset>/{cos_full, norm, cos_prev} over steps
- `geometry_vs_tokens.png` cos_full of each subset against its size in tokens (random subsets draw
                          the curve chance gives, `train.geometry_random_fractions`)
- `geometry_by_layer.png` anchors vs explorers as each probe layer's entropy splits them
                          (`train.geometry_layers`)
- `geometry_volatility.png` cos_prev_1step and cos_halves per subset (`train.geometry_consecutive`,
                          `train.geometry_halves`)
- `report.md`             tables: final eval per variant (mean ± std, runs), paired tests against
                          "full" (or `--baseline NAME`) on matching seeds, training tail, entropy
                          dynamics, gradient geometry
- `summary.json`          the same numbers, machine-readable (NaN written as null)

A plot is drawn only when its metrics exist in at least one run. A history that is not one job's
record (a step going backwards, a training step recorded twice: two jobs on one workdir, or a
resume that did not cut the file back) is an error unless `keep_last=True` / `--keep-last`.

Modules: `runs` (loading), `layout` (which metrics, in what order), `aggregate` (the numbers),
`plots`, `report` (markdown), `cli` (`run_analyze`, `main`).
"""
from jaxrl_entropy.analyze.aggregate import aggregate, final_eval, series
from jaxrl_entropy.analyze.cli import main, run_analyze
from jaxrl_entropy.analyze.runs import Run, load_run

__all__ = ["Run", "load_run", "series", "aggregate", "final_eval", "run_analyze", "main"]
