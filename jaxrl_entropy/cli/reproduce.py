"""Small-scale reproduction of the paper's token-subset experiments on the CPU demo task.

    jaxrl-entropy reproduce --out runs/repro --seeds 0 1 2 \
        --variants full random anchor explorer soft [--jobs 2] [--report docs/reproduction] \
        [--config configs/multiplication.py] [--config.KEY=VALUE ...]

A variant `NAME@xK` (e.g. `random@x5`) is NAME with K times the prompts per step and per optimiser
update (`rl.prompts_per_step` and `rl.mini_batch_prompts` × K: as many updates per step, each over K
times the tokens): a 20 % subset at ×5 sees as many tokens per update as `full` at ×1. K may be a
fraction that leaves whole numbers of prompts: `full@x0.25` trains on all the tokens of a quarter of
the prompts, about as many tokens per update as a 20 % subset at ×1 (the same question from the
other side, at a quarter of the cost).

Per seed, the supervised warm-up runs once (`<out>/warmup_seed<s>`, `--jobs` seeds at a time); every
variant then starts RL from that same checkpoint (`<out>/<variant>_seed<s>`, or `<out>/NAME_seed<s>` with
`--config.name=NAME`, for one variant at other settings beside its plain runs), so variants differ
only in their token weights. With `--warmup-seed S` one warm-up (`<out>/warmup_seed<S>`) serves every seed: the
seeds then differ only in RL (sampling and prompt order), for a task whose warm-up costs more than
its RL runs. Each run's own output goes to `train.log` in its directory (appended on resume);
this command prints one line as each run starts and one as it ends, with its wall time.
Gradient geometry is logged every `--geometry-every` steps. A run that fails (e.g. dynamic sampling
finds no group with mixed rewards after a collapse) is recorded as such and the others go on.
A run is finished when its last recorded step is the configured `train.steps`, not when its process
exited 0: a run stopped by a signal (SIGTERM, Ctrl-C) saves and exits 0 part-way. Finally `analyze`
writes the plots and the report over the finished runs only (variants compared at unequal steps would
mislead); the command exits 1 while any run is unfinished or failed, naming them. Restarting the same
command skips finished runs and resumes the others from their latest checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import fractions
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from jaxrl_entropy import analyze
from jaxrl_entropy.rundir import metrics


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "jaxrl_entropy.cli", *args]


LOG_FILE = "train.log"
LOCK_FILE = ".reproduce.lock"


def _say(message: str) -> None:
    """One progress line; written whole, so the lines of runs in parallel threads do not interleave."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _run_logged(args: list[str], workdir: str) -> subprocess.CompletedProcess:
    """Run a child with its stdout and stderr appended to `<workdir>/train.log`; the returned
    `stderr` holds the log's last line (what a failure says last)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOG_FILE)
    with open(path, "a") as log:
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(args[1:])}\n")
        log.flush()
        proc = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT)
    with open(path, "rb") as f:  # the last line only: a resumed run's log holds every earlier attempt
        f.seek(max(0, os.path.getsize(path) - 8192))
        lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    return subprocess.CompletedProcess(args, proc.returncode, "", lines[-1] if lines else "")


@contextlib.contextmanager
def _exclusive(path: str, *, wait: bool):
    """An advisory lock on `path` (fcntl), held while the block runs: two `reproduce` commands on
    one `--out` never run the same warm-up or RL run at once. Yields whether the lock is held (False
    only with wait=False, when another process holds it)."""
    import fcntl
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def warmup(out: str, seed: int, overrides: list[str], config: str | None = None) -> str:
    """The SFT warm-up of one seed, saved as a step-0 checkpoint (run once, reused; a second command
    on the same `--out` waits for it rather than running it again)."""
    workdir = os.path.join(out, f"warmup_seed{seed}")
    ckpt = os.path.join(workdir, "checkpoints", "0")
    with _exclusive(os.path.join(workdir, LOCK_FILE), wait=True):
        if os.path.isdir(ckpt):
            return ckpt
        return _run_warmup(workdir, ckpt, seed, overrides, config)


def _run_warmup(workdir: str, ckpt: str, seed: int, overrides: list[str], config: str | None) -> str:
    _say(f"reproduce: warm-up seed {seed} started (log: {os.path.join(workdir, LOG_FILE)})")
    start = time.time()
    proc = _run_logged(_cli("train", f"--config={config or _demo_config()}", f"--workdir={workdir}",
                            f"--config.seed={seed}", "--config.train.progress=False", *overrides,
                            "--config.train.steps=0", "--config.eval.every=0"), workdir)
    if proc.returncode or not os.path.isdir(ckpt):
        raise RuntimeError(f"the warm-up of seed {seed} failed (exit {proc.returncode}): {proc.stderr}; "
                           f"its log is {os.path.join(workdir, LOG_FILE)}")
    _say(f"reproduce: warm-up seed {seed} done in {(time.time() - start) / 60:.1f} min")
    return ckpt


def progress_of(workdir: str) -> tuple[int | None, int | None]:
    """(last step in `metrics.jsonl`, the run's configured `train.steps` from its `config.json`);
    None where the run has not written it."""
    last = configured = None
    metrics_path = os.path.join(workdir, metrics.METRICS_FILE)
    if os.path.exists(metrics_path):
        rows = metrics.read_metrics(metrics_path, strict=False)
        last = max((int(r["step"]) for r in rows if "step" in r), default=None)
    config_path = os.path.join(workdir, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            configured = int(json.load(f)["train"]["steps"])
    return last, configured


def variant_overrides(variant: str, config_file: str) -> tuple[str, list[str]]:
    """(the paper variant, its extra overrides) of a `--variants` entry: `NAME` or `NAME@xK` (K times
    the prompts per step and per update; see the module's docstring)."""
    name, _, scale = variant.partition("@x")
    if not scale:
        return variant, []
    try:
        k = fractions.Fraction(scale)
    except (ValueError, ZeroDivisionError):
        k = fractions.Fraction(0)
    if k <= 0:
        raise ValueError(f"variant {variant!r}: write NAME@xK with K a positive number (e.g. random@x5, "
                         "full@x0.25)")
    import runpy
    base = runpy.run_path(config_file)["get_config"](name)
    prompts, mini = base.rl.prompts_per_step * k, base.rl.mini_batch_prompts * k
    if prompts.denominator != 1 or mini.denominator != 1:
        raise ValueError(f"variant {variant!r}: {base.rl.prompts_per_step} prompts per step in mini-batches "
                         f"of {base.rl.mini_batch_prompts} times {scale} is not a whole number of prompts; "
                         "choose K so that both are")
    scaled = [f"--config.rl.prompts_per_step={prompts.numerator}",
              f"--config.rl.mini_batch_prompts={mini.numerator}", f"--config.name={variant}"]
    rows = mini.numerator * base.rl.group_size
    if rows % base.rl.micro_batch_size:  # a smaller update than one micro-batch: the update is one micro-batch
        scaled.append(f"--config.rl.micro_batch_size={math.gcd(rows, base.rl.micro_batch_size)}")
    return name, scaled


def run_name(variant: str, overrides: list[str]) -> str:
    """The name of a variant's runs (`<out>/<name>_seed<s>`): the variant, or `--config.name`'s value
    when the overrides set it (e.g. `explorer` at another learning rate beside the plain one)."""
    return _config_name(overrides) or variant


def _config_name(overrides: list[str]) -> str | None:
    names = [a.split("=", 1)[1] for a in overrides if a.startswith("--config.name=")]
    return names[-1] if names else None


def rl_run(out: str, variant: str, seed: int, ckpt: str, overrides: list[str], geometry_every: int,
           config: str | None = None) -> dict:
    name = run_name(variant, overrides)
    workdir = os.path.join(out, f"{name}_seed{seed}")
    with _exclusive(os.path.join(workdir, LOCK_FILE), wait=False) as mine:
        if not mine:  # another reproduce command on this --out runs it now: leave it to that one
            _say(f"reproduce: {name} seed {seed} is running in another command; skipped here")
            return {"variant": variant, "name": name, "seed": seed, "finished": False,
                    "error": "running in another reproduce command on the same --out; run this one again after it"}
        return _rl_run(workdir, variant, name, seed, ckpt, overrides, geometry_every, config)


def _rl_run(workdir: str, variant: str, name: str, seed: int, ckpt: str, overrides: list[str],
            geometry_every: int, config: str | None) -> dict:
    config = config or _demo_config()
    preset, scaled = variant_overrides(variant, config)
    settings = [f"--config.seed={seed}", "--config.train.progress=False",
                f"--config.train.geometry_every={geometry_every}", *scaled, *overrides]
    # what the run trains, as recorded: the config file by name, so a new install or checkout path
    # does not count as other settings
    train_args = [f"--config={os.path.basename(config)}:{preset}", *settings]
    status_file = os.path.join(workdir, "status.json")
    if os.path.exists(status_file):  # finished earlier (a restarted reproduction skips it)
        with open(status_file) as f:
            status = json.load(f)
        if status.get("finished") and status.get("train_args", train_args) != train_args:
            # skipping it would report a run of other settings under this command's name
            return {"variant": variant, "name": name, "seed": seed, "finished": False,
                    "error": f"{workdir} finished earlier with other settings ({' '.join(status['train_args'])}); "
                             "name this command's runs apart (--config.name=NAME) or use another --out"}
        if status.get("finished"):
            return status
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        os.makedirs(os.path.join(workdir, "checkpoints"))
        shutil.copytree(ckpt, os.path.join(workdir, "checkpoints", "0"))
    start = time.time()
    _say(f"reproduce: {name} seed {seed} started (log: {os.path.join(workdir, LOG_FILE)})")
    proc = _run_logged(_cli("train", f"--config={config}:{preset}", f"--workdir={workdir}", *settings), workdir)
    last, configured = progress_of(workdir)
    status = {"variant": variant, "name": name, "seed": seed, "returncode": proc.returncode,
              "minutes": round((time.time() - start) / 60, 2), "step": last, "steps": configured,
              "finished": proc.returncode == 0 and last is not None and last == configured,
              "train_args": train_args}
    if proc.returncode:
        status["error"] = proc.stderr or "?"
    elif not status["finished"]:  # exit 0 part-way: stopped by a signal, saved, resumable
        status["error"] = f"stopped at step {last} of {configured} (a stop request); run the command again to resume"
    with open(status_file, "w") as f:
        json.dump(status, f)
    _say(json.dumps(status))
    return status


def _demo_config() -> str:
    from jaxrl_entropy import presets
    return presets.__file__


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jaxrl-entropy reproduce", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/repro")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["full", "random", "anchor", "explorer", "soft"])
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (each uses all cores XLA gives it)")
    ap.add_argument("--warmup-seed", type=int, default=None,
                    help="one warm-up, of this seed, for every seed's RL runs (default: a warm-up per seed)")
    ap.add_argument("--geometry-every", type=int, default=10)
    ap.add_argument("--report", default=None, help="directory for the analysis (default <out>/analysis)")
    ap.add_argument("--config", default=None, help="a config file with get_config(variant) (default: the built-in "
                                                   "CPU demo); e.g. configs/multiplication.py")
    args, overrides = ap.parse_known_args(argv)
    bad = [a for a in overrides if not a.startswith("--config.")]
    if bad:
        ap.error(f"unrecognised arguments {bad}: only --config.KEY=VALUE overrides (applied to the warm-ups "
                 "and to every RL run) may follow the options")
    args.overrides = overrides
    config = os.path.abspath(args.config) if args.config else None
    if len(args.variants) > 1 and _config_name(overrides):
        ap.error(f"--config.name names one variant's runs (<out>/NAME_seed<s>); {len(args.variants)} variants "
                 f"({' '.join(args.variants)}) would share its directories: run one command per variant")
    for v in args.variants:
        try:
            variant_overrides(v, config or _demo_config())
        except ValueError as e:
            ap.error(str(e))
    os.makedirs(args.out, exist_ok=True)
    jobs = [(v, s) for s in args.seeds for v in args.variants]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        try:
            warmup_seeds = args.seeds if args.warmup_seed is None else [args.warmup_seed]
            done = dict(zip(warmup_seeds, pool.map(lambda s: warmup(args.out, s, args.overrides, config),
                                                   warmup_seeds)))
            ckpts = {s: done[s if args.warmup_seed is None else args.warmup_seed] for s in args.seeds}
        except RuntimeError as e:
            print(f"jaxrl-entropy reproduce: {e}", file=sys.stderr)
            return 1
        statuses = list(pool.map(lambda vs: rl_run(args.out, vs[0], vs[1], ckpts[vs[1]], args.overrides,
                                                     args.geometry_every, config), jobs))
    with open(os.path.join(args.out, "runs.json"), "w") as f:
        json.dump(statuses, f, indent=1)
    unfinished = [st for st in statuses if not st.get("finished")]
    for st in unfinished:
        print(f"jaxrl-entropy reproduce: {st.get('name', st['variant'])} seed {st['seed']} did not finish: "
              f"{st.get('error', '?')}", file=sys.stderr)
    dirs = [os.path.join(args.out, f"{st.get('name', st['variant'])}_seed{st['seed']}")
            for st in statuses if st.get("finished")]
    code = analyze.main(dirs + (["--out", args.report] if args.report else [])) if dirs else 0
    if unfinished:
        print(f"jaxrl-entropy reproduce: {len(unfinished)} of {len(statuses)} runs unfinished; the report covers "
              "the finished ones. Run the same command again: finished runs are skipped, stopped ones resume.",
              file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
