"""The jitted programs of one RL step, each with explicit input/output shardings. The trainer builds
them once; `dryrun` compiles the same programs ahead of time from abstract arguments.

    programs = step_programs.build(cfg, policy, tx)
    stats = programs.rollout_stats(params, seqs)        # old log-probs, pred. entropy, Hnorm, each [M, N]
    w, aux = programs.token_weights(mask, hnorm, pred_entropy, rng, step)
    params, opt_state, metrics = programs.update(params, opt_state, minibatch)   # [n_micro, micro, ...]
    metrics, sketches, align = programs.geometry(params, micro, subsets)         # train.geometry_every

The maths is in `rl/` (pure functions); this module only decides what is compiled and how it is laid
out over the mesh.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl_entropy import parallel
from jaxrl_entropy.model_setup import Policy
from jaxrl_entropy.models import qwen3
from jaxrl_entropy.rl import diagnostics
from jaxrl_entropy.rl import loss as loss_lib
from jaxrl_entropy.rl import train_step as ts
from jaxrl_entropy.rl.token_weights import SoftConfig, token_weights

ROLLOUT_KEYS = ("input_ids", "attention_mask", "response")
UPDATE_KEYS = ("input_ids", "attention_mask", "response", "response_mask", "old_logp", "advantage", "weights")


def step_spec(cfg: ml_collections.ConfigDict, arch: qwen3.Qwen3Config) -> ts.StepSpec:
    return ts.StepSpec(
        prompt_len=cfg.data.max_prompt_len, response_len=cfg.rollout.max_new_tokens,
        probe_layers=qwen3.resolve_probe_layers(cfg.entropy.layers, arch.num_hidden_layers),
        aggregation=cfg.entropy.aggregation, temperature=cfg.rollout.temperature,
        eps_low=cfg.rl.eps_low, eps_high=cfg.rl.eps_high, clip_c=cfg.rl.clip_c,
        kl_coef=cfg.rl.kl_coef, entropy_coef=cfg.rl.entropy_coef)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    o = cfg.optim
    return ts.make_optimizer(o.lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                             warmup_steps=o.warmup_steps, grad_clip=o.grad_clip)


def opt_state_shardings(tx: optax.GradientTransformation, policy: Policy) -> Any:
    abstract = jax.eval_shape(tx.init, policy.params)
    return parallel.opt_state_shardings(abstract, policy.shardings, policy.mesh)


@dataclasses.dataclass(frozen=True)
class StepPrograms:
    spec: ts.StepSpec
    tx: optax.GradientTransformation
    opt_shardings: Any
    batch_sharding: NamedSharding    # [M, ...] rollout arrays: rows over data × fsdp
    micro_sharding: NamedSharding    # [n_micro, micro, ...] mini-batches: micro-batch rows over data × fsdp
    rollout_stats: Callable
    update: Callable
    token_weights: Callable
    geometry: Callable | None
    init_opt_state: Callable


def geometry_fn(graphdef, spec: ts.StepSpec, sketch) -> Callable:
    """(params, micro-batch, subsets) → (geometry metrics, gradient sketches, per-token alignment
    `[B, N]`): each token subset's gradient against the full-token gradient, and every token's own
    gradient projected on the full-token update (the target of the controls)."""

    def geometry(params, part, subsets):
        mask = part["response_mask"]

        def logp_fn(p):
            return ts.policy_forward(nnx.merge(graphdef, p), part, spec, probe=False)[0]

        loss_fn = diagnostics.policy_subset_loss(logp_fn, old_logp=part["old_logp"], adv=part["advantage"],
                                                 mask=mask, eps_low=spec.eps_low, eps_high=spec.eps_high,
                                                 clip_c=spec.clip_c)
        g_full = jax.grad(loss_fn)(params, subsets["full"])
        metrics, sketches = diagnostics.geometry_and_sketches(loss_fn, params, subsets, method="loop",
                                                              sketch=sketch, full_grad=g_full)

        def per_token(p):  # each token's own clipped loss
            loss, _ = loss_lib.ppo_token_loss(logp_fn(p), part["old_logp"], part["advantage"],
                                              eps_low=spec.eps_low, eps_high=spec.eps_high, clip_c=spec.clip_c)
            return jnp.where(mask, loss, 0.0)

        return metrics, sketches, diagnostics.token_projections(per_token, params, g_full)

    return geometry


def build(cfg: ml_collections.ConfigDict, policy: Policy, tx: optax.GradientTransformation, *,
          sketch=None) -> StepPrograms:
    """Every jitted program of one RL step. `sketch` (a `diagnostics.GradientSketch`) enables the
    gradient-geometry program."""
    spec = step_spec(cfg, policy.arch)
    mesh, graphdef = policy.mesh, policy.graphdef
    params_sh = policy.shardings
    opt_sh = opt_state_shardings(tx, policy)
    batch_sh = parallel.batch_sharding(mesh, 2)
    micro_sh = NamedSharding(mesh, PartitionSpec(None, parallel.LOGICAL_RULES["batch"]))
    chunk = cfg.rl.micro_batch_size
    rollout_stats = jax.jit(lambda p, b: ts.rollout_stats(graphdef, p, b, spec, chunk),
                            in_shardings=(params_sh, batch_sh), out_shardings=batch_sh)
    # donation halves the state's footprint; the CPU backend ignores it with a warning
    donate = (0, 1) if jax.default_backend() != "cpu" else ()
    normalization = cfg.weights.normalization
    update = jax.jit(lambda p, o, mb: ts.update(graphdef, p, o, mb, spec, tx, normalization),
                     in_shardings=(params_sh, opt_sh, micro_sh), out_shardings=(params_sh, opt_sh, None),
                     donate_argnums=donate)
    soft = SoftConfig(**cfg.weights.soft.to_dict())
    mode, fraction = cfg.weights.mode, cfg.weights.fraction
    weights = jax.jit(lambda mask, h, pred, rng, step: token_weights(
        mode, mask_BxT=mask, attn_entropy_BxT=h, pred_entropy_BxT=pred, fraction=fraction, rng=rng,
        step=step, soft=soft))
    geometry = jax.jit(geometry_fn(graphdef, spec, sketch)) if sketch is not None else None
    init_opt = jax.jit(tx.init, out_shardings=opt_sh)
    return StepPrograms(spec=spec, tx=tx, opt_shardings=opt_sh, batch_sharding=batch_sh,
                        micro_sharding=micro_sh, rollout_stats=rollout_stats, update=update,
                        token_weights=weights, geometry=geometry, init_opt_state=init_opt)
