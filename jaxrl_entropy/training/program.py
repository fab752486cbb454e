"""Programs described for ahead-of-time compilation: what `dryrun` compiles, from abstract arguments
(`jax.ShapeDtypeStruct`s carrying their shardings), with no weights and no data.

Each part of the system that owns jitted programs (the RL step, the rollout engine, evaluation)
describes them as `Program`s; `dryrun` compiles them for a TPU topology and reports memory, FLOPs,
collectives and a roofline step-time estimate (`calls_per_step` weighs each program in the step).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Program:
    name: str                    # e.g. "update", "rollout/decode"
    fn: Callable                 # a `jax.jit`-wrapped function (with in/out shardings where it matters)
    args: tuple[Any, ...]        # abstract positional arguments (pytrees of ShapeDtypeStruct)
    calls_per_step: float = 1.0  # how many times one RL step runs it (for the step-time estimate)
    note: str = ""               # shapes worth printing (e.g. "micro 16 × 9216 tokens")
    kernel_flops: float = 0.0    # per device, per call: FLOPs inside custom kernels (Pallas) that the
                                 # compiler's cost model cannot see, counted analytically
    resident_bytes: int = 0      # per device: other arrays the caller keeps alive while it runs
