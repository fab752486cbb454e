"""`train --multihost` with 2 processes × 4 CPU devices on this machine (a local coordinator, gloo
collectives): it trains with evaluation at step 0; SIGTERM to one process makes both save the same
step and exit 0; starting again resumes to exactly what an uninterrupted 2-process run gives."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

import jax

from conftest import REPO_ROOT, TINY_CLI_FLAGS, metrics_rows

pytestmark = pytest.mark.slow  # end to end: CLI processes and whole training runs

ROOT = str(REPO_ROOT)
STEPS = 4
FLAGS = [*TINY_CLI_FLAGS, "--config.train.sft_steps=0", "--config.eval.every=100",  # evaluates at step 0 only
         "--config.train.checkpoint_every=100"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir: str, steps: int, logs: str) -> list[subprocess.Popen]:
    # the compilation cache comes with the environment (conftest): the three runs compile the same programs
    flags = [f for f in os.environ["XLA_FLAGS"].split() if not f.startswith("--xla_force_host_platform_device_count")]
    # XLA:CPU reports a collective whose local devices have waited 60 s in its rendezvous (which of
    # them arrived), so that a hang's log says what it waited for
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=4",
                                           "--xla_cpu_collective_call_warn_stuck_timeout_seconds=60"]))
    port = _free_port()
    procs = []
    for i in range(2):
        out = open(f"{logs}.{i}.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "jaxrl_entropy.cli", "train", "--multihost",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
             f"--workdir={workdir}", *FLAGS, f"--config.train.steps={steps}"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        proc.log_path = out.name
        procs.append(proc)
    return procs


def _tail(path: str, lines: int = 60) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _wait(procs, timeout: float = 900, idle: float = 480, straggle: float = 90, hung=None) -> list[int]:
    """Exit codes of `procs`, or a failure with both processes' last log lines as soon as the pair
    looks hung: no log output from either for `idle` s (an idle collective), one process still
    running `straggle` s after the other exited (its peer will never answer), or `timeout` s in all."""
    start = time.time()
    sizes = [-1] * len(procs)
    last_output = start
    first_exit = None
    while True:
        now = time.time()
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes
        new_sizes = [os.path.getsize(p.log_path) for p in procs]
        if new_sizes != sizes:
            sizes, last_output = new_sizes, now
        if first_exit is None and any(c is not None for c in codes):
            first_exit = now
        why = (f"no output from either process for {idle:.0f} s" if now - last_output > idle else
               f"one process exited ({codes}) and the other is still running {straggle:.0f} s later"
               if first_exit is not None and now - first_exit > straggle else
               f"not finished after {timeout:.0f} s" if now - start > timeout else None)
        if why:
            _dump_stacks(procs)
            for p in procs:
                p.kill()
                p.wait()
            tails = "\n".join(f"--- process {i} ({p.log_path}), last lines:\n{_tail(p.log_path)}"
                              for i, p in enumerate(procs))
            if hung is not None:
                raise hung(f"{why}\n{tails}")
            pytest.fail(f"multi-process run hung: {why}\n{tails}")
        time.sleep(0.25)


def _dump_stacks(procs) -> None:
    """Ask each live process for its Python stacks (the CLI prints them on SIGUSR1) before it is
    killed, so that a hang's log says where each process waited."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.send_signal(signal.SIGUSR1)
    if live:
        time.sleep(3)


def _metrics_steps(workdir: str) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(re.search(r'"step": (\d+)', line).group(1)) for line in f if line.endswith("\n")]


class _Hung(Exception):
    pass


def _straight_run(workdir: str, logs: str) -> list[int]:
    """The uninterrupted run, launched a second time if the first pair hangs. A pair of CPU processes
    sometimes waits forever in its first 8-rank gloo collective (about 1 run in 20 on the 2-core
    machines, both processes silent right after the engine is built; not understood yet, see
    docs/testing.md): a hang twice in a row still fails, with both logs."""
    import shutil
    for attempt in range(2):
        try:
            return _wait(_launch(workdir, STEPS, f"{logs}.{attempt}"), hung=_Hung if attempt == 0 else None)
        except _Hung as e:  # a warning, so that the first attempt's stacks reach the run's summary
            warnings.warn(f"multihost: the first attempt hung and was launched again: {e}")
            shutil.rmtree(workdir, ignore_errors=True)
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    straight, stopped = str(base / "straight"), str(base / "stopped")
    out = {"straight": straight, "stopped": stopped, "logs": str(base / "log")}
    out["straight_codes"] = _straight_run(straight, f"{out['logs']}.straight")

    # SIGTERM to process 1 (not the one that writes metrics) once step 0 is done; a larger
    # train.steps so that the stop, not the end of the run, ends it wherever the signal lands
    procs = _launch(stopped, 1000, f"{out['logs']}.stopped")
    deadline = time.time() + 900
    while 0 not in _metrics_steps(stopped) and time.time() < deadline and procs[0].poll() is None:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    out["stopped_codes"] = _wait(procs)
    out["stopped_logs"] = [open(f"{out['logs']}.stopped.{i}.log").read() for i in range(2)]

    out["resumed_codes"] = _wait(_launch(stopped, STEPS, f"{out['logs']}.resumed"))
    out["resumed_logs"] = [open(f"{out['logs']}.resumed.{i}.log").read() for i in range(2)]
    return out


def test_two_processes_train_with_evaluation_at_step_0(runs):
    assert runs["straight_codes"] == [0, 0]
    rows = metrics_rows(runs["straight"])
    assert [r["step"] for r in rows if "loss" in r] == list(range(STEPS))
    assert 0 <= rows[0]["eval/accuracy"] <= 1 and "reward/mean" in rows[0]


def test_sigterm_to_one_process_makes_both_save_the_same_step_and_exit_0(runs):
    assert runs["stopped_codes"] == [0, 0], runs["stopped_logs"]
    saved = [re.findall(r"saved checkpoint at step (\d+)", log) for log in runs["stopped_logs"]]
    assert saved[0] == saved[1] and len(saved[0]) == 1, saved   # process 0 logs it; so does process 1
    step = int(saved[0][0])
    assert 1 <= step < STEPS, f"the stop landed at step {step}; the test needs it before {STEPS}"
    assert "received signal SIGTERM" in runs["stopped_logs"][1]
    assert "received signal" not in runs["stopped_logs"][0]
    assert all(f"stopped at step {step} on request" in log for log in runs["stopped_logs"])


def test_the_resumed_run_equals_the_uninterrupted_one(runs):
    from jaxrl_entropy.training import model_io

    assert runs["resumed_codes"] == [0, 0], runs["resumed_logs"]
    straight = {r["step"]: r for r in metrics_rows(runs["straight"]) if "loss" in r}
    resumed = {r["step"]: r for r in metrics_rows(runs["stopped"]) if "loss" in r}
    assert sorted(resumed) == list(range(STEPS))
    for step in range(STEPS):
        for key in ("loss", "reward/mean", "grad_norm", "entropy/anchor_threshold", "approx_kl"):
            assert resumed[step][key] == pytest.approx(straight[step][key], rel=1e-6, abs=1e-7), (step, key)
    _, a, step_a, _ = model_io.policy_from_run(None, runs["straight"])
    _, b, step_b, _ = model_io.policy_from_run(None, runs["stopped"])
    assert step_a == step_b == STEPS
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_watchdog_fails_fast_with_both_logs_when_one_process_is_left_waiting(tmp_path):
    procs = []
    for i, code in enumerate(["print('step 0 done', flush=True)",
                              "import time; print('waiting in a collective', flush=True); time.sleep(600)"]):
        out = open(tmp_path / f"{i}.log", "w")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT)
        proc.log_path = out.name
        procs.append(proc)
    start = time.time()
    with pytest.raises(pytest.fail.Exception) as failure:
        _wait(procs, timeout=120, idle=60, straggle=2)
    assert time.time() - start < 30
    message = str(failure.value)
    assert "still running" in message and "step 0 done" in message and "waiting in a collective" in message
    assert procs[1].poll() is not None   # killed, not left behind


def test_the_watchdog_can_hand_a_hang_to_the_caller_for_a_second_attempt(tmp_path):
    procs = []
    for i in range(2):
        out = open(tmp_path / f"{i}.log", "w")
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], stdout=out,
                                stderr=subprocess.STDOUT)
        proc.log_path = out.name
        procs.append(proc)
    with pytest.raises(_Hung, match="no output"):
        _wait(procs, timeout=120, idle=2, straggle=60, hung=_Hung)
    assert all(p.poll() is not None for p in procs)   # both killed before the caller retries
