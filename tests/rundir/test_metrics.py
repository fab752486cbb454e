"""`jaxrl_entropy.rundir.metrics`: reading a history, judging it, and cutting it back on resume, for local
and `gs://` workdirs (the in-memory object store of `fake_gcs`).

Oracles: the lines the test itself wrote, parsed here with `json.loads` line by line.
"""
import json
import os
import struct

import pytest

from fake_gcs import fake_gcs  # noqa: F401  (fixture)
from jaxrl_entropy.rundir import fileio, metrics
from jaxrl_entropy.rundir.metrics import MetricsWriter


def _train(step, **extra):
    return {"step": step, "time": 1.0 + step, "loss": 0.5 - 0.01 * step, "reward/mean": 0.1 * step, **extra}


def _history(last_step, *, eval_every=2, final_eval=False):
    """The lines a trainer writes for steps 0..last_step (evaluation shares the line of its step)."""
    rows = [_train(s, **({"eval/accuracy": 0.3 + 0.01 * s} if s % eval_every == 0 else {}))
            for s in range(last_step + 1)]
    if final_eval:
        rows.append({"step": last_step + 1, "time": 99.0, "eval/accuracy": 0.9})
    return rows


def _dump(rows, tail=""):
    return "".join(json.dumps(r) + "\n" for r in rows) + tail


def _parse(text):
    """Every line must be a JSON object: what `analyze` needs."""
    return [json.loads(line) for line in text.splitlines()]


# ----------------------------------------------------------------------------- reading, judging


def test_reader_drops_a_half_written_last_line_and_names_a_broken_middle_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_dump(_history(2), tail='{"step": 3, "lo'))
    with pytest.warns(UserWarning, match="truncated"):
        assert metrics.read_metrics(str(path)) == _history(2)
    path.write_text('{"step": 1, "loss": 0.1}\n{"step": 2, "lo{"step": 2, "loss": 0.2}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: .*two records run together"):
        metrics.read_metrics(str(path))
    with pytest.warns(UserWarning, match="metrics.jsonl:2"):
        assert [r["step"] for r in metrics.read_metrics(str(path), strict=False)] == [1, 3]


def test_history_problems_backwards_duplicate_and_interleaved():
    def problems(rows):
        return metrics.history_problems(metrics.parse_lines(_dump(rows), "m.jsonl"), "m.jsonl")

    # one job: clean, including an evaluation repeated at the step a finished run was continued from
    assert problems(_history(5, final_eval=True) + [_train(6, **{"eval/accuracy": 0.8})]) == []
    assert problems(_history(5) + [{"step": 6, "eval/accuracy": 0.9}, _train(6, **{"eval/accuracy": 0.9})]) == []
    # resumed from the checkpoint of step 4 without cutting the file back: 0..5, then 4, 5, 6 again
    got = problems(_history(5) + [_train(4), _train(5), _train(6)])
    assert got[0] == "m.jsonl:7: step goes back from 5 (line 6) to 4"
    assert "m.jsonl:7: training step 4 recorded again (first at line 5)" in got
    assert "m.jsonl:8: training step 5 recorded again (first at line 6)" in got
    assert len(got) == 3  # step 6 is new
    # two jobs that started together: 0, 0, 1, 1, ... — never backwards, every step twice
    got = problems([r for s in range(3) for r in (_train(s), _train(s, loss=9.0))])
    assert got == [f"m.jsonl:{2 * s + 2}: training step {s} recorded again (first at line {2 * s + 1})"
                   for s in range(3)]
    # a second job started on a workdir whose first job is at step 10: 10, 0, 11, 1, 12, 2
    got = problems([r for s in range(3) for r in (_train(10 + s), _train(s))])
    assert [p for p in got if "goes back" in p] == [
        "m.jsonl:2: step goes back from 10 (line 1) to 0",
        "m.jsonl:4: step goes back from 11 (line 3) to 1",
        "m.jsonl:6: step goes back from 12 (line 5) to 2"]


def test_lines_before_keeps_what_the_checkpoint_covers():
    lines = metrics.parse_lines(_dump(_history(5, final_eval=True)), "m")
    # the checkpoint of step 4 holds the state after 4 updates: steps 4, 5 and the final eval go
    assert [ln.record for ln in metrics.lines_before(lines, 4)] == _history(3)
    # a finished run's checkpoint (step 6): its final evaluation stays, nothing is re-run
    assert [ln.record for ln in metrics.lines_before(lines, 6)] == _history(5, final_eval=True)
    assert metrics.lines_before(lines, 0) == []


# ----------------------------------------------------------------------------- writing, local


def test_a_resumed_writer_records_each_step_once(tmp_path):
    """Killed during step 5 (a half-written line) with the last checkpoint at step 4: the run
    repeats steps 4 and 5. Today's history is 0..5 once each, every line JSON."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(_dump(_history(5), tail='{"step": 6, "lo'))
    with pytest.warns(UserWarning, match="truncated"):
        w = MetricsWriter(str(tmp_path), tensorboard=False, resume_step=4)
    assert _parse(path.read_text()) == _history(3)  # cut back before anything is written
    assert not w.has_eval(4) and w.has_eval(2)
    w.write(4, {"loss": 0.1, "eval/accuracy": 0.5})
    w.write(5, {"loss": 0.2})
    w.close()
    rows = _parse(path.read_text())
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert rows[:4] == _history(3) and rows[4]["eval/accuracy"] == 0.5 and rows[5]["loss"] == 0.2
    assert metrics.history_problems(metrics.read_lines(str(path)), "m") == []


def test_a_finished_run_restarted_keeps_its_history_byte_for_byte(tmp_path):
    path = tmp_path / "metrics.jsonl"
    text = _dump(_history(3, final_eval=True))
    path.write_text(text)
    w = MetricsWriter(str(tmp_path), tensorboard=False, resume_step=4)
    assert w.has_eval(4)  # so the trainer does not evaluate again
    w.close()
    assert path.read_text() == text


def test_without_resume_step_nothing_is_appended_to_a_fragment(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_dump(_history(2), tail='{"step": 3, "lo'))
    with pytest.warns(UserWarning, match="truncated"):
        w = MetricsWriter(str(tmp_path), tensorboard=False)
    w.write(3, {"loss": 0.3})
    w.close()
    rows = _parse(path.read_text())
    assert rows[:3] == _history(2) and [r["step"] for r in rows] == [0, 1, 2, 3]


def test_a_damaged_middle_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"  # what resuming onto a fragment used to leave behind
    path.write_text(_dump(_history(1)) + '{"step": 2, "lo{"step": 2, "loss": 0.2}\n' + _dump([_train(3)]))
    with pytest.warns(UserWarning, match="metrics.jsonl:3"):
        MetricsWriter(str(tmp_path), tensorboard=False, resume_step=4).close()
    assert _parse(path.read_text()) == _history(1) + [_train(3)]


def _tfrecords(path):
    """The serialised events of a TensorBoard event file (TFRecord: length, crc, data, crc)."""
    data, out, i = open(path, "rb").read(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        out.append(data[i + 12:i + 12 + n])
        i += 12 + n + 4
    return out


def test_tensorboard_is_told_to_drop_the_rerun_steps(tmp_path):
    from tensorboardX.proto import event_pb2

    (tmp_path / "metrics.jsonl").write_text(_dump(_history(5)))
    MetricsWriter(str(tmp_path), resume_step=4).close()
    (events_file,) = os.listdir(tmp_path / "tensorboard")
    events = [event_pb2.Event.FromString(r) for r in _tfrecords(tmp_path / "tensorboard" / events_file)]
    # SessionLog START at step s: TensorBoard discards the earlier files' events from step s on
    starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert starts == [4]


# ----------------------------------------------------------------------------- writing, gs://


def test_a_remote_workdir_is_mirrored_and_uploaded_whole(tmp_path, monkeypatch, fake_gcs):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    w = MetricsWriter("gs://b/run", tensorboard=False, resume_step=0)
    w.write(0, {"loss": 1.5, "nan": float("nan")})
    w.sync()
    rows = _parse(fake_gcs["b/run/metrics.jsonl"].getvalue().decode())
    assert rows[0]["loss"] == 1.5 and rows[0]["nan"] is None
    w.write(1, {"loss": 1.0})
    w.close()
    w2 = MetricsWriter("gs://b/run", tensorboard=False, resume_step=2)  # continues the uploaded history
    w2.write(2, {"loss": 0.5})
    w2.close()
    assert [r["step"] for r in _parse(fake_gcs["b/run/metrics.jsonl"].getvalue().decode())] == [0, 1, 2]


def test_a_resumed_remote_run_is_cut_back_in_the_bucket(tmp_path, monkeypatch, fake_gcs):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    fileio.write_text("gs://b/run/metrics.jsonl", _dump(_history(5), tail='{"step": 6, "lo'))
    with pytest.warns(UserWarning, match="gs://b/run/metrics.jsonl:7"):
        w = MetricsWriter("gs://b/run", tensorboard=False, resume_step=4)
    # the bucket no longer shows the steps being re-run, even if this job dies before its first sync
    assert _parse(fake_gcs["b/run/metrics.jsonl"].getvalue().decode()) == _history(3)
    w.write(4, {"loss": 0.1})
    w.write(5, {"loss": 0.2})
    w.close()
    assert [r["step"] for r in _parse(fake_gcs["b/run/metrics.jsonl"].getvalue().decode())] == [0, 1, 2, 3, 4, 5]


def test_a_stale_local_mirror_does_not_leak_into_a_new_remote_run(tmp_path, monkeypatch, fake_gcs):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    mirror = tmp_path / "home" / ".cache" / "jaxrl-entropy" / "b_run"
    mirror.mkdir(parents=True)
    (mirror / "metrics.jsonl").write_text(_dump(_history(7)))  # an earlier job's, on this machine
    w = MetricsWriter("gs://b/run", tensorboard=False, resume_step=0)  # the bucket has no history
    w.write(0, {"loss": 1.0})
    w.close()
    assert [r["step"] for r in _parse(fake_gcs["b/run/metrics.jsonl"].getvalue().decode())] == [0]
