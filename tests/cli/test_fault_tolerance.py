"""Nothing lost, nothing silent, through the CLI on a tiny model: one job per workdir, damaged
checkpoints named (or an explicit fallback), a run that skips every update stops, stop requests
honoured in every phase (warm-up, rollout, evaluation, export) and resumed exactly, read-only
commands that do not write, writability checked at start, a full disk as one message."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import jax

from conftest import REPO_ROOT, TINY_CLI_FLAGS, metrics_rows, tiny_config
from jaxrl_entropy import cli

pytestmark = pytest.mark.slow  # end to end: CLI processes and whole training runs

ROOT = str(REPO_ROOT)
TINY = [*TINY_CLI_FLAGS, "--config.train.sft_steps=0", "--config.eval.every=0"]


def _env() -> dict:
    """A subprocess like this test session: same fake devices, same compilation cache (both in the
    environment, see conftest)."""
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")


def _cli(args: list[str], *, prefix: tuple[str, ...] = (), timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "jaxrl_entropy.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=_env(), cwd=ROOT)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A 2-step run with a checkpoint after each step (steps 1 and 2). Tests copy it before changing it."""
    workdir = str(tmp_path_factory.mktemp("base") / "run")
    assert cli.main(["jaxrl-entropy", "train", f"--workdir={workdir}", *TINY, "--config.train.steps=2",
                     "--config.train.checkpoint_every=1"]) == 0
    return workdir


def _copy(run: str, tmp_path) -> str:
    dst = str(tmp_path / "run")
    shutil.copytree(run, dst)
    return dst


def _snapshot(directory: str) -> dict:
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, directory)] = (hashlib.sha256(open(p, "rb").read()).hexdigest(),
                                                  os.stat(p).st_mtime_ns)
    return out


def _largest_data_file(step_dir: str) -> str:
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs if "/d/" in os.path.join(r, f)]
    return max(files, key=os.path.getsize)


# ---------------------------------------------------------------------------------- one writer
def test_a_second_job_on_a_workdir_exits_at_once_naming_the_holder(tmp_path, capsys):
    from jaxrl_entropy.rundir.locking import WorkdirLock

    workdir = str(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom jaxrl_entropy.rundir.locking import WorkdirLock\n"
         "lock = WorkdirLock(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(600)", workdir],
        stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = cli.main(["jaxrl-entropy", "train", f"--workdir={workdir}", *TINY, "--config.train.steps=1"])
        err = capsys.readouterr().err
        assert code == 1
        assert "WorkdirBusyError" in err and f"process {holder.pid} on host" in err and "in use" in err
        assert sorted(os.listdir(workdir)) == [".lock", "checkpoints"]  # nothing of the run was written
    finally:
        holder.kill()  # kill -9: the kernel releases the lock with the process
        holder.wait()
    WorkdirLock(workdir).release()


def test_lease_on_object_stores_refuses_a_live_holder_and_expires_after_a_dead_one(tmp_path):
    """The gs:// lease, exercised on a local path (it only uses fileio's read/write)."""
    from jaxrl_entropy.rundir.locking import LEASE_FILE, WorkdirBusyError, WorkdirLock

    first = WorkdirLock(str(tmp_path), mode="lease", settle_s=0, heartbeat_s=3600)
    with pytest.raises(WorkdirBusyError) as e:
        WorkdirLock(str(tmp_path), mode="lease", settle_s=0)
    assert f"process {os.getpid()}" in str(e.value) and "expire" in str(e.value)
    path = tmp_path / LEASE_FILE
    lease = json.loads(path.read_text())
    lease["heartbeat"] -= 301  # its holder died 5 minutes ago: no renewal since
    path.write_text(json.dumps(lease))
    second = WorkdirLock(str(tmp_path), mode="lease", settle_s=0, heartbeat_s=3600)
    assert json.loads(path.read_text())["token"] != lease["token"]
    first.release()                 # not its lease any more: leaves it alone
    assert path.exists()
    second.release()
    assert not path.exists()


# ---------------------------------------------------------------------------------- damaged checkpoints
def test_a_corrupted_latest_checkpoint_is_one_paragraph_naming_step_and_file(base_run, tmp_path):
    workdir = _copy(base_run, tmp_path)
    step_dir = os.path.join(workdir, "checkpoints", "2")
    target = _largest_data_file(step_dir)
    data = bytearray(open(target, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    open(target, "wb").write(bytes(data))
    before = _snapshot(workdir)
    out = _cli(["train", f"--workdir={workdir}", *TINY, "--config.train.steps=3"])
    assert out.returncode == 1
    err = out.stderr.strip()
    assert "CheckpointCorruptError" in err and "step 2" in err and os.path.relpath(target, step_dir) in err
    assert "on_corrupt_checkpoint=fallback" in err
    assert "Traceback" not in err and "Event loop is closed" not in err and len(err.splitlines()) <= 3, err
    after = _snapshot(workdir)
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


def test_missing_state_is_one_paragraph_too(base_run, tmp_path):
    workdir = _copy(base_run, tmp_path)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "2", "state"))
    out = _cli(["train", f"--workdir={workdir}", *TINY, "--config.train.steps=3"])
    err = out.stderr.strip()
    assert out.returncode == 1 and "step 2" in err and "state/" in err and "missing" in err
    assert "Traceback" not in err and "Event loop is closed" not in err and len(err.splitlines()) <= 3, err


def test_fallback_resumes_from_the_newest_intact_step_and_says_so(base_run, tmp_path, caplog):
    workdir = _copy(base_run, tmp_path)
    os.remove(_largest_data_file(os.path.join(workdir, "checkpoints", "2")))
    # train.steps=1: the resumed run is already at step 1, so nothing is compiled
    code = cli.main(["jaxrl-entropy", "train", f"--workdir={workdir}", *TINY, "--config.train.steps=1",
                     "--config.train.on_corrupt_checkpoint=fallback"])
    assert code == 0
    assert "checkpoint step 2" in caplog.text and "Falling back" in caplog.text
    assert "resumed from step 1" in caplog.text
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2.corrupt"]


# ---------------------------------------------------------------------------------- non-finite updates
def test_a_run_that_skips_every_update_stops_with_an_error(base_run, tmp_path, capsys):
    """Non-finite parameters (damaged weights that still pass the checksum: saved that way) make
    every update non-finite; the run stops after train.max_skipped_steps such steps, non-zero."""
    from jaxrl_entropy.training.trainer import Trainer

    workdir = _copy(base_run, tmp_path)
    trainer = Trainer(tiny_config(**{"train.steps": 2, "eval.every": 0}), workdir)
    trainer.params = jax.tree.map(lambda x: x * np.nan, trainer.params)
    trainer.checkpointer.delete(2)
    trainer.save()
    trainer.close()
    code = cli.main(["jaxrl-entropy", "train", f"--workdir={workdir}", *TINY, "--config.train.steps=8",
                     "--config.train.max_skipped_steps=2", "--config.train.checkpoint_every=1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "TrainingDivergedError" in err and "steps 2..3" in err and "max_skipped_steps=2" in err
    rows = {r["step"]: r for r in metrics_rows(workdir)}
    updates = 4 // 2  # rl.prompts_per_step / rl.mini_batch_prompts
    assert rows[2]["skipped_updates"] == rows[3]["skipped_updates"] == updates
    assert max(rows) == 3
    assert 4 not in [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]


# ---------------------------------------------------------------------------------- stop requests
def test_stop_requests_are_agreed_across_processes_and_a_second_ctrl_c_aborts():
    from jaxrl_entropy.rundir.preemption import PreemptionGuard, StopRequested

    others = [False]
    guard = PreemptionGuard(agree=lambda mine: mine or others[0])  # stands in for the all-gather
    previous = signal.getsignal(signal.SIGINT)
    with guard:
        assert not guard.should_stop()
        others[0] = True                      # another process was signalled, this one was not
        assert not guard.requested and guard.should_stop()
        others[0] = False
        with pytest.raises(StopRequested):    # once agreed it stays agreed (no second collective)
            guard.check()
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            signal.getsignal(signal.SIGINT)   # the handler runs here at the latest
    assert signal.getsignal(signal.SIGINT) is previous


def test_multihost_flags_need_multihost(capsys):
    assert cli.main(["jaxrl-entropy", "train", "--num_processes=2", "--process_id=0"]) == 1
    assert "--multihost" in capsys.readouterr().err


def _signal_on_call(monkeypatch, obj, name, when):
    """Wrap obj.name: SIGTERM to this process during the call for which `when(call_index)` is true
    (the trainer's handler records it; the phase notices at its next boundary)."""
    real = getattr(obj, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if when(len(calls) - 1):
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


def test_sigterm_in_the_warm_up_saves_its_progress_and_resumes_to_the_same_parameters(tmp_path, monkeypatch):
    from jaxrl_entropy.training.trainer import Trainer
    from jaxrl_entropy.training.warmup import WARMUP_DIR

    cfg = dict(**{"train.steps": 0, "train.sft_steps": 5, "train.sft_batch_size": 8,
                  "train.sft_target_accuracy": 0.0, "eval.every": 0})
    straight = Trainer(tiny_config(**cfg), str(tmp_path / "straight"))
    straight.run()
    straight.close()

    workdir = str(tmp_path / "stopped")
    first = Trainer(tiny_config(**cfg), workdir)
    _signal_on_call(monkeypatch, first.preemption, "should_stop", lambda i: i == 2)  # asked before each step
    first.run()
    assert not first.sft_done and first.checkpointer.latest_step() is None
    first.close()
    assert sorted(os.listdir(os.path.join(workdir, WARMUP_DIR))) == ["2"]  # steps 0 and 1 done
    second = Trainer(tiny_config(**cfg), workdir)
    assert second._warmup_resume.step == 2
    second.run()
    second.close()
    assert second.sft_done and second.checkpointer is None
    assert not os.path.exists(os.path.join(workdir, WARMUP_DIR))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["0"]
    for x, y in zip(jax.tree.leaves(straight.params), jax.tree.leaves(second.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert metrics_rows(workdir)[-1]["sft/steps"] == metrics_rows(str(tmp_path / "straight"))[-1]["sft/steps"] == 5


def test_stops_mid_rollout_and_mid_evaluation_resume_to_the_uninterrupted_run(tmp_path, monkeypatch):
    """Stop 1: in step 1's rollout after a generation batch was drawn (what dynamic sampling's
    between-batch check raises): the data position goes back to the step's start. Stop 2: SIGTERM
    during step 2's first evaluation batch: the evaluation stops before its second batch. Each
    saves the last completed step and returns; the resumed run equals an uninterrupted one."""
    from jaxrl_entropy.rundir.preemption import StopRequested
    from jaxrl_entropy.training.trainer import Trainer

    cfg = {"train.steps": 3, "eval.every": 2, "data.synthetic.eval_size": 24, "train.checkpoint_every": 100}
    straight_dir, workdir = str(tmp_path / "straight"), str(tmp_path / "stopped")
    straight = Trainer(tiny_config(**cfg), straight_dir)
    straight.run()

    first = Trainer(tiny_config(**cfg), workdir)
    real_collect = first.collector.collect

    def collect_then_stop(step, sample, should_stop=None):
        if step == 1:
            next(first.batcher)  # a generation batch was drawn before the stop
            raise StopRequested(signal.SIGTERM)
        return real_collect(step, sample, should_stop=should_stop)

    monkeypatch.setattr(first.collector, "collect", collect_then_stop)
    first.run()
    assert first.step == 1 and first.checkpointer.latest_step() == 1
    first.close()

    second = Trainer(tiny_config(**cfg), workdir)
    assert second.step == 1 and second.batcher.get_state()["batches_consumed"] == 1
    eval_calls = []
    real_sampler = second.sampler

    def sampler(params, ids, mask, key, sp):
        if second.step == 2:  # step 2 begins with its evaluation (3 batches of 8 problems)
            eval_calls.append(1)
            if len(eval_calls) == 1:
                os.kill(os.getpid(), signal.SIGTERM)
        return real_sampler(params, ids, mask, key, sp)

    sampler.release = real_sampler.release  # the trainer frees the engine's weights after each rollout
    monkeypatch.setattr(second, "sampler", sampler)
    second.run()
    assert second.step == 2 and len(eval_calls) == 1 and second.checkpointer.latest_step() == 2
    second.close()

    third = Trainer(tiny_config(**cfg), workdir)
    assert third.step == 2
    third.run()
    rows = {(r["step"], "loss" in r): r for r in metrics_rows(workdir)}
    ref = {(r["step"], "loss" in r): r for r in metrics_rows(straight_dir)}
    assert sorted(rows) == sorted(ref)
    for key, r in ref.items():
        for name in ("loss", "reward/mean", "grad_norm", "eval/accuracy"):
            if name in r:
                assert rows[key][name] == pytest.approx(r[name], rel=1e-6, abs=1e-7), (key, name)
    for x, y in zip(jax.tree.leaves(straight.params), jax.tree.leaves(third.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    straight.close()
    third.close()


def test_dynamic_sampling_stops_between_generation_batches():
    """The rollout asks before each further generation batch; a stop there drops the partial batch."""
    from jaxrl_entropy.training import data_setup
    from jaxrl_entropy.data.pipeline import PromptBatcher
    from jaxrl_entropy.models.sampler import SampleOutput
    from jaxrl_entropy.rundir.preemption import StopRequested
    from jaxrl_entropy.training.rollout import RolloutCollector

    cfg = tiny_config(**{"rl.dynamic_sampling": True, "rl.max_gen_batches": 5})
    tok = data_setup.tokenizer_for(cfg)
    records, _, _ = data_setup.datasets(cfg)
    batcher = PromptBatcher(records, tok, batch_size=4, max_prompt_len=64, seed=0)
    collector = RolloutCollector(cfg, tok, batcher, records, None, (tok.eos_token_id,))
    calls, asked = [], []

    def sample(ids, mask, key, sp):  # every response empty: every group constant, never enough
        calls.append(1)
        n = ids.shape[0]
        return SampleOutput(tokens=np.full((n, 4), tok.pad_token_id, np.int32), lengths=np.zeros(n, np.int32),
                            logprobs=np.zeros((n, 4), np.float32), finished=np.ones(n, bool))

    def should_stop():
        asked.append(1)
        return True

    with pytest.raises(StopRequested):
        collector.collect(0, sample, should_stop=should_stop)
    assert len(calls) == 1 and len(asked) == 1


def test_a_stopped_export_leaves_the_target_as_it_was(base_run, tmp_path):
    from jaxrl_entropy.training import model_io
    from jaxrl_entropy.rundir.preemption import PreemptionGuard, StopRequested

    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")
    before = _snapshot(str(out))
    guard = PreemptionGuard()

    def signal_then_ask():
        os.kill(os.getpid(), signal.SIGTERM)
        return guard.should_stop()

    with guard, pytest.raises(StopRequested):
        model_io.checkpoint_to_hf(None, base_run, str(out), overwrite=True, should_stop=signal_then_ask,
                                  max_shard_bytes=4096)  # many shards: a boundary to stop at
    assert _snapshot(str(out)) == before
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no staging directory left


# ---------------------------------------------------------------------------------- read-only commands
def test_eval_does_not_touch_the_run(base_run, capsys):
    before = _snapshot(base_run)
    code = cli.main(["jaxrl-entropy", "eval", f"--checkpoint={base_run}",
                     f"--config={os.path.join(ROOT, 'jaxrl_entropy', 'presets.py')}", *TINY])
    assert code == 0 and "eval/accuracy" in capsys.readouterr().out
    assert _snapshot(base_run) == before


def test_convert_refuses_a_non_empty_target_and_overwrite_replaces_it_whole(base_run, tmp_path, capsys):
    from safetensors.numpy import load_file

    from jaxrl_entropy.training import model_io

    out = tmp_path / "hf"
    out.mkdir()
    stale = np.zeros((3, 3), np.float32)
    from safetensors.numpy import save_file
    save_file({"model.embed_tokens.weight": stale}, str(out / "model-00001-of-00002.safetensors"))
    save_file({"lm_head.weight": stale}, str(out / "model-00002-of-00002.safetensors"))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    (out / "config.json").write_text("{}")
    before = _snapshot(str(out))

    assert cli.main(["jaxrl-entropy", "convert", f"--checkpoint={base_run}", f"--to_hf={out}"]) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert _snapshot(str(out)) == before

    assert cli.main(["jaxrl-entropy", "convert", f"--checkpoint={base_run}", f"--to_hf={out}", "--overwrite"]) == 0
    files = sorted(os.listdir(out))
    assert "model.safetensors" in files and not any(f.startswith("model-0000") or f.endswith("index.json")
                                                    for f in files)
    _, policy, step, _ = model_io.policy_from_run(None, base_run)
    assert step == 2
    np.testing.assert_array_equal(load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"],
                                  np.asarray(policy.params["embed_tokens"]))

    foreign = tmp_path / "not_hf"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert cli.main(["jaxrl-entropy", "convert", f"--checkpoint={base_run}", f"--to_hf={foreign}",
                     "--overwrite"]) == 1
    assert "not part of an HF export" in capsys.readouterr().err
    assert os.listdir(foreign) == ["notes.txt"]


# ---------------------------------------------------------------------------------- storage
def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _in_namespace(setup: str) -> tuple[str, ...]:
    """Run the CLI after `setup` in a private user+mount namespace (mounts without root)."""
    return ("unshare", "-rm", "sh", "-c", f'{setup} && exec "$@"', "sh")


def test_a_read_only_checkpoint_directory_is_found_before_the_first_step(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    ck = workdir / "checkpoints"
    if os.geteuid() != 0:
        os.chmod(ck, 0o555)
        prefix = ()
    elif _can_unshare():  # root ignores permissions: a read-only bind mount stops root too
        prefix = _in_namespace(f"mount --bind {ck} {ck} && mount -o remount,bind,ro {ck}")
    else:
        pytest.skip("running as root without user namespaces: no way to make a directory read-only")
    out = _cli(["train", f"--workdir={workdir}", *TINY, "--config.train.steps=2"], prefix=prefix)
    os.chmod(ck, 0o755)
    assert out.returncode == 1
    assert "checkpoint directory" in out.stderr and str(ck) in out.stderr and "not writable" in out.stderr
    assert not (workdir / "metrics.jsonl").exists()  # found before anything ran


@pytest.mark.skipif(not _can_unshare(), reason="needs user namespaces for a small tmpfs")
def test_a_full_disk_is_one_clear_message(tmp_path):
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    out = _cli(["train", f"--workdir={mnt}/run", *TINY, "--config.train.steps=2", "--config.train.checkpoint_every=1"],
               prefix=_in_namespace(f"mount -t tmpfs -o size=200k none {mnt}"))
    err = out.stderr.strip()
    assert out.returncode == 1
    assert "disk is full" in err and "checkpoint step 1" in err
    assert "Traceback" not in err and "never retrieved" not in err and len(err.splitlines()) <= 6, err
