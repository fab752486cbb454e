"""The RL loop end to end on a tiny model: CLI, metrics, checkpoints, resume, signals, eval, export."""
import json
import os
import signal

import numpy as np
import pytest

import jax

from conftest import TINY_CLI_FLAGS, metrics_rows as _rows, tiny_config
from jaxrl_entropy import cli
from jaxrl_entropy.models.config import CheckpointError
from jaxrl_entropy.training import model_io
from jaxrl_entropy.training.trainer import Trainer

pytestmark = pytest.mark.slow  # end to end: CLI processes and whole training runs

STEPS = 4


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted run of STEPS steps through the console-script entry point."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    code = cli.main(["jaxrl-entropy", "train", f"--workdir={workdir}", *TINY_CLI_FLAGS,
                     f"--config.train.steps={STEPS}", "--config.train.sft_steps=0",
                     "--config.train.checkpoint_every=2", "--config.train.geometry_every=1",
                     "--config.eval.every=2"])
    assert code == 0
    return workdir


def test_train_writes_metrics_events_and_checkpoints(straight_run):
    rows = _rows(straight_run)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(STEPS))
    first = rows[0]
    for key in ("reward/mean", "accuracy", "response_len/mean", "clip_frac", "grad_norm", "loss",
                "entropy/anchor_threshold", "entropy/explorer_threshold", "entropy/q50",
                "entropy/spearman_pred", "weights/selected_frac", "geometry/anchor/cos_full",
                "geometry/explorer/norm", "controls/align_partial_corr", "controls/align_raw_corr",
                "eval/accuracy", "eval/synthetic_heldout/mean@2"):
        assert key in first, key
    assert rows[1]["geometry/anchor/cos_prev"] is not None       # volatility from the second step
    assert first["entropy/anchor_threshold"] <= first["entropy/explorer_threshold"]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2, 4]   # step 0, every 2, final
    assert os.listdir(os.path.join(straight_run, "tensorboard"))
    assert sorted(os.listdir(os.path.join(straight_run, "checkpoints"))) == ["2", "4"]
    cfg = json.load(open(os.path.join(straight_run, "config.json")))
    assert cfg["name"] == "full" and cfg["rl"]["group_size"] == 4


def test_resume_gives_the_same_steps_as_not_stopping(straight_run, tmp_path):
    """Stop after 2 steps, start a new process-like Trainer on the same workdir: steps 2-3 repeat
    the uninterrupted run's numbers, and the final parameters are the same."""
    overrides = {"train.geometry_every": 1}
    first = Trainer(tiny_config(**overrides, **{"train.steps": 2}), str(tmp_path))
    first.run()
    first.close()
    second = Trainer(tiny_config(**overrides, **{"train.steps": STEPS}), str(tmp_path))
    assert second.step == 2
    second.run()
    straight = {r["step"]: r for r in _rows(straight_run) if "loss" in r}
    resumed = {r["step"]: r for r in _rows(str(tmp_path)) if "loss" in r}
    for step in (2, 3):
        for key in ("reward/mean", "loss", "grad_norm", "entropy/anchor_threshold"):
            assert resumed[step][key] == pytest.approx(straight[step][key], rel=1e-5, abs=1e-6), (step, key)
    final = Trainer(tiny_config(**{"train.steps": STEPS}), straight_run)
    for a, b in zip(jax.tree.leaves(second.params), jax.tree.leaves(final.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    second.close()
    final.close()
    # Starting a finished run again changes nothing: no second final evaluation, no new lines.
    lines = _rows(str(tmp_path))
    again = Trainer(tiny_config(**overrides, **{"train.steps": STEPS}), str(tmp_path))
    again.run()
    again.close()
    assert _rows(str(tmp_path)) == lines
    assert sum(1 for r in lines if r["step"] == STEPS and "eval/accuracy" in r) == 1


def test_sigterm_saves_and_stops(tmp_path, monkeypatch):
    def outer_handler(signum, frame):  # the caller's own handler, which run() must put back
        raise AssertionError("the trainer's handler should have caught the signal")

    previous = signal.signal(signal.SIGTERM, outer_handler)
    trainer = Trainer(tiny_config(**{"train.steps": 10, "eval.every": 0, "train.checkpoint_every": 100}),
                      str(tmp_path))
    real_step = trainer.train_step

    def step_then_preempt():
        out = real_step()
        if trainer.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # what a TPU preemption sends
        return out

    monkeypatch.setattr(trainer, "train_step", step_then_preempt)
    trainer.run()
    assert trainer.step == 2                               # finished the step it was in, then stopped
    assert trainer.checkpointer.latest_step() == 2        # and saved it (checkpoint_every is 100)
    assert signal.getsignal(signal.SIGTERM) is outer_handler   # the caller's handler is back
    signal.signal(signal.SIGTERM, previous)
    trainer.close()


def test_eval_and_convert_commands(straight_run, tmp_path, capsys, torch):
    from transformers import Qwen3ForCausalLM

    out_json = tmp_path / "eval.json"
    assert cli.main(["jaxrl-entropy", "eval", f"--checkpoint={straight_run}", f"--out={out_json}"]) == 0
    printed = capsys.readouterr().out
    assert "| synthetic_heldout |" in printed and "mean@2" in printed
    metrics = json.loads(out_json.read_text())
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0

    hf_dir = tmp_path / "hf"
    assert cli.main(["jaxrl-entropy", "convert", f"--checkpoint={straight_run}", f"--to_hf={hf_dir}"]) == 0
    hf = Qwen3ForCausalLM.from_pretrained(str(hf_dir), attn_implementation="eager").eval()
    trainer = Trainer(tiny_config(**{"train.steps": STEPS}), straight_run)
    ids = np.array([[5, 6, 7, 8, 9]])
    from flax import nnx
    ours = nnx.merge(trainer.graphdef, trainer.params)(ids).logits
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4)
    assert (hf_dir / "tokenizer_config.json").exists()
    trainer.close()


def test_eval_of_a_run_applies_command_line_overrides_to_its_config(straight_run, tmp_path, capsys):
    # without --config the run's config.json is used (k = 2 there); --config.eval.k=3 must apply
    out_json = tmp_path / "eval.json"
    assert cli.main(["jaxrl-entropy", "eval", f"--checkpoint={straight_run}", "--config.eval.k=3",
                     f"--out={out_json}"]) == 0
    metrics = json.loads(out_json.read_text())
    assert "eval/synthetic_heldout/mean@3" in metrics and not any(k.endswith("@2") for k in metrics)
    capsys.readouterr()
    # a bad value is refused like any config value, naming the key
    assert cli.main(["jaxrl-entropy", "eval", f"--checkpoint={straight_run}", "--config.eval.k=0"]) != 0
    assert "eval.k" in capsys.readouterr().err


def test_convert_of_a_run_applies_command_line_overrides_to_its_config(straight_run, tmp_path, capsys, caplog):
    # the run's config.json with the override on top: applied (logged), and checked like any value
    hf_dir = tmp_path / "hf"
    with caplog.at_level("INFO", logger="jaxrl_entropy"):
        assert cli.main(["jaxrl-entropy", "convert", f"--checkpoint={straight_run}", f"--to_hf={hf_dir}",
                         "--config.model.logits_chunk=32"]) == 0
    assert "overrides: model.logits_chunk=32" in caplog.text and (hf_dir / "config.json").exists()
    capsys.readouterr()
    assert cli.main(["jaxrl-entropy", "convert", f"--checkpoint={straight_run}", f"--to_hf={tmp_path / 'hf2'}",
                     "--config.rl.group_size=1"]) != 0
    assert "rl.group_size" in capsys.readouterr().err and not (tmp_path / "hf2").exists()


def test_eval_refuses_an_unwritable_out_before_evaluating(straight_run, tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "dir" / "eval.json"
    assert cli.main(["jaxrl-entropy", "eval", f"--checkpoint={straight_run}", f"--out={missing}"]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and str(missing.parent) in err
    assert cli.main(["jaxrl-entropy", "eval", f"--checkpoint={straight_run}", f"--out={tmp_path}"]) == 1
    assert "is a directory" in capsys.readouterr().err


def test_bad_override_fails_before_compiling(capsys):
    code = cli.main(["jaxrl-entropy", "train", "--config.rl.gropu_size=8"])
    assert code != 0
    assert "gropu_size" in capsys.readouterr().err


def test_bad_value_fails_with_the_key(tmp_path, capsys):
    code = cli.main(["jaxrl-entropy", "train", f"--workdir={tmp_path}", "--config.weights.mode=anchors"])
    assert code != 0
    err = capsys.readouterr().err
    assert "weights.mode" in err and "anchor" in err
    assert not os.path.exists(tmp_path / "checkpoints")


def test_malformed_data_file_names_file_and_row(tmp_path):
    from jaxrl_entropy.data.sources import DataError

    path = tmp_path / "train.jsonl"
    good = {"prompt": "1+1=", "reward_model": {"ground_truth": "2"}}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "2+2="}) + "\n")
    from jaxrl_entropy.data.tokenizer import build_demo_tokenizer

    build_demo_tokenizer().save_pretrained(str(tmp_path / "tok"))
    cfg = tiny_config(**{"data.kind": "files", "data.train_files": str(path), "tokenizer": str(tmp_path / "tok")})
    with pytest.raises(DataError) as e:
        Trainer(cfg, str(tmp_path / "run"))
    assert "train.jsonl" in str(e.value) and "row 1" in str(e.value) and "ground_truth" in str(e.value)


def _long_prompt_parquet(tmp_path) -> tuple[str, list[str]]:
    """8 problems for the tiny config's max_prompt_len=25: the chat template adds 19 tokens, so
    rows 2 and 5 (12 characters: 31 tokens) are too long, the rest (4: 23 tokens) fit; the demo
    tokenizer saved next to it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jaxrl_entropy.data.tokenizer import build_demo_tokenizer

    contents = ["1+2=", "3+4=", "What is 5+6?", "7+8=", "9+1=", "Compute 2+3.", "4+4=", "6+1="]
    rows = [{"prompt": [{"role": "user", "content": c}], "reward_model": {"ground_truth": "0"}} for c in contents]
    path = str(tmp_path / "dapo_like.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    build_demo_tokenizer().save_pretrained(str(tmp_path / "tok"))
    return path, ["--config.data.kind=files", f"--config.data.train_files={path}",
                  f"--config.tokenizer={tmp_path / 'tok'}", "--config.train.sft_steps=0", "--config.train.steps=1",
                  "--config.eval.every=0", "--config.data.synthetic.eval_size=0"]


def test_over_long_prompts_stop_the_cli_by_default_and_name_the_way_out(tmp_path, capsys):
    path, flags = _long_prompt_parquet(tmp_path)
    code = cli.main(["jaxrl-entropy", "train", f"--workdir={tmp_path / 'run'}", *TINY_CLI_FLAGS, *flags])
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"{path}, row 2 " in err and "31 tokens" in err and "max_prompt_len=25" in err, err
    assert "--config.data.max_prompt_len=31" in err and "--config.data.truncation=left" in err, err


def test_over_long_prompts_dropped_through_the_cli_are_logged_and_counted(tmp_path, caplog):
    path, flags = _long_prompt_parquet(tmp_path)
    workdir = str(tmp_path / "run")
    with caplog.at_level("WARNING", logger="jaxrl_entropy"):
        code = cli.main(["jaxrl-entropy", "train", f"--workdir={workdir}", *TINY_CLI_FLAGS, *flags,
                         "--config.data.truncation=drop"])
    assert code == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and path in r.getMessage()]
    assert len(warned) == 1 and "2 of 8" in warned[0] and "data.truncation" in warned[0], warned
    first = _rows(workdir)[0]
    assert first["step"] == 0
    assert (first["data/prompts_dropped"], first["data/prompts_truncated"]) == (2, 0)


def test_eval_a_hf_directory(make_hf_qwen3, tmp_path, capsys):
    """`eval --hf=DIR` reads weights and tokenizer from a local HF directory (nothing downloaded)."""
    import shutil

    from jaxrl_entropy.data.tokenizer import build_demo_tokenizer

    _, path = make_hf_qwen3(vocab_size=128, num_hidden_layers=2)
    hf_dir = tmp_path / "hf"
    shutil.copytree(path, hf_dir)
    build_demo_tokenizer().save_pretrained(str(hf_dir))
    code = cli.main(["jaxrl-entropy", "eval", f"--hf={hf_dir}", "--config.data.synthetic.eval_size=8",
                     "--config.eval.k=2", "--config.rollout.max_new_tokens=8", "--config.rl.prompts_per_step=4",
                     "--config.rl.group_size=4", "--config.rl.mini_batch_prompts=4",
                     "--config.rl.micro_batch_size=8", "--config.rl.overlong_buffer=4"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| synthetic_heldout |" in out and '"eval/accuracy"' in out
    # HF → a step-0 run (orbax), whose parameters are the HF tensors (read back with safetensors)
    from safetensors.numpy import load_file
    run = tmp_path / "run"
    assert cli.main(["jaxrl-entropy", "convert", f"--hf={hf_dir}", f"--to_orbax={run}",
                     "--config.rl.prompts_per_step=4", "--config.rl.group_size=4", "--config.rl.mini_batch_prompts=4",
                     "--config.rl.micro_batch_size=8"]) == 0
    assert (run / "checkpoints" / "0").is_dir()
    trainer = Trainer(tiny_config(**{"model.hf_dir": str(hf_dir)}), str(run))
    assert trainer.step == 0 and trainer.sft_done
    hf = load_file(str(hf_dir / "model.safetensors"))
    np.testing.assert_array_equal(np.asarray(trainer.params["layers"][1]["mlp"]["up_proj"]["kernel"]),
                                  hf["model.layers.1.mlp.up_proj.weight"].T)
    trainer.close()
    assert not (run / model_io.CONVERSION_MARKER).exists()

    # a conversion killed before its checkpoint was committed: what it had written is its marker and
    # config.json. `train` refuses it (it would start from random weights); the same command finishes it.
    killed = tmp_path / "killed"
    shutil.copytree(run, killed)
    shutil.rmtree(killed / "checkpoints")
    (killed / model_io.CONVERSION_MARKER).write_text(json.dumps({"hf": str(hf_dir)}))
    with pytest.raises(CheckpointError, match=f"never finished.*convert --hf={hf_dir} --to_orbax={killed}"):
        Trainer(tiny_config(**{"model.hf_dir": str(hf_dir)}), str(killed))
    assert cli.main(["jaxrl-entropy", "convert", f"--hf={hf_dir}", f"--to_orbax={killed}",
                     "--config.rl.prompts_per_step=4", "--config.rl.group_size=4", "--config.rl.mini_batch_prompts=4",
                     "--config.rl.micro_batch_size=8"]) == 0
    assert (killed / "checkpoints" / "0").is_dir() and not (killed / model_io.CONVERSION_MARKER).exists()
    # a workdir without the marker (a real run) is still refused
    assert cli.main(["jaxrl-entropy", "convert", f"--hf={hf_dir}", f"--to_orbax={killed}"]) == 1


def test_a_config_changed_on_resume_is_recorded_where_eval_and_analyze_read_it(tmp_path):
    workdir = str(tmp_path / "run")
    trainer = Trainer(tiny_config(**{"train.steps": 1, "eval.every": 0}), workdir)
    trainer.run()
    trainer.close()
    trainer = Trainer(tiny_config(**{"train.steps": 2, "eval.every": 0, "optim.lr": 5e-4}), workdir)
    trainer.close()
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["optim"]["lr"] == 5e-4 and saved["train"]["steps"] == 2
    history = [json.loads(line) for line in open(os.path.join(workdir, "config_history.jsonl"))]
    assert [h["step"] for h in history] == [1]
    assert any(c.startswith("optim.lr: 0.001 -> 0.0005") for c in history[0]["changes"]), history


def test_top_p_sampling_reports_how_far_the_behaviour_policy_is(straight_run, tmp_path):
    # nucleus sampling keeps at least top_p of the mass: the gap −log(mass kept) lies in [0, −log top_p];
    # top_k = -1 is vLLM's "off"; without truncation (the straight run) the metric is not written
    workdir = str(tmp_path / "run")
    trainer = Trainer(tiny_config(**{"train.steps": 1, "eval.every": 0, "rollout.top_p": 0.8,
                                     "rollout.top_k": -1}), workdir)
    trainer.run()
    trainer.close()
    row = [r for r in _rows(workdir) if "loss" in r][0]
    assert 0.0 < row["rollout/behaviour_logp_gap_mean"] <= row["rollout/behaviour_logp_gap_max"] <= -np.log(0.8) + 1e-5
    assert not any("behaviour_logp_gap" in k for r in _rows(straight_run) for k in r)


def test_eval_of_a_live_run_reads_on_when_its_step_is_rotated_away(straight_run, tmp_path, monkeypatch, caplog):
    # a live run removes (rotates) the step that eval is reading: that is said as such, not called
    # "corrupt", and the newest step on disk is read instead
    import shutil

    from jaxrl_entropy.rundir import checkpoint as ckpt

    workdir = str(tmp_path / "live")
    shutil.copytree(straight_run, workdir)
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert len(steps) >= 2, steps
    verify = ckpt.Checkpointer.verify
    rotated = []

    def rotate_then_verify(self, step):
        if not rotated:
            rotated.append(step)
            shutil.rmtree(self.step_dir(step))
        return verify(self, step)

    monkeypatch.setattr(ckpt.Checkpointer, "verify", rotate_then_verify)
    _, _, step, _ = model_io.policy_from_run(None, workdir)
    assert rotated == [steps[-1]] and step == steps[-2]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"step {steps[-1]}" in said and "rotated" in said and "corrupt" not in said


def test_geometry_at_consecutive_steps_with_halves_and_a_token_count_curve(tmp_path):
    workdir = str(tmp_path / "run")
    trainer = Trainer(tiny_config(**{"train.steps": 3, "eval.every": 0, "train.geometry_every": 2,
                                     "train.geometry_consecutive": True, "train.geometry_halves": True,
                                     "train.geometry_random_fractions": (0.5,)}), workdir)
    trainer.run()
    trainer.close()
    rows = {r["step"]: r for r in _rows(workdir) if "loss" in r}
    assert [s for s in sorted(rows) if "geometry/full/cos_full" in rows[s]] == [0, 1, 2]
    assert "geometry/steps_since_prev" not in rows[0]
    assert rows[1]["geometry/steps_since_prev"] == 1 and rows[2]["geometry/steps_since_prev"] == 1
    assert "geometry/anchor/cos_prev" in rows[1]
    for r in rows.values():
        assert r["geometry/full/cos_full"] == pytest.approx(1.0, abs=1e-5)
        assert -1.0 <= r["geometry/anchor/cos_halves"] <= 1.0
        assert abs(r["geometry/random@0.5/tokens"] - r["geometry/full/tokens"] / 2) <= 1
        assert not any("#half" in k for k in r)


def test_the_geometry_probe_only_measures_training_is_unchanged(tmp_path):
    # the study runs the probe in some variants only: a run with every probe option must train
    # exactly as one without (same rollouts, losses and updates)
    logged = {}
    for name, extra in (("plain", {"train.geometry_every": 0}),
                        ("probed", {"train.geometry_every": 1, "train.geometry_consecutive": True,
                                    "train.geometry_halves": True, "train.geometry_layers": (0,),
                                    "train.geometry_random_fractions": (0.5,)})):
        workdir = str(tmp_path / name)
        trainer = Trainer(tiny_config(**{"train.steps": 2, "eval.every": 2, **extra}), workdir)
        trainer.run()
        trainer.close()
        logged[name] = [{k: v for k, v in r.items() if not k.startswith(("geometry/", "controls/", "time"))}
                        for r in _rows(workdir)]
    assert any("geometry/full/cos_full" in r for r in _rows(str(tmp_path / "probed")))
    assert logged["probed"] == logged["plain"]


def test_geometry_layers_split_anchors_by_each_layer_alone(tmp_path):
    # the tiny model has 2 layers and trains on layer 1's entropy (entropy.layers = 0.55 → 1):
    # layer 1's own split must be the training split, layer 0's the same size but other tokens
    workdir = str(tmp_path / "run")
    trainer = Trainer(tiny_config(**{"train.steps": 2, "eval.every": 0, "train.geometry_every": 1,
                                     "train.geometry_layers": (0, 1)}), workdir)
    trainer.run()
    trainer.close()
    rows = [r for r in _rows(workdir) if "geometry/full/cos_full" in r]
    assert len(rows) == 2
    for r in rows:
        for m in ("cos_full", "norm", "tokens"):
            assert r[f"geometry/anchor@L1/{m}"] == pytest.approx(r[f"geometry/anchor/{m}"], rel=1e-4)
            assert r[f"geometry/explorer@L1/{m}"] == pytest.approx(r[f"geometry/explorer/{m}"], rel=1e-4)
        assert r["geometry/anchor@L0/tokens"] == r["geometry/anchor/tokens"]
        assert r["geometry/anchor@L0/cos_full"] != pytest.approx(r["geometry/anchor/cos_full"], rel=1e-3)


def test_a_damaged_config_json_on_resume_is_one_line_naming_it(straight_run, tmp_path, capsys):
    import shutil
    workdir = tmp_path / "copy"
    shutil.copytree(straight_run, workdir)
    (workdir / "config.json").write_text((workdir / "config.json").read_text()[:40])  # cut mid-write
    code = cli.main(["jaxrl-entropy", "train", f"--workdir={workdir}", *TINY_CLI_FLAGS,
                     f"--config.train.steps={STEPS + 1}"])
    err = capsys.readouterr().err
    assert code == 1 and "config.json is damaged" in err and "Traceback" not in err, err
