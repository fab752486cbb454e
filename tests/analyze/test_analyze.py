"""Tests for `jaxrl_entropy.analyze` on synthetic run directories written here.

Oracles: the numbers the test itself wrote (final eval values, geometry series), reduced with
numpy (mean, std ddof=1), the paired t-test by hand with its closed-form p-value and the exact
Wilcoxon distribution by enumeration (`tests/oracles.py`); PNG files checked by their signature
and decoded with PIL.
"""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import pytest

import oracles
from fake_gcs import fake_gcs  # noqa: F401  (fixture)
from jaxrl_entropy import analyze
from jaxrl_entropy.rundir import metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VARIANTS = ("full", "anchor")
SEEDS = (0, 1, 2)
STEPS = 12
EVAL_EVERY = 4


def _write_run(root, variant, seed, *, geometry=True, config=True, truncated=True, dir_name=None):
    """Writes one synthetic run; returns the eval values per metric at the last eval step."""
    rng = np.random.default_rng([sum(map(ord, variant)), seed])
    d = os.path.join(root, dir_name or f"{variant}-{seed}")
    os.makedirs(d)
    if config:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"name": variant, "seed": seed, "rl": {"group_size": 4}}, f)
    geo = {}
    final = {}
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for step in range(1, STEPS + 1):
            rec = {"step": step, "time": 1.5 * step, "reward/mean": float(rng.random()),
                   "response_len/mean": float(rng.integers(20, 60)), "grad_norm": float(rng.random()),
                   "entropy/anchor_threshold": 0.3 + 0.01 * step, "entropy/explorer_threshold": 0.7,
                   **{f"entropy/q{q}": q / 100 for q in (10, 25, 50, 75, 90)}}
            if geometry:
                for subset in ("anchor", "explorer", "random", "full"):
                    for m in ("cos_full", "norm", "cos_prev"):
                        v = float(rng.random())
                        rec[f"geometry/{subset}/{m}"] = v
                        geo.setdefault((subset, m), []).append(v)
            f.write(json.dumps(rec) + "\n")
            if step % EVAL_EVERY == 0:  # eval on its own line, as the trainer writes it
                final = {"eval/accuracy": float(rng.random()),
                         "eval/aime/mean@8": float(rng.random()),
                         "eval/math500/mean@4": float(rng.random()),
                         "eval/aime/pass@8": float(rng.random())}
                f.write(json.dumps({"step": step, **final}) + "\n")
        if truncated:  # a job killed mid-write
            f.write('{"step": 13, "reward/mean": 0.4')
    return d, final, geo


@pytest.fixture()
def runs(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    finals, geos = {}, {}
    for v in VARIANTS:
        for s in SEEDS:
            _, finals[v, s], geos[v, s] = _write_run(str(root), v, s)
    return root, finals, geos


def _assert_drawn(png: bytes) -> None:
    """A decodable image of plot size with lines in several colours, not a blank canvas."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        assert im.width >= 400 and im.height >= 300
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) >= 8


def _parse_cell(cell: str) -> tuple[float, float]:
    m = re.fullmatch(r"\s*([-+0-9.eE]+) ± ([-+0-9.eE]+)\s*", cell)
    assert m, f"not a 'mean ± std' cell: {cell!r}"
    return float(m.group(1)), float(m.group(2))


def _table_after(report: str, heading: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the first markdown table after `heading`."""
    lines = report[report.index(heading):].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows[0], rows[2:]


def test_analyze_writes_plots_report_and_summary(runs, tmp_path):
    root, finals, geos = runs
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="truncated"):
        summary = analyze.run_analyze([str(root / f"{v}-{s}") for v in VARIANTS for s in SEEDS], str(out))

    for name in ("reward.png", "entropy_thresholds.png", "gradient_geometry.png",
                 "eval_benchmarks.png", "training.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
        _assert_drawn(data)
    assert (out / "report.md").is_file() and (out / "summary.json").is_file()
    assert json.loads((out / "summary.json").read_text()) == summary

    report = (out / "report.md").read_text()
    header, rows = _table_after(report, "## Final evaluation")
    cols = ["eval/accuracy", "eval/aime/mean@8", "eval/math500/mean@4"]
    assert header == ["variant", "runs", *cols]
    assert [r[0] for r in rows] == ["full", "anchor"]
    for row in rows:
        v = row[0]
        assert row[1] == "3"
        for metric, cell in zip(cols, row[2:]):
            vals = np.array([finals[v, s][metric] for s in SEEDS])
            mean, std = _parse_cell(cell)
            assert mean == pytest.approx(vals.mean(), abs=6e-5)
            assert std == pytest.approx(vals.std(ddof=1), abs=6e-5)
            entry = summary["variants"][v]["final"][metric]
            assert entry["mean"] == pytest.approx(vals.mean(), rel=1e-12)
            assert entry["std"] == pytest.approx(vals.std(ddof=1), rel=1e-12)
            assert entry["n"] == 3

    # Paired test anchor vs full on seeds 0, 1, 2, by hand.
    tests = {p["metric"]: p for p in summary["paired_tests"] if p["variant"] == "anchor"}
    assert set(tests) == set(cols)
    for metric in cols:
        a = [finals["anchor", s][metric] for s in SEEDS]
        b = [finals["full", s][metric] for s in SEEDS]
        t, p = oracles.paired_t(a, b)
        assert tests[metric]["n"] == 3 and tests[metric]["seeds"] == list(SEEDS)
        assert tests[metric]["t"] == pytest.approx(t, rel=1e-9)
        assert tests[metric]["p_t"] == pytest.approx(p, rel=1e-9)
        # one-sided "anchor > full": half the two-sided p on the side t points to
        assert tests[metric]["p_greater"] == pytest.approx(p / 2 if t > 0 else 1 - p / 2, rel=1e-9)
        assert tests[metric]["mean_diff"] == pytest.approx(np.mean(np.subtract(a, b)))
        assert tests[metric]["p_wilcoxon"] is None  # n < 6 → NaN → null in JSON
    assert "## Paired tests against 'full'" in report

    # Gradient geometry: per-run mean over steps, then mean ± std across runs.
    header, rows = _table_after(report, "## Gradient geometry")
    assert header[:6] == ["variant", "subset", "runs", "cos_full", "norm", "cos_prev"]
    by_key = {(r[0], r[1]): r for r in rows}
    assert len(by_key) == 8
    for v in VARIANTS:
        for subset in ("anchor", "explorer", "random", "full"):
            for j, m in enumerate(("cos_full", "norm", "cos_prev")):
                per_run = np.array([np.mean(geos[v, s][subset, m]) for s in SEEDS])
                got = summary["variants"][v]["geometry"][subset][m]
                assert got["mean"] == pytest.approx(per_run.mean(), rel=1e-12)
                assert got["std"] == pytest.approx(per_run.std(ddof=1), rel=1e-12)
                mean, std = _parse_cell(by_key[v, subset][3 + j])
                assert mean == pytest.approx(per_run.mean(), rel=1e-3)
                assert std == pytest.approx(per_run.std(ddof=1), rel=1e-3)
            sd = np.array([np.std(geos[v, s][subset, "cos_full"], ddof=1) for s in SEEDS])
            assert summary["variants"][v]["geometry"][subset]["cos_full_sd_over_steps"]["mean"] == \
                pytest.approx(sd.mean(), rel=1e-12)

    # Subset contrasts: one (anchor, explorer) pair per run, all 6 runs, by hand / enumeration.
    contrasts = {(c["a"], c["b"], c["metric"]): c for c in summary["subset_contrasts"]}
    for metric, reduce in (("cos_full", np.mean), ("norm", lambda x: np.std(x, ddof=1) / np.mean(x))):
        key = metric if metric == "cos_full" else "norm_cv_over_steps"
        a = [reduce(geos[v, s]["anchor", metric]) for v in VARIANTS for s in SEEDS]
        b = [reduce(geos[v, s]["explorer", metric]) for v in VARIANTS for s in SEEDS]
        got = contrasts["anchor", "explorer", key]
        t, p = oracles.paired_t(a, b)
        assert got["n"] == 6
        assert got["mean_diff"] == pytest.approx(np.mean(np.subtract(a, b)), rel=1e-9)
        assert got["t"] == pytest.approx(t, rel=1e-9) and got["p_t"] == pytest.approx(p, rel=1e-9)
        assert got["p_wilcoxon"] == pytest.approx(oracles.wilcoxon_exact_p(np.subtract(a, b)), rel=1e-9)
    assert {(c["a"], c["b"]) for c in summary["subset_contrasts"]} == \
        {("anchor", "explorer"), ("anchor", "random"), ("explorer", "random")}
    assert "## Subset contrasts (paired over runs)" in report

    # The truncated last line was dropped; everything before it was kept.
    assert all(r["records"] == STEPS + STEPS // EVAL_EVERY for r in summary["runs"])
    assert all(r["final_eval_step"] == STEPS for r in summary["runs"])


def test_analyze_default_out_dir_parent_expansion_and_missing_plots(tmp_path):
    root = tmp_path / "exp"
    root.mkdir()
    # No geometry, no config.json: variant and seed come from the directory name.
    _, f0, _ = _write_run(str(root), "soft", 0, geometry=False, config=False, truncated=False,
                          dir_name="soft_seed4")
    _, f1, _ = _write_run(str(root), "random", 1, geometry=False, config=False, truncated=False,
                          dir_name="random")
    summary = analyze.run_analyze([str(root)])  # a parent of runs: expanded to its sub-directories
    out = root / "analysis"
    assert summary["out_dir"] == str(out)
    assert (out / "reward.png").is_file() and (out / "entropy_thresholds.png").is_file()
    assert not (out / "gradient_geometry.png").exists()
    got = {(r["variant"], r["seed"]) for r in summary["runs"]}
    assert got == {("soft", 4), ("random", 0)}
    assert summary["variants"]["soft"]["final"]["eval/accuracy"]["values"] == [f0["eval/accuracy"]]
    assert summary["variants"]["soft"]["final"]["eval/accuracy"]["std"] is None  # one run: no spread
    assert any("full" in n for n in summary["paired_notes"])


def test_missing_metrics_file_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="not_a_run.*metrics.jsonl"):
        analyze.run_analyze([str(empty)])
    assert analyze.main([str(empty)]) == 1
    assert "not_a_run" in capsys.readouterr().err


def test_corrupt_middle_line_names_file_and_line(tmp_path, capsys):
    d = tmp_path / "full"
    d.mkdir()
    (d / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.1}\n{"step": 2, "rew\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        metrics.read_metrics(str(d / "metrics.jsonl"))
    assert analyze.main([str(d)]) == 1
    assert "metrics.jsonl:2" in capsys.readouterr().err


def test_main_cli_writes_to_out(runs, tmp_path, capsys):
    root, _, _ = runs
    out = tmp_path / "cli_out"
    with pytest.warns(UserWarning):
        rc = analyze.main([str(root / "full-0"), str(root / "anchor-0"), "--out", str(out)])
    assert rc == 0
    assert (out / "report.md").is_file() and (out / "reward.png").is_file()
    assert str(out) in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "1 seed(s) shared" in report  # a single pair: no paired test, and the report says why


def test_baseline_picks_the_variant_the_others_are_paired_with(runs, tmp_path, capsys):
    root, finals, _ = runs
    dirs = [str(root / f"{v}-{s}") for v in VARIANTS for s in SEEDS]
    out = tmp_path / "by_anchor"
    with pytest.warns(UserWarning):
        assert analyze.main([*dirs, "--out", str(out), "--baseline", "anchor"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    tests = {p["metric"]: p for p in summary["paired_tests"]}
    assert {p["variant"] for p in summary["paired_tests"]} == {"full"}
    a = [finals["full", s]["eval/accuracy"] for s in SEEDS]
    b = [finals["anchor", s]["eval/accuracy"] for s in SEEDS]
    t, p = oracles.paired_t(a, b)                 # full − anchor, by hand
    assert tests["eval/accuracy"]["t"] == pytest.approx(t, rel=1e-9)
    assert tests["eval/accuracy"]["p_t"] == pytest.approx(p, rel=1e-9)
    assert tests["eval/accuracy"]["baseline"] == "anchor"
    assert "## Paired tests against 'anchor'" in (out / "report.md").read_text()
    with pytest.warns(UserWarning):
        assert analyze.main([*dirs, "--out", str(tmp_path / "x"), "--baseline", "soft"]) == 1
    assert "--baseline 'soft' names no variant of these runs (they are: full, anchor)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_series_and_aggregate_across_unequal_step_sets():
    a = analyze.Run("a", "full", 0, [{"step": 1, "x": 1.0}, {"step": 2, "x": 2.0}, {"step": 3, "x": 3.0},
                                     {"step": 2, "x": 5.0}])  # step 2 re-logged after a resume
    b = analyze.Run("b", "full", 1, [{"step": 2, "x": 4.0}, {"step": 3, "x": 7.0}, {"step": 4, "x": 1.0},
                                     {"step": 5, "y": 0.0}])
    steps, vals = analyze.series(a, "x")
    np.testing.assert_array_equal(steps, [1, 2, 3])
    np.testing.assert_array_equal(vals, [1.0, 5.0, 3.0])
    steps, mean, std = analyze.aggregate([a, b], "x")
    np.testing.assert_array_equal(steps, [1, 2, 3, 4])
    np.testing.assert_allclose(mean, [1.0, 4.5, 5.0, 1.0])
    assert np.isnan(std[0]) and np.isnan(std[3])
    np.testing.assert_allclose(std[1:3], [np.std([5.0, 4.0], ddof=1), np.std([3.0, 7.0], ddof=1)])


def test_controls_table_is_the_mean_over_steps_then_runs(tmp_path):
    import json as _json

    from jaxrl_entropy.analyze import run_analyze

    wrote = {}
    for seed in (0, 1):
        d = tmp_path / f"full_seed{seed}"
        d.mkdir()
        (d / "config.json").write_text(_json.dumps({"name": "full", "seed": seed}))
        vals = [0.1 * (seed + 1), 0.3 * (seed + 1)]
        wrote[seed] = float(np.mean(vals))
        with open(d / "metrics.jsonl", "w") as f:
            for step, v in enumerate(vals):
                f.write(_json.dumps({"step": step, "controls/align_partial_corr": v}) + "\n")
    run_analyze([str(tmp_path / "full_seed0"), str(tmp_path / "full_seed1")], str(tmp_path / "out"))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Controls" in report
    _, rows = _table_after(report, "## Controls")
    mean, std = _parse_cell(rows[0][1])
    per_run = [wrote[0], wrote[1]]
    assert mean == pytest.approx(np.mean(per_run), abs=1e-4)
    assert std == pytest.approx(np.std(per_run, ddof=1), abs=1e-4)


# ----------------------------------------------------------------------------- damaged histories


def _train_row(step, **extra):
    return {"step": step, "loss": 1.0 / (step + 1), "reward/mean": 0.05 * step, **extra}


def _write_rows(d, rows, name="full", seed=0):
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"name": name, "seed": seed}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d)


def test_two_jobs_on_one_workdir_are_refused_not_merged(tmp_path, capsys):
    # a second job started from scratch while the first, at step 10, kept going: lines alternate
    rows = [r for s in range(4) for r in (_train_row(10 + s), _train_row(s))]
    d = _write_rows(tmp_path / "full_seed0", rows)
    with pytest.raises(ValueError) as err:
        analyze.run_analyze([d], str(tmp_path / "out"))
    msg = str(err.value)
    assert "metrics.jsonl is not the record of one job" in msg
    assert "metrics.jsonl:2: step goes back from 10 (line 1) to 0" in msg
    assert "... and 1 more" in msg and "two jobs" in msg and "--keep-last" in msg
    assert not (tmp_path / "out" / "report.md").exists()
    assert analyze.main([d]) == 1
    assert "step goes back from 10" in capsys.readouterr().err
    # two jobs started together: never backwards, but every training step twice
    rows = [r for s in range(3) for r in (_train_row(s), _train_row(s, loss=5.0))]
    d = _write_rows(tmp_path / "twins", rows)
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: training step 0 recorded again \(first at line 1\)"):
        analyze.run_analyze([d], str(tmp_path / "out"))


def test_keep_last_analyses_a_resume_that_did_not_cut_the_file(tmp_path):
    """Steps 0..5 (eval at 4), killed; resumed from the checkpoint of step 4 by a version that
    appended: 4 (eval again), 5, 6 follow. --keep-last takes each step's last record."""
    first = [_train_row(s, **({"eval/accuracy": 0.2} if s == 4 else {})) for s in range(6)]
    again = [_train_row(4, **{"eval/accuracy": 0.6, "reward/mean": 0.9}), _train_row(5, **{"reward/mean": 0.8}),
             _train_row(6)]
    d = _write_rows(tmp_path / "full_seed0", first + again)
    with pytest.raises(ValueError, match="resumed by a version that did not cut metrics.jsonl"):
        analyze.run_analyze([d], str(tmp_path / "out"))
    with pytest.warns(UserWarning, match="3 history problem"):
        summary = analyze.run_analyze([d], str(tmp_path / "out"), keep_last=True)
    with pytest.warns(UserWarning, match="keeps its last record"):
        run = analyze.load_run(d, keep_last=True)
    steps, reward = analyze.series(run, "reward/mean")
    np.testing.assert_array_equal(steps, [0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_allclose(reward, [0.0, 0.05, 0.1, 0.15, 0.9, 0.8, 0.3])
    assert summary["variants"]["full"]["final"]["eval/accuracy"]["values"] == [0.6]
    (entry,) = summary["runs"]
    assert entry["history_problems"][0].endswith("metrics.jsonl:7: step goes back from 5 (line 6) to 4")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "### History problems" in report and "step goes back from 5" in report


# ----------------------------------------------------------------------------- gs://


def test_analyze_reads_and_writes_a_bucket(tmp_path, fake_gcs):
    from jaxrl_entropy.rundir import fileio

    local = tmp_path / "exp"
    local.mkdir()
    finals = {}
    seeds = SEEDS[:2]  # few, small plots: the numbers are checked in depth on local runs above
    for v in VARIANTS:
        for s in seeds:
            d, finals[v, s], _ = _write_run(str(local), v, s, truncated=False, geometry=False)
            for name in ("metrics.jsonl", "config.json"):
                fileio.write_text(f"gs://b/exp/{v}-{s}/{name}", (local / f"{v}-{s}" / name).read_text())
    summary = analyze.run_analyze(["gs://b/exp"])
    assert summary["out_dir"] == "gs://b/exp/analysis"  # the runs' parent, as for local runs
    assert {r["path"] for r in summary["runs"]} == {f"gs://b/exp/{v}-{s}" for v in VARIANTS for s in seeds}
    for v in VARIANTS:
        vals = [finals[v, s]["eval/accuracy"] for s in seeds]
        got = summary["variants"][v]["final"]["eval/accuracy"]
        assert got["mean"] == pytest.approx(np.mean(vals), rel=1e-12)
        assert got["std"] == pytest.approx(np.std(vals, ddof=1), rel=1e-12)
    written = {k.removeprefix("b/exp/analysis/") for k in fake_gcs if k.startswith("b/exp/analysis/")}
    assert written == {"reward.png", "eval_benchmarks.png", "training.png", "entropy_thresholds.png",
                       "report.md", "summary.json"}
    _assert_drawn(fake_gcs["b/exp/analysis/reward.png"].getvalue())
    assert json.loads(fake_gcs["b/exp/analysis/summary.json"].getvalue()) == summary
    assert "## Final evaluation" in fake_gcs["b/exp/analysis/report.md"].getvalue().decode()


def test_runs_of_one_variant_that_compute_different_things_are_refused(tmp_path, capsys):
    root = tmp_path / "runs"
    root.mkdir()
    a, _, _ = _write_run(str(root), "full", 0)
    b, _, _ = _write_run(str(root), "full", 1)
    # seeds and how a run is executed may differ (seed, progress bar, mesh, KV pool)
    for d, extra in ((a, {"train": {"progress": True}, "parallel": {"data": 8}}),
                     (b, {"train": {"progress": False}, "parallel": {"data": 4}})):
        cfg = json.load(open(os.path.join(d, "config.json")))
        cfg.update(extra)
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    assert analyze.main([a, b, "--out", str(tmp_path / "ok")]) == 0
    # what the run computes may not: another group size is another experiment, not another seed
    cfg = json.load(open(os.path.join(b, "config.json")))
    cfg["rl"]["group_size"] = 16
    json.dump(cfg, open(os.path.join(b, "config.json"), "w"))
    capsys.readouterr()
    assert analyze.main([a, b, "--out", str(tmp_path / "mixed")]) == 1
    err = capsys.readouterr().err
    assert "variant 'full'" in err and "rl.group_size (4 in" in err and "16 in" in err and "--config.name" in err


def test_a_key_an_older_run_lacks_counts_as_its_default(tmp_path, capsys):
    # a run recorded before train.sft_weights existed and one after it, at the default: one experiment;
    # the newer one at another value: another experiment
    root = tmp_path / "runs"
    root.mkdir()
    a, _, _ = _write_run(str(root), "full", 0)
    b, _, _ = _write_run(str(root), "full", 1)
    for d, sft in ((a, None), (b, "full")):
        cfg = json.load(open(os.path.join(d, "config.json")))
        cfg.setdefault("train", {}).pop("sft_weights", None)
        if sft:
            cfg["train"]["sft_weights"] = sft
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    assert analyze.main([a, b, "--out", str(tmp_path / "ok")]) == 0
    cfg = json.load(open(os.path.join(b, "config.json")))
    cfg["train"]["sft_weights"] = "anchor"
    json.dump(cfg, open(os.path.join(b, "config.json"), "w"))
    capsys.readouterr()
    assert analyze.main([a, b, "--out", str(tmp_path / "mixed")]) == 1
    assert "train.sft_weights ('full' in" in capsys.readouterr().err    # the default, filled in for the older run


def test_cos_full_against_subset_size_curve(tmp_path):
    # two runs of one variant; each logs tokens and cos_full of random subsets of three sizes and of
    # anchors at two probes: the points are the runs' means over probes, then their mean across runs
    from jaxrl_entropy.analyze import plots
    from jaxrl_entropy.analyze.layout import layout_of
    from jaxrl_entropy.analyze.runs import load_run

    subsets = {"random@0.05": 10, "random": 40, "random@0.5": 100, "anchor": 40, "full": 200}
    want = {}
    for seed in (0, 1):
        d = tmp_path / f"soft_seed{seed}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"name": "soft", "seed": seed}))
        with open(d / "metrics.jsonl", "w") as f:
            for step in (0, 1):
                rec = {"step": step}
                for s, n in subsets.items():
                    cos = 0.1 * seed + 0.01 * step + n / 400
                    rec[f"geometry/{s}/tokens"] = n + step
                    rec[f"geometry/{s}/cos_full"] = cos
                    want.setdefault(s, []).append(cos)
                f.write(json.dumps(rec) + "\n")
    lay = layout_of([load_run(str(tmp_path / f"soft_seed{s}")) for s in (0, 1)])
    points = plots.token_curve_points(lay, "soft")
    assert [p[0] for p in points] == ["random@0.05", "random", "anchor", "random@0.5", "full"] or \
        [p[0] for p in points] == ["random@0.05", "anchor", "random", "random@0.5", "full"]
    for name, tokens, cos, sd in points:
        assert tokens == pytest.approx(subsets[name] + 0.5)
        per_run = [np.mean(want[name][0:2]), np.mean(want[name][2:4])]
        assert cos == pytest.approx(np.mean(per_run)) and sd == pytest.approx(np.std(per_run, ddof=1))
    path = plots.token_curve_plot(lay, str(tmp_path / "curve.png"))
    _assert_drawn(open(path, "rb").read())


def test_next_step_cos_prev_averages_only_probes_one_step_apart(tmp_path):
    # probes at 0, 1, 10, 11, 20, 21 (train.geometry_consecutive): 1, 11 and 21 follow their
    # previous probe by one step, 10 and 20 by nine
    cos = {0: None, 1: 0.9, 10: 0.1, 11: 0.7, 20: -0.2, 21: 0.5}
    rows = []
    for step, c in cos.items():
        r = {"step": step, "geometry/explorer/cos_full": 0.5}
        if c is not None:
            r.update({"geometry/explorer/cos_prev": c, "geometry/steps_since_prev": 1.0 if step % 10 else 9.0})
        rows.append(r)
    run = analyze.load_run(_write_rows(tmp_path / "full_seed0", rows))
    got = _aggregate_module()._run_geometry(run, "explorer", ["cos_full", "cos_prev"])
    assert got["cos_prev_1step"] == pytest.approx((0.9 + 0.7 + 0.5) / 3)
    assert got["cos_prev"] == pytest.approx((0.9 + 0.1 + 0.7 - 0.2 + 0.5) / 5)
    # without consecutive probes there is no such column
    plain = analyze.load_run(_write_rows(tmp_path / "full_seed1", [
        {"step": s, "geometry/explorer/cos_prev": 0.3} for s in (10, 20)], seed=1))
    assert "cos_prev_1step" not in _aggregate_module()._run_geometry(plain, "explorer", ["cos_prev"])


def _aggregate_module():
    import importlib
    return importlib.import_module("jaxrl_entropy.analyze.aggregate")  # the package exports a function of that name


def test_each_probe_layers_split_is_plotted_and_contrasted(tmp_path):
    # three runs log anchor@L<i> / explorer@L<i> for layers 1 and 3 (train.geometry_layers); the
    # layer points are the runs' means over probes, then mean and std across runs (by hand), and
    # anchor@L<i> − explorer@L<i> is a paired contrast over the runs
    from jaxrl_entropy.analyze import plots
    from jaxrl_entropy.analyze.layout import layout_of

    vals = {}
    for seed in (0, 1, 2):
        rows = []
        for step in (0, 10):
            r = {"step": step, "geometry/full/cos_full": 1.0, "geometry/anchor/cos_full": 0.6,
                 "geometry/explorer/cos_full": 0.2, "geometry/full/tokens": 200, "geometry/anchor/tokens": 40}
            for layer in (1, 3):
                for split, base in (("anchor", 0.5), ("explorer", 0.1)):
                    v = base + 0.1 * layer + 0.01 * seed + 0.001 * step
                    r[f"geometry/{split}@L{layer}/cos_full"] = v
                    r[f"geometry/{split}@L{layer}/norm"] = 2 * v
                    r[f"geometry/{split}@L{layer}/tokens"] = 40
                    vals.setdefault((split, layer, seed), []).append(v)
            rows.append(r)
        _write_rows(tmp_path / f"full_seed{seed}", rows, seed=seed)
    runs = [analyze.load_run(str(tmp_path / f"full_seed{s}")) for s in (0, 1, 2)]
    lay = layout_of(runs)
    for split in ("anchor", "explorer"):
        pts = plots.layer_points(lay, "full", split)
        assert [p[0] for p in pts] == [1, 3]
        for layer, mean, sd in pts:
            per_run = [np.mean(vals[split, layer, s]) for s in (0, 1, 2)]
            assert mean == pytest.approx(np.mean(per_run)) and sd == pytest.approx(np.std(per_run, ddof=1))
    _assert_drawn(open(plots.layer_plot(lay, str(tmp_path / "layers.png")), "rb").read())
    # the token-size curve leaves other layers' splits out
    assert [p[0] for p in plots.token_curve_points(lay, "full")] == ["anchor", "full"]
    summary = _aggregate_module().summarize_runs(runs, lay)
    got = {(c["a"], c["b"], c["metric"]): c for c in summary["subset_contrasts"]}
    c = got["anchor@L3", "explorer@L3", "cos_full"]
    assert c["n"] == 3 and c["mean_diff"] == pytest.approx(0.4)


def test_volatility_bars_are_the_runs_means_of_next_step_and_split_half_cosines(tmp_path):
    from jaxrl_entropy.analyze import plots
    from jaxrl_entropy.analyze.layout import layout_of

    want = {}
    for seed in (0, 1):
        rows = []
        for step, gap in ((0, None), (1, 1.0), (10, 9.0), (11, 1.0)):
            r = {"step": step}
            for s, base in (("anchor", 0.6), ("explorer", 0.1)):
                r[f"geometry/{s}/cos_halves"] = base + 0.01 * step + 0.1 * seed
                want.setdefault(("cos_halves", s, seed), []).append(r[f"geometry/{s}/cos_halves"])
                if gap is not None:
                    r[f"geometry/{s}/cos_prev"] = base / 2 + 0.02 * step + 0.1 * seed
                    if gap == 1.0:
                        want.setdefault(("cos_prev_1step", s, seed), []).append(r[f"geometry/{s}/cos_prev"])
            if gap is not None:
                r["geometry/steps_since_prev"] = gap
            rows.append(r)
        _write_rows(tmp_path / f"full_seed{seed}", rows, seed=seed)
    lay = layout_of([analyze.load_run(str(tmp_path / f"full_seed{s}")) for s in (0, 1)])
    pts = plots.volatility_points(lay, "full")
    for measure in ("cos_prev_1step", "cos_halves"):
        for s in ("anchor", "explorer"):
            per_run = [np.mean(want[measure, s, seed]) for seed in (0, 1)]
            assert pts[measure][s] == pytest.approx((np.mean(per_run), np.std(per_run, ddof=1)))
    _assert_drawn(open(plots.volatility_plot(lay, str(tmp_path / "vol.png")), "rb").read())


def test_cos_rest_per_probe_from_logged_norms_then_mean(tmp_path):
    # two probes; the hand values: <g_S, g> = proj·‖g‖, <g_S, g_R> = (N<g_S,g> − |S|‖g_S‖²)/|R|,
    # ‖g_R‖ = ‖N g − |S| g_S‖/|R|
    probes = {0: (2.0, 0.5, 0.4, 10, 50), 1: (1.0, 0.3, 0.5, 12, 48)}   # norm_S, proj_S, ‖g‖, |S|, N
    rows, want = [], []
    for step, (ns, ps, nf, s, n) in probes.items():
        rows.append({"step": step, "geometry/anchor/norm": ns, "geometry/anchor/proj_full": ps,
                     "geometry/full/norm": nf, "geometry/anchor/tokens": s, "geometry/full/tokens": n})
        dot = ps * nf
        dot_r = (n * dot - s * ns**2) / (n - s)
        norm_r = np.sqrt(n**2 * nf**2 - 2 * n * s * dot + s**2 * ns**2) / (n - s)
        want.append((dot_r / (ns * norm_r), s / n * ns / nf))
    run = analyze.load_run(_write_rows(tmp_path / "full_seed0", rows))
    got = _aggregate_module().complement_geometry(run, "anchor")
    assert got["cos_rest"] == pytest.approx(np.mean([w[0] for w in want]))
    assert got["self_share"] == pytest.approx(np.mean([w[1] for w in want]))
    assert _aggregate_module().complement_geometry(run, "full") == {}
