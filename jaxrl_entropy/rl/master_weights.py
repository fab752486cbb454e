"""A float32 master copy of low-precision parameters, held by the optimiser.

AdamW stepping bf16 parameters directly rounds every update to the parameters' precision: a bf16
weight of magnitude 0.02 sits on a grid of 1.2e-4, so an update of lr 1e-6 rounds away, every
step, and the moments themselves are bf16. `wrap` keeps the optimiser on a float32 copy instead
(MaxText, verl and Megatron do the same); the bf16 parameters the model computes with are that
copy rounded, again after every update:

    tx = master_weights.wrap(optax.adamw(...))     # any optax transformation
    state = tx.init(params)                        # MasterWeightsState(master=params in f32, inner=...)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)  # == state.master rounded to the parameters' dtype

Why an optax wrapper rather than float32 parameters in the train state cast down for each
forward: the master copy is then optimiser state, and everything that already handles optimiser
state handles it unchanged and in one place — checkpoints (saved and restored with it, so a
resume is bit-identical), shardings (`parallel.opt_state_shardings` gives each leaf the sharding
of the parameter at its path: the master is sharded like the parameters), buffer donation, the
skip of a non-finite update (`train_step.apply_if_finite` checks and keeps the whole state), and
`dryrun`'s memory count (`tx.init`'s shapes). The trainer, the sampler, evaluation, the old-policy
forward and the HF export keep seeing one set of parameters, in the dtype they compute with.

`optimizer_bytes_per_param`: what that costs (bf16: 2 bytes of parameters + 4 of master + 8 of
moments per parameter, where float32 parameters need 4 + 8).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

MASTER_DTYPE = np.dtype(np.float32)


class MasterWeightsState(NamedTuple):
    master: Any   # the parameters in the master dtype: what the optimiser steps
    inner: Any    # the wrapped transformation's state, over `master` (AdamW's moments in the master dtype)


def master_dtype(param_dtype, dtype=MASTER_DTYPE) -> np.dtype | None:
    """`dtype` when parameters stored in `param_dtype` need a master copy (a floating dtype
    narrower than it: bfloat16, float16), else None."""
    param_dtype, dtype = np.dtype(param_dtype), np.dtype(dtype)
    if jnp.issubdtype(param_dtype, jnp.floating) and param_dtype.itemsize < dtype.itemsize:
        return dtype
    return None


def optimizer_bytes_per_param(param_dtype, moments: int = 2) -> int:
    """Bytes of optimiser state per parameter: `moments` (AdamW: 2) in the master dtype, plus the
    master copy itself when `param_dtype` needs one (bf16 parameters: 4 + 8 = 12; float32: 8)."""
    master = master_dtype(param_dtype)
    if master is None:
        return moments * np.dtype(param_dtype).itemsize
    return (moments + 1) * master.itemsize


def _widen(tree, dtype):
    """Floating leaves narrower than `dtype` cast to it (exact); others (counts) unchanged."""
    def one(x):
        if jnp.issubdtype(x.dtype, jnp.floating) and np.dtype(x.dtype).itemsize < np.dtype(dtype).itemsize:
            return x.astype(dtype)
        return x
    return jax.tree.map(one, tree)


def wrap(inner: optax.GradientTransformation, dtype=MASTER_DTYPE) -> optax.GradientTransformation:
    """`inner` run on a `dtype` master copy of the parameters (see the module's docstring).

    `update` needs the stored parameters: the updates it returns are, per leaf, (master rounded to
    the parameters' dtype) − parameters, computed in `dtype`, so that `optax.apply_updates`, which
    adds and rounds to the parameters' dtype, lands on the rounded master. That is exact whenever
    an update moves a parameter by less than 2^13 times its new magnitude (always, in practice);
    and since the master is the truth and the parameters are derived from it anew each update, a
    rounding difference could never accumulate."""
    dtype = np.dtype(dtype)

    def init(params):
        master = _widen(params, dtype)
        return MasterWeightsState(master, inner.init(master))

    def update(grads, state: MasterWeightsState, params=None):
        if params is None:
            raise ValueError("master_weights.wrap: update() needs the parameters (the updates are relative to them)")
        # the gradient (with respect to the bf16 parameters) in full precision for the moments
        steps, inner_state = inner.update(_widen(grads, dtype), state.inner, state.master)
        master = optax.apply_updates(state.master, steps)
        updates = jax.tree.map(lambda m, p: m.astype(p.dtype).astype(dtype) - p.astype(dtype), master, params)
        return updates, MasterWeightsState(master, inner_state)

    return optax.GradientTransformation(init, update)


def legacy_layout(state: MasterWeightsState, param_dtype) -> Any:
    """The state a run saved before optimiser states held a master copy: `inner` alone, its
    floating leaves (the moments) in the parameters' dtype. Abstract (shape, dtype, sharding):
    the target to restore such a checkpoint into."""
    def one(x):
        dt = param_dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        return jax.ShapeDtypeStruct(x.shape, dt, sharding=getattr(x, "sharding", None))
    return jax.tree.map(one, state.inner)


def from_legacy(inner_state, params, dtype=MASTER_DTYPE) -> MasterWeightsState:
    """A state without a master copy (`legacy_layout`) → `wrap`'s: the master is the stored
    parameters and the moments are the stored ones, both widened to `dtype` (exactly)."""
    return MasterWeightsState(_widen(params, dtype), _widen(inner_state, dtype))
