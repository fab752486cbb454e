"""absl entry points behind `jaxrl-entropy train | eval | convert` (flags parsed per command)."""
from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from jaxrl_entropy import presets

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "ml_collections config file (`path.py` or `path.py:variant`); default: the built-in CPU demo",
    lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: metrics.jsonl, TensorBoard events, checkpoints, config.json")
flags.DEFINE_string("checkpoint", None, "a train workdir (or its checkpoints/ dir) to read parameters from")
flags.DEFINE_string("hf", None, "a local HF Qwen3 checkpoint directory")
flags.DEFINE_string("to_hf", None, "convert: write a HF checkpoint directory here")
flags.DEFINE_string("to_orbax", None, "convert: write an orbax checkpoint (a workdir) here")
flags.DEFINE_string("out", None, "eval: also write the metrics as JSON to this file")
flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() (TPU pods, multi-node GPU)")


def _config():
    cfg = FLAGS.config if FLAGS.config is not None else presets.demo()
    from jaxrl_entropy.config import validate
    return validate(cfg)


def _setup():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if FLAGS.multihost:
        import jax
        jax.distributed.initialize()


def _train(_):
    _setup()
    from jaxrl_entropy.trainer import Trainer
    cfg = _config()
    workdir = FLAGS.workdir or os.path.join("runs", cfg.name)
    trainer = Trainer(cfg, workdir)
    last = trainer.run()
    trainer.close()
    print(json.dumps({k: v for k, v in last.items() if k.startswith(("step", "eval/", "reward", "accuracy"))},
                     indent=1))
    print(f"run directory: {os.path.abspath(workdir)}  (plots: jaxrl-entropy analyze {workdir})")


def _params_source():
    if bool(FLAGS.checkpoint) == bool(FLAGS.hf):
        raise app.UsageError("give exactly one of --checkpoint=WORKDIR or --hf=HF_DIR")


def _eval(_):
    _setup()
    _params_source()
    from jaxrl_entropy import evaluate as eval_lib
    from jaxrl_entropy import model_io
    cfg = _config()
    trainer = model_io.trainer_for_eval(cfg, checkpoint=FLAGS.checkpoint, hf=FLAGS.hf)
    metrics = trainer.evaluate(trainer.step)
    if not metrics:
        raise app.UsageError("no benchmarks: set --config.eval.benchmarks=name=path,... (or use synthetic data)")
    print(eval_lib.format_table(metrics, cfg.eval.k))
    if FLAGS.out:
        eval_lib.dump_json(metrics, FLAGS.out)
    print(json.dumps(metrics, indent=1, sort_keys=True))


def _convert(_):
    _setup()
    from jaxrl_entropy import model_io
    if FLAGS.checkpoint and FLAGS.to_hf:
        model_io.checkpoint_to_hf(_config(), FLAGS.checkpoint, FLAGS.to_hf)
        print(f"wrote HF checkpoint to {FLAGS.to_hf}")
    elif FLAGS.hf and FLAGS.to_orbax:
        cfg = _config()
        model_io.hf_to_checkpoint(cfg, FLAGS.hf, FLAGS.to_orbax)
        print(f"wrote orbax checkpoint to {FLAGS.to_orbax}")
    else:
        raise app.UsageError("convert needs --checkpoint=WORKDIR --to_hf=DIR, or --hf=DIR --to_orbax=WORKDIR")


def run(command: str, argv: list[str]) -> int:
    fn = {"train": _train, "eval": _eval, "convert": _convert}[command]
    try:
        app.run(fn, argv=argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0
