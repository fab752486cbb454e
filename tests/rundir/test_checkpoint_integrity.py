"""Checkpoints you can verify: a checksum manifest written after orbax commits, checked on restore;
damage named in one paragraph (or an explicit fallback); rotation that never drops the last good
step; a failed save (full disk) as one clear error."""
import json
import os
import shutil

import numpy as np
import pytest

import jax.numpy as jnp

from jaxrl_entropy.rundir import checkpoint as ck
from jaxrl_entropy.rundir.checkpoint import (MANIFEST, Checkpointer, CheckpointCorruptError, CheckpointWriteError)


def _state(value: float):
    """Incompressible arrays (constant ones would be inlined into orbax's index, leaving no data file)."""
    rng = np.random.default_rng(int(value * 1000))
    return {"params": {"w": jnp.asarray(rng.standard_normal((64, 32), np.float32)),
                       "b": jnp.arange(32, dtype=jnp.float32) + value},
            "opt_state": {"mu": jnp.asarray(rng.standard_normal((64, 32), np.float32))}}


def _largest_data_file(step_dir: str) -> str:
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs if "/d/" in os.path.join(r, f)]
    return max(files, key=os.path.getsize)


@pytest.fixture
def saved(tmp_path):
    """Steps 1 and 2 of a small state, saved and closed; returns the checkpoint directory."""
    directory = str(tmp_path / "checkpoints")
    c = Checkpointer(directory, keep=3)
    c.save(1, _state(1.0), {"step": 1})
    c.save(2, _state(2.0), {"step": 2})
    c.close()
    return directory


def test_manifest_lists_every_file_with_its_sha256(saved):
    import hashlib
    step_dir = os.path.join(saved, "2")
    manifest = json.load(open(os.path.join(step_dir, MANIFEST)))
    on_disk = sorted(os.path.relpath(os.path.join(r, f), step_dir)
                     for r, _, fs in os.walk(step_dir) for f in fs if f != MANIFEST)
    assert sorted(manifest["files"]) == on_disk
    for rel, entry in manifest["files"].items():
        data = open(os.path.join(step_dir, rel), "rb").read()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["healthy"] is True and manifest["step"] == 2


def _flip_middle(path, n=64):
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    open(path, "wb").write(bytes(data))


DAMAGE = {
    "flipped bytes": lambda d: _flip_middle(_largest_data_file(d)),
    "truncated data": lambda d: open(_largest_data_file(d), "r+b").truncate(100),
    "missing data": lambda d: os.remove(_largest_data_file(d)),
    "missing orbax manifest": lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
    "missing _METADATA": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "missing state/": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "garbled checksum manifest": lambda d: open(os.path.join(d, MANIFEST), "w").write("{not json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_to_the_latest_step_is_one_error_naming_step_and_file(saved, damage):
    step_dir = os.path.join(saved, "2")
    named = {"missing state/": "state/", "garbled checksum manifest": MANIFEST,
             "missing orbax manifest": "state/manifest.ocdbt", "missing _METADATA": "state/_METADATA"}.get(
        damage, os.path.relpath(_largest_data_file(step_dir), step_dir))
    DAMAGE[damage](step_dir)
    c = Checkpointer(saved)
    with pytest.raises(CheckpointCorruptError) as e:
        c.restore_latest(_state(0.0), on_corrupt="fail")
    msg = str(e.value)
    assert "step 2" in msg and named in msg and "on_corrupt_checkpoint=fallback" in msg and "\n" not in msg
    assert c.all_steps() == [1, 2]  # "fail" moves nothing
    c.close()


def test_fallback_restores_the_newest_intact_step_and_keeps_the_damaged_one_aside(saved):
    _flip_middle(_largest_data_file(os.path.join(saved, "2")))
    c = Checkpointer(saved)
    step, state, meta = c.restore_latest(_state(0.0), on_corrupt="fallback")
    assert step == 1 and meta == {"step": 1}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.asarray(_state(1.0)["params"]["w"]))
    assert c.all_steps() == [1] and os.path.isdir(os.path.join(saved, "2.corrupt"))
    c.save(2, _state(5.0), {"step": 2})  # the re-run step saves without colliding with the damaged copy
    assert c.all_steps() == [1, 2]
    c.close()


def test_unverified_step_restores_with_a_warning_and_damage_orbax_finds_is_still_one_error(saved, caplog):
    os.remove(os.path.join(saved, "2", MANIFEST))  # e.g. killed between orbax's commit and the manifest
    c = Checkpointer(saved)
    step, state, _ = c.restore_latest(_state(0.0))
    assert step == 2 and "unverified" in caplog.text
    np.testing.assert_array_equal(np.asarray(state["opt_state"]["mu"]), np.asarray(_state(2.0)["opt_state"]["mu"]))
    c.close()
    open(_largest_data_file(os.path.join(saved, "2")), "r+b").truncate(100)
    c = Checkpointer(saved)
    with pytest.raises(CheckpointCorruptError) as e:
        c.restore(2, _state(0.0))
    assert "step 2" in str(e.value) and "could not be read" in str(e.value) and "\n" not in str(e.value)
    c.close()


def test_rotation_never_drops_the_last_healthy_step(tmp_path):
    c = Checkpointer(str(tmp_path), keep=1)
    c.save(1, _state(1.0), {}, healthy=True)
    c.save(2, _state(1.0), {}, healthy=False)   # a run skipping every update
    c.save(3, _state(1.0), {}, healthy=False)
    assert c.all_steps() == [1, 3]
    assert c.newest_healthy_step() == 1
    c.save(4, _state(2.0), {}, healthy=True)     # healthy again: the old one may go
    assert c.all_steps() == [4]
    c.close()
    assert Checkpointer(str(tmp_path), read_only=True).healthy(4)


def test_read_only_checkpointer_writes_nothing(saved):
    before = {os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns for r, _, fs in os.walk(saved) for f in fs}
    c = Checkpointer(saved, read_only=True)
    params, meta = c.restore_params(2, _state(0.0)["params"])
    c.close()
    assert meta == {"step": 2}
    after = {os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns for r, _, fs in os.walk(saved) for f in fs}
    assert after == before


def test_a_failed_save_is_one_error_and_leaves_the_previous_step(saved, monkeypatch):
    """What orbax raises when the disk fills (its tensorstore message, as seen on a full tmpfs)."""
    c = Checkpointer(saved)

    def full_disk(*args, **kwargs):
        os.makedirs(os.path.join(saved, "3.orbax-checkpoint-tmp", "state"))
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "params.w/0.0" in OCDBT database at local file '
                         f'"{saved}/3.orbax-checkpoint-tmp/state/": Failed to write 77400 bytes to file 21: '
                         "No space left on device [os_error_code='28']")

    monkeypatch.setattr(c._manager, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as e:
        c.save(3, _state(3.0), {"step": 3})
    msg = str(e.value)
    assert "step 3" in msg and "disk is full" in msg and "step 2" in msg and "\n" not in msg
    assert e.value.errno == 28
    assert not os.path.exists(os.path.join(saved, "3.orbax-checkpoint-tmp"))  # the space is given back
    monkeypatch.undo()
    assert c.all_steps() == [1, 2]
    c.close()


def test_event_loop_leftovers_of_a_failed_orbax_operation_are_not_printed(capsys):
    """After a failed save, tensorstore's I/O threads call back into orbax's closed event loop and
    print `RuntimeError: Event loop is closed` through sys.excepthook (seen dozens of times around
    the one real error); those are dropped, during the operation and after it failed."""
    import sys

    ck.install_orbax_noise_filters()  # the application's part (the CLI calls it at start-up)
    with pytest.raises(ValueError):
        with ck.orbax_errors_collected():
            sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)
            raise ValueError("RESOURCE_EXHAUSTED: ... No space left on device")
    sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)
    assert "Event loop is closed" not in capsys.readouterr().err
    sys.excepthook(KeyError, KeyError("something else"), None)   # everything else still shows
    assert "something else" in capsys.readouterr().err


def test_the_library_leaves_process_hooks_alone(tmp_path):
    # a save and a failed save through the library: sys.excepthook and the asyncio logger untouched
    import subprocess
    import sys

    probe = f"""
import logging, sys
import jax.numpy as jnp
from jaxrl_entropy.rundir import checkpoint as ck
hooks = (sys.excepthook, sys.unraisablehook, list(logging.getLogger("asyncio").filters))
c = ck.Checkpointer({str(tmp_path / "ckpt")!r})
c.save(1, {{"w": jnp.ones(3)}}, {{"step": 1}})
try:
    with ck.orbax_errors_collected():
        raise ValueError("a failed orbax operation")
except ValueError:
    pass
assert (sys.excepthook, sys.unraisablehook, list(logging.getLogger("asyncio").filters)) == hooks
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_ctrl_c_during_start_up_is_never_lost_in_a_gc_callback(monkeypatch):
    # jax's `_xla_gc_callback` runs at every collection; a KeyboardInterrupt raised inside it is
    # printed as "Exception ignored" and lost. The start-up handler sends the signal again instead.
    import signal
    import types

    from jaxrl_entropy.rundir import preemption

    resent = []

    class Timer:
        def __init__(self, delay, fn, args):
            self.fn, self.args = fn, args

        def start(self):
            resent.append(self.args)

    monkeypatch.setattr(preemption.threading, "Timer", Timer)

    def frame(name, back=None):
        return types.SimpleNamespace(f_code=types.SimpleNamespace(co_name=name), f_back=back)

    inside = frame("_xla_gc_callback", back=frame("compile", back=frame("main")))
    preemption._interrupt_outside_gc_callbacks(signal.SIGINT, inside)     # no raise: sent again
    assert resent and resent[0][1] == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        preemption._interrupt_outside_gc_callbacks(signal.SIGINT, frame("load_data", back=frame("main")))


def test_a_save_that_never_committed_is_cleaned_up_by_the_next_writer_not_by_readers(saved):
    # what a job killed mid-save (or a second Ctrl-C during a save) leaves: orbax's temporary directory
    leftover = os.path.join(saved, "3.orbax-checkpoint-tmp-1234")
    os.makedirs(os.path.join(leftover, "state"))
    open(os.path.join(leftover, "state", "data"), "wb").write(b"\0" * 4096)
    reader = Checkpointer(saved, read_only=True)   # eval / convert: never change a run
    assert os.path.isdir(leftover) and reader.all_steps() == [1, 2]
    reader.close()
    writer = Checkpointer(saved, keep=3)           # train resuming: the only writer (the workdir lock)
    assert not os.path.exists(leftover) and writer.all_steps() == [1, 2]
    writer.close()
