"""Group-relative advantages (GRPO / Dr. GRPO) and DAPO dynamic sampling.

A *group* is the G responses sampled for one prompt; rewards arrive flat, group by group:
``rewards_N`` with ``N = num_groups * G`` and response ``i`` in group ``i // G``.
"""
from __future__ import annotations

import math

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = [
    "group_advantages",
    "keep_groups",
    "DynamicSamplingError",
    "GroupAccumulator",
]


def _check_group_size(n: int, group_size: int, where: str) -> None:
    if group_size < 1:
        raise ValueError(f"{where}: group_size must be >= 1, got {group_size}.")
    if n % group_size:
        raise ValueError(
            f"{where}: {n} rewards are not a whole number of groups of group_size={group_size}; "
            "the rollout batch must hold G responses for every prompt, group by group."
        )


def group_advantages(
    rewards_N: jnp.ndarray,
    group_size: int,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> jnp.ndarray:
    """Per-response advantage relative to its group.

    ``A_i = (r_i - mean_g) / (std_g + eps)`` with the unbiased std (ddof=1), as verl's GRPO;
    ``scale_by_std=False`` gives Dr. GRPO's ``r_i - mean_g``.  A group of one, and a group whose
    rewards are all equal, gets exactly 0 (float32 round-off in the mean would otherwise turn
    ``~1e-8 / (~1e-8 + eps)`` into a spurious O(0.01) advantage).

    Args:
      rewards_N: ``[N]`` rewards, ``N = num_groups * group_size``, grouped contiguously.
      group_size: G, static.
    Returns:
      ``[N]`` float32 advantages (broadcast over response tokens by the loss).
    """
    r_N = jnp.asarray(rewards_N, jnp.float32)
    if r_N.ndim != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D [N], got shape {r_N.shape}.")
    n = r_N.shape[0]
    _check_group_size(n, group_size, "group_advantages")
    if group_size == 1:
        return jnp.zeros_like(r_N)
    r_GxK = r_N.reshape(n // group_size, group_size)
    centred_GxK = r_GxK - r_GxK.mean(axis=1, keepdims=True)
    if scale_by_std:
        std_Gx1 = jnp.sqrt(jnp.sum(centred_GxK**2, axis=1, keepdims=True) / (group_size - 1))
        adv_GxK = centred_GxK / (std_Gx1 + eps)
    else:
        adv_GxK = centred_GxK
    constant_Gx1 = (r_GxK.max(axis=1) == r_GxK.min(axis=1))[:, None]
    return jnp.where(constant_Gx1, 0.0, adv_GxK).reshape(n)


def keep_groups(rewards_N: jnp.ndarray, group_size: int) -> jnp.ndarray:
    """``[N // group_size]`` bool: False for groups whose rewards are all equal (no signal).

    A group of one is always dropped (its advantage is 0).
    """
    r_N = jnp.asarray(rewards_N)
    _check_group_size(r_N.shape[0], group_size, "keep_groups")
    r_GxK = r_N.reshape(-1, group_size)
    return r_GxK.max(axis=1) != r_GxK.min(axis=1)


def _keep_groups_np(rewards_N: np.ndarray, group_size: int) -> np.ndarray:
    r_GxK = np.asarray(rewards_N).reshape(-1, group_size)
    return r_GxK.max(axis=1) != r_GxK.min(axis=1)


class DynamicSamplingError(RuntimeError):
    """Dynamic sampling could not fill the batch within ``max_gen_batches`` generation batches."""


def _leading_len(key: str, value: Any) -> int:
    if hasattr(value, "shape") and hasattr(value, "ndim"):  # numpy or jax array
        if value.ndim == 0:
            raise ValueError(f"GroupAccumulator.add: batch[{key!r}] is a scalar; every entry needs "
                             "a leading dimension N (one row per response).")
        return value.shape[0]
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return len(value)
    raise TypeError(f"GroupAccumulator.add: batch[{key!r}] has type {type(value).__name__}; "
                    "expected an array or a list with one entry per response.")


def prompts_to_generate(target_groups: int, kept: int, seen: int, batch_prompts: int, *, last: bool,
                        margin: float = 1.5) -> int:
    """How many prompts of the next generation batch dynamic sampling decodes.

    Surplus groups are discarded (as in verl), so every prompt decoded beyond the need is wasted
    work: after the first batch, decode only enough prompts to fill the missing groups at the keep
    rate seen so far in this step, with a margin (`margin` × the expectation, plus one). The whole
    batch when nothing has been seen or kept yet, and on the last batch the budget allows (so a
    shortfall is never caused by decoding fewer). The prompts are the batch's first ones, so the
    groups kept are those the whole batch would have given whenever these suffice."""
    if seen == 0 or kept == 0 or last:
        return batch_prompts
    missing = max(target_groups - kept, 0)
    return max(1, min(batch_prompts, math.ceil(margin * missing * seen / kept) + 1))


class GroupAccumulator:
    """DAPO dynamic sampling: collect groups with non-constant rewards across generation batches.

    Usage (one training step)::

        acc = GroupAccumulator(target_groups=32, group_size=16, max_gen_batches=10)
        while not acc.full:
            acc.add(generate_and_score())      # dict of [N, ...] arrays / lists, has "reward"
        batch = acc.take()                     # exactly 32 groups, in arrival order

    Every entry of a batch has a leading dimension ``N = groups * group_size`` (numpy arrays or
    lists, e.g. decoded strings); groups whose ``batch["reward"]`` values are all equal are
    dropped.  At most ``max_gen_batches`` batches are added per step (verl's
    ``max_num_gen_batches``): the ``add`` that uses up the budget without filling raises
    :class:`DynamicSamplingError`, so no batch is generated only to be refused.
    ``max_gen_batches <= 0`` means unlimited.  ``take`` resets the accumulator for the next step;
    surplus groups from the last batch are discarded (as verl does).
    """

    def __init__(self, target_groups: int, group_size: int, max_gen_batches: int, *,
                 metric_key: str = "reward"):
        if target_groups < 1:
            raise ValueError(f"GroupAccumulator: target_groups must be >= 1, got {target_groups}.")
        if group_size < 1:
            raise ValueError(f"GroupAccumulator: group_size must be >= 1, got {group_size}.")
        self.target_groups = int(target_groups)
        self.group_size = int(group_size)
        self.max_gen_batches = int(max_gen_batches)
        # what must vary within a group for it to be kept (DAPO filters on accuracy, "acc", so
        # that overlong shaping alone does not keep an all-wrong group)
        self.metric_key = metric_key
        self._reset()
        self.last_stats: dict[str, int] = {}

    def _reset(self) -> None:
        self._groups: list[dict[str, Any]] = []
        self._keys: tuple[str, ...] | None = None
        self.num_gen_batches = 0
        self.groups_seen = 0

    @property
    def groups_kept(self) -> int:
        return len(self._groups)

    @property
    def full(self) -> bool:
        return len(self._groups) >= self.target_groups

    def add(self, batch: dict[str, np.ndarray | list]) -> None:
        """Adds one generation batch; keeps its groups that have reward variance."""
        if self.metric_key not in batch:
            raise KeyError(f"GroupAccumulator.add: the batch has no {self.metric_key!r} entry "
                           f"(keys: {sorted(batch)}); score the responses before adding them.")
        keys = tuple(sorted(batch))
        if self._keys is not None and keys != self._keys:
            raise ValueError(f"GroupAccumulator.add: batch keys {list(keys)} differ from the "
                             f"earlier batches' {list(self._keys)} in this step.")
        rewards = np.asarray(batch[self.metric_key]).astype(np.float64)
        if rewards.ndim != 1:
            raise ValueError(f"GroupAccumulator.add: batch[{self.metric_key!r}] must be 1-D [N], "
                             f"got shape {rewards.shape}.")
        n = rewards.shape[0]
        _check_group_size(n, self.group_size, "GroupAccumulator.add")
        for key, value in batch.items():
            if _leading_len(key, value) != n:
                raise ValueError(f"GroupAccumulator.add: batch[{key!r}] has leading length "
                                 f"{_leading_len(key, value)}, but batch[{self.metric_key!r}] has {n}.")
        self._keys = keys
        self.num_gen_batches += 1
        self.groups_seen += n // self.group_size
        g = self.group_size
        for gi in np.flatnonzero(_keep_groups_np(rewards, g)):
            self._groups.append({k: v[gi * g:(gi + 1) * g] for k, v in batch.items()})
        if (not self.full and self.max_gen_batches > 0
                and self.num_gen_batches >= self.max_gen_batches):
            kept, seen = len(self._groups), self.groups_seen
            self._reset()
            raise DynamicSamplingError(
                f"Dynamic sampling kept only {kept} of the {self.target_groups} groups needed "
                f"after max_gen_batches={self.max_gen_batches} generation batches ({seen} groups "
                "seen; the others had identical rewards in every response). Fix: raise "
                "max_gen_batches, lower the batch size (fewer prompts per step), or disable "
                "dynamic sampling.")

    def take(self) -> dict[str, np.ndarray | list]:
        """Returns exactly ``target_groups`` groups (``target_groups * group_size`` rows) in
        arrival order, and resets for the next step; stats go to ``self.last_stats``."""
        if not self.full:
            raise RuntimeError(f"GroupAccumulator.take: only {len(self._groups)} of "
                               f"{self.target_groups} groups collected; add batches until .full.")
        chosen = self._groups[:self.target_groups]
        out: dict[str, np.ndarray | list] = {}
        for key in chosen[0]:
            parts = [grp[key] for grp in chosen]
            if hasattr(parts[0], "shape"):
                out[key] = np.concatenate(parts, axis=0)
            else:
                out[key] = [item for part in parts for item in part]
        self.last_stats = {
            "gen_batches": self.num_gen_batches,
            "groups_seen": self.groups_seen,
            "groups_kept": len(self._groups),
        }
        self._reset()
        return out
