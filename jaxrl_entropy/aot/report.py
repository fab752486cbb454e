"""`dryrun`'s report: per program, what it needs of a chip (memory, FLOPs, traffic, collectives) and
its roofline time; the table `jaxrl-entropy dryrun` prints, the verdict, and the JSON of `--out`."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

GiB = float(1 << 30)


@dataclasses.dataclass
class ProgramReport:
    name: str
    note: str
    calls_per_step: float
    compiled: bool                    # False: an analytic estimate (GPU without a GPU) or a compile error
    compile_s: float = 0.0
    argument_bytes: float = 0.0
    output_bytes: float = 0.0
    alias_bytes: float = 0.0
    temp_bytes: float = 0.0
    code_bytes: float = 0.0
    resident_bytes: float = 0.0
    total_bytes: float = 0.0          # arguments + outputs − aliased + temporaries + code + resident
    capacity_bytes: float = 0.0
    fits: bool = False
    hlo_flops: float = 0.0            # per chip per call, matmuls in the compiled HLO, loop trips counted
    kernel_flops: float = 0.0         # per chip per call, analytic, inside Pallas kernels
    xla_cost_flops: float = 0.0       # `cost_analysis()["flops"]` (loop bodies counted once)
    hbm_traffic_bytes: float = 0.0    # per chip per call (estimate, loop trips counted)
    collectives: dict = dataclasses.field(default_factory=dict)   # kind -> {"count", "bytes"} per call
    largest_collectives: list = dataclasses.field(default_factory=list)
    unknown_trip_loops: int = 0
    t_compute_s: float = 0.0
    t_memory_s: float = 0.0
    t_collective_s: float = 0.0
    roofline_s: float = 0.0           # per call: max(compute, memory, collectives)
    largest_buffers: list = dataclasses.field(default_factory=list)
    error: str = ""
    estimate: str = ""                # how an analytic (uncompiled) figure was made

    @property
    def step_s(self) -> float:
        return self.roofline_s * self.calls_per_step


@dataclasses.dataclass
class Report:
    topology: str
    description: str
    chip: dict
    mesh: dict
    config: str
    headroom: float
    tokens_per_step: int
    response_tokens_per_step: int
    programs: list[ProgramReport]
    peak_host_rss_gib: float = 0.0
    num_chips: int = 0                # chips of the slice (for chip-hours)
    steps: int = 0                    # RL steps of the run (train.steps)
    notes: list = dataclasses.field(default_factory=list)    # what the step time assumes (`costs.weigh`)
    advice: list = dataclasses.field(default_factory=list)   # what to change when something does not fit

    @property
    def ok(self) -> bool:
        return all(p.fits for p in self.programs)

    @property
    def step_s(self) -> float:
        return sum(p.step_s for p in self.programs)

    @property
    def generation_s(self) -> float:
        """The part of `step_s` that is generation and evaluation (decode at the worst-case length)."""
        return sum(p.step_s for p in self.programs
                   if p.name in ("generation", "eval") or p.name.startswith(("rollout/", "eval/")))

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["ok"], d["step_s"], d["generation_s"] = self.ok, self.step_s, self.generation_s
        for p, pr in zip(d["programs"], self.programs):
            p["step_s"] = pr.step_s
        return json.dumps(d, indent=1)


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def format_report(report: Report) -> str:
    """The per-program table (per chip, per call), then the verdicts and the step estimate."""
    chip = report.chip
    lines = [f"dryrun: config {report.config!r} on {report.description}, mesh {report.mesh}",
             f"chip {chip['name']}: {chip['hbm_bytes'] / GiB:.0f} GiB HBM, {chip['bf16_flops'] / 1e12:.0f} TFLOP/s bf16, "
             f"{chip['hbm_bw'] / 1e9:.0f} GB/s HBM" + (f", {chip['ici_bw'] / 1e9:.0f} GB/s ICI" if chip['ici_bw'] else "")
             + f"; fits = total ≤ {1 - report.headroom:.0%} of HBM",
             "",
             "| program | args | out | temp | resident | total GiB | % HBM | fits | TFLOP/call | HBM GB/call | "
             "collectives GB/call | compile s | roofline s/call | calls/step | s/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in report.programs:
        pct = 100.0 * p.total_bytes / p.capacity_bytes if p.capacity_bytes else 0.0
        coll = sum(c["bytes"] for c in p.collectives.values()) / 1e9
        fits = "yes" if p.fits else ("ERROR" if p.error and not p.total_bytes else "NO")
        est = "~" if p.estimate else ""
        lines.append(
            f"| {p.name} | {_gib(p.argument_bytes)} | {_gib(p.output_bytes - p.alias_bytes)} | {_gib(p.temp_bytes)} | "
            f"{_gib(p.resident_bytes)} | {est}{_gib(p.total_bytes)} | {pct:.0f}% | {fits} | "
            f"{(p.hlo_flops + p.kernel_flops) / 1e12:.2f} | {p.hbm_traffic_bytes / 1e9:.1f} | {coll:.1f} | "
            f"{p.compile_s:.0f} | {p.roofline_s:.3g} | {p.calls_per_step:g} | {p.step_s:.3g} |")
    lines.append("")
    lines.append(f"tokens per RL step: {report.tokens_per_step:,} ({report.response_tokens_per_step:,} response tokens); "
                 f"roofline step time (programs above, generation as compiled): {report.step_s:.3g} s; "
                 f"peak host RSS {report.peak_host_rss_gib:.1f} GiB")
    if report.steps and report.num_chips:
        hours = report.step_s * report.steps / 3600.0
        lines.append(f"{report.steps} steps (train.steps): {hours:.3g} h, {hours * report.num_chips:.3g} chip-hours on "
                     f"{report.num_chips} chips, at roofline (a lower bound for every program at the shapes counted; "
                     f"generation and evaluation {report.generation_s:.3g} s of each step, at the worst-case length)")
    lines += [f"assumes {n}" for n in report.notes]
    for p in report.programs:
        details = [f"  {p.note}"]
        if p.kernel_flops:
            details.append(f"  + {p.kernel_flops / 1e12:.2f} TFLOP/chip analytic attention inside Pallas kernels "
                           f"(XLA's cost_analysis: {p.xla_cost_flops / 1e12:.2f} TFLOP, loop bodies once)")
        if p.collectives:
            details.append("  collectives/call: " + ", ".join(
                f"{k} ×{c['count']:g} ({c['bytes'] / 1e9:.2f} GB)" for k, c in p.collectives.items()))
        if p.unknown_trip_loops:
            details.append(f"  {p.unknown_trip_loops} loop(s) of data-dependent length counted once")
        if p.estimate:
            details.append("  " + p.estimate)
        if not p.fits:
            details.append(f"  DOES NOT FIT: {p.error or 'over the headroom'}")
            details += [f"    {b}" for b in p.largest_buffers]
        elif p.error:
            details.append(f"  {p.error}")
        lines.append(f"- {p.name}:")
        lines += details
    return "\n".join(lines)


def failure_message(report: Report) -> str:
    """What did not fit, where, and its largest buffers (the non-zero exit's message)."""
    bad = [p for p in report.programs if not p.fits]
    out = []
    for p in bad:
        what = p.error or (f"needs {p.total_bytes / GiB:.1f} GiB per chip, over {1 - report.headroom:.0%} of "
                           f"{p.capacity_bytes / GiB:.0f} GiB")
        out.append(f"program {p.name!r} does not fit on {report.description}: {what}")
        out += [f"  largest buffer: {b}" for b in p.largest_buffers[:5]]
    if report.advice:
        out.append("what would fit:")
        out += [f"  - {a}" for a in report.advice]
    return "\n".join(out)


def as_dict(report: Report) -> dict[str, Any]:
    return json.loads(report.to_json())


def load(path: str) -> Report:
    """A report written by `--out=FILE`, back as a `Report` (for `format_report`: docs tables)."""
    with open(path) as f:
        d = json.load(f)
    fields = {f.name for f in dataclasses.fields(ProgramReport)}
    programs = [ProgramReport(**{k: v for k, v in p.items() if k in fields}) for p in d.pop("programs")]
    keep = {f.name for f in dataclasses.fields(Report)}
    return Report(programs=programs, **{k: v for k, v in d.items() if k in keep})
