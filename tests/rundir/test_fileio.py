"""`jaxrl_entropy.rundir.fileio` on local paths and on `gs://` (an in-memory object store reached through
etils.epath and fsspec, the code path a real bucket takes: see `fake_gcs`)."""
import fsspec
import pytest

from fake_gcs import fake_gcs  # noqa: F401  (fixture)
from jaxrl_entropy.rundir import fileio


def test_local_files(tmp_path):
    run = tmp_path / "runs" / "full_seed0"
    fileio.makedirs(str(run))
    fileio.write_text(str(run / "config.json"), '{"name": "full", "é": 1}')
    fileio.write_bytes(str(run / "a.png"), b"\x89PNG\x00\xff")
    assert (run / "config.json").read_text(encoding="utf-8") == '{"name": "full", "é": 1}'
    assert fileio.read_text(str(run / "config.json")) == '{"name": "full", "é": 1}'
    assert fileio.read_bytes(str(run / "a.png")) == b"\x89PNG\x00\xff"
    assert sorted(p.name for p in run.iterdir()) == ["a.png", "config.json"]  # no temp file left behind
    assert fileio.listdir(str(run)) == ["a.png", "config.json"]
    assert fileio.isdir(str(run)) and not fileio.isfile(str(run))
    assert fileio.isfile(str(run / "a.png")) and not fileio.exists(str(run / "b.png"))
    assert fileio.basename(str(run) + "/") == "full_seed0"
    assert fileio.parent(str(run)) == str(tmp_path / "runs")
    (run / "cut.txt").write_bytes(b'{"a": 1}\n{"b": \xe2\x82')  # a job killed mid-character
    assert fileio.read_text(str(run / "cut.txt"), errors="replace") == '{"a": 1}\n{"b": \ufffd'
    with pytest.raises(UnicodeDecodeError):
        fileio.read_text(str(run / "cut.txt"))


def test_gs_files_land_in_the_bucket(fake_gcs):
    fileio.makedirs("gs://b/runs/full_seed0")
    fileio.write_text("gs://b/runs/full_seed0/config.json", '{"name": "full"}')
    fileio.write_bytes("gs://b/runs/full_seed0/a.png", b"\x89PNG")
    fileio.write_text("gs://b/runs/anchor_seed0/metrics.jsonl", '{"step": 0}\n')  # no makedirs: implicit
    gcs = fsspec.filesystem("gcs")  # the store, seen through fsspec rather than fileio
    assert gcs.cat_file("gs://b/runs/full_seed0/config.json") == b'{"name": "full"}'
    assert gcs.cat_file("gs://b/runs/full_seed0/a.png") == b"\x89PNG"
    assert fileio.read_text("gs://b/runs/full_seed0/config.json") == '{"name": "full"}'
    assert fileio.read_bytes("gs://b/runs/full_seed0/a.png") == b"\x89PNG"
    assert fileio.listdir("gs://b/runs") == ["anchor_seed0", "full_seed0"]
    assert fileio.listdir("gs://b/runs/full_seed0/") == ["a.png", "config.json"]
    assert fileio.isdir("gs://b/runs/anchor_seed0") and not fileio.isfile("gs://b/runs/anchor_seed0")
    assert fileio.isfile("gs://b/runs/anchor_seed0/metrics.jsonl")
    assert not fileio.exists("gs://b/runs/soft_seed0") and not fileio.isdir("gs://b/runs/soft_seed0")
    fileio.write_text("gs://b/runs/full_seed0/config.json", "{}")  # a whole-file replace
    assert gcs.cat_file("gs://b/runs/full_seed0/config.json") == b"{}"


def test_gs_path_arithmetic():
    assert fileio.join("gs://b/run/", "checkpoints", "3") == "gs://b/run/checkpoints/3"
    assert fileio.absolute("gs://b/run") == "gs://b/run"
    assert fileio.basename("gs://b/runs/full_seed0/") == "full_seed0"
    assert fileio.parent("gs://b/runs/full_seed0") == "gs://b/runs"
    assert fileio.parent("gs://b/run") == "gs://b"
    with pytest.raises(ValueError, match="bucket root"):
        fileio.parent("gs://b")
