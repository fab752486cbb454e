"""Orbax checkpoints of a run: parameters, optimiser state, step, data-iterator state.

The RNG needs no slot: every random draw of step s derives from `fold_in(key(seed), s)`, so the
step number restores it. Saves are atomic (orbax writes to a temporary directory and renames), so
a job killed mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxrl_entropy import fileio


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3):
        self.directory = fileio.absolute(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False),
            item_names=("state", "meta"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """state: a pytree of arrays (params, opt_state); meta: JSON-serialisable."""
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                          meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """`abstract_state`: the state's structure with target shardings (e.g. from jax.eval_shape
        plus `.sharding`), so every array comes back straight into its sharding."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            abstract_state)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                       meta=ocp.args.JsonRestore()))
        except ValueError as e:
            if "structures do not match" not in str(e) and "shape" not in str(e):
                raise
            raise ValueError(
                f"checkpoint {self.directory}/{step} does not fit this run's model/optimiser (was the "
                f"architecture, the HF checkpoint or the optimiser changed?); start a new --workdir or "
                f"restore with the original config.\n{e}") from None
        return out["state"], out["meta"]

    def restore_params(self, step: int, abstract_params: Any) -> tuple[Any, dict]:
        """Only the parameters of a checkpoint (and its meta): what `eval` and `convert` need,
        without reading the optimiser state."""
        target = {"params": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            abstract_params)}
        restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
            meta=ocp.args.JsonRestore()))
        return out["state"]["params"], out["meta"]

    def close(self):
        self._manager.close()
