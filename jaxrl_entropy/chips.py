"""Accelerators by their published figures, and slice names → topologies the TPU compiler knows.

    topo = chips.resolve("v5p-64")      # 32 v5p chips, "v5p:2x4x4"
    topo.chip.hbm_bytes, topo.chip.bf16_flops, topo.chip.hbm_bw, topo.chip.ici_bw
    devices = topo.tpu_devices()        # real TPU devices from libtpu (no TPU attached)

Figures are the vendors' per-chip numbers (dense bf16, no sparsity); `source` says where each comes
from. Cloud TPU names count TensorCores for v4 and v5p (two per chip: `v5p-64` is 32 chips) and
chips for v5e and v6e (`v6e-8` is 8 chips), as `gcloud` does.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys

GiB = 1 << 30
GB = 10 ** 9


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int            # memory per chip
    bf16_flops: float         # peak dense bf16 FLOP/s per chip
    hbm_bw: float             # bytes/s per chip
    ici_bw: float | None      # bidirectional chip-to-chip bytes/s per chip (TPU ICI / NVLink); None = unpublished
    cores_per_chip: int       # TensorCores per chip (v4/v5p names count cores)
    source: str


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1200 * GB, None, 2,
               "cloud.google.com/tpu/docs/v4 (275 TFLOP/s, 32 GiB, 1200 GBps)"),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819 * GB, 400 * GB, 1,
                "cloud.google.com/tpu/docs/v5e (197 TFLOP/s, 16 GB, 819 GBps, ICI 400 GBps)"),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765 * GB, 1200 * GB, 2,
                "cloud.google.com/tpu/docs/v5p (459 TFLOP/s, 95 GiB, 2765 GBps, ICI 1200 GBps)"),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640 * GB, 800 * GB, 1,
                "cloud.google.com/tpu/docs/v6e (918 TFLOP/s, 32 GB, 1640 GBps, ICI 800 GBps)"),
    "a100": Chip("a100", 80 * GB, 312e12, 2039 * GB, 600 * GB, 1,
                 "NVIDIA A100 80GB SXM datasheet (312 TFLOP/s bf16 dense, 2039 GB/s, NVLink 600 GB/s)"),
    "h100": Chip("h100", 80 * GB, 989e12, 3350 * GB, 900 * GB, 1,
                 "NVIDIA H100 SXM datasheet (989 TFLOP/s bf16 dense, 80 GB, 3.35 TB/s, NVLink 900 GB/s)"),
    "h200": Chip("h200", 141 * GB, 989e12, 4800 * GB, 900 * GB, 1,
                 "NVIDIA H200 SXM datasheet (989 TFLOP/s bf16 dense, 141 GB, 4.8 TB/s, NVLink 900 GB/s)"),
}

# `device.device_kind` prefixes → chips; first match wins ("TPU v5 lite" is how a v5e reports
# itself, "TPU v5" a v5p)
DEVICE_KINDS = (("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"), ("TPU v5p", "v5p"), ("TPU v5", "v5p"),
                ("TPU v4", "v4"), ("TPU v6 lite", "v6e"), ("TPU v6e", "v6e"), ("NVIDIA H100", "h100"),
                ("NVIDIA H200", "h200"), ("NVIDIA A100", "a100"))


def chip_for_device_kind(kind: str) -> Chip | None:
    """The chip behind a JAX `device_kind` string, or None when it is not in `CHIPS`."""
    for prefix, name in DEVICE_KINDS:
        if str(kind).startswith(prefix):
            return CHIPS[name]
    return None


# chips -> physical shape, as Cloud TPU lays out its slices
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
GPU_MAX_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str                 # as the user wrote it ("v5p-64")
    chip: Chip
    platform: str             # "tpu" | "gpu"
    num_chips: int
    shape: str                # "2x4x4" (TPU) | "8" (GPU)

    @property
    def tpu_name(self) -> str:
        """The name `jax.experimental.topologies.get_topology_desc` takes ("v5p:2x4x4")."""
        return f"{self.chip.name}:{self.shape}"

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.shape.split("x"))

    def describe(self) -> str:
        if self.platform == "gpu":
            return f"{self.name} ({self.num_chips} × {self.chip.name.upper()})"
        return f"{self.name} ({self.tpu_name}, {self.num_chips} chips)"

    def tpu_devices(self) -> list:
        """The devices of this slice from the TPU compiler (libtpu), one per chip, with real
        coordinates and hosts: enough to compile for it on a CPU machine."""
        if self.platform != "tpu":
            raise ValueError(f"{self.name} is not a TPU slice")
        from jax.experimental import topologies
        kwargs = {"chip_config_name": "megacore" if self.chip.cores_per_chip > 1 else "default"}
        if self.chip.name in ("v5e", "v6e") and self.num_chips == 8:
            kwargs["chips_per_host_bounds"] = (2, 4, 1)  # single-host 8-chip VMs
        elif self.num_chips >= 4:
            kwargs["chips_per_host_bounds"] = (2, 2, 1)
        if len(self.dims) == 3 and self.num_chips >= 64:
            kwargs["wrap"] = (True, True, True)  # full cubes are tori
        return list(topologies.get_topology_desc(platform="tpu", topology_name=self.tpu_name, **kwargs).devices)


def known_names() -> list[str]:
    out = [f"v5p-{2 * n}" for n in _SHAPES_3D] + [f"v4-{2 * n}" for n in _SHAPES_3D if n <= 2048]
    out += [f"{c}-{n}" for c in ("v5e", "v6e") for n in _SHAPES_2D]
    out += [f"{g}x{n}" for g in ("a100", "h100", "h200") for n in (1, 2, 4, 8)]
    return out


def resolve(name: str) -> Topology:
    """`v5p-64`, `v4-32`, `v5e-256`, `v6e-8`, an explicit `v5p:2x4x4` / `v5e:4x4`, or `h100x8`."""
    raw = name.strip()
    key = raw.lower().replace("v5litepod", "v5e").replace("v5lite", "v5e")
    m = re.fullmatch(r"(a100|h100|h200)(?:x(\d+))?", key)
    if m:
        n = int(m.group(2) or 8)
        if not 1 <= n <= GPU_MAX_PER_HOST:
            raise ValueError(f"topology {raw!r}: {n} GPUs; give 1..{GPU_MAX_PER_HOST} (one host), e.g. h100x8")
        return Topology(raw, CHIPS[m.group(1)], "gpu", n, str(n))
    m = re.fullmatch(r"(v4|v5p|v5|v5e|v6e):(\d+(?:x\d+)+)", key)
    if m:
        chip = CHIPS["v5p" if m.group(1) == "v5" else m.group(1)]
        shape = m.group(2)
        return Topology(raw, chip, "tpu", math.prod(int(d) for d in shape.split("x")), shape)
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", key)
    if m:
        chip = CHIPS[m.group(1)]
        n = int(m.group(2))
        if n % chip.cores_per_chip:
            raise ValueError(f"topology {raw!r}: {chip.name} names count TensorCores ({chip.cores_per_chip} per "
                             f"chip); {n} is not a multiple of {chip.cores_per_chip}")
        chips = n // chip.cores_per_chip
        shapes = _SHAPES_3D if chip.cores_per_chip > 1 else _SHAPES_2D
        if chips not in shapes:
            sizes = ", ".join(f"{chip.name}-{k * chip.cores_per_chip}" for k in shapes)
            raise ValueError(f"topology {raw!r}: no standard {chip.name} slice of {chips} chips; choose one of "
                             f"{sizes}, or give the shape ({chip.name}:AxB{'xC' if chip.cores_per_chip > 1 else ''})")
        return Topology(raw, chip, "tpu", chips, shapes[chips])
    raise ValueError(f"unknown topology {raw!r}; use a Cloud TPU name (v5p-64, v4-32, v5e-256, v6e-8), an explicit "
                     "shape (v5p:2x4x4, v5e:4x4) or a GPU host (h100x8, h200x8, a100x8)")


def prepare_environment(topo: Topology, *, estimate: bool = False) -> None:
    """What `dryrun` needs set before jax is first imported (jax reads it once): on a TPU topology
    libtpu serves as the compiler only, so JAX runs on the CPU; for a GPU estimate without GPUs, or
    any `estimate`, `num_chips` CPU stand-in devices carry the shardings. Once jax is imported the
    caller's own settings stand (the test suite's 8 fake devices)."""
    if "jax" in sys.modules:
        return
    if topo.platform == "tpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if topo.platform == "tpu" and not estimate:
        return
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={topo.num_chips}").strip()
