"""The jitted programs of one RL step, each with explicit input/output shardings. The trainer builds
them once; `dryrun` compiles the same programs ahead of time from abstract arguments.

    programs = step_programs.build(cfg, policy, tx)
    stats = programs.rollout_stats(params, seqs)        # old log-probs, pred. entropy, Hnorm, each [M, N]
    w, aux = programs.token_weights(mask, hnorm, pred_entropy, rng, step)
    params, opt_state, metrics = programs.update(params, opt_state, minibatch)   # [n_micro, micro, ...]
    metrics, sketches, align = programs.geometry(params, micro, subsets)         # train.geometry_every

    step_programs.check_batch(cfg, mesh)                 # micro-batches split evenly over the mesh
    aot_programs(cfg, policy)                            # the same programs, for `dryrun`

The maths is in `rl/` (pure functions); this module only decides what is compiled and how it is laid
out over the mesh.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable

import jax
import numpy as np
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl_entropy.training import model_setup
from jaxrl_entropy.training.program import Program
from jaxrl_entropy import config, parallel
from jaxrl_entropy import config as config_lib
from jaxrl_entropy.config import ConfigError, EntropyConfig, ModelConfig, TrainConfig, as_tuple
from jaxrl_entropy.training.model_setup import Policy
from jaxrl_entropy.models import qwen3
from jaxrl_entropy.rundir.checkpoint import Checkpointer, CheckpointMismatchError
from jaxrl_entropy.rl import diagnostics, master_weights
from jaxrl_entropy.rl import loss as loss_lib
from jaxrl_entropy.rl import train_step as ts
from jaxrl_entropy.rl.token_weights import token_weights

log = logging.getLogger("jaxrl_entropy")

ROLLOUT_KEYS = ("input_ids", "attention_mask", "response")
UPDATE_KEYS = ("input_ids", "attention_mask", "response", "response_mask", "old_logp", "advantage", "weights")


def probe_layers(entropy: EntropyConfig, arch: qwen3.Qwen3Config) -> tuple[int, ...]:
    entropy = config_lib.section_of(entropy, "entropy", "probe_layers")
    try:
        return qwen3.resolve_probe_layers(entropy.layers, arch.num_hidden_layers)
    except ValueError as e:
        raise ConfigError(f"config.entropy.layers={entropy.layers!r}: {e}") from None


def step_spec(cfg: ml_collections.ConfigDict, arch: qwen3.Qwen3Config) -> ts.StepSpec:
    return ts.StepSpec(
        prompt_len=cfg.data.max_prompt_len, response_len=cfg.rollout.max_new_tokens,
        probe_layers=probe_layers(cfg.entropy, arch),
        aggregation=cfg.entropy.aggregation, temperature=cfg.rollout.temperature,
        eps_low=cfg.rl.eps_low, eps_high=cfg.rl.eps_high, clip_c=cfg.rl.clip_c,
        kl_coef=cfg.rl.kl_coef, entropy_coef=cfg.rl.entropy_coef)


def optimizer_from_config(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW as `optim` says; for parameters stored narrower than float32 (`model.param_dtype`:
    bf16), on a float32 master copy of them, held in the optimiser state (`master_weights`)."""
    o = cfg.optim
    return ts.make_optimizer(o.lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                             warmup_steps=o.warmup_steps, grad_clip=o.grad_clip,
                             param_dtype=model_setup.DTYPES[cfg.model.param_dtype])


def optimizer_bytes_per_param(model: ModelConfig) -> int:
    """Bytes of `optimizer_from_config`'s state per parameter (AdamW's two moments, and the master
    copy for bf16 parameters): 8 with float32 parameters, 12 with bf16 ones."""
    model = config_lib.section_of(model, "model", "optimizer_bytes_per_param")
    return master_weights.optimizer_bytes_per_param(model_setup.DTYPES[model.param_dtype])


def policy_opt_state_shardings(tx: optax.GradientTransformation, policy: Policy) -> Any:
    """Like the parameters (AdamW's moments and the master copy, leaf by leaf), counts replicated."""
    abstract = jax.eval_shape(tx.init, policy.params)
    return parallel.opt_state_shardings(abstract, policy.shardings, policy.mesh)


def restore_latest(checkpointer: Checkpointer, state: dict, *, on_corrupt: str):
    """`checkpointer.restore_latest(state)` (state: {"params": ..., <optimiser states>...}), that also
    reads a checkpoint saved before the optimiser kept a float32 master copy of bf16 parameters:
    its master copy is then the saved parameters and its moments the saved ones, widened (exact),
    with a warning. Any other mismatch is raised as it is."""
    try:
        return checkpointer.restore_latest(state, on_corrupt=on_corrupt)
    except CheckpointMismatchError as mismatch:
        upgraded = [k for k, v in state.items() if isinstance(v, master_weights.MasterWeightsState)]
        if not upgraded:
            raise
        param_dtype = jax.tree.leaves(state["params"])[0].dtype
        legacy = dict(state, **{k: master_weights.legacy_layout(state[k], param_dtype) for k in upgraded})
        try:
            found = checkpointer.restore_latest(legacy, on_corrupt=on_corrupt)
        except CheckpointMismatchError:
            raise mismatch from None
        if found is None:
            raise mismatch from None
    step, restored, meta = found
    log.warning("checkpoint step %d in %s was saved without a float32 master copy of its %s parameters (before "
                "`master_weights`): resuming with the saved parameters as the master copy and the saved %s "
                "moments widened to float32; from here on the updates are no longer rounded to %s",
                step, checkpointer.directory, param_dtype, param_dtype, param_dtype)
    for k in upgraded:
        shardings = jax.tree.map(lambda x: x.sharding, state[k])
        restored[k] = jax.jit(master_weights.from_legacy, out_shardings=shardings)(restored[k], restored["params"])
    return step, restored, meta


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
    geometry: GeometryPrograms | None
    init_opt_state: Callable


@dataclasses.dataclass(frozen=True)
class GeometryPrograms:
    """The gradient-geometry diagnostics as separately compiled programs, run in a loop on the host
    (`diagnostics.loop_geometry`): one subset gradient per call, so the largest program is one
    gradient of one micro-batch, like `update`'s, and compiles like it.

        metrics, sketches, align = geometry(params, part, subsets)

    `part`: one micro-batch of the rollout, `subsets`: `diagnostics.geometry_subsets`
    of it (`full`, `anchor`, `explorer`, `random`, each `[B, N]`). Returns the subset metrics, each
    subset gradient's `diagnostics.GradientSketch` and every token's alignment with the full
    gradient `[B, N]` (`diagnostics.token_projections`)."""
    gradient: Callable      # (params, part, weights [B, N]) -> the subset loss's gradient, sharded like params
    norm_and_dot: Callable  # (g, g_full) -> (|g|, <g, g_full>)
    projections: Callable   # (params, part, g_full) -> [B, N] each token's gradient along g_full / |g_full|
    sketch: diagnostics.GradientSketch
    layers: tuple[int, ...] = ()             # train.geometry_layers, resolved to indices
    layer_hnorms: Callable | None = None     # (params, part) -> [L, B, N] Hnorm of each of `layers`

    def __call__(self, params, part, subsets):
        g_full = self.gradient(params, part, subsets["full"])
        metrics, sketches = diagnostics.loop_geometry(
            lambda w: self.gradient(params, part, w), subsets, sketch=self.sketch, full_grad=g_full,
            norm_and_dot=self.norm_and_dot)
        return metrics, sketches, self.projections(params, part, g_full)


def geometry_probe_due(train: TrainConfig, step: int) -> bool:
    """Whether RL step `step` runs the gradient-geometry probe: every `train.geometry_every` steps,
    and the step after each with `train.geometry_consecutive`."""
    train = config_lib.section_of(train, "train", "geometry_probe_due")
    every = train.geometry_every
    return bool(every) and (step % every == 0 or (train.geometry_consecutive and step % every == 1))


def geometry_calls_per_step(train: TrainConfig) -> tuple[float, int]:
    """(probes per RL step on average, subset gradients per probe): what `dryrun` multiplies the
    geometry programs' costs by."""
    train = config_lib.section_of(train, "train", "geometry_calls_per_step")
    every = train.geometry_every
    probes = (2.0 if train.geometry_consecutive and every > 1 else 1.0) / every
    subsets = 4 + len(as_tuple(train.geometry_random_fractions)) + 2 * len(as_tuple(train.geometry_layers))
    return probes, subsets * (3 if train.geometry_halves else 1)


def geometry_layers(train: TrainConfig, arch: qwen3.Qwen3Config) -> tuple[int, ...]:
    """`train.geometry_layers` as layer indices of this model (duplicates dropped, in order)."""
    try:
        return tuple(dict.fromkeys(qwen3.resolve_probe_layers(as_tuple(train.geometry_layers),
                                                               arch.num_hidden_layers)))
    except ValueError as e:
        raise ConfigError(f"config.train.geometry_layers={train.geometry_layers!r}: {e}") from None


def geometry_programs(graphdef, spec: ts.StepSpec, sketch: diagnostics.GradientSketch, *, params_sharding,
                      rows_sharding: NamedSharding, jvp_graphdef=None, layers: tuple[int, ...] = ()
                      ) -> GeometryPrograms:
    """`GeometryPrograms` for a policy. `jvp_graphdef`: the module for the forward-mode pass of the
    projections (attention kernels with a custom VJP have no JVP;
    `model_setup.graphdef_with(policy, attention="blockwise")` does). `layers`: probe layers whose
    entropy alone splits anchors from explorers as well (`train.geometry_layers`)."""
    jvp_graphdef = jvp_graphdef or graphdef

    def subset_loss(part):
        def logp_fn(p):
            return ts.policy_forward(qwen3.merge_for_compute(graphdef, p), part, spec, probe=False)[0]

        return diagnostics.policy_subset_loss(logp_fn, old_logp=part["old_logp"], adv=part["advantage"],
                                              mask=part["response_mask"], eps_low=spec.eps_low,
                                              eps_high=spec.eps_high, clip_c=spec.clip_c)

    def gradient(params, part, weights):
        return jax.grad(subset_loss(part))(params, weights.astype(jnp.float32))

    def projections(params, part, g_full):
        def per_token(p):  # each token's own clipped loss
            logp = ts.policy_forward(qwen3.merge_for_compute(jvp_graphdef, p), part, spec, probe=False)[0]
            loss, _ = loss_lib.ppo_token_loss(logp, part["old_logp"], part["advantage"],
                                              eps_low=spec.eps_low, eps_high=spec.eps_high, clip_c=spec.clip_c)
            return jnp.where(part["response_mask"], loss, 0.0)

        return diagnostics.token_projections(per_token, params, g_full)

    def layer_hnorms(params, part):
        return ts.layer_hnorms(qwen3.merge_for_compute(graphdef, params), part, spec, layers)

    return GeometryPrograms(
        gradient=jax.jit(gradient, out_shardings=params_sharding),
        norm_and_dot=jax.jit(diagnostics.tree_norm_and_dot),
        projections=jax.jit(projections, out_shardings=rows_sharding),
        sketch=sketch, layers=layers, layer_hnorms=jax.jit(layer_hnorms) if layers else None)


def build(cfg: ml_collections.ConfigDict, policy: Policy, tx: optax.GradientTransformation, *,
          sketch=None) -> StepPrograms:
    """Every jitted program of one RL step. `sketch` (a `diagnostics.GradientSketch`) enables the
    gradient-geometry program."""
    spec = step_spec(cfg, policy.arch)
    mesh, graphdef = policy.mesh, policy.graphdef
    params_sh = policy.shardings
    opt_sh = policy_opt_state_shardings(tx, policy)
    batch_sh = parallel.batch_sharding(mesh, 2)
    micro_sh = NamedSharding(mesh, PartitionSpec(None, parallel.LOGICAL_RULES["batch"]))
    chunk = cfg.rl.micro_batch_size
    rollout_stats = jax.jit(lambda p, b: ts.rollout_stats(graphdef, p, b, spec, chunk, mesh),
                            in_shardings=(params_sh, batch_sh), out_shardings=batch_sh)
    # donation halves the state's footprint; the CPU backend ignores it with a warning. The mesh's
    # platform, not the host's, decides: `dryrun` compiles for TPUs on a CPU host.
    donate = (0, 1) if platform(mesh) != "cpu" else ()
    normalization = cfg.weights.normalization
    update = jax.jit(lambda p, o, mb: ts.update(graphdef, p, o, mb, spec, tx, normalization),
                     in_shardings=(params_sh, opt_sh, micro_sh), out_shardings=(params_sh, opt_sh, None),
                     donate_argnums=donate)
    soft = config.typed(cfg).weights.soft
    mode, fraction = cfg.weights.mode, cfg.weights.fraction
    weights = jax.jit(lambda mask, h, pred, rng, step: token_weights(
        mode, mask_BxT=mask, attn_entropy_BxT=h, pred_entropy_BxT=pred, fraction=fraction, rng=rng,
        step=step, soft=soft))
    geometry = None
    if sketch is not None:
        jvp_graphdef = (graphdef if cfg.model.attention in ("xla", "blockwise") else
                        model_setup.graphdef_with(policy, attention="blockwise"))
        geometry = geometry_programs(graphdef, spec, sketch, params_sharding=params_sh, rows_sharding=batch_sh,
                                     jvp_graphdef=jvp_graphdef, layers=geometry_layers(cfg.train, policy.arch))
    init_opt = jax.jit(tx.init, out_shardings=opt_sh)
    return StepPrograms(spec=spec, tx=tx, opt_shardings=opt_sh, batch_sharding=batch_sh,
                        micro_sharding=micro_sh, rollout_stats=rollout_stats, update=update,
                        token_weights=weights, geometry=geometry, init_opt_state=init_opt)


def platform(mesh) -> str:
    """"tpu", "gpu" or "cpu": the platform of the mesh's devices."""
    return mesh.devices.flat[0].platform


@dataclasses.dataclass(frozen=True)
class StepShapes:
    """The array sizes of one RL step: M rollout rows of T = P + N tokens, mini-batches of `mini`
    rows, each `n_micro` micro-batches of `micro` rows."""
    rows: int
    prompt_len: int
    response_len: int
    mini: int
    micro: int

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def n_micro(self) -> int:
        return self.mini // self.micro

    @property
    def updates(self) -> int:
        return self.rows // self.mini


def step_shapes(cfg: ml_collections.ConfigDict) -> StepShapes:
    r = cfg.rl
    return StepShapes(rows=r.prompts_per_step * r.group_size, prompt_len=cfg.data.max_prompt_len,
                      response_len=cfg.rollout.max_new_tokens, mini=r.mini_batch_prompts * r.group_size,
                      micro=r.micro_batch_size)


def check_batch(cfg: ml_collections.ConfigDict, mesh) -> None:
    """`config.check_micro_batch` on this mesh's axis sizes."""
    config.check_micro_batch(cfg.rl, dict(mesh.shape))


def _abstract(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded `ShapeDtypeStruct`s (or arrays)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            itemsize = 8  # a threefry key: two uint32 words
        else:
            itemsize = jnp.dtype(x.dtype).itemsize
        total += math.prod(shape) * itemsize
    return total


UPDATE_DTYPES = {"input_ids": jnp.int32, "attention_mask": jnp.int32, "response": jnp.int32,
                 "response_mask": jnp.bool_, "old_logp": jnp.float32, "advantage": jnp.float32,
                 "weights": jnp.float32}


def _rollout_arrays(sh: StepShapes, sharding, lead=()) -> dict[str, jax.ShapeDtypeStruct]:
    widths = {"input_ids": sh.seq_len, "attention_mask": sh.seq_len}
    return {k: _abstract((*lead, widths.get(k, sh.response_len)), dt, sharding) for k, dt in UPDATE_DTYPES.items()}


def attention_flops(arch: qwen3.Qwen3Config, rows: int, seq_len: int, units: float) -> float:
    """Matmul FLOPs of causal attention inside kernels the compiler cannot see into (Pallas), in
    units of one causal QKᵀ (or PV) product over `rows` sequences: B·H·T²·D multiply-adds × 2 / 2.
    A flash forward is 2 units, its backward 5, a head-mixture pass 1."""
    return units * rows * arch.num_attention_heads * seq_len ** 2 * arch.head_dim


def _kernel_units(cfg: ml_collections.ConfigDict, arch: qwen3.Qwen3Config, *, backward: bool, probe: bool) -> float:
    """Attention work (units of `attention_flops`) that runs inside Pallas kernels, per pass of the
    model: 0 for layers the compiler sees (`xla`)."""
    n_layers = arch.num_hidden_layers
    n_probe = len(probe_layers(cfg.entropy, arch)) if probe else 0
    plain_in_kernel = cfg.model.attention != "xla"
    probe_in_kernel = cfg.model.probe_attention != "xla"
    per_layer = 2.0 + (7.0 if cfg.model.remat else 5.0) * backward   # forward (+ remat forward + backward)
    units = per_layer * ((n_layers - n_probe) * plain_in_kernel + n_probe * probe_in_kernel)
    if probe and probe_in_kernel and cfg.entropy.aggregation == "head_mixture":
        units += n_probe
    return units


def aot_programs(cfg: ml_collections.ConfigDict, policy: Policy, tx: optax.GradientTransformation | None = None,
                 programs: StepPrograms | None = None) -> list[Program]:
    """The step's programs (`build`) with abstract arguments of the config's shapes: what `dryrun`
    compiles. `resident_bytes`: per device, the trainer's other live arrays while each runs
    (the optimiser state during the forward passes, the rollout's arrays during the updates)."""
    tx = tx or optimizer_from_config(cfg)
    sketch = None
    if cfg.train.geometry_every:
        sketch = diagnostics.GradientSketch()
    programs = programs or build(cfg, policy, tx, sketch=sketch)
    check_batch(cfg, policy.mesh)
    mesh, arch, sh = policy.mesh, policy.arch, step_shapes(cfg)
    n_dev = mesh.size
    params = policy.params
    opt = jax.tree.map(lambda x, s: _abstract(x.shape, x.dtype, s), jax.eval_shape(tx.init, params),
                       programs.opt_shardings)
    rows_sh = programs.batch_sharding
    rollout = _rollout_arrays(sh, rows_sh, (sh.rows,))
    rollout_all = dict(rollout, hnorm=rollout["old_logp"], pred_entropy=rollout["old_logp"])
    stats_in = {k: rollout[k] for k in ROLLOUT_KEYS}
    minibatch = _rollout_arrays(sh, programs.micro_sharding, (sh.n_micro, sh.micro))
    opt_bytes, rollout_bytes = per_device_bytes(opt), per_device_bytes(rollout_all)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = _abstract(key.shape, key.dtype, parallel.replicated(mesh))
    step = jax.ShapeDtypeStruct((), jnp.int32, weak_type=True, sharding=parallel.replicated(mesh))
    f32_rows = _abstract((sh.rows, sh.response_len), jnp.float32, rows_sh)
    T = sh.seq_len
    out = [
        Program("rollout_stats", programs.rollout_stats, (params, stats_in), calls_per_step=1.0,
                    note=f"old-policy forward + probe entropy: {sh.rows} rows × {T} tokens, chunks of {sh.micro}",
                    kernel_flops=attention_flops(arch, sh.rows, T, _kernel_units(cfg, arch, backward=False,
                                                                                   probe=True)) / n_dev,
                    resident_bytes=opt_bytes),
        Program("update", programs.update, (params, opt, minibatch), calls_per_step=float(sh.updates),
                    note=f"{sh.n_micro} micro-batches × {sh.micro} rows × {T} tokens, AdamW",
                    kernel_flops=attention_flops(arch, sh.mini, T, _kernel_units(cfg, arch, backward=True,
                                                                                   probe=False)) / n_dev,
                    resident_bytes=rollout_bytes),
        Program("token_weights", programs.token_weights,
                    (_abstract((sh.rows, sh.response_len), jnp.bool_, rows_sh), f32_rows, f32_rows, key, step),
                    calls_per_step=1.0, note=f"global quantiles over {sh.rows} × {sh.response_len} tokens",
                    resident_bytes=per_device_bytes(params) + opt_bytes + rollout_bytes),
    ]
    if programs.geometry is not None:
        out += _geometry_aot(cfg, arch, programs.geometry, params, rows_sh, sh, n_dev,
                             resident=opt_bytes + rollout_bytes)
    return out


def _geometry_aot(cfg, arch, geometry: GeometryPrograms, params, rows_sh, sh: StepShapes, n_dev: int, *,
                  resident: int) -> list[Program]:
    """The geometry programs as the host loop runs them (`geometry_calls_per_step`): per probe, n subset
    gradients, n norms and dots, n sketches (n = 4, more with random fractions, ×3 with halves), 1
    projection pass. The sketch compiles once per
    distinct leaf shape; the largest leaf's stands for them (the others are smaller copies)."""
    probes, n = geometry_calls_per_step(cfg.train)
    part = _rollout_arrays(sh, rows_sh, (sh.micro,))
    w = _abstract((sh.micro, sh.response_len), jnp.float32, rows_sh)
    grad = jax.tree.map(lambda p: _abstract(p.shape, jnp.float32, p.sharding), params)
    grad_bytes = per_device_bytes(grad)
    leaves = jax.tree.leaves(grad)
    largest = max(leaves, key=lambda x: math.prod(x.shape))
    sketch = geometry.sketch
    salt = jax.ShapeDtypeStruct((), jnp.uint32)
    gradient_units = _kernel_units(cfg, arch, backward=True, probe=False)
    return [
        Program("geometry/gradient", geometry.gradient, (params, part, w), calls_per_step=n * probes,
                    note=f"one subset's gradient on {sh.micro} rows × {sh.seq_len} tokens",
                    kernel_flops=attention_flops(arch, sh.micro, sh.seq_len, gradient_units) / n_dev,
                    resident_bytes=resident + grad_bytes),   # the full gradient, kept while the others run
        Program("geometry/projections", geometry.projections, (params, part, grad), calls_per_step=probes,
                    note=f"per-token JVP along the full gradient on {sh.micro} rows (XLA attention)",
                    resident_bytes=resident),
        Program("geometry/norm_and_dot", geometry.norm_and_dot, (grad, grad), calls_per_step=n * probes,
                    note="|g| and <g, g_full> over all parameters", resident_bytes=resident + grad_bytes),
        Program("geometry/sketch", diagnostics.sketch_leaf_program(sketch), (largest, salt),
                    calls_per_step=n * len(leaves) * probes,
                    note=f"count sketch of the largest of {len(leaves)} gradient leaves {tuple(largest.shape)} "
                         f"into {sketch.dim} buckets", resident_bytes=resident + 2 * grad_bytes),
    ]


@functools.lru_cache(maxsize=None)
def _mini_batch_program(micro_sharding: NamedSharding, rows: int, micro: int) -> Callable:
    """`(data, u) -> mini-batch u` of `rows` rows as `[rows // micro, micro, ...]`, micro-batch rows
    over data × fsdp: one program for all the keys. Eager slices, reshapes and a `device_put` were a
    dozen programs per update, each a collective across processes, and a 2-process CPU run once
    hung between two of them (one process in a slice, the other already resharding)."""
    def take(data, u):
        return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, u * rows, rows, axis=0).reshape(
            rows // micro, micro, *x.shape[1:]), data)
    return jax.jit(take, out_shardings=micro_sharding)


def apply_updates(prog: "StepPrograms", params, opt_state, data: dict[str, jax.Array], *, mini_batch_rows: int,
                  micro_batch_size: int) -> tuple[Any, Any, dict[str, float], int, int]:
    """One RL step's optimiser updates: `data` (`[M, ...]` per key) in mini-batches of
    `mini_batch_rows` rows, each run as micro-batches of `micro_batch_size` (gradient accumulation).
    Returns (params, opt_state, the updates' mean metrics, updates skipped as non-finite, updates)."""
    M = next(iter(data.values())).shape[0]
    take = _mini_batch_program(prog.micro_sharding, mini_batch_rows, micro_batch_size)
    per_update = []
    for u in range(M // mini_batch_rows):
        part = take(data, np.int32(u))
        params, opt_state, m = prog.update(params, opt_state, part)
        per_update.append(m)
    means = {k: float(np.mean([parallel.to_host(m[k]) for m in per_update])) for k in per_update[0]}
    skipped = int(sum(int(parallel.to_host(m["skipped"])) for m in per_update))
    return params, opt_state, means, skipped, len(per_update)
