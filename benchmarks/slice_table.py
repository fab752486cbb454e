"""The model × slice table of docs/scaling.md: every Qwen3 preset on every slice a user has.

    python benchmarks/slice_table.py [--compiled benchmarks/dryrun] [--models 0.6b,1.7b] [--slices v5e-8]

For each cell it runs `dryrun --estimate` (formulas on CPU stand-in devices: seconds, no libtpu)
on the preset laid out for the slice (`presets.qwen3_dapo(size, "full,<slice>")`, the architecture
from configs/arch/), and takes compiled figures where it has them: the JSON reports of
`jaxrl-entropy dryrun --out` in --compiled named `<arch>_<slice>*.json` (several files, e.g. one
per `--programs` subset, are merged), and Qwen3-8B's compiled tables of docs/scaling.md
(`DOCUMENTED`). Compiled figures replace the estimate's memory and the training programs' roofline;
generation and evaluation always come from the estimate (the decode's memory floor). An analytic
program whose total, scaled by the worst compiled/estimate ratio seen (printed), would pass the
limit is "borderline". Prints the markdown table and the calibration.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

MAX_CHIPS = 32   # the largest slice of the table (v5p-64): CPU stand-ins for its devices
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = " ".join([f for f in os.environ.get("XLA_FLAGS", "").split()
                                    if not f.startswith("--xla_force_host_platform_device_count")]
                                   + [f"--xla_force_host_platform_device_count={MAX_CHIPS}"])
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from jaxrl_entropy import presets  # noqa: E402
from jaxrl_entropy.aot import costs, dryrun  # noqa: E402
from jaxrl_entropy.aot.report import GiB, ProgramReport, Report  # noqa: E402

TABLE_SLICES = ("h100x1", "h100x8", "v5e-8", "v6e-8", "v5p-8", "v5p-64")
TRAINING = ("update", "rollout_stats", "geometry/gradient")   # the programs compared for the calibration

# Qwen3-8B compiled on 2026-11-29 (docs/scaling.md's tables: total GiB per chip, roofline s per call)
DOCUMENTED = {
    ("8b", "v5p-64"): {"rollout_stats": (5.44, 91.3), "update": (14.49, 22.0), "token_weights": (3.73, 0.000895),
                       "geometry/gradient": (14.44, 1.38), "geometry/projections": (8.71, 1.05),
                       "geometry/norm_and_dot": (4.91, 0.00263), "geometry/sketch": (4.11, 0.000367),
                       "rollout/prefill": (77.57, 0.0603), "rollout/decode": (78.23, 1.01),
                       "eval/decode": (78.40, 1.06)},
    ("8b", "v5p-8"): {"rollout_stats": (29.32, 730.0), "update": (57.46, 176.0), "token_weights": (24.57, 0.00103),
                      "geometry/gradient": (46.91, 1.38), "geometry/projections": (36.43, 1.05),
                      "geometry/norm_and_dot": (38.75, 0.00792), "geometry/sketch": (33.95, 0.00383),
                      "rollout/prefill": (81.63, 0.0603), "rollout/decode": (82.16, 0.828),
                      "eval/decode": (82.62, 0.862)},
}


def preset(size: str, slice_name: str):
    cfg = presets.qwen3_dapo(size, f"full,{slice_name}")
    cfg.model.hf_dir = os.path.join(ROOT, "configs", "arch", presets.MODELS[size].arch)
    return cfg


def compiled_report(size: str, slice_name: str, directory: str, analytic: Report) -> Report | None:
    """The compiled programs of one cell: `dryrun --out` files, or the documented 8B tables."""
    programs: dict[str, ProgramReport] = {}
    arch = presets.MODELS[size].arch
    for path in sorted(glob.glob(os.path.join(directory, f"{arch}_{slice_name}*.json"))):
        for p in dryrun.load(path).programs:
            if p.compiled:
                programs[p.name] = p
    cap = analytic.chip["hbm_bytes"]
    for name, (gib, roofline) in DOCUMENTED.get((size, slice_name), {}).items():
        programs.setdefault(name, ProgramReport(name, "docs/scaling.md", 0.0, compiled=True, total_bytes=gib * GiB,
                                                capacity_bytes=cap, fits=gib * GiB <= 0.9 * cap,
                                                roofline_s=roofline))
    if not programs:
        return None
    return Report(analytic.topology, analytic.description, analytic.chip, analytic.mesh, analytic.config,
                  analytic.headroom, analytic.tokens_per_step, analytic.response_tokens_per_step,
                  list(programs.values()))


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compiled", default=os.path.join(ROOT, "benchmarks", "dryrun"))
    ap.add_argument("--models", default=",".join(presets.MODELS))
    ap.add_argument("--slices", default=",".join(TABLE_SLICES))
    args = ap.parse_args(argv)
    cells = []
    for size in args.models.split(","):
        for slice_name in args.slices.split(","):
            analytic = dryrun.run(preset(size, slice_name), slice_name, estimate=True)
            cells.append((size, slice_name, analytic, compiled_report(size, slice_name, args.compiled, analytic)))
    ratios = []
    for size, slice_name, analytic, compiled in cells:
        by_name = {p.name: p for p in analytic.programs}
        for p in (compiled.programs if compiled else []):
            if p.name in TRAINING and p.name in by_name and by_name[p.name].total_bytes:
                ratios.append((p.total_bytes / by_name[p.name].total_bytes, f"Qwen3-{size} {p.name} on {slice_name}"))
    calibration = max([r for r, _ in ratios] + [1.0])
    rows = [costs.plan_cell(f"Qwen3-{size.upper()}", analytic, compiled, calibration=calibration)
            for size, slice_name, analytic, compiled in cells]
    out = [costs.format_table(rows), "",
           f"calibration: compiled / estimated total per chip of the training programs, worst {calibration:.2f}:"]
    out += [f"  {r:.2f} {what}" for r, what in sorted(ratios, reverse=True)]
    for size, slice_name, analytic, _ in cells:
        if analytic.advice:
            out.append(f"Qwen3-{size.upper()} on {slice_name}, what would fit: " + " | ".join(analytic.advice))
    text = "\n".join(out)
    print(text)
    return text


if __name__ == "__main__":
    main()
