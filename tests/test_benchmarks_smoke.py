"""Smoke test of `benchmarks/attention.py`: one tiny shape on CPU through every implementation."""
from __future__ import annotations

import importlib.util
import sys

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # end to end: CLI processes and whole training runs

_PATH = REPO_ROOT / "benchmarks" / "attention.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_attention", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_flop_count_by_hand(bench):
    # causal T=4: 1+2+3+4 = 10 visible pairs; 4 FLOPs per pair and head-dim element (QKᵀ and PV).
    assert bench.forward_flops(bench.Shape(B=1, T=4, Hq=1, Hkv=1, D=2)) == 4 * 10 * 2
    assert bench.forward_flops(bench.Shape(B=3, T=4, Hq=2, Hkv=1, D=2, causal=False)) == 4 * 3 * 2 * 16 * 2


def test_row_function_and_table(bench):
    shape = bench.Shape(B=1, T=32, Hq=2, Hkv=1, D=16)
    rows = bench.run_shape(shape, backend="xla", reps=1)
    assert [r["impl"] for r in rows] == list(bench.IMPLS)
    for r in rows:
        assert r["note"] == "", r["note"]
        assert r["fwd_s"] > 0
        if r["impl"] == "head_mixture_entropy":
            assert r["fwdbwd_s"] is None
        else:
            assert r["fwdbwd_s"] > 0
    base = next(r for r in rows if r["impl"] == bench.BASELINE)
    assert base["fwd_s_ratio"] == pytest.approx(1.0)

    table = bench.format_table(rows).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == list(bench.COLUMNS)
    assert {"fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s", "fwd × flash",
            "compiled MiB", "device peak MiB"} <= set(header)
    body = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert len(body) == len(bench.IMPLS)
    for cells in body:
        assert len(cells) == len(bench.COLUMNS)
        float(cells[header.index("fwd ms")])  # a number, not an error note
        assert cells[header.index("device peak MiB")] == "n/a"  # CPU exposes no allocator stats


def test_main_appends_markdown(bench, tmp_path, monkeypatch):
    out = tmp_path / "results.md"
    tiny = (bench.Shape(B=1, T=16, Hq=2, Hkv=1, D=16),)
    monkeypatch.setattr(bench, "SMALL_SHAPES", tiny)
    assert bench.main(["--shapes", "small", "--backend", "xla", "--reps", "1",
                       "--impls", "flash_attention,head_mixture_entropy", "--out", str(out)]) == 0
    text = out.read_text()
    assert "jax " in text and "B1 T16 H2/1 D16" in text and "| head_mixture_entropy |" in text


def test_sampler_benchmark_cache_agrees_with_recompute(capsys):
    """The sampler benchmark asserts the KV-cache tokens equal those of recomputing the prefix."""
    import importlib.util

    path = str(REPO_ROOT / "benchmarks" / "sampler.py")
    spec = importlib.util.spec_from_file_location("bench_sampler", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--batches", "2", "--prompt-len", "5", "--new-tokens", "6", "--reps", "1"]) == 0
    assert "| 2 | 5 + 6 |" in capsys.readouterr().out


def test_sampler_benchmark_engine_mode(capsys):
    """Engine mode runs end to end; it asserts the engine's greedy tokens equal the dense sampler's."""
    import importlib.util

    path = str(REPO_ROOT / "benchmarks" / "sampler.py")
    spec = importlib.util.spec_from_file_location("bench_sampler_engine", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--mode", "engine", "--size", "demo", "--batches", "8", "--prompt-len", "6", "--new-tokens", "6",
                     "--group", "4", "--slots", "2", "--chunk", "3", "--page", "4", "--reps", "1"]) == 0
    assert "| 8 (2×4) | 3–6 + ≤6 |" in capsys.readouterr().out


def test_slice_table_merges_compiled_reports_into_the_estimate(tmp_path):
    """`benchmarks/slice_table.py` on two cells: the estimate alone, then with a compiled report
    of the update in --compiled (its memory replaces the estimate's, the cell says so)."""
    import json

    spec = importlib.util.spec_from_file_location("slice_table", REPO_ROOT / "benchmarks" / "slice_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    text = table.main(["--models", "0.6b", "--slices", "v5e-8,h100x1", "--compiled", str(tmp_path)])
    rows = [line for line in text.splitlines() if line.startswith("| Qwen3-0.6B")]
    assert [r.split(" | ")[1] for r in rows] == ["v5e-8", "h100x1"] and all("| analytic |" in r for r in rows)
    compiled = {"topology": "v5e-8", "programs": [{"name": "update", "note": "", "calls_per_step": 16, "compiled": True,
                                                   "total_bytes": 6.44 * 2 ** 30, "capacity_bytes": 16 * 2 ** 30,
                                                   "fits": True, "roofline_s": 30.6}]}
    (tmp_path / "qwen3-0.6b_v5e-8_update.json").write_text(json.dumps(dict(
        compiled, description="", chip={}, mesh={}, config="full", headroom=0.1, tokens_per_step=0,
        response_tokens_per_step=0)))
    text = table.main(["--models", "0.6b", "--slices", "v5e-8", "--compiled", str(tmp_path)])
    row = next(line for line in text.splitlines() if line.startswith("| Qwen3-0.6B"))
    assert "| 6.4 of 16 |" in row and "compiled: update; the rest analytic" in row
    assert "0.6b update on v5e-8" in text   # the calibration lists the comparison
