"""`jaxrl-entropy dryrun`: compile every program of an RL step for a named TPU slice on this machine
(no TPU, no weights, no data) and say, per chip, whether each fits, how much work it is and how long
a step should take.

    jaxrl-entropy dryrun --config=configs/qwen3_8b_dapo.py --topology=v5p-64 \\
        --config.model.hf_dir=configs/arch/qwen3-8b [--programs=update,rollout_stats] [--out=report.json]

    report = dryrun.run(cfg, "v5p-64")            # a `Report`; report.ok, report.programs[i].total_bytes
    print(dryrun.format_report(report))

TPUs: libtpu (`pip install -e '.[tpu]'`) provides the devices of a real slice
(`chips.Topology.tpu_devices`) and the real compiler, Mosaic kernels included; per program it gives
per-chip HBM (`compiled.memory_analysis()`), FLOPs and traffic (`hlo_stats`, loop trips counted;
XLA's `cost_analysis()` is shown too, which counts loop bodies once), the collectives, and a roofline
time from the chip's published figures (`chips.CHIPS`). A program fits when its arguments, outputs,
temporaries and the caller's other live arrays (`Program.resident_bytes`) stay under
(1 − headroom) of the chip's HBM.

GPUs (`h100x8`, ...) cannot be compiled for without one: where no GPU is attached the report is an
analytic estimate (`estimate_gpu`), labelled as such; with GPUs attached the programs compile for
real on them.

Programs come from builders (`BUILDERS`): the RL step's (`step_programs.aot_programs`), generation
and evaluation (today's `sampler.generate`). A part that owns jitted programs adds its builder there.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import re
import resource
import time
import types
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from jaxrl_entropy.training import model_setup, sampling, step_programs
from jaxrl_entropy.training.program import Program
from jaxrl_entropy import chips, parallel
from jaxrl_entropy.aot import costs, hlo_stats
from jaxrl_entropy.config import ConfigError
from jaxrl_entropy.aot.report import (GiB, ProgramReport, Report, as_dict, failure_message,  # noqa: F401 (the API)
                                      format_report, load)

HEADROOM = 0.10


# ----------------------------------------------------------------------------- program builders
def generation_programs(cfg: ml_collections.ConfigDict, policy: model_setup.Policy,
                        topo: chips.Topology) -> list[Program]:
    """Rollout generation as the trainer runs it. `rollout.engine="paged"`: the engine's prefill and
    decode-chunk programs on one host's devices (`engine_setup.aot_programs`; its KV pool sized for
    the topology's chips), plus the evaluation's decode when `eval.every`. `"dense"`: one
    `sampler.generate` call of `rl.prompts_per_step × rl.group_size` rows over a dense KV cache."""
    if cfg.rollout.engine == "paged":
        from jaxrl_entropy.training import engine_setup
        sizing, mesh, hosts = None, policy.mesh, None
        if policy.mesh.devices.flat[0].platform == "cpu" and topo.platform == "gpu":
            sizing = _gpu_standin(topo)  # size the engine for the named GPUs, not the CPU stand-ins
        elif policy.mesh.devices.flat[0].platform == "cpu":   # `--estimate` for a TPU slice: CPU stand-ins
            sizing = _tpu_standin(topo)
            per_host = chips_per_host(topo)
            hosts = topo.num_chips // per_host
            mesh = parallel.make_mesh(1, 1, per_host, devices=list(policy.mesh.devices.flat)[:per_host])
        return engine_setup.aot_programs(cfg, policy, mesh, training_devices=policy.mesh.size, hosts=hosts,
                                         sizing_device=sizing, eval_decode=bool(cfg.eval.every))
    rows = cfg.rl.prompts_per_step * cfg.rl.group_size
    sp = sampling.rollout_sampling_params(cfg.rollout, _eos(policy), 0)
    return [_sample_program("generation", cfg, policy, rows, sp, calls_per_step=1.0)]


def eval_programs(cfg: ml_collections.ConfigDict, policy: model_setup.Policy,
                  topo: chips.Topology) -> list[Program]:
    """One evaluation sampling call (`evaluate.spec_for`'s batch, `eval.*` sampling settings) with
    the dense sampler; the paged engine's is in `generation_programs`."""
    if not cfg.eval.every or cfg.rollout.engine == "paged":
        return []
    from jaxrl_entropy.training import evaluate
    spec = evaluate.spec_for(cfg, policy.mesh)
    sp = evaluate.sampling_params(cfg, _eos(policy), 0)
    return [_sample_program("eval", cfg, policy, spec.batch_prompts * spec.k, sp, calls_per_step=0.0)]


def _gpu_standin(topo: chips.Topology):
    """What `engine_setup` sizes an engine by (platform, device kind, no live memory figures)."""
    return types.SimpleNamespace(platform="gpu", device_kind=f"NVIDIA {topo.chip.name.upper()}", process_index=0,
                                 memory_stats=lambda: None)


def _tpu_standin(topo: chips.Topology):
    """A TPU chip as `engine_setup` sizes an engine by, for `--estimate` on CPU stand-ins."""
    kind = {"v5e": "TPU v5 lite", "v6e": "TPU v6 lite", "v5p": "TPU v5p", "v4": "TPU v4"}[topo.chip.name]
    return types.SimpleNamespace(platform="tpu", device_kind=kind, process_index=0, memory_stats=lambda: None)


def chips_per_host(topo: chips.Topology) -> int:
    """Accelerators one host drives: a GPU node's all; 8 on single-host v5e-8 / v6e-8, else 4 per
    TPU host (as `chips.Topology.tpu_devices` lays slices out)."""
    if topo.platform == "gpu":
        return topo.num_chips
    if topo.chip.name in ("v5e", "v6e") and topo.num_chips == 8:
        return 8
    return min(4, topo.num_chips)


def _eos(policy) -> tuple[int, ...]:
    from jaxrl_entropy.models import sampler
    return sampler.as_tuple(policy.arch.eos_token_id) or (0,)


def _sample_program(name, cfg, policy, rows: int, sp, *, calls_per_step: float) -> Program:
    from jaxrl_entropy.models import sampler
    graphdef = policy.graphdef
    row_sh = parallel.batch_sharding(policy.mesh, 2)
    P = cfg.data.max_prompt_len
    ids = jax.ShapeDtypeStruct((rows, P), jnp.int32, sharding=row_sh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=parallel.replicated(policy.mesh))
    # the body of `sampler.generate`'s jitted program, with the trainer's graphdef and sampling settings
    fn = jax.jit(lambda state, i, m, k: sampler._generate(graphdef, state, i, m, k, sp))
    opt = jax.eval_shape(step_programs.optimizer_from_config(cfg).init, policy.params)
    opt_bytes = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(opt)) // policy.mesh.size
    return Program(name, fn, (policy.params, ids, ids, key), calls_per_step=calls_per_step,
                       note=f"{rows} rows, prompt {P} + {sp.max_new_tokens} new tokens, dense KV cache",
                       resident_bytes=opt_bytes)


Builder = Callable[[ml_collections.ConfigDict, model_setup.Policy, chips.Topology], list[Program]]
BUILDERS: dict[str, Builder] = {
    "step": lambda cfg, policy, topo: step_programs.aot_programs(cfg, policy),
    "generation": generation_programs,
    "eval": eval_programs,
}


# ----------------------------------------------------------------------------- compile and measure
def _hbm_error(msg: str) -> tuple[float | None, list[str]]:
    """The TPU compiler's out-of-memory message → (bytes it needed, its largest allocations)."""
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    used = (re.search(r"Used ([\d.]+)([KMGT])i?B? of ([\d.]+)([KMGT])i?B? hbm", msg) or
            re.search(r"required for [^(]*\(([\d.]+)([KMGT])\) exceeds available HBM", msg))
    need = float(used.group(1)) * scale[used.group(2)] if used else None
    lines = [ln.strip() for ln in msg.splitlines()]
    big = []
    for i, ln in enumerate(lines):
        if ln.startswith("Size:"):
            size = ln.split("Size:")[1].strip()
            shape = next((x.split("Shape:")[1].strip() for x in lines[i:i + 6] if x.startswith("Shape:")), "")
            op = next((x for x in lines[i:i + 6] if x.startswith(("Operator:", "op_name"))), "")
            big.append(f"{size} {shape} {op[:160]}")
    return need, big[:8]


def _largest_buffers(text: str, n: int = 6) -> list[str]:
    """The largest arrays an unfused op of the compiled program produces (where the memory goes)."""
    comps, _, fused = hlo_stats.parse(text)
    seen: dict[str, tuple[float, str]] = {}
    for name, instrs in comps.items():
        if name in fused:
            continue
        for ins in instrs:
            if ins.opcode in ("parameter", "tuple", "get-tuple-element", "bitcast", "while", "conditional"):
                continue
            for shape in re.findall(r"\b[a-z][a-z0-9]*\[[0-9,]*\]", ins.type):
                b = hlo_stats.array_bytes(shape)
                meta = re.search(r'op_name="([^"]+)"', ins.rest)
                where = meta.group(1)[-90:] if meta else ins.opcode
                key = f"{shape} ({where})"
                if b > seen.get(key, (0.0, ""))[0]:
                    seen[key] = (b, key)
    top = sorted(seen.values(), key=lambda kv: -kv[0])[:n]
    return [f"{b / GiB:.2f} GiB {k}" for b, k in top]


def _largest_lowered(lowered) -> list[str]:
    """Largest arrays of the program before partitioning (global shapes): where the compiler gives
    no list of its own."""
    try:
        text = lowered.compiler_ir("hlo").as_hlo_text()
    except Exception:  # noqa: BLE001
        return []
    return [b.replace(" GiB ", " GiB global ") for b in _largest_buffers(text)]


def compile_program(program: Program, topo: chips.Topology, headroom: float = HEADROOM) -> ProgramReport:
    """Trace, lower and compile one program for the mesh its arguments live on; measure it."""
    chip = topo.chip
    cap = float(chip.hbm_bytes)
    rep = ProgramReport(program.name, program.note, program.calls_per_step, compiled=False,
                        resident_bytes=float(program.resident_bytes), capacity_bytes=cap,
                        kernel_flops=float(program.kernel_flops))
    t0 = time.time()
    lowered = None
    try:
        lowered = program.fn.trace(*program.args).lower()
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 — the compiler's own words are the report
        rep.compile_s = time.time() - t0
        msg = str(e)
        need, big = _hbm_error(msg)
        if need is not None:
            rep.total_bytes = need + rep.resident_bytes
            rep.largest_buffers = big or _largest_lowered(lowered)
            rep.error = "out of HBM at compile time: " + msg.splitlines()[0][:300]
        else:
            rep.error = f"{type(e).__name__}: {msg[:2000]}"
        return rep
    rep.compile_s = time.time() - t0
    rep.compiled = True
    mem = compiled.memory_analysis()
    if mem is not None:
        rep.argument_bytes = float(mem.argument_size_in_bytes)
        rep.output_bytes = float(mem.output_size_in_bytes)
        rep.alias_bytes = float(mem.alias_size_in_bytes)
        rep.temp_bytes = float(mem.temp_size_in_bytes)
        rep.code_bytes = float(mem.generated_code_size_in_bytes)
    rep.total_bytes = (rep.argument_bytes + rep.output_bytes - rep.alias_bytes + rep.temp_bytes + rep.code_bytes
                       + rep.resident_bytes)
    rep.fits = rep.total_bytes <= (1.0 - headroom) * cap
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    rep.xla_cost_flops = float(cost.get("flops", 0.0))
    text = compiled.as_text()
    if os.environ.get("JAXRL_DRYRUN_HLO_DIR"):  # the optimised HLO, for reading what a number comes from
        with open(os.path.join(os.environ["JAXRL_DRYRUN_HLO_DIR"], program.name.replace("/", "_") + ".hlo"), "w") as f:
            f.write(text)
    stats = hlo_stats.analyze(text)
    rep.hlo_flops, rep.hbm_traffic_bytes = stats.flops, stats.bytes
    rep.collectives = {k: {"count": c.count, "bytes": c.bytes} for k, c in stats.collectives.items() if c.count}
    rep.largest_collectives = [f"{k} {s} ×{n:g}" for k, s, n in stats.largest_collectives]
    rep.unknown_trip_loops = stats.unknown_trip_loops
    _roofline(rep, chip, stats.collective_bytes)
    if not rep.fits:
        rep.largest_buffers = _largest_buffers(text)
    del compiled, text
    gc.collect()
    return rep


def _roofline(rep: ProgramReport, chip: chips.Chip, collective_bytes: float) -> None:
    rep.t_compute_s = (rep.hlo_flops + rep.kernel_flops) / chip.bf16_flops
    rep.t_memory_s = rep.hbm_traffic_bytes / chip.hbm_bw
    # a chip sends and receives each collective's bytes over its links at once: the bidirectional figure halves
    rep.t_collective_s = collective_bytes / (chip.ici_bw / 2) if chip.ici_bw else 0.0
    rep.roofline_s = max(rep.t_compute_s, rep.t_memory_s, rep.t_collective_s)


# ----------------------------------------------------------------------------- GPU estimate
def estimate_gpu(cfg: ml_collections.ConfigDict, policy: model_setup.Policy, program: Program,
                 topo: chips.Topology, headroom: float = HEADROOM) -> ProgramReport:
    """Per-GPU memory and time of a program from formulas (no compiler): parameters, optimiser
    state and gradients as sharded; activations of one micro-batch (or chunk) of the model with
    per-layer remat; the dense KV cache for sampling. An ESTIMATE: XLA's buffer assignment and
    fusion decide the real figure (run `dryrun` on a GPU host for it)."""
    arch, n = policy.arch, topo.num_chips
    sh = step_programs.step_shapes(cfg)
    P_all = sum(math.prod(x.shape) for x in jax.tree.leaves(policy.params))
    layer = (arch.hidden_size * (arch.num_attention_heads + 2 * arch.num_key_value_heads) * arch.head_dim
             + arch.num_attention_heads * arch.head_dim * arch.hidden_size + 3 * arch.hidden_size * arch.intermediate_size)
    pbytes = jnp.dtype(model_setup.DTYPES[cfg.model.param_dtype]).itemsize
    # AdamW's moments, and for bf16 parameters the float32 master copy: 8 or 12 bytes per parameter
    optimiser = step_programs.optimizer_bytes_per_param(cfg.model) * P_all / n
    cbytes = 2 if cfg.model.dtype in ("bfloat16", "float16") else 4
    D, I, L, V = arch.hidden_size, arch.intermediate_size, arch.num_hidden_layers, arch.vocab_size
    qkv = (arch.num_attention_heads * 2 + 2 * arch.num_key_value_heads) * arch.head_dim
    C = min(cfg.model.logits_chunk, sh.response_len)
    T = sh.seq_len
    params = pbytes * P_all / n
    gathered = 2 * cbytes * layer                        # this layer's and the next layer's weights, whole
    def layer_work(rows):  # one layer's live activations in its backward pass (recomputed under remat)
        return rows * T * cbytes * (4 * D + 2 * qkv + 3 * I) * 2
    parts: dict[str, float] = {"parameters": params}
    flops = 0.0
    hbm_bytes = 0.0   # estimated only where a program is memory-bound by construction (decode)
    if program.name in ("update", "geometry/gradient"):
        rows = sh.micro / n
        parts.update(optimiser=optimiser, gradients=2 * 4 * P_all / n, gathered_weights=gathered,
                     saved_layer_inputs=L * rows * T * D * cbytes, layer_backward=layer_work(rows),
                     logits_chunk=3 * rows * C * V * 4)
        flops = (8 if cfg.model.remat else 6) * P_all * (sh.mini if program.name == "update" else sh.micro) * T / n
    elif program.name.startswith("geometry/"):   # projections (forward + tangents), norms, sketches
        rows = sh.micro / n
        parts.update(optimiser=optimiser, gradients=2 * 4 * P_all / n, gathered_weights=2 * gathered,
                     layer_forward=layer_work(rows), logits_chunk=4 * rows * C * V * 4)
        flops = 4 * P_all * sh.micro * T / n if program.name == "geometry/projections" else 0.0
    elif program.name in ("rollout_stats", "token_weights"):
        rows = sh.micro / n
        parts.update(optimiser=optimiser, gathered_weights=gathered, layer_forward=layer_work(rows) / 2,
                     logits_chunk=2 * rows * C * V * 4, outputs=3 * sh.rows * sh.response_len * 4 / n)
        flops = 2 * P_all * sh.rows * T / n if program.name == "rollout_stats" else 0.0
    elif program.name.startswith(("rollout/", "eval/")):  # the paged engine: one host's tensor-parallel copy
        tp = jax.tree.leaves(program.args[0])[0].sharding.mesh.size   # the engine's devices
        args_bytes = step_programs.per_device_bytes(program.args)
        parts.pop("parameters")
        parts.update(training_state=float(program.resident_bytes), engine_arguments=args_bytes)
        if program.name.endswith("prefill"):
            R, T_p = program.args[2].shape
            parts["layer_activations"] = R * T_p * cbytes * (4 * D + 2 * qkv + 3 * I)
            flops = 2 * P_all * R * T_p / tp
        else:
            S = program.args[2].shape[0]
            steps = cfg.rollout.decode_chunk
            parts["logits"] = S * V * 4 * 3
            flops = 2 * P_all * S * steps / tp
            # decode is memory-bound: every step reads this device's weights and its share of the
            # live KV (slots at the mean context, prompt + half the response limit, of the pool's
            # full-length capacity)
            P_len, N_len = cfg.data.max_prompt_len, cfg.rollout.max_new_tokens
            live_kv = step_programs.per_device_bytes(program.args[1]) * (P_len + N_len / 2) / (P_len + N_len)
            hbm_bytes = steps * (step_programs.per_device_bytes(program.args[0]) + live_kv)
    else:  # generation / eval
        rows = program.args[1].shape[0] / n
        S = program.args[1].shape[1] + (cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens)
        parts.update(optimiser=optimiser, kv_cache=rows * S * L * 2 * arch.num_key_value_heads
                     * arch.head_dim * cbytes, gathered_weights=gathered, logits=rows * V * 4 * 2)
        flops = 2 * P_all * rows * S
    total = sum(parts.values())
    rep = ProgramReport(program.name, program.note, program.calls_per_step, compiled=False,
                        total_bytes=total, capacity_bytes=float(topo.chip.hbm_bytes),
                        fits=total <= (1.0 - headroom) * topo.chip.hbm_bytes, hlo_flops=flops,
                        kernel_flops=program.kernel_flops)
    rep.estimate = "ANALYTIC ESTIMATE (no GPU compiler): " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in parts.items())
    rep.t_compute_s = (flops + program.kernel_flops) / topo.chip.bf16_flops
    rep.hbm_traffic_bytes = hbm_bytes
    rep.t_memory_s = hbm_bytes / topo.chip.hbm_bw
    rep.roofline_s = max(rep.t_compute_s, rep.t_memory_s)
    return rep


# ----------------------------------------------------------------------------- the command
def select(programs: list[Program], names: Sequence[str] | None) -> list[Program]:
    """The programs named in `names`, in the config's order; a group name (`geometry`, `rollout`,
    `eval`) selects every program under it (`geometry/gradient`, ...)."""
    if not names:
        return programs

    def chosen(p: Program, name: str) -> bool:
        return p.name == name or p.name.startswith(name + "/")

    known = [p.name for p in programs]
    unknown = [n for n in names if not any(chosen(p, n) for p in programs)]
    if unknown:
        groups = sorted({k.split("/")[0] for k in known if "/" in k})
        raise ConfigError(f"--programs: unknown program(s) {unknown}; this config has {known} "
                          f"(or a whole group: {groups})")
    return [p for p in programs if any(chosen(p, n) for n in names)]


def run(cfg: ml_collections.ConfigDict, topology: str, *, programs: Sequence[str] | None = None,
        headroom: float = HEADROOM, log: Callable[[str], None] | None = None, estimate: bool = False) -> Report:
    """Compile (TPU) or estimate (GPU without one, or any slice with `estimate=True`: formulas on CPU
    stand-in devices, seconds instead of minutes) the selected programs of `cfg` on `topology`.
    Generation and evaluation are weighed per RL step by `costs.weigh`."""
    from jaxrl_entropy.config import typed
    cfg = typed(cfg)
    topo = chips.resolve(topology)
    if not cfg.model.hf_dir:
        raise ConfigError("dryrun reads the architecture from config.json: set --config.model.hf_dir=DIR "
                          "(a directory holding the model's config.json; Qwen3-8B's is in configs/arch/qwen3-8b)")
    arch = model_setup.architecture(cfg.model)
    gpu_estimate = estimate
    if estimate:
        devices = _cpu_standins(topo.num_chips)
    elif topo.platform == "tpu":
        devices = topo.tpu_devices()
    else:
        attached = [d for d in jax.devices() if d.platform == "gpu"]
        gpu_estimate = len(attached) < topo.num_chips
        devices = attached[: topo.num_chips] if not gpu_estimate else jax.devices("cpu")[: topo.num_chips]
        if len(devices) < topo.num_chips:  # a mesh of CPU stand-ins, for shapes and shardings only
            devices = _cpu_standins(topo.num_chips)
    mesh = model_setup.build_mesh(cfg.parallel, devices=devices)
    step_programs.check_batch(cfg, mesh)
    policy = model_setup.abstract_policy(cfg, mesh, arch)
    all_programs: list[Program] = []
    reports = []
    for kind, build in BUILDERS.items():
        try:
            all_programs += build(cfg, policy, topo)
        except ConfigError as e:   # the engine cannot be sized: no memory left for its KV pool
            if kind != "generation" or (programs and not any(n.startswith(("rollout", "eval")) for n in programs)):
                raise
            reports.append(ProgramReport("rollout", "the generation engine", 0.0, compiled=False,
                                         capacity_bytes=float(topo.chip.hbm_bytes), error=str(e)))
    all_programs, notes = costs.weigh(cfg, all_programs)
    chosen = select(all_programs, programs)
    for p in chosen:
        if log:
            log(f"{'estimating' if gpu_estimate else 'compiling'} {p.name} for {topo.describe()} ({p.note}) ...")
        rep = estimate_gpu(cfg, policy, p, topo, headroom) if gpu_estimate else compile_program(p, topo, headroom)
        if estimate and topo.platform == "tpu":
            rep.estimate = rep.estimate.replace("(no GPU compiler)", "(--estimate: not compiled)")
        if log:
            log(f"  {p.name}: {rep.total_bytes / GiB:.1f} GiB per chip of {rep.capacity_bytes / GiB:.0f}"
                f"{' (estimate)' if rep.estimate else ''}, compile {rep.compile_s:.0f} s")
        reports.append(rep)
    sh = step_programs.step_shapes(cfg)
    report = Report(topology=topo.name, description=topo.describe(), chip=dataclasses.asdict(topo.chip),
                    mesh=dict(mesh.shape), config=cfg.name, headroom=headroom,
                    tokens_per_step=sh.rows * sh.seq_len, response_tokens_per_step=sh.rows * sh.response_len,
                    programs=reports, peak_host_rss_gib=peak_rss_gib(), num_chips=topo.num_chips,
                    steps=cfg.train.steps, notes=notes)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(policy.params))
    report.advice = costs.advice(cfg, report, n_params)
    return report


def _cpu_standins(n: int) -> list:
    cpus = jax.devices("cpu")
    if len(cpus) < n:
        raise ConfigError(f"the GPU estimate needs {n} devices to lay out shardings; start with "
                          f"XLA_FLAGS=--xla_force_host_platform_device_count={n} (the CLI does this itself)")
    return cpus[:n]


def peak_rss_gib() -> float:
    """This process's peak resident host memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
