"""What a run costs (`aot.costs`): generation batches under dynamic sampling and evaluations per
step by hand, the weighing of `dryrun`'s programs, the planning table's cells, the advice when a
model does not fit, `dryrun --estimate` for a TPU slice, and the presets' architecture files."""
import json

import pytest

from conftest import REPO_ROOT
from jaxrl_entropy import cli, presets
from jaxrl_entropy.aot import costs
from jaxrl_entropy.aot.report import GiB, ProgramReport, Report
from jaxrl_entropy.training.program import Program


@pytest.mark.parametrize("keep, batches", [
    (1.0, 1.0),
    (0.5, 2.0),    # 256 kept; the next batch would decode 1.5 × 256 / 0.5 + 1 > 512 prompts: a whole batch
    (0.6, 2.0),    # 307 kept, 205 missing: 1.5 × 205 × 512 / 307 + 1 = 514 > 512 → a whole batch
    (0.25, 4.0),   # 128, 256, 384, 512 kept after 1, 2, 3, 4 whole batches
    (0.9, 600 / 512),  # 460 kept, 52 missing: ceil(1.5 × 52 × 512 / 460) + 1 = 88 more prompts suffice
    (0.05, 10.0),  # the budget: rl.max_gen_batches
])
def test_expected_generation_batches_by_hand(keep, batches):
    assert costs.expected_gen_batches(keep, 512, 10) == pytest.approx(batches)


def test_evaluations_per_step_count_step_0_and_the_end():
    c = presets.qwen3_dapo("8b")
    assert costs.evals_per_step(c) == pytest.approx(13 / 120)     # before 0, 10, ..., 110, and after 120
    c.train.steps = 125
    assert costs.evals_per_step(c) == pytest.approx(14 / 125)     # 0, ..., 120, and after 125
    c.eval.every = 0
    assert costs.evals_per_step(c) == 0.0


def _program(name, calls):
    return Program(name, fn=None, args=(), calls_per_step=calls)


def test_weigh_scales_generation_and_counts_evaluation():
    c = presets.qwen3_dapo("8b")   # keep 0.5 → 2 batches; 1547 problems × k 8; 13 evaluations in 120 steps
    progs, notes = costs.weigh(c, [_program("update", 16), _program("rollout/prefill", 8),
                                   _program("rollout/decode", 1280), _program("eval/decode", 0)])
    calls = {p.name: p.calls_per_step for p in progs}
    assert calls["update"] == 16 and calls["rollout/prefill"] == 16 and calls["rollout/decode"] == 2560
    # decode calls ∝ rows: 1547 × 8 eval rows against 512 × 16 rollout rows, 13/120 times per step
    assert calls["eval/decode"] == pytest.approx(1280 * 1547 * 8 / 8192 * 13 / 120)
    assert any("2.00 batches" in n and "50%" in n for n in notes) and any("1547 problems" in n for n in notes)
    c.rl.dynamic_sampling = False
    c.dryrun.eval_problems = 0
    progs, notes = costs.weigh(c, [_program("rollout/decode", 1280), _program("eval/decode", 0)])
    assert [p.calls_per_step for p in progs] == [1280, 0]
    assert any("evaluation not counted" in n for n in notes)


def _report(programs, chips=8, steps=120, hbm=16 * GiB):
    return Report("v5e-8", "v5e-8 (v5e:2x4, 8 chips)", {"name": "v5e", "hbm_bytes": hbm}, {"fsdp": chips}, "full",
                  0.10, 1, 1, programs, num_chips=chips, steps=steps)


def test_plan_cell_by_hand():
    """Compiled memory and training roofline replace the estimate's; generation stays analytic;
    an analytic training program within the calibration of the limit is borderline."""
    cap = 16 * GiB
    analytic = _report([ProgramReport("update", "", 16, False, total_bytes=12 * GiB, capacity_bytes=cap, fits=True,
                                      roofline_s=30.0),
                        ProgramReport("rollout_stats", "", 1, False, total_bytes=4 * GiB, capacity_bytes=cap,
                                      fits=True, roofline_s=100.0),
                        ProgramReport("rollout/decode", "", 1000, False, total_bytes=13 * GiB, capacity_bytes=cap,
                                      fits=True, roofline_s=0.5)])
    cell = costs.plan_cell("Qwen3-X", analytic, calibration=1.3)
    assert cell.fits == "borderline"    # update: 12 × 1.3 = 15.6 GiB > 0.9 × 16; decode is not calibrated
    assert cell.note == "update ≈ 12–16 GiB of 14 usable: compile to know"
    assert cell.step_s == pytest.approx(16 * 30 + 100 + 500) and cell.generation_s == pytest.approx(500)
    assert cell.hours == pytest.approx(1080 * 120 / 3600) and cell.chip_hours == pytest.approx(8 * 36)
    assert cell.train_gib == pytest.approx(12) and cell.source == "analytic"
    compiled = _report([ProgramReport("update", "", 16, True, total_bytes=13 * GiB, capacity_bytes=cap, fits=True,
                                      roofline_s=25.0),
                        ProgramReport("rollout/decode", "", 1000, True, total_bytes=14 * GiB, capacity_bytes=cap,
                                      fits=True, roofline_s=1.0)])
    cell = costs.plan_cell("Qwen3-X", analytic, compiled, calibration=1.3)
    assert cell.fits == "yes" and cell.train_gib == pytest.approx(13)
    assert cell.step_s == pytest.approx(16 * 25 + 100 + 500)   # the compiled decode's bound is not used
    assert cell.source == "compiled: engine, update; the rest analytic"
    table = costs.format_table([cell]).splitlines()
    assert table[0] == "| " + " | ".join(costs.TABLE_COLUMNS) + " |"
    assert table[2].startswith("| Qwen3-X | v5e-8 | yes | 13.0 of 16 | 1,000 | 50% | 33 h | 267 |")
    too_big = _report([ProgramReport("update", "", 16, True, total_bytes=15 * GiB, capacity_bytes=cap, fits=False)])
    cell = costs.plan_cell("Qwen3-X", analytic, too_big)
    assert cell.fits == "no" and "| – | – | – | – |" in costs.format_table([cell])


def _run(args, capsys):
    code = cli.main(["jaxrl-entropy", "dryrun"] + args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_estimate_for_a_tpu_slice_needs_no_compiler(tmp_path, capsys, monkeypatch):
    """`--estimate` on v5e-8: every program by formula on 8 CPU stand-ins, labelled; the run's hours
    and chip-hours, and what the step time assumes."""
    from test_dryrun import SMALL, _tiny_dir

    monkeypatch.chdir(REPO_ROOT)
    out = tmp_path / "report.json"
    code, stdout, _ = _run(SMALL + [f"--config.model.hf_dir={_tiny_dir(tmp_path)}", "--topology=v5e-8", "--estimate",
                                    "--config.rl.micro_batch_size=8", "--config.rl.mini_batch_prompts=4",
                                    "--config.dryrun.keep_rate=0.5", "--config.dryrun.eval_problems=100",
                                    f"--out={out}"], capsys)
    assert code == 0, stdout
    report = json.loads(out.read_text())
    names = [p["name"] for p in report["programs"]]
    assert {"update", "rollout_stats", "rollout/decode", "eval/decode"} <= set(names)
    assert all("ANALYTIC ESTIMATE (--estimate: not compiled)" in p["estimate"] for p in report["programs"])
    assert report["num_chips"] == 8 and report["steps"] == 120
    assert "120 steps (train.steps):" in stdout and "chip-hours on 8 chips" in stdout
    assert "assumes generation: 2.00 batches of 4 prompts" in stdout and "100 problems" in stdout
    decode = next(p for p in report["programs"] if p["name"] == "rollout/decode")
    assert "over 8 devices of a host" in decode["note"]   # a v5e-8 is one host of 8 chips


def test_a_model_too_large_for_its_slice_says_what_would_fit(capsys, monkeypatch):
    """Qwen3-8B (f32 state, 131 GB) on a v5e-8 (8 × 16 GiB): estimated, it does not fit; the
    message names a v5e slice that holds it, and not bf16 parameters (with their float32 master
    copy they would need more memory, not less)."""
    monkeypatch.chdir(REPO_ROOT)
    code, _, stderr = _run(["--config=configs/qwen3_8b_dapo.py:full,v5e-8", "--topology=v5e-8", "--estimate",
                            "--config.model.hf_dir=configs/arch/qwen3-8b", "--programs=update,rollout_stats"], capsys)
    assert code == 1
    assert "program 'update' does not fit on v5e-8" in stderr
    assert "what would fit:" in stderr and "--topology=v5e-32 with --config.rl.micro_batch_size=32" in stderr
    assert "--config.model.param_dtype=bfloat16" not in stderr


# Published sizes (Qwen3 model cards): parameters without the embedding, in billions
NON_EMBEDDING = {"0.6b": 0.44, "1.7b": 1.4, "4b": 3.6, "8b": 6.95}


@pytest.mark.parametrize("size", list(presets.MODELS))
def test_shipped_architecture_files(size):
    """configs/arch/<model>/config.json: the published widths, counted by hand to the model card's
    non-embedding parameters; the probe layer 0.55 of its depth lies inside it."""
    arch = json.loads((REPO_ROOT / "configs" / "arch" / presets.MODELS[size].arch / "config.json").read_text())
    D, I, L = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    H, K, Dh = arch["num_attention_heads"], arch["num_key_value_heads"], arch["head_dim"]
    per_layer = D * (H + 2 * K) * Dh + H * Dh * D + 3 * D * I + 2 * D + 2 * Dh
    assert L * per_layer / 1e9 == pytest.approx(NON_EMBEDDING[size], abs=0.05)   # the card rounds
    assert arch["tie_word_embeddings"] == (size != "8b") and arch["vocab_size"] == 151936
    assert (arch["rope_theta"], arch["rms_norm_eps"], Dh, arch["model_type"]) == (1000000, 1e-6, 128, "qwen3")
