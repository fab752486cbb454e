"""`reproduce`'s bookkeeping with a stand-in for `train` (a tiny script): a run is finished when its
last step is the configured one, not when its process exited 0."""
import json
import os
import sys

import pytest

from jaxrl_entropy.cli import reproduce

# writes what `train` leaves in a workdir: config.json (train.steps = 3) and one metrics line per step
# up to STOP_AT (a file beside the workdirs), appending from where the workdir's metrics end; exit 0
FAKE_TRAIN = r'''
import json, os, sys
workdir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))
out = os.path.dirname(workdir)
with open(os.path.join(out, "calls"), "a") as f:
    f.write(os.path.basename(workdir) + "\n")
stop_at = int(open(os.path.join(out, "STOP_AT")).read())
print("fake train of", os.path.basename(workdir), "to step", stop_at, flush=True)
with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"train": {"steps": 3}}, f)
path = os.path.join(workdir, "metrics.jsonl")
done = sum(1 for _ in open(path)) if os.path.exists(path) else 0
with open(path, "a") as f:
    for step in range(done, stop_at + 1):
        f.write(json.dumps({"step": step, "reward/mean": 0.0}) + "\n")
'''


@pytest.fixture
def out(tmp_path, monkeypatch):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    runs = tmp_path / "runs"
    os.makedirs(runs / "warmup_seed0" / "checkpoints" / "0")  # the warm-up is done
    monkeypatch.setattr(reproduce, "_cli", lambda *args: [sys.executable, str(script), *args])
    analysed = []
    monkeypatch.setattr(reproduce.analyze, "main", lambda argv: analysed.append(list(argv)) or 0)
    return runs, analysed


def _calls(runs) -> list[str]:
    path = runs / "calls"
    return path.read_text().split() if path.exists() else []


def test_a_run_that_exits_0_part_way_is_not_finished_and_resumes_on_the_next_call(out, capsys):
    runs, analysed = out
    argv = ["--out", str(runs), "--seeds", "0", "--variants", "full", "anchor"]
    (runs / "STOP_AT").write_text("1")      # both children stop at step 1 of 3 with exit 0
    assert reproduce.main(argv) == 1
    err = capsys.readouterr().err
    assert "full seed 0 did not finish: stopped at step 1 of 3" in err and "2 of 2 runs unfinished" in err
    status = json.loads((runs / "full_seed0" / "status.json").read_text())
    assert (status["returncode"], status["finished"], status["step"], status["steps"]) == (0, False, 1, 3)
    assert analysed == []                  # no report over runs at unequal or partial steps

    (runs / "STOP_AT").write_text("3")
    assert reproduce.main(argv) == 0       # both resumed (called again) and finished
    assert sorted(_calls(runs)) == sorted(["full_seed0", "anchor_seed0"] * 2)
    assert [os.path.basename(d) for d in analysed[-1]] == ["full_seed0", "anchor_seed0"]

    assert reproduce.main(argv) == 0       # finished runs are skipped
    assert len(_calls(runs)) == 4


def test_a_failed_run_is_reported_and_the_others_analysed(out, capsys, monkeypatch):
    runs, analysed = out
    (runs / "STOP_AT").write_text("3")
    real = reproduce._cli
    monkeypatch.setattr(reproduce, "_cli", lambda *args: real(*args) if "anchor" not in " ".join(args)
                        else [sys.executable, "-c", "import sys; sys.exit('DynamicSamplingError: no mixed group')"])
    assert reproduce.main(["--out", str(runs), "--seeds", "0", "--variants", "full", "anchor"]) == 1
    assert "anchor seed 0 did not finish: DynamicSamplingError: no mixed group" in capsys.readouterr().err
    assert [os.path.basename(d) for d in analysed[-1]] == ["full_seed0"]


def test_a_token_matched_variant_scales_prompts_and_updates_and_keeps_its_name(out, monkeypatch):
    runs, analysed = out
    (runs / "STOP_AT").write_text("3")
    seen, fake = [], reproduce._cli
    monkeypatch.setattr(reproduce, "_cli", lambda *args: seen.append(args) or fake(*args))
    assert reproduce.main(["--out", str(runs), "--seeds", "0", "--variants", "full", "random@x5"]) == 0
    scaled = next(a for a in seen if "random@x5_seed0" in " ".join(a))
    # the demo's 16 prompts per step in updates of 8, times 5 (by hand)
    assert "--config.rl.prompts_per_step=80" in scaled and "--config.rl.mini_batch_prompts=40" in scaled
    assert "--config.name=random@x5" in scaled and any(a.endswith("presets.py:random") for a in scaled)
    plain = next(a for a in seen if "full_seed0" in " ".join(a))
    assert not any("prompts_per_step" in a for a in plain)
    assert sorted(os.path.basename(d) for d in analysed[0]) == ["full_seed0", "random@x5_seed0"]


def test_a_bad_scale_is_refused_before_anything_runs(out, capsys):
    runs, _ = out
    with pytest.raises(SystemExit):
        reproduce.main(["--out", str(runs), "--seeds", "0", "--variants", "random@x0"])
    assert "NAME@xK" in capsys.readouterr().err and _calls(runs) == []


def test_a_fractional_scale_trains_on_fewer_prompts_and_must_leave_whole_prompts(out, monkeypatch, capsys):
    runs, _ = out
    (runs / "STOP_AT").write_text("3")
    seen, fake = [], reproduce._cli
    monkeypatch.setattr(reproduce, "_cli", lambda *args: seen.append(args) or fake(*args))
    assert reproduce.main(["--out", str(runs), "--seeds", "0", "--variants", "full@x0.25"]) == 0
    scaled = next(a for a in seen if "full@x0.25_seed0" in " ".join(a))
    # the demo's 16 prompts per step in updates of 8, times 1/4 (by hand)
    assert "--config.rl.prompts_per_step=4" in scaled and "--config.rl.mini_batch_prompts=2" in scaled
    # an update of 2 prompts × 8 answers = 16 rows is smaller than the demo's 64-row micro-batch
    assert "--config.rl.micro_batch_size=16" in scaled
    with pytest.raises(SystemExit):   # 16 × 0.3 = 4.8 prompts
        reproduce.main(["--out", str(runs), "--seeds", "0", "--variants", "full@x0.3"])
    assert "not a whole number of prompts" in capsys.readouterr().err


def test_a_config_file_is_used_for_every_run(out, monkeypatch):
    from conftest import REPO_ROOT

    runs, _ = out
    (runs / "STOP_AT").write_text("3")
    seen, fake = [], reproduce._cli
    monkeypatch.setattr(reproduce, "_cli", lambda *args: seen.append(args) or fake(*args))
    config = str(REPO_ROOT / "configs" / "multiplication.py")
    assert reproduce.main(["--out", str(runs), "--seeds", "0", "--variants", "soft", "random@x2",
                           "--config", config]) == 0
    assert {next(a for a in args if a.startswith("--config=")) for args in seen} == {
        f"--config={config}:soft", f"--config={config}:random"}
    scaled = next(a for a in seen if "random@x2_seed0" in " ".join(a))
    assert "--config.rl.prompts_per_step=32" in scaled   # multiplication keeps the demo's 16 prompts


def test_each_run_logs_to_its_own_file_appending_on_resume(out, capsys):
    runs, _ = out
    argv = ["--out", str(runs), "--seeds", "0", "--variants", "full"]
    (runs / "STOP_AT").write_text("1")
    reproduce.main(argv)
    (runs / "STOP_AT").write_text("3")
    assert reproduce.main(argv) == 0
    log = (runs / "full_seed0" / reproduce.LOG_FILE).read_text()
    assert "fake train of full_seed0 to step 1" in log and "fake train of full_seed0 to step 3" in log
    assert log.index("to step 1") < log.index("to step 3")      # appended, in order
    printed = capsys.readouterr().out
    assert "full seed 0 started (log: " in printed and "fake train" not in printed


def test_a_failed_warm_up_stops_with_its_last_log_line_and_no_rl_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(reproduce, "_cli", lambda *args: [
        sys.executable, "-c", "import sys; print('compiling'); sys.exit('ValueError: bad data file')"])
    assert reproduce.main(["--out", str(tmp_path), "--seeds", "0", "1", "--jobs", "2", "--variants", "full"]) == 1
    err = capsys.readouterr().err
    assert "warm-up of seed" in err and "ValueError: bad data file" in err and "train.log" in err
    assert not (tmp_path / "full_seed0").exists()
    assert "compiling" in (tmp_path / "warmup_seed0" / reproduce.LOG_FILE).read_text()


def test_a_run_another_command_holds_is_skipped_not_run_twice(out, capsys):
    runs, analysed = out
    (runs / "STOP_AT").write_text("3")
    lock = os.path.join(runs, "full_seed0", reproduce.LOCK_FILE)
    with reproduce._exclusive(lock, wait=True):       # as a second command running full seed 0 would
        code = reproduce.main(["--out", str(runs), "--seeds", "0", "--variants", "full", "anchor"])
    assert code == 1 and _calls(runs) == ["anchor_seed0"]
    assert "running in another reproduce command" in capsys.readouterr().err
    assert reproduce.main(["--out", str(runs), "--seeds", "0", "--variants", "full", "anchor"]) == 0
    assert _calls(runs) == ["anchor_seed0", "full_seed0"]   # the lock released, it runs; anchor is not re-run


def test_one_warm_up_serves_every_seed_with_warmup_seed(tmp_path, monkeypatch):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    runs = tmp_path / "runs"
    weights = runs / "warmup_seed7" / "checkpoints" / "0"
    os.makedirs(weights)
    (weights / "params").write_text("seed 7's warm-up")
    (runs / "STOP_AT").write_text("3")
    monkeypatch.setattr(reproduce, "_cli", lambda *args: [sys.executable, str(script), *args])
    monkeypatch.setattr(reproduce.analyze, "main", lambda argv: 0)
    assert reproduce.main(["--out", str(runs), "--seeds", "0", "1", "--variants", "full", "--warmup-seed", "7"]) == 0
    assert sorted(_calls(runs)) == ["full_seed0", "full_seed1"]       # no warm-up of seeds 0 or 1 ran
    assert not (runs / "warmup_seed0").exists() and not (runs / "warmup_seed1").exists()
    for seed in (0, 1):
        assert (runs / f"full_seed{seed}" / "checkpoints" / "0" / "params").read_text() == "seed 7's warm-up"


def test_config_name_runs_a_variant_at_other_settings_beside_its_plain_runs(out, monkeypatch):
    runs, analysed = out
    (runs / "STOP_AT").write_text("3")
    seen, fake = [], reproduce._cli
    monkeypatch.setattr(reproduce, "_cli", lambda *args: seen.append(args) or fake(*args))
    assert reproduce.main(["--out", str(runs), "--seeds", "0", "--variants", "explorer"]) == 0
    argv = ["--out", str(runs), "--seeds", "0", "--variants", "explorer", "--config.optim.lr=3e-5",
            "--config.name=explorer_lr3e-5"]
    assert reproduce.main(argv) == 0
    # a run of its own (it was skipped as the finished plain explorer run, and reported as this one)
    assert _calls(runs) == ["explorer_seed0", "explorer_lr3e-5_seed0"]
    assert "--config.optim.lr=3e-5" in seen[-1] and any(a.endswith("presets.py:explorer") for a in seen[-1])
    assert [os.path.basename(d) for d in analysed[-1]] == ["explorer_lr3e-5_seed0"]
    assert reproduce.main(argv) == 0 and len(_calls(runs)) == 2     # finished: skipped on a restart


def test_a_finished_run_of_other_settings_is_refused_not_reported_as_this_commands(out, capsys):
    runs, analysed = out
    (runs / "STOP_AT").write_text("3")
    assert reproduce.main(["--out", str(runs), "--seeds", "0", "--variants", "explorer"]) == 0
    assert reproduce.main(["--out", str(runs), "--seeds", "0", "--variants", "explorer",
                           "--config.optim.lr=3e-5"]) == 1
    err = capsys.readouterr().err
    assert "finished earlier with other settings" in err and "--config.name=NAME" in err
    assert _calls(runs) == ["explorer_seed0"] and len(analysed) == 1     # neither re-run nor re-reported


def test_one_name_for_several_variants_is_refused(out, capsys):
    runs, _ = out
    with pytest.raises(SystemExit):
        reproduce.main(["--out", str(runs), "--seeds", "0", "--variants", "full", "anchor", "--config.name=x"])
    assert "would share its directories" in capsys.readouterr().err and _calls(runs) == []
