"""`jaxrl-entropy reproduce` end to end on a tiny model: one warm-up per seed, variants from it."""
import json
import os

import pytest

from conftest import TINY_CLI_FLAGS, metrics_rows as _rows
from jaxrl_entropy import cli

pytestmark = pytest.mark.slow  # end to end: CLI processes and whole training runs

STEPS = 2
FLAGS = [*TINY_CLI_FLAGS, f"--config.train.steps={STEPS}", "--config.train.sft_steps=3",
         "--config.train.sft_target_accuracy=0", "--config.train.checkpoint_every=1", "--config.eval.every=2"]


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("repro"))
    report = os.path.join(out, "report")
    argv = ["jaxrl-entropy", "reproduce", "--out", out, "--seeds", "0", "--variants", "full", "anchor",
            "--jobs", "2", "--geometry-every", "1", "--report", report, *FLAGS]
    assert cli.main(argv) == 0
    return out, report, argv


def test_warmup_runs_once_and_records_its_report(repro):
    out, _, _ = repro
    rows = _rows(os.path.join(out, "warmup_seed0"))
    assert len(rows) == 1 and rows[0]["step"] == 0 and rows[0]["sft/steps"] == 3
    assert os.path.isdir(os.path.join(out, "warmup_seed0", "checkpoints", "0"))


def test_variants_start_from_the_same_weights_and_differ_in_weights_only(repro):
    out, _, _ = repro
    full, anchor = _rows(os.path.join(out, "full_seed0")), _rows(os.path.join(out, "anchor_seed0"))
    # Same checkpoint and seed: the step-0 evaluation and rollout (taken before any update) agree.
    for key in ("eval/accuracy", "reward/mean", "response_len/mean"):
        assert full[0][key] == anchor[0][key], key
    assert full[0]["weights/selected_frac"] == 1.0
    assert abs(anchor[0]["weights/selected_frac"] - 0.2) < 0.05  # the bottom-20% entropy tokens
    assert full[-1]["step"] == anchor[-1]["step"] == STEPS
    assert "geometry/anchor/cos_full" in full[0]
    statuses = json.load(open(os.path.join(out, "runs.json")))
    assert [(s["variant"], s["returncode"]) for s in statuses] == [("full", 0), ("anchor", 0)]


def test_report_lists_both_variants(repro):
    _, report, _ = repro
    text = open(os.path.join(report, "report.md")).read()
    assert "| full | 1 |" in text and "| anchor | 1 |" in text
    assert os.path.exists(os.path.join(report, "reward.png"))


def test_restart_skips_finished_runs(repro):
    out, _, argv = repro
    before = {d: len(_rows(os.path.join(out, d))) for d in ("warmup_seed0", "full_seed0", "anchor_seed0")}
    mtime = os.path.getmtime(os.path.join(out, "full_seed0", "metrics.jsonl"))
    assert cli.main(argv) == 0
    assert {d: len(_rows(os.path.join(out, d))) for d in before} == before
    assert os.path.getmtime(os.path.join(out, "full_seed0", "metrics.jsonl")) == mtime


def test_rejects_arguments_that_are_not_config_overrides(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["jaxrl-entropy", "reproduce", "--out", str(tmp_path), "--config.rl.group_size=4", "--bogus"])
    assert e.value.code == 2
    assert "--bogus" in capsys.readouterr().err


def test_warmup_seed_starts_another_seeds_rl_from_that_warm_up(repro):
    # seed 1's RL from seed 0's warm-up: its step-0 checkpoint holds seed 0's (unconsumed) prompt
    # stream, which a run of seed 1 must start afresh rather than refuse (it did: DataError)
    out, _, argv = repro
    i = argv.index("--seeds")
    again = argv[:i] + ["--seeds", "1", "--warmup-seed", "0"] + argv[i + 2:]
    again[again.index("--variants") + 1:again.index("--variants") + 3] = ["full"]
    again[again.index("--report") + 1] = os.path.join(out, "report_seed1")   # the shared report stays as it was
    assert cli.main(again) == 0
    assert not os.path.exists(os.path.join(out, "warmup_seed1"))
    rows = _rows(os.path.join(out, "full_seed1"))
    assert rows[-1]["step"] == STEPS
    log = open(os.path.join(out, "full_seed1", "train.log")).read()
    assert "starting the prompt stream from its beginning with seed 1" in log
