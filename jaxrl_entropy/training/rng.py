"""The random streams of a run. Every draw of RL step s comes from `fold_in(fold_in(key(seed), s), tag)`,
so a resumed run repeats exactly what an uninterrupted one would do, and the streams of one step
(sampling, token weights, evaluation, gradient geometry) never overlap."""
from __future__ import annotations

import jax

SAMPLE, WEIGHTS, EVAL, GEOMETRY = 1, 2, 3, 4
SFT_CHECK_OFFSET = 10_000_000  # warm-up accuracy checks use "steps" that RL never reaches
SFT_WEIGHTS_OFFSET = 20_000_000  # and the warm-up's random token subsets (train.sft_weights=random)


def step_key(seed: int, step: int, tag: int | None = None) -> jax.Array:
    """The key of RL step `step`, or of its stream `tag`."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    return key if tag is None else jax.random.fold_in(key, tag)
