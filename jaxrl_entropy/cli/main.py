"""`jaxrl-entropy` console script: train | eval | convert | dryrun | analyze | reproduce | prepare-data.

    jaxrl-entropy train [--config=configs/demo.py[:variant]] [--workdir=runs/demo] [--config.a.b=v ...]
    jaxrl-entropy eval --config=... (--checkpoint=WORKDIR | --hf=HF_DIR) [--out=metrics.json]
    jaxrl-entropy convert --config=... --checkpoint=WORKDIR --to_hf=OUT_DIR
    jaxrl-entropy convert --hf=HF_DIR --to_orbax=WORKDIR [--config=...]
    jaxrl-entropy dryrun --config=... --topology=v5p-64 [--programs=update,rollout_stats] [--out=report.json]
    jaxrl-entropy analyze RUN_DIR [RUN_DIR ...] [--out=DIR]
    jaxrl-entropy reproduce [--out=runs/repro] [--seeds 0 1 2] [--variants full random ...] [--jobs=2]
    jaxrl-entropy prepare-data --in=FILE --out=OUT.parquet [--prompt_key=problem --answer_key=answer
                               --prompt_template=dapo --data_source=NAME]   # → verl's layout (docs/data.md)
"""
from __future__ import annotations

import os
import sys

COMMANDS = ("train", "eval", "convert", "dryrun", "analyze", "reproduce", "prepare-data")


def _usage() -> str:
    return __doc__.strip()


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `jaxrl-entropy dryrun --help | head`: the reader left, nothing is wrong
        # Python would print another traceback flushing stdout at exit: point it at /dev/null
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if len(argv) >= 2 else 2
    command, rest = argv[1], argv[2:]
    from jaxrl_entropy.rundir.preemption import install_startup_interrupt_handler  # no jax import
    install_startup_interrupt_handler()
    if command not in COMMANDS:
        print(f"unknown command {command!r}; choose one of {COMMANDS}\n\n{_usage()}", file=sys.stderr)
        return 2
    if command == "analyze":
        from jaxrl_entropy import analyze
        return analyze.main(rest)
    if command == "reproduce":
        from jaxrl_entropy.cli import reproduce
        return reproduce.main(rest)
    if command == "prepare-data":  # reads and writes files only: no jax
        from jaxrl_entropy.cli import prepare_data
        return prepare_data.main(rest)
    if command == "dryrun":
        _prepare_dryrun(rest)
    _install_process_hooks()  # imports jax: after dryrun has chosen its devices
    from jaxrl_entropy.cli import commands as cli_commands
    return cli_commands.run(command, [f"jaxrl-entropy {command}"] + rest)


def _install_process_hooks() -> None:
    """Process-wide settings belong to the application, not the library: set them here, once."""
    from jaxrl_entropy.rundir.orbax_noise import install_orbax_noise_filters
    install_orbax_noise_filters()
    # `kill -USR1 <pid>` prints every thread's Python stack to stderr and the job goes on: where a
    # job that has gone quiet waits (a collective, I/O), without stopping it
    import faulthandler
    import io
    import signal
    import sys
    if hasattr(signal, "SIGUSR1"):
        try:  # the process's own stderr: sys.stderr may be replaced by one without a file (a test's capture)
            faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
        except (AttributeError, ValueError, io.UnsupportedOperation):
            pass  # no stderr file to write stacks to (a detached process): nothing to register


def _prepare_dryrun(args: list[str]) -> None:
    """Set the devices `dryrun` needs before anything imports jax (`cli_commands` does)."""
    from jaxrl_entropy import chips  # no jax import
    names = [a.split("=", 1)[1] for a in args if a.startswith("--topology=")]
    try:
        topo = chips.resolve(names[-1]) if names else None
    except ValueError:
        return  # the command itself reports the bad name
    if topo is not None:
        estimate = any(a in ("--estimate", "--estimate=true", "--estimate=True") for a in args)
        chips.prepare_environment(topo, estimate=estimate)

