"""The gradient-geometry probe of a training run (`train.geometry_every`): which steps it runs at,
the token subsets it compares, and the metrics it writes (`geometry/*`, `controls/*`). It holds
what must outlive a step: the previous probe's gradient sketches (for `cos_prev`) and its step."""
from __future__ import annotations

import jax
import numpy as np

from jaxrl_entropy import parallel
from jaxrl_entropy.config import TrainConfig, as_tuple
from jaxrl_entropy.rl import diagnostics
from jaxrl_entropy.training import rng, step_programs


class GeometryProbe:
    """`due(step)`, then `measure(...)` on that step's rollout: subset gradients against the full
    one, their volatility, and the controls on every token's alignment with the full update."""

    def __init__(self, train: TrainConfig, *, fraction: float, micro_batch_size: int, seed: int):
        self.train, self.fraction, self.rows, self.seed = train, fraction, micro_batch_size, seed
        self.tracker = diagnostics.GeometryTracker()
        self.last_step: int | None = None

    @property
    def sketch(self) -> diagnostics.GradientSketch:
        return self.tracker.sketch

    def due(self, step: int) -> bool:
        return step_programs.geometry_probe_due(self.train, step)

    def measure(self, programs, params, data: dict, st: dict, step: int) -> dict[str, float]:
        """On the step's first micro-batch (bounded memory at any scale): `data` the update's arrays
        `[M, ...]`, `st` the rollout statistics (`hnorm`, `pred_entropy` `[M, N]`)."""
        n = self.rows
        part = jax.device_put(jax.tree.map(lambda x: x[:n], data), programs.batch_sharding)
        geometry = programs.geometry
        layer_entropy = None
        if geometry.layers:  # train.geometry_layers: each layer's own anchors and explorers
            h_LxBxN = geometry.layer_hnorms(params, part)
            layer_entropy = {f"L{layer}": h_LxBxN[i] for i, layer in enumerate(geometry.layers)}
        subsets = diagnostics.geometry_subsets(part["response_mask"], st["hnorm"][:n], fraction=self.fraction,
                                               rng=rng.step_key(self.seed, step, rng.GEOMETRY),
                                               random_fractions=as_tuple(self.train.geometry_random_fractions),
                                               halves=self.train.geometry_halves, layer_entropy=layer_entropy)
        metrics, sketches, align = geometry(params, part, subsets)
        metrics, sketches = diagnostics.split_half_metrics(metrics, sketches)
        out = {f"geometry/{k}": float(v) for k, v in self.tracker.update(metrics, sketches).items()}
        out.update({f"geometry/{name}/tokens": float(np.sum(parallel.to_host(w) > 0))
                    for name, w in subsets.items() if name in sketches})
        if self.last_step is not None:
            out["geometry/steps_since_prev"] = float(step - self.last_step)
        self.last_step = step
        out.update(diagnostics.alignment_controls(
            parallel.to_host(align), parallel.to_host(st["hnorm"][:n]), parallel.to_host(st["pred_entropy"][:n]),
            parallel.to_host(part["response_mask"]), fraction=self.fraction, seed=step))
        return out
