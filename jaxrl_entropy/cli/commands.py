"""Entry points behind `jaxrl-entropy train | eval | convert | dryrun`.

Each call parses its own `absl.flags.FlagValues` (not the process-global FLAGS), so the commands can
be called repeatedly in one process (tests, notebooks) and a bad flag never leaves state behind.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

from jaxrl_entropy import presets


def _define(fv: flags.FlagValues, argv: list[str]) -> None:
    # `sys_argv`: config_flags reads the --config.* overrides from this list, not from fv(argv)
    config_flags.DEFINE_config_file(
        "config", presets.__file__,
        "ml_collections config file (`path.py` or `path.py:variant`); default: the CPU demo "
        "(jaxrl_entropy/presets.py, installed with the package; the same config as configs/demo.py)",
        flag_values=fv, lock_config=True, sys_argv=list(argv))
    flags.DEFINE_string("workdir", None, "run directory: metrics.jsonl, TensorBoard events, checkpoints, "
                        "config.json (train: default runs/<config.name>)", flag_values=fv)
    flags.DEFINE_string("checkpoint", None, "a train workdir (or its checkpoints/ dir) to read parameters from",
                        flag_values=fv)
    flags.DEFINE_string("hf", None, "a local HF Qwen3 checkpoint directory", flag_values=fv)
    flags.DEFINE_string("to_hf", None, "convert: write a HF checkpoint directory here", flag_values=fv)
    flags.DEFINE_string("to_orbax", None, "convert: write an orbax checkpoint (a workdir) here", flag_values=fv)
    flags.DEFINE_string("out", None, "eval: also write the metrics as JSON to this file; dryrun: the report as JSON",
                        flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "convert --to_hf: replace a non-empty HF directory (its old files are "
                      "removed, not mixed with the new ones)", flag_values=fv)
    flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() (TPU pods, multi-node GPU, several "
                      "CPU processes); without the three flags below JAX detects the cluster itself", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "--multihost: HOST:PORT of process 0's coordination service",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "--multihost: the number of processes", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "--multihost: this process's index in [0, num_processes)",
                         flag_values=fv)
    flags.DEFINE_string("topology", None, "dryrun: a TPU slice (v5p-64, v4-32, v5e-256, v6e-8, v5p:2x4x4) or a GPU "
                        "host (h100x8, h200x8, a100x8)", flag_values=fv)
    flags.DEFINE_list("programs", [], "dryrun: compile only these programs (default: all), e.g. update,rollout_stats",
                      flag_values=fv)
    flags.DEFINE_bool("estimate", False, "dryrun: an analytic estimate (formulas, no compiler: seconds, no libtpu) "
                      "instead of compiling for a TPU slice; GPU hosts without GPUs are always estimated",
                      flag_values=fv)
    flags.DEFINE_float("headroom", 0.10, "dryrun: a program fits when it needs at most (1 - headroom) of a chip's HBM",
                       flag_values=fv)


class UsageError(Exception):
    pass


def _config(fv):
    from jaxrl_entropy.config import validate
    return validate(fv.config)


def _setup(fv):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # An import (grain) may already have configured the root logger, at WARNING: basicConfig then
    # does nothing, and every INFO line of ours (checkpoint saves, progress) would be lost. Our
    # logger's own level lets them through whatever handlers the root has (pytest's included).
    logging.getLogger("jaxrl_entropy").setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax._src", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    explicit = {k: fv[k].value for k in ("coordinator_address", "num_processes", "process_id")
                if fv[k].value is not None}
    if explicit and not fv.multihost:
        raise UsageError(f"--{'/--'.join(explicit)} only apply with --multihost")
    if fv.multihost:
        import jax
        # collectives between CPU processes (the CPU test of a pod, CPU-only clusters); the
        # setting only concerns the CPU backend, so it is harmless next to TPUs or GPUs
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # Each CPU process matches gloo collectives by the order its programs reach them. With
        # async dispatch, two programs that both hold cross-process collectives (a step and a
        # diagnostic, say) can run at once and reach them in different orders on the two
        # processes: both then wait forever (seen ~1 run in 9). Synchronous dispatch runs one
        # program at a time, in the order Python called them, which is the same everywhere.
        jax.config.update("jax_cpu_enable_async_dispatch", False)
        jax.distributed.initialize(**explicit)


def _train(fv):
    from jaxrl_entropy.config import check_placeholders
    cfg = _config(fv)  # validate before any set-up or compilation
    check_placeholders(cfg)  # a preset's /path/to/... paths: every key still to set, in one message
    _setup(fv)
    import jax

    from jaxrl_entropy.config import validate_for_runtime
    # the checks that need the devices (after multi-host set-up) and the model's depth (config.json only)
    validate_for_runtime(cfg, num_devices=jax.device_count(), num_processes=jax.process_count())
    from jaxrl_entropy.training.trainer import Trainer
    workdir = fv.workdir or os.path.join("runs", cfg.name)
    trainer = Trainer(cfg, workdir)
    try:
        last = trainer.run()
    finally:
        trainer.close()  # releases the workdir, also after an error
    if last:
        print(json.dumps({k: v for k, v in last.items() if k.startswith(("step", "eval/", "reward", "accuracy"))},
                         indent=1))
    print(f"run directory: {os.path.abspath(workdir)}  (plots: jaxrl-entropy analyze {workdir})")


def _params_source(fv):
    if bool(fv.checkpoint) == bool(fv.hf):
        raise UsageError("give exactly one of --checkpoint=WORKDIR or --hf=HF_DIR")


def _explicit_config(fv):
    """The run's own config.json unless --config was given on the command line."""
    return _config(fv) if fv["config"].present else None


def _overrides_for_run(fv) -> dict:
    """Without --config, the run's own config.json is used, and `--config.KEY=VALUE` overrides
    (`--config.eval.k=32`) go on top of it: key -> value, parsed by the flag for that key's type.
    With --config they are already part of that config."""
    if fv["config"].present:
        return {}
    from jaxrl_entropy.config import get_key
    keys = [name[len("config."):] for name in fv if name.startswith("config.") and fv[name].present]
    return {key: get_key(fv.config, key) for key in keys}


def _check_out_file(path: str | None) -> None:
    """`--out=FILE` is checked before any work: an evaluation that cannot save its result is lost."""
    if not path:
        return
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    if os.path.isdir(target):
        raise UsageError(f"--out={path} is a directory; give a file name (e.g. {os.path.join(path, 'metrics.json')})")
    if not os.path.isdir(parent):
        raise UsageError(f"--out={path}: the directory {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK) or (os.path.exists(target) and not os.access(target, os.W_OK)):
        raise UsageError(f"--out={path} is not writable; choose another path")


def _eval(fv):
    _params_source(fv)
    _check_out_file(fv.out)
    cfg = _explicit_config(fv) if fv.checkpoint else _config(fv)
    if cfg is not None:
        from jaxrl_entropy.config import check_placeholders
        check_placeholders(cfg, keys=("eval.benchmarks", "tokenizer") + (() if fv.hf else ("model.hf_dir",)))
    _setup(fv)
    from jaxrl_entropy.training import evaluate as eval_lib
    from jaxrl_entropy.training import model_io
    if fv.checkpoint:
        cfg, policy, step, tokenizer = model_io.policy_from_run(cfg, fv.checkpoint,
                                                                overrides=_overrides_for_run(fv))
    else:
        cfg, policy, tokenizer = model_io.policy_from_hf(cfg, fv.hf)
        step = 0
    metrics = model_io.evaluate_for_cli(cfg, policy, step, tokenizer)
    if not metrics:
        raise UsageError("no benchmarks: set --config.eval.benchmarks=name=path,... (or use synthetic data)")
    print(eval_lib.format_table(metrics, cfg.eval.k))
    if fv.out:
        eval_lib.dump_json(metrics, fv.out)
    print(json.dumps(metrics, indent=1, sort_keys=True))


def _convert(fv):
    from jaxrl_entropy.training import model_io
    from jaxrl_entropy.rundir.preemption import PreemptionGuard, StopRequested
    if fv.overwrite and not fv.to_hf:
        raise UsageError("--overwrite applies to --to_hf only (an orbax workdir is never overwritten: choose a "
                         "new one)")
    if fv.checkpoint and fv.to_hf:
        cfg = _explicit_config(fv)
        model_io.check_hf_target(fv.to_hf, overwrite=fv.overwrite, source=fv.checkpoint)  # before loading anything
        _setup(fv)
        guard = PreemptionGuard()
        try:
            with guard:
                model_io.checkpoint_to_hf(cfg, fv.checkpoint, fv.to_hf, overwrite=fv.overwrite,
                                          should_stop=guard.should_stop, overrides=_overrides_for_run(fv))
        except StopRequested as e:
            print(f"jaxrl-entropy convert: {e}; nothing was written to {fv.to_hf} (the partial export was "
                  "removed): run the command again", file=sys.stderr)
            return 128 + (e.signum or 15)  # the shell's code for "ended by this signal"
        print(f"wrote HF checkpoint to {fv.to_hf}")
    elif fv.hf and fv.to_orbax:
        cfg = _config(fv)
        model_io.check_new_workdir(fv.to_orbax)
        _setup(fv)
        model_io.hf_to_checkpoint(cfg, fv.hf, fv.to_orbax)
        print(f"wrote orbax checkpoint to {fv.to_orbax}")
    else:
        raise UsageError("convert needs --checkpoint=WORKDIR --to_hf=DIR, or --hf=DIR --to_orbax=WORKDIR")
    return 0


class DoesNotFit(Exception):
    """dryrun: a program needs more memory than the topology has (exit status 1)."""


def _dryrun(fv):
    if not fv.topology:
        raise UsageError("dryrun needs --topology=NAME (e.g. v5p-64, v6e-8, v5p:2x4x4, h100x8)")
    from jaxrl_entropy import chips
    try:
        topo = chips.resolve(fv.topology)
    except ValueError as e:
        raise UsageError(str(e)) from None
    chips.prepare_environment(topo, estimate=fv.estimate)
    cfg = _config(fv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from jaxrl_entropy.aot import dryrun
    report = dryrun.run(cfg, fv.topology, programs=fv.programs, headroom=fv.headroom, estimate=fv.estimate,
                        log=lambda m: print(m, file=sys.stderr, flush=True))
    print(dryrun.format_report(report))
    if fv.out:
        with open(fv.out, "w") as f:
            f.write(report.to_json())
    if not report.ok:
        raise DoesNotFit(dryrun.failure_message(report))


def _parse(fv: flags.FlagValues, argv: list[str]) -> list[str]:
    """`fv(argv)`; a config file that cannot be loaded (missing, a syntax error, no `get_config`, an
    exception inside it) is one line naming the file, not a traceback from ml_collections."""
    given = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
    if given and not os.path.isfile(given[-1].split(":", 1)[0]):
        raise UsageError(f"--config={given[-1]}: no such file {given[-1].split(':', 1)[0]!r} (a Python file with "
                         "get_config(); the built-in ones are in configs/)")
    # ml_collections loads every config file as the module `config_config` with the deprecated
    # `load_module`, which re-runs a new file inside the module object of the previous one: a file
    # without get_config() would quietly get the previous file's (tests, notebooks: several commands
    # in one process). Start from no module.
    sys.modules.pop("config_config", None)
    try:
        return fv(argv)
    except flags.Error:
        raise
    except Exception as e:  # noqa: BLE001 — whatever the user's config file raises
        if not given:
            raise
        path = given[-1].split(":", 1)[0]
        if isinstance(e, SyntaxError):
            what = f"{e.filename or path}:{e.lineno}: {e.msg}"
        elif isinstance(e, AttributeError) and "get_config" in str(e):
            what = (f"{path} has no get_config(): a config file defines get_config(variant=None) returning "
                    "an ml_collections.ConfigDict built from jaxrl_entropy.config.base_config() (see configs/demo.py)")
        else:
            what = f"{path}: {type(e).__name__}: {e} (raised while loading the config file)"
        raise UsageError(f"--config: {what}") from None


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says what to fix: printed without a traceback."""
    from jaxrl_entropy.rundir.checkpoint import CheckpointCorruptError, CheckpointMismatchError
    from jaxrl_entropy.config import ConfigError
    from jaxrl_entropy.data.sources import DataError
    from jaxrl_entropy.rundir.locking import WorkdirBusyError
    from jaxrl_entropy.models.config import CheckpointError
    from jaxrl_entropy.rl.advantages import DynamicSamplingError
    from jaxrl_entropy.training.trainer import TrainingDivergedError
    return (UsageError, ConfigError, DataError, CheckpointError, DynamicSamplingError, OSError, WorkdirBusyError,
            CheckpointCorruptError, CheckpointMismatchError, TrainingDivergedError, DoesNotFit)


def run(command: str, argv: list[str]) -> int:
    fn = {"train": _train, "eval": _eval, "convert": _convert, "dryrun": _dryrun}[command]
    fv = flags.FlagValues()
    try:
        _define(fv, argv)  # loads the default config and applies --config.* overrides
    except (AttributeError, KeyError) as e:
        msg = str(e).replace("\\n", " ").replace("\n", " ").replace("\\'", "").strip("'\" ")
        print(f"jaxrl-entropy {command}: unknown config key: {msg}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help", "--helpfull", "--helpshort") for a in argv[1:]):
        print(f"usage: jaxrl-entropy {command} [flags]\n\n{fv.main_module_help() or fv}")
        return 0
    try:
        rest = _parse(fv, argv)
        if len(rest) > 1:
            raise UsageError(f"unexpected arguments {rest[1:]}; flags take the form --name=value")
        code = fn(fv)
    except flags.Error as e:
        print(f"jaxrl-entropy {command}: {e}\n(run `jaxrl-entropy {command} --help` for the flags; config keys "
              "are listed in jaxrl_entropy/config.py)", file=sys.stderr)
        return 2
    except _user_errors() as e:
        hint = ""
        if isinstance(e, OSError) and e.errno == errno.ENOSPC and "disk is full" not in str(e):
            hint = " (the disk is full: free space, then run the same command again to resume from the last checkpoint)"
        print(f"jaxrl-entropy {command}: {type(e).__name__}: {e}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C while training, or one during set-up (nothing to save yet)
        print(f"jaxrl-entropy {command}: aborted by Ctrl-C; nothing was saved since the last checkpoint",
              file=sys.stderr)
        return 130
    return code or 0
