"""Local/remote path helpers and the metrics writer's remote mirror (gs:// simulated by a fake
epath backed by a local directory)."""
import json

from jaxrl_entropy import fileio
from jaxrl_entropy.metrics import MetricsWriter


class _FakePath:
    """Minimal stand-in for `etils.epath.Path` mapping `gs://bucket/...` into a local root."""
    root = None

    def __init__(self, path):
        self.local = _FakePath.root / str(path).split("://", 1)[1]

    def mkdir(self, parents=False, exist_ok=False):
        self.local.mkdir(parents=parents, exist_ok=exist_ok)

    def exists(self):
        return self.local.exists()

    def read_text(self):
        return self.local.read_text()

    def write_text(self, text):
        self.local.parent.mkdir(parents=True, exist_ok=True)
        self.local.write_text(text)


def test_local_and_remote_paths(tmp_path, monkeypatch):
    import etils.epath

    _FakePath.root = tmp_path / "bucket_root"
    monkeypatch.setattr(etils.epath, "Path", _FakePath)
    assert fileio.join("gs://b/run", "checkpoints") == "gs://b/run/checkpoints"
    assert fileio.absolute("gs://b/run") == "gs://b/run"
    fileio.makedirs("gs://b/run")
    fileio.write_text("gs://b/run/config.json", "{}")
    assert fileio.exists("gs://b/run/config.json") and fileio.read_text("gs://b/run/config.json") == "{}"
    local = tmp_path / "x.txt"
    fileio.write_text(str(local), "hi")
    assert fileio.read_text(str(local)) == "hi" and not (tmp_path / "x.txt.tmp").exists()


def test_metrics_writer_mirrors_a_remote_workdir(tmp_path, monkeypatch):
    import etils.epath

    _FakePath.root = tmp_path / "bucket_root"
    monkeypatch.setattr(etils.epath, "Path", _FakePath)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    w = MetricsWriter("gs://b/run", tensorboard=False)
    w.write(0, {"loss": 1.5, "nan": float("nan")})
    w.sync()
    remote = tmp_path / "bucket_root" / "b" / "run" / "metrics.jsonl"
    rows = [json.loads(line) for line in remote.read_text().splitlines()]
    assert rows[0]["loss"] == 1.5 and rows[0]["nan"] is None
    w.write(1, {"loss": 1.0})
    w.close()
    # a resumed run continues the uploaded history
    w2 = MetricsWriter("gs://b/run", tensorboard=False)
    w2.write(2, {"loss": 0.5})
    w2.close()
    assert [json.loads(line)["step"] for line in remote.read_text().splitlines()] == [0, 1, 2]
