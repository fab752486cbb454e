"""From a config and the trainer's policy to the rollout engine (`models/engine.py`): its devices
(one host's, tensor-parallel), its size (slots and KV pages from a per-device memory budget), the
inference copy of the weights (cast and resharded once per rollout), per-host generation, and the
engine's programs for ahead-of-time compilation.

    engine = engine_setup.build(cfg, policy)
    params_inf = engine_setup.inference_params(engine, params, policy.mesh)   # once per rollout
    out = engine_setup.generate(engine, params_inf, ids_BxP, mask_BxP, key, sp)  # every host: its rows
    programs = engine_setup.aot_programs(cfg, abstract_policy, mesh)           # `dryrun`

Sizing (config `rollout.*`): the pool gets `rollout.kv_cache_gib` per device (0 = auto: 80 % of
the device's free memory after the training state and the inference weights; on a CPU only what
the slots need);
`rollout.max_slots` (0 = auto) is, on an accelerator, the number of requests that fit at full
length (prompt shared by its group) — so preemption never happens unless slots are set higher by
hand — capped at the rows of one generation call; on a CPU, a quarter of those rows (at least 16).
"""
from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxrl_entropy.training import step_programs
from jaxrl_entropy.training.program import Program
from jaxrl_entropy import chips, parallel
from jaxrl_entropy import config as config_lib
from jaxrl_entropy.config import ConfigError, RolloutConfig
from jaxrl_entropy.training.model_setup import DTYPES, Policy
from jaxrl_entropy.models import paged_cache, qwen3
from jaxrl_entropy.models.engine import Engine, EngineSpec
from jaxrl_entropy.rundir.progress import RolloutProgress
from jaxrl_entropy.models.paged_cache import pages_for
from jaxrl_entropy.models.sampler import SampleOutput, SamplingParams
from jaxrl_entropy.training.sampling import rollout_sampling_params

log = logging.getLogger("jaxrl_entropy")

GIB = 2 ** 30
MEGACORE_KINDS = ("TPU v4", "TPU v5", "TPU v5p")  # two TensorCores behind one device
# of the free memory after the training state and the inference weights: the rest is for the
# decode programs' temporaries and the runtime, inside `dryrun`'s 10 % headroom
AUTO_FRACTION = 0.80
CPU_BUDGET_GIB = 1.0     # a CPU has no HBM to fill: only what the slots need, at most this


def max_new_tokens(cfg: ml_collections.ConfigDict) -> int:
    """The longest response any sampling call asks for (rollouts, evaluation)."""
    return max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens or 0)


def rows_per_call(cfg: ml_collections.ConfigDict, mesh) -> int:
    """The most rows one host generates in one call (a rollout batch, an eval batch, a warm-up
    check): more slots than this are never used."""
    from jaxrl_entropy.training import evaluate, warmup
    rollout = cfg.rl.prompts_per_step * cfg.rl.group_size
    ev = evaluate.spec_for(cfg, mesh)
    check = warmup.CHECK_PROMPTS * warmup.CHECK_SAMPLES if cfg.train.sft_steps else 0
    return -(-max(rollout, ev.batch_prompts * ev.k, check) // jax.process_count())


def host_devices(devices) -> list:
    """The devices of the first process among `devices`, by id (the same rule on every host)."""
    devices = list(devices)
    first = min(d.process_index for d in devices)
    return sorted((d for d in devices if d.process_index == first), key=lambda d: d.id)


def tensor_parallel(rollout: RolloutConfig, arch: qwen3.Qwen3Config, n_local: int, platform: str) -> int:
    """Engine devices per host: `rollout.tensor_parallel`, or (0) all local accelerators — the
    largest count that divides the heads; 1 on a CPU (its devices share the same cores)."""
    rollout = config_lib.section_of(rollout, "rollout", "tensor_parallel")
    tp = rollout.tensor_parallel
    if tp:
        if n_local % tp or arch.num_key_value_heads % tp:
            raise ConfigError(f"config.rollout.tensor_parallel={tp} must divide the {n_local} local devices and the "
                              f"model's {arch.num_key_value_heads} key/value heads")
        return tp
    if platform == "cpu":
        return 1
    return max(t for t in range(1, n_local + 1) if n_local % t == 0 and arch.num_key_value_heads % t == 0
               and arch.num_attention_heads % t == 0)


def param_count(arch: qwen3.Qwen3Config) -> int:
    state = nnx.eval_shape(lambda: nnx.state(qwen3.Qwen3(arch, rngs=nnx.Rngs(0))))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def _memory_stats(device) -> dict | None:
    """The runtime's memory figures of a live device; None for a device that cannot be asked (a
    TPU topology's device compiled for ahead of time, a stand-in)."""
    try:
        return device.memory_stats() if hasattr(device, "memory_stats") else None
    except Exception:  # noqa: BLE001 — "MemoryStats is only supported for addressable PjRt devices"
        return None


def hbm_bytes(device) -> float | None:
    stats = _memory_stats(device)
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"])
    chip = chips.chip_for_device_kind(getattr(device, "device_kind", ""))
    if chip is not None:
        return float(chip.hbm_bytes)
    return None


def kv_budget_bytes(cfg: ml_collections.ConfigDict, arch: qwen3.Qwen3Config, devices: list, tp: int, *,
                    training_bytes_per_device: float = 0.0) -> float:
    """KV pool bytes per engine device. `rollout.kv_cache_gib`, or auto: 80 % of what is free after
    the training state (measured on a live device, or `training_bytes_per_device` when compiling
    ahead of time) and the inference weights."""
    if cfg.rollout.kv_cache_gib:
        return cfg.rollout.kv_cache_gib * GIB
    dev = devices[0]
    if dev.platform == "cpu":
        return CPU_BUDGET_GIB * GIB
    total = hbm_bytes(dev)
    if total is None:
        raise ConfigError(f"cannot tell the memory of device {dev.device_kind!r}: set config.rollout.kv_cache_gib")
    stats = _memory_stats(dev)
    used = float(stats.get("bytes_in_use", 0)) if stats else training_bytes_per_device
    weights = param_count(arch) * jnp.dtype(DTYPES[cfg.model.dtype]).itemsize / tp
    budget = AUTO_FRACTION * (total - used - weights)
    if budget <= 0:
        raise ConfigError(f"no device memory left for the KV cache ({total / GIB:.1f} GiB per device, "
                          f"{used / GIB:.1f} in use, {weights / GIB:.1f} for the inference weights): set "
                          "config.rollout.kv_cache_gib, or shard the model over more devices")
    return budget


def plan(cfg: ml_collections.ConfigDict, arch: qwen3.Qwen3Config, *, tp: int, budget_bytes: float,
         rows: int, device) -> EngineSpec:
    """Slots and pages for the config (see the module docstring) on devices like `device`."""
    r = cfg.rollout
    page, P, N, G = r.page_size, cfg.data.max_prompt_len, max_new_tokens(cfg), cfg.rl.group_size
    dtype = DTYPES[cfg.model.dtype]
    per_request = pages_for(N + page, page)   # private pages at full length (with the copied partial page)
    per_prompt = pages_for(P, page)
    budget_pages = paged_cache.num_pages_for_budget(budget_bytes, arch, dtype, page, tp)
    fit = int((budget_pages - 1) // (per_request + per_prompt / G))
    # a group shares its prompt's pages, but one request alone still holds them all: a pool
    # smaller than that would refuse it at the first rollout (engine.RequestTooLarge)
    if fit < 1 or budget_pages - 1 < per_request + per_prompt:
        need = (per_request + per_prompt) * page * paged_cache.bytes_per_token(arch, dtype) / tp
        raise ConfigError(f"the KV budget of {budget_bytes / GIB:.2f} GiB per device holds no request of "
                          f"{P} + {N} tokens ({need / GIB:.2f} GiB): raise config.rollout.kv_cache_gib (or "
                          f"rollout.tensor_parallel), or lower rollout.max_new_tokens / data.max_prompt_len")
    if r.max_slots:
        slots = r.max_slots
    elif device.platform == "cpu":
        # compute-bound: an idle slot costs a CPU as much as a live one, so a quarter of a call's
        # rows keeps the tail after the queue empties short while each step still batches enough
        # rows to amortise its fixed cost
        slots = max(1, min(fit, rows, max(16, rows // 4)))
    else:
        # memory-bound: a step reads the weights once whatever the row count
        slots = max(1, min(fit, rows))
    # a CPU allocates only what the slots can use; an accelerator's pool takes the whole budget
    num_pages = budget_pages if device.platform != "cpu" else min(budget_pages, 1 + slots * (per_request + per_prompt))
    # v4 / v5p chips are two TensorCores behind one device ("megacore"): the TPU paged kernel
    # splits its rows over both
    megacore = "batch" if str(device.device_kind) in MEGACORE_KINDS and slots % 2 == 0 else None
    return EngineSpec(num_slots=slots, page_size=page, num_pages=int(num_pages), max_prompt_len=P,
                      decode_chunk=r.decode_chunk, prefill_tokens=r.prefill_tokens, megacore_mode=megacore,
                      # TPU attention kernels (splash) tile sequences by 128
                      prefill_multiple=128 if device.platform == "tpu" else 0)


def engine_mesh(devices: list, tp: int):
    return parallel.make_mesh(1, 1, tp, devices=devices[:tp])


def build(cfg: ml_collections.ConfigDict, policy: Policy, *, devices=None) -> Engine:
    """The engine of this host for `policy` (its architecture; the weights come per rollout)."""
    local = host_devices(jax.local_devices() if devices is None else devices)
    tp = tensor_parallel(cfg.rollout, policy.arch, len(local), local[0].platform)
    budget = kv_budget_bytes(cfg, policy.arch, local, tp)
    spec = plan(cfg, policy.arch, tp=tp, budget_bytes=budget, rows=rows_per_call(cfg, policy.mesh), device=local[0])
    m = cfg.model
    engine = Engine(policy.arch, spec, engine_mesh(local, tp), dtype=DTYPES[m.dtype], attention=m.attention,
                    kernel_backend=m.kernel_backend or None)
    log.info("rollout engine: %d slots, %d KV pages of %d tokens (%.2f GiB per device), tensor-parallel over %d "
             "device(s), decode chunk %d", spec.num_slots, spec.num_pages, spec.page_size,
             spec.num_pages * spec.page_size * paged_cache.bytes_per_token(policy.arch, DTYPES[m.dtype]) / tp / GIB,
             tp, spec.decode_chunk)
    return engine


# ------------------------------------------------------------------------- inference weights
def _replica_mesh(engine: Engine, policy_mesh):
    """All devices of the training mesh as (replicas × tensor): each process's engine devices are
    one row, so a jit onto this mesh leaves every host a tensor-parallel copy on its engine."""
    tp = engine.mesh.shape["tensor"]
    devs = list(policy_mesh.devices.flat)
    rows = []
    for p in sorted({d.process_index for d in devs}):
        mine = sorted((d for d in devs if d.process_index == p), key=lambda d: d.id)
        if len(mine) % tp:
            raise ConfigError(f"process {p} holds {len(mine)} devices of the mesh, not a multiple of the rollout "
                              f"engine's tensor parallelism {tp} (config rollout.tensor_parallel)")
        rows += mine
    return parallel.make_mesh(len(rows) // tp, 1, tp, devices=rows)


def inference_params(engine: Engine, params, policy_mesh):
    """The training parameters (any dtype, sharded on `policy_mesh`) as the engine's copy: cast to
    its dtype and gathered once into tensor-parallel shards on each host's engine devices."""
    key = ("reshard", policy_mesh)
    if key not in engine._programs:  # one compiled cast-and-gather per engine and training mesh
        out_sh = parallel.param_shardings(params, _replica_mesh(engine, policy_mesh))
        engine._programs[key] = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(engine.dtype), p),
                                        out_shardings=out_sh)
    gathered = engine._programs[key](params)

    def local(x, sharding):
        by_device = {s.device: s.data for s in x.addressable_shards}
        return jax.make_array_from_single_device_arrays(
            x.shape, sharding, [by_device[d] for d in sharding.addressable_devices_indices_map(x.shape)])

    return jax.tree.map(local, gathered, engine.param_shardings)


# ------------------------------------------------------------------------- per-host generation
def generate(engine: Engine, params, ids_BxP, mask_BxP, key, sp: SamplingParams, *,
             progress: bool = False) -> SampleOutput:
    """Every process generates a contiguous share of the rows (whole groups when the row count
    allows) on its own engine; the outputs are gathered so every process returns all rows. Row r
    samples with `fold_in(key, r)` whatever process runs it."""
    ids, mask = np.asarray(ids_BxP), np.asarray(mask_BxP)
    B = ids.shape[0]
    lo, hi, _ = parallel.process_rows(B)   # one process: all rows
    if hi > lo:
        bar = RolloutProgress(hi - lo, progress)
        try:
            out = engine.generate(params, ids[lo:hi], mask[lo:hi], key, sp, row_ids=np.arange(lo, hi),
                                  on_progress=bar.update)
        finally:
            bar.close()
        parts = [out.tokens, out.lengths, out.logprobs, out.finished, out.behaviour_logprobs]
    else:
        N = sp.max_new_tokens
        parts = [np.zeros((0, N), np.int32), np.zeros(0, np.int32), np.zeros((0, N), np.float32), np.zeros(0, bool),
                 np.zeros((0, N), np.float32)]
    return SampleOutput(*parallel.gather_rows(parts, B))


# ------------------------------------------------------------------------- ahead of time
def training_bytes_per_device(cfg: ml_collections.ConfigDict, n_params: int, devices: int) -> float:
    """The training state each device holds, FSDP-sharded over `devices`: the parameters, AdamW's
    two moments and, for bf16 parameters, the float32 master copy (4 + 8 = 12 bytes per parameter
    in float32; 2 + 4 + 8 = 14 with bf16 parameters)."""
    per_param = jnp.dtype(DTYPES[cfg.model.param_dtype]).itemsize + step_programs.optimizer_bytes_per_param(cfg.model)
    return n_params * per_param / devices


def aot_programs(cfg: ml_collections.ConfigDict, policy: Policy, mesh, *, training_devices: int | None = None,
                 hosts: int | None = None, sizing_device=None, eval_decode: bool = False) -> list[Program]:
    """The engine's programs (one host's: prefill at the longest bucket, the decode chunk) at the
    config's shapes, as abstract arguments with shardings, for `jaxrl-entropy dryrun`. `policy`
    may be abstract (`model_setup.abstract_policy`). The engine runs on the first host's devices
    of `mesh`; `training_devices` (default `mesh.size`) shard the training state that shares HBM
    with the KV pool, and `hosts` (default: the processes of `mesh`) split the rollout's rows.
    `sizing_device` (default: the mesh's first device) is what slots and pages are sized for: a
    stand-in with a GPU's `platform` and `device_kind` sizes an engine for GPUs that are not attached
    (`dryrun`'s GPU estimate). `eval_decode` adds the evaluation's decode program (its own
    sampling settings, the same engine)."""
    arch = policy.arch
    devices = host_devices(mesh.devices.flat)
    sizing = sizing_device or devices[0]
    tp = tensor_parallel(cfg.rollout, arch, len(devices), sizing.platform)
    n_params = param_count(arch)
    training = training_bytes_per_device(cfg, n_params, training_devices or mesh.size)
    budget = kv_budget_bytes(cfg, arch, [sizing], tp, training_bytes_per_device=training)
    hosts = hosts or len({d.process_index for d in mesh.devices.flat})
    rows = -(-max(cfg.rl.prompts_per_step * cfg.rl.group_size, 1) // hosts)
    spec = plan(cfg, arch, tp=tp, budget_bytes=budget, rows=rows, device=sizing)
    m = cfg.model
    engine = Engine(arch, spec, engine_mesh(devices, tp), dtype=DTYPES[m.dtype], attention=m.attention,
                    kernel_backend=m.kernel_backend or None)
    sp = rollout_sampling_params(cfg.rollout, (1,), 0)
    args = engine.abstract_args(sp)
    S, C, N = spec.num_slots, spec.decode_chunk, sp.max_new_tokens
    R, T = args["prefill"][2].shape
    prompts = -(-cfg.rl.prompts_per_step // hosts)
    kv_gib = spec.num_pages * spec.page_size * paged_cache.bytes_per_token(arch, engine.dtype) / tp / GIB
    note = (f"{S} slots, {spec.num_pages} pages × {spec.page_size} tokens = {kv_gib:.1f} GiB KV per device, "
            f"TP {tp} over {len(devices)} devices of a host")
    programs = [
        Program("rollout/prefill", engine.prefill_fn(), args["prefill"], calls_per_step=-(-prompts // R),
                    note=f"{R} prompts × {T} tokens; {note}", resident_bytes=int(training)),
        # worst case: every response runs to max_new_tokens
        Program("rollout/decode", engine.decode_fn(sp), args["decode"], calls_per_step=-(-rows // S) * -(-N // C),
                    note=f"{C} steps × {S} slots; {note}", resident_bytes=int(training)),
    ]
    if eval_decode:
        from jaxrl_entropy.training import evaluate
        esp = evaluate.sampling_params(cfg, sp.eos_ids, 0)
        eargs = engine.abstract_args(esp)
        programs.append(Program("eval/decode", engine.decode_fn(esp), eargs["decode"], calls_per_step=0.0,
                                    note=f"{C} steps × {S} slots, eval sampling; {note}",
                                    resident_bytes=int(training)))
    return programs
