"""What a run costs, from `dryrun`'s programs: the calls per RL step of generation under dynamic
sampling and of evaluation at its cadence, and the whole run's hours and chip-hours.

    programs, notes = costs.weigh(cfg, programs)   # generation × expected batches, evaluation per step
    costs.expected_gen_batches(0.5, 512, 10)        # 2.0 generation batches per step
    costs.advice(cfg, report)                       # what to change when a program does not fit

Dynamic sampling decodes further generation batches until `rl.prompts_per_step` groups with
varying rewards are kept; how many depends on the model and the data, so the estimate takes the
share of groups kept as an assumption (`dryrun.keep_rate`, the presets' per model) and follows the
trainer's own rule for how many prompts each further batch decodes (`advantages.prompts_to_generate`).
Evaluation (`eval.every`) decodes `dryrun.eval_problems` × `eval.k` rows at step 0, every
`eval.every` steps and at the end.
"""
from __future__ import annotations

import dataclasses
import math
import re

import ml_collections

from jaxrl_entropy import chips
from jaxrl_entropy.rl.advantages import prompts_to_generate
from jaxrl_entropy.training.program import Program

GiB = float(1 << 30)


def expected_gen_batches(keep_rate: float, prompts: int, max_gen_batches: int) -> float:
    """Prompts decoded per step, in units of `prompts` (one generation batch), when a share
    `keep_rate` of every batch's groups is kept: the trainer's rule (`prompts_to_generate`) applied
    to the expected counts. At most `max_gen_batches` (the trainer stops with an error beyond)."""
    if not 0 < keep_rate <= 1:
        raise ValueError(f"keep_rate must lie in (0, 1], got {keep_rate}")
    seen = kept = 0.0
    batches = 0
    while kept < prompts - 1e-9 and batches < max_gen_batches:
        batches += 1
        n = prompts_to_generate(prompts, math.floor(kept), math.floor(seen), prompts,
                                last=batches == max_gen_batches)
        seen += n
        kept += keep_rate * n
    return seen / prompts


def evals_per_step(cfg: ml_collections.ConfigDict) -> float:
    """Evaluations per RL step: before steps 0, every, 2·every, ... < train.steps, and after the last."""
    every, steps = cfg.eval.every, cfg.train.steps
    if not every or not steps:
        return 0.0
    return (math.ceil(steps / every) + 1) / steps


def weigh(cfg: ml_collections.ConfigDict, programs: list[Program]) -> tuple[list[Program], list[str]]:
    """`programs` with the calls per step of generation (× the expected generation batches) and of
    the evaluation's decode (its rows relative to a rollout's, per step) set; and the assumptions,
    one line each, for the report."""
    notes = []
    factor = 1.0
    if cfg.rl.dynamic_sampling:
        factor = expected_gen_batches(cfg.dryrun.keep_rate, cfg.rl.prompts_per_step, cfg.rl.max_gen_batches)
        notes.append(f"generation: {factor:.2f} batches of {cfg.rl.prompts_per_step} prompts per step, dynamic "
                     f"sampling keeping {cfg.dryrun.keep_rate:.0%} of the groups (dryrun.keep_rate, an assumption: "
                     "set it to the sampling/kept_group_frac a run logs)")
    rollout_rows = cfg.rl.prompts_per_step * cfg.rl.group_size
    eval_rows = cfg.dryrun.eval_problems * cfg.eval.k
    per_step = evals_per_step(cfg)
    n_rollout = cfg.rollout.max_new_tokens
    n_eval = cfg.eval.max_new_tokens or n_rollout
    decode = next((p for p in programs if p.name == "rollout/decode"), None)
    out = []
    for p in programs:
        if p.name.startswith("rollout/") or p.name == "generation":
            p = dataclasses.replace(p, calls_per_step=p.calls_per_step * factor)
        elif p.name == "eval/decode" and decode is not None:
            calls = decode.calls_per_step * eval_rows / rollout_rows * n_eval / n_rollout * per_step
            p = dataclasses.replace(p, calls_per_step=calls)
        out.append(p)
    if cfg.eval.every and any(p.name.startswith("eval") for p in programs):
        if eval_rows:
            notes.append(f"evaluation: {cfg.dryrun.eval_problems} problems (dryrun.eval_problems) × k={cfg.eval.k} "
                         f"samples, {per_step * cfg.train.steps:g} times in {cfg.train.steps} steps "
                         f"(eval.every={cfg.eval.every}, step 0 and the end included)")
        else:
            notes.append("evaluation not counted: set dryrun.eval_problems to the problems of eval.benchmarks")
    return out, notes


def run_hours(step_s: float, steps: int, num_chips: int) -> tuple[float, float]:
    """(wall-clock hours, chip-hours) of `steps` RL steps of `step_s` seconds on `num_chips` chips."""
    hours = step_s * steps / 3600.0
    return hours, hours * num_chips


# ----------------------------------------------------------------------------- what to change
_STATE_PROGRAMS = ("update", "rollout_stats", "token_weights", "geometry/")


def _bigger_slices(topo: chips.Topology) -> list[chips.Topology]:
    """Standard slices of the same chip with more chips, smallest first."""
    out = []
    for name in chips.known_names():
        try:
            t = chips.resolve(name)
        except ValueError:
            continue
        if t.chip.name == topo.chip.name and t.num_chips > topo.num_chips:
            out.append(t)
    return sorted(out, key=lambda t: t.num_chips)


def training_state_bytes(cfg: ml_collections.ConfigDict, num_params: int) -> float:
    """Parameters, Adam's two moments, a gradient and its accumulator (f32), whole (all chips
    together): what `dryrun`'s estimate counts for the update."""
    pbytes = 2 if cfg.model.param_dtype in ("bfloat16", "float16") else 4
    return num_params * (3 * pbytes + 8)


def advice(cfg: ml_collections.ConfigDict, report, num_params: int) -> list[str]:
    """What to change, one line each, when a program of `report` does not fit: the smallest slice
    of the same chip that holds the training programs (their state shrinks with the chips), bf16
    parameters, a smaller KV pool for the engine's programs."""
    topo = chips.resolve(report.topology)
    limit = (1.0 - report.headroom) * topo.chip.hbm_bytes
    bad = [p for p in report.programs if not p.fits]
    if not bad:
        return []
    lines = []
    state = training_state_bytes(cfg, num_params)
    train_bad = [p for p in bad if p.name.startswith(_STATE_PROGRAMS)]
    # the engine could not be sized: the training state leaves no room for its weights and KV pool
    no_room = [p for p in bad if p.name == "rollout" and p.error]
    if train_bad or no_room:
        worst = max(train_bad, key=lambda p: p.total_bytes) if train_bad else None
        need = worst.total_bytes if worst else state / topo.num_chips
        rest = max(need - state / topo.num_chips, 0.0)   # what does not shrink with more chips
        room = 1.0 if worst else 0.5    # with no room for the engine, leave it half of each chip
        bigger = next((t for t in _bigger_slices(topo) if rest + state / t.num_chips <= room * limit), None)
        if bigger is not None:
            what = f"{worst.name}" if worst else "the training state"
            lines.append(f"a bigger slice: --topology={bigger.name} with --config.rl.micro_batch_size="
                         f"{bigger.num_chips} (about {(rest + state / bigger.num_chips) / GiB:.0f} GiB per chip for "
                         f"{what})")
        # (not bf16 parameters: AdamW keeps a float32 master copy of them, rl/master_weights.py, so
        # the state grows from 12 to 14 bytes per parameter instead of shrinking)
        if rest > limit:
            lines.append(f"one sequence's activations alone need about {rest / GiB:.0f} GiB per chip: split "
                         "heads and MLP over neighbouring chips (--config.parallel.tensor=2, halving "
                         "rl.micro_batch_size) or lower model.logits_chunk")
    engine_bad = [p for p in bad if p.name.startswith(("rollout/", "eval/"))]
    if engine_bad:
        worst = max(engine_bad, key=lambda p: p.total_bytes)
        pool = re.search(r"= ([\d.]+) GiB KV per device", worst.note)
        size = float(pool.group(1)) - (worst.total_bytes - limit) / GiB - 0.5 if pool else None
        if size is not None and size < 1:   # no pool worth having: the state itself is the problem
            return lines
        lines.append(f"a smaller KV pool for the engine: --config.rollout.kv_cache_gib="
                     f"{'<smaller>' if size is None else f'{size:.0f}'} ({worst.name} needs "
                     f"{worst.total_bytes / GiB:.1f} GiB per chip with the automatic pool, 80 % of what the training "
                     "state and the inference weights leave; fewer slots, slower generation)")
    return lines


# ----------------------------------------------------------------------------- the planning table
@dataclasses.dataclass
class Cell:
    """One model on one slice: what `plan_cell` makes of an analytic report and, where there is one,
    a compiled one."""
    model: str
    slice: str
    fits: str                 # "yes" | "no" | "borderline" (analytic, within the calibration of the limit)
    train_gib: float          # the largest training program per chip (update, forward, geometry)
    capacity_gib: float
    step_s: float             # roofline seconds per RL step, generation and evaluation included
    generation_s: float       # of which generation and evaluation
    hours: float              # train.steps steps
    chip_hours: float
    source: str               # "compiled" | "analytic" | "compiled (training), analytic (generation)"
    note: str = ""


def _is_generation(name: str) -> bool:
    """The engine's programs (and the dense sampler's), not the old-policy forward `rollout_stats`."""
    return name in ("rollout", "generation", "eval") or name.startswith(("rollout/", "eval/"))


def plan_cell(model: str, analytic, compiled=None, *, calibration: float = 1.0) -> Cell:
    """A table cell from `dryrun`'s reports of one config on one slice. `analytic`: the `--estimate`
    report (every program). `compiled` (optional): a compiled report of some programs; its memory
    and its training programs' roofline replace the estimate's. Generation and evaluation always
    come from the estimate: the decode's memory floor (weights + live KV per step; the compiled
    decode counts the whole KV pool as read every step, an upper bound). `calibration`: how much
    larger compiled totals have come out than the estimate's (the worst seen); an analytic program
    that fits only without it is "borderline"."""
    done = {p.name: p for p in (compiled.programs if compiled else []) if p.compiled}
    limit = (1.0 - analytic.headroom)
    train_bytes, step_s, gen_s = 0.0, 0.0, 0.0
    too_big, engine_too_big, borderline = [], [], []
    for p in analytic.programs:
        c = done.get(p.name)
        if c is not None:
            ok, total = c.fits, c.total_bytes
        else:
            total = p.total_bytes
            # the engine's programs are sized by formula to a share of the memory left (no calibration)
            scale = 1.0 if _is_generation(p.name) else calibration
            ok = p.fits and not p.error
            if ok and total * scale > limit * p.capacity_bytes:
                borderline.append(p)
        if not ok:
            (engine_too_big if _is_generation(p.name) else too_big).append(p)
        roofline = c.roofline_s if (c is not None and not _is_generation(p.name)) else p.roofline_s
        step_s += roofline * p.calls_per_step
        if _is_generation(p.name):
            gen_s += roofline * p.calls_per_step
        elif not p.error:
            train_bytes = max(train_bytes, total)
    fits = "no" if too_big or engine_too_big else "borderline" if borderline else "yes"
    hints = []
    advice = " ".join(analytic.advice)
    if too_big:
        bigger = re.search(r"--topology=(\S+)", advice)
        hints.append(f"{max(too_big, key=lambda p: p.total_bytes).name} too big"
                     + (f"; ≥ {bigger.group(1)}" if bigger else ""))
    if borderline:
        worst = max(borderline, key=lambda p: p.total_bytes)
        hints.append(f"{worst.name} ≈ {worst.total_bytes / GiB:.0f}–{worst.total_bytes * calibration / GiB:.0f} GiB of "
                     f"{limit * worst.capacity_bytes / GiB:.0f} usable: compile to know")
    if engine_too_big and not too_big:
        pool = re.search(r"kv_cache_gib=(\d+)", advice)
        hints.append("the automatic KV pool leaves too little" + (f": rollout.kv_cache_gib={pool.group(1)}" if pool else ""))
    hours, chip_hours = run_hours(step_s, analytic.steps, analytic.num_chips)
    if not done:
        source = "analytic"
    elif all(p.name in done for p in analytic.programs):
        source = "compiled"
    else:
        names = sorted({"engine" if _is_generation(n) else n for n in done})
        source = f"compiled: {', '.join(names)}; the rest analytic"
    cap = analytic.chip["hbm_bytes"] / GiB
    return Cell(model, analytic.topology, fits, train_bytes / GiB, cap, step_s, gen_s, hours, chip_hours, source,
                note="; ".join(hints))


TABLE_COLUMNS = ("model", "slice", "fits", "training GiB/chip", "s per RL step", "generation + eval",
                 "120 steps", "chip-hours", "figures")


def format_table(cells: list[Cell]) -> str:
    """The markdown table of docs/scaling.md: model × slice → fits, per-chip GiB, roofline step
    time, the run's hours and chip-hours, and where the figures come from."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for c in cells:
        fits = c.fits + (f": {c.note}" if c.note else "")
        if c.fits == "no":   # a step that cannot run has no time
            lines.append(f"| {c.model} | {c.slice} | {fits} | {c.train_gib:.1f} of {c.capacity_gib:.0f} | – | – | – | "
                         f"– | {c.source} |")
            continue
        run = f"{c.hours:,.0f} h" if c.hours >= 10 else f"{c.hours:.1f} h"
        lines.append(f"| {c.model} | {c.slice} | {fits} | {c.train_gib:.1f} of {c.capacity_gib:.0f} | "
                     f"{c.step_s:,.0f} | {c.generation_s / c.step_s:.0%} | {run} | {c.chip_hours:,.0f} | "
                     f"{c.source} |")
    return "\n".join(lines)
