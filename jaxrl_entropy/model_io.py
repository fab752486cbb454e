"""Parameters in and out of runs: evaluate a run or a HF directory, convert orbax ⇄ HF."""
from __future__ import annotations

import tempfile

import ml_collections
from flax import nnx

from jaxrl_entropy import config as config_lib
from jaxrl_entropy import fileio
from jaxrl_entropy.models import qwen3


def run_dir_of(checkpoint: str) -> str:
    """Accept a train workdir or its `checkpoints/` subdirectory (local or gs://)."""
    path = fileio.absolute(checkpoint).rstrip("/")
    if path.rsplit("/", 1)[-1] == "checkpoints":
        path = path.rsplit("/", 1)[0]
    if not fileio.exists(fileio.join(path, "checkpoints")):
        raise FileNotFoundError(f"{checkpoint}: no checkpoints/ directory; pass the workdir of a `train` run")
    return path


def config_for_run(cfg: ml_collections.ConfigDict | None, workdir: str) -> ml_collections.ConfigDict:
    saved = fileio.join(workdir, "config.json")
    if cfg is None:
        if not fileio.exists(saved):
            raise FileNotFoundError(f"{saved} not found; pass --config for this run")
        return config_lib.from_json_text(fileio.read_text(saved), source=saved)
    return cfg


def trainer_for_eval(cfg, *, checkpoint: str | None = None, hf: str | None = None):
    from jaxrl_entropy.trainer import Trainer
    if checkpoint:
        workdir = run_dir_of(checkpoint)
        trainer = Trainer(config_for_run(cfg, workdir), workdir)
        if trainer.checkpointer.latest_step() is None:
            raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint yet")
        return trainer
    cfg = cfg.copy_and_resolve_references()
    cfg.model.hf_dir = hf
    cfg.train.sft_steps = 0
    return Trainer(cfg, tempfile.mkdtemp(prefix="jaxrl-eval-"))


def checkpoint_to_hf(cfg, checkpoint: str, out_dir: str, *, dtype=None) -> None:
    """The latest checkpoint of a run → a HF directory (weights, config, tokenizer)."""
    trainer = trainer_for_eval(cfg, checkpoint=checkpoint)
    model = nnx.merge(trainer.graphdef, trainer.params)
    qwen3.save_pretrained(model, out_dir, dtype=dtype, tokenizer=trainer.tokenizer)
    trainer.close()


def hf_to_checkpoint(cfg, hf: str, workdir: str) -> None:
    """A HF directory → step-0 orbax checkpoint of a new run (sharded as the config's mesh says)."""
    from jaxrl_entropy.trainer import Trainer
    cfg = cfg.copy_and_resolve_references()
    cfg.model.hf_dir = hf
    cfg.train.sft_steps = 0
    trainer = Trainer(cfg, workdir)
    trainer.save()
    trainer.close()
