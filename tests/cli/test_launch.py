"""`scripts/launch.sh`: the per-worker command it renders sets every placeholder of the presets and
parses as the CLI's flags; run as rendered (the checkout, the venv, `jaxrl-entropy train
--multihost`), on 2 CPU processes × 4 devices, it trains the 0.6B preset's pipeline at tiny widths
and evaluates on the six benchmark files it names."""
import os
import shlex
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, TINY_CLI_FLAGS, metrics_rows
from test_multihost import _free_port, _wait

SCRIPT = str(REPO_ROOT / "scripts" / "launch.sh")
EVAL_SETS = ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")


def _render(**env) -> str:
    out = subprocess.run(["bash", SCRIPT, "worker-command"], env={"PATH": os.environ["PATH"], **env},
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _train_argv(command: str) -> list[str]:
    """The `jaxrl-entropy train ...` part of a rendered `cd ... && . venv && train` line."""
    part = command.split(" && ")[-1]
    argv = shlex.split(part)
    assert argv[:2] == ["jaxrl-entropy", "train"], argv
    return argv


@pytest.mark.parametrize("config", ["configs/qwen3_8b_dapo.py:anchor,v5p-64", "configs/qwen3_0.6b_dapo.py:full,v5e-8"])
def test_the_rendered_worker_command_sets_every_placeholder(config, monkeypatch):
    from absl import flags

    from jaxrl_entropy import config as config_lib
    from jaxrl_entropy.cli import commands

    command = _render(CONFIG=config, BUCKET="b")
    assert command.startswith("cd ~/jaxrl-entropy && . .venv/bin/activate && jaxrl-entropy train --multihost ")
    argv = _train_argv(command)
    fv = flags.FlagValues()
    monkeypatch.chdir(REPO_ROOT)
    commands._define(fv, argv)
    commands._parse(fv, argv)
    cfg = config_lib.validate(fv.config)
    assert config_lib.placeholders(cfg) == {}
    config_lib.check_placeholders(cfg)
    size = config.split("qwen3_")[1].split("_dapo")[0]
    assert cfg.model.hf_dir == f"/tmp/ckpt/Qwen3-{size.upper()}-Base"
    assert cfg.data.train_files == "gs://b/data/dapo-math-17k.parquet"
    assert cfg.eval.benchmarks == ",".join(f"{n}=gs://b/data/{n}.parquet" for n in EVAL_SETS)
    assert fv.workdir == f"gs://b/runs/{config.split(':')[1].split(',')[0]}"


def test_the_gpu_node_command_is_one_process():
    command = _render(CONFIG="configs/qwen3_1.7b_dapo.py:soft,h100x8", MULTIHOST="0")
    assert "--multihost" not in command and "--config=configs/qwen3_1.7b_dapo.py:soft,h100x8" in command


def _eval_files(data) -> None:
    """The six benchmark files and a training file in verl's layout (a few sums each), and the demo
    tokenizer the tiny model reads them with."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jaxrl_entropy.data.tokenizer import build_demo_tokenizer

    data.mkdir()
    rows = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}], "reward_model": {"ground_truth": str(a + b)},
             "data_source": "sums"} for a, b in ((1, 2), (3, 4), (5, 1), (2, 2), (6, 3), (7, 1), (4, 5), (8, 1))]
    pq.write_table(pa.Table.from_pylist(rows), str(data / "dapo-math-17k.parquet"))
    for i, name in enumerate(EVAL_SETS):
        pq.write_table(pa.Table.from_pylist(rows[i:i + 2]), str(data / f"{name}.parquet"))
    build_demo_tokenizer().save_pretrained(str(data / "tok"))


@pytest.mark.slow  # two CLI processes, a whole (tiny) training run
def test_the_rendered_command_trains_on_two_cpu_processes(tmp_path):
    data, venv, workdir = tmp_path / "data", tmp_path / "venv", tmp_path / "run"
    _eval_files(data)
    # a venv whose `jaxrl-entropy` is this checkout's (`python -m` from the checkout puts it first on sys.path)
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "jaxrl-entropy").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m jaxrl_entropy.cli "$@"\n')
    (venv / "bin" / "jaxrl-entropy").chmod(0o755)
    (venv / "bin" / "activate").write_text(f'export PATH={shlex.quote(str(venv / "bin"))}:"$PATH"\n')
    # the 0.6B preset as the docs launch it, shrunk to tiny widths on the command line (EXTRA)
    tiny = [*TINY_CLI_FLAGS, "--config.model.hf_dir=", f"--config.tokenizer={data / 'tok'}",
            "--config.data.max_prompt_len=32", "--config.train.steps=2", "--config.train.geometry_every=0",
            "--config.train.checkpoint_every=100", "--config.eval.every=100"]
    port = _free_port()
    flags = [f for f in os.environ["XLA_FLAGS"].split() if not f.startswith("--xla_force_host_platform_device_count")]
    procs = []
    for i in range(2):
        extra = " ".join(shlex.quote(f) for f in tiny + [f"--coordinator_address=127.0.0.1:{port}",
                                                          "--num_processes=2", f"--process_id={i}"])
        command = _render(CONFIG="configs/qwen3_0.6b_dapo.py:full,v5e-8", CHECKOUT=str(REPO_ROOT), VENV=str(venv),
                          WORKDIR=str(workdir), DATA=str(data), EXTRA=extra)
        assert " --multihost " in command
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=4"]))
        log = open(tmp_path / f"{i}.log", "w")
        proc = subprocess.Popen(["bash", "-c", command], stdout=log, stderr=subprocess.STDOUT, env=env)
        proc.log_path = log.name
        procs.append(proc)
    codes = _wait(procs)
    logs = [open(p.log_path).read()[-3000:] for p in procs]
    assert codes == [0, 0], logs
    rows = metrics_rows(str(workdir))
    assert [r["step"] for r in rows if "loss" in r] == [0, 1]
    first = rows[0]
    for name in EVAL_SETS:   # every file the rendered command names was read and scored
        assert 0 <= first[f"eval/{name}/mean@2"] <= 1, first


@pytest.mark.parametrize("doc, config", [("docs/launch.md", "configs/qwen3_8b_dapo.py:anchor,v5p-64"),
                                         ("docs/cloud-tpu.md", "configs/qwen3_8b_dapo.py:soft,v5p-64")])
def test_the_docs_show_the_command_the_script_renders(doc, config):
    import re

    text = (REPO_ROOT / doc).read_text()
    blocks = [b.replace("\\\n", " ") for b in re.findall(r"```bash\n(.*?)```", text, re.S)]
    shown = next(" ".join(b.split()) for b in blocks if b.startswith("cd ~/jaxrl-entropy"))
    assert shown == _render(CONFIG=config, BUCKET="my-bucket")
