"""Does the paper's rollout fit, and how close is a decode step to the memory-bandwidth floor?

    JAX_PLATFORMS=cpu python benchmarks/rollout_fit.py [--topology v5p:2x2x1] [--hosts 8] [--out benchmarks/RESULTS.md]

Compiles the rollout engine's programs (`engine_setup.aot_programs`: prefill at the longest
bucket, the decode chunk) for Qwen3-8B (the shapes of its config.json; no weights) on one TPU host
of the topology with the real TPU compiler (libtpu on a CPU host), sized for the paper's config
(512 prompts × 16 samples, prompt ≤ 1024, responses ≤ 8192, rows split over `--hosts` hosts, the
training state FSDP-sharded over all their chips), and prints per-device HBM (XLA's memory
analysis) and a decode step's bytes against the HBM-bandwidth floor:

    floor per step = (weights per device + live KV per device) / HBM bandwidth

live KV = slots × mean context (prompt + half the response limit) × K/V bytes per token / TP. The
TPU paged-attention kernel is a custom call, so its KV reads are not in XLA's cost analysis:
the script adds them analytically. An 8×H100 node is estimated analytically (no GPU compiler here).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxrl_entropy import chips, presets  # noqa: E402
from jaxrl_entropy.training import engine_setup, model_setup
from jaxrl_entropy.models import paged_cache, qwen3  # noqa: E402

GIB = 2 ** 30
QWEN3_8B = qwen3.Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                             tie_word_embeddings=False)
BANDWIDTH = {"TPU v5p": 2765e9, "NVIDIA H100": 3350e9}
HBM = {"TPU v5p": chips.CHIPS["v5p"].hbm_bytes, "NVIDIA H100": chips.CHIPS["h100"].hbm_bytes}


class _Dev:
    """A stand-in device for the analytic GPU estimate (sizing only needs kind and platform)."""
    def __init__(self, kind, platform, i):
        self.device_kind, self.platform, self.id, self.process_index = kind, platform, i, 0


def _topology_devices(topology: str) -> list:
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices


def decode_floor(arch, spec, tp: int, dtype, bandwidth: float, prompt: int, max_new: int) -> dict:
    weights = engine_setup.param_count(arch) * jnp.dtype(dtype).itemsize / tp
    context = prompt + max_new / 2
    kv = spec.num_slots * context * paged_cache.bytes_per_token(arch, dtype) / tp
    t = (weights + kv) / bandwidth
    return {"weights_gb": weights / 1e9, "kv_gb": kv / 1e9, "floor_ms": 1e3 * t,
            "tokens_per_s": spec.num_slots / t}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", default="v5p:2x2x1", help="one host's TPU topology")
    ap.add_argument("--hosts", type=int, default=8, help="hosts of the whole slice (v5p-64: 8)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    cfg = presets.qwen3_8b_dapo()
    cfg.model.hf_dir = ""
    devices = _topology_devices(args.topology)
    n_host = len(devices)
    mesh = model_setup.build_mesh(cfg.parallel, devices=devices)
    policy = model_setup.abstract_policy(cfg, mesh, QWEN3_8B)
    # the slice: `hosts` × this host's chips, training state FSDP-sharded over all of them
    slice_chips = n_host * args.hosts
    training = engine_setup.param_count(QWEN3_8B) * (4 + 8) / slice_chips
    lines = []
    import time
    tp = engine_setup.tensor_parallel(cfg.rollout, QWEN3_8B, n_host, "tpu")
    budget = engine_setup.kv_budget_bytes(cfg, QWEN3_8B, devices, tp, training_bytes_per_device=training)
    rows = -(-cfg.rl.prompts_per_step * cfg.rl.group_size // args.hosts)
    spec = engine_setup.plan(cfg, QWEN3_8B, tp=tp, budget_bytes=budget, rows=rows, device=devices[0])
    kv_gib = spec.num_pages * spec.page_size * paged_cache.bytes_per_token(QWEN3_8B, jnp.bfloat16) / tp / GIB
    lines.append(f"TPU {args.topology} host of a {args.hosts}-host slice ({slice_chips} chips): TP {tp}, "
                 f"{rows} rows per host, {spec.num_slots} slots, {spec.num_pages} pages × {spec.page_size} tokens = "
                 f"{kv_gib:.1f} GiB KV per chip (training state {training / GIB:.1f} GiB per chip)")
    lines += ["", "| program | args GiB | temps GiB | total GiB / chip | HBM GiB | XLA bytes accessed / call (GB) | "
              "XLA TFLOP / call | compile s |", "|---|---|---|---|---|---|---|---|"]
    programs = engine_setup.aot_programs(cfg, policy, mesh, training_devices=slice_chips, hosts=args.hosts)
    decode_bytes = None
    for prog in programs:
        t = time.time()
        compiled = prog.fn.trace(*prog.args).lower().compile()
        dt = time.time() - t
        m = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        total = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                 - m.alias_size_in_bytes)
        by = cost.get("bytes accessed", float("nan"))
        if prog.name == "rollout/decode":
            decode_bytes = by
        lines.append(f"| {prog.name} | {m.argument_size_in_bytes / GIB:.1f} | {m.temp_size_in_bytes / GIB:.2f} | "
                     f"{total / GIB:.1f} | {HBM['TPU v5p'] / GIB:.1f} | {by / 1e9:.1f} | "
                     f"{cost.get('flops', float('nan')) / 1e12:.2f} | {dt:.0f} |")
        print(lines[-1], flush=True)
        lines.append("")
        lines.append(f"  {prog.name}: {prog.note}; {prog.calls_per_step:g} calls per step (worst case)")
        lines.append("")
    f = decode_floor(QWEN3_8B, spec, tp, jnp.bfloat16, BANDWIDTH["TPU v5p"], cfg.data.max_prompt_len,
                     cfg.rollout.max_new_tokens)
    lines.append(f"decode step floor (v5p, per chip): weights {f['weights_gb']:.2f} GB + live KV {f['kv_gb']:.1f} GB "
                 f"(all {spec.num_slots} slots at mean context {cfg.data.max_prompt_len + cfg.rollout.max_new_tokens // 2}) "
                 f"→ {f['floor_ms']:.1f} ms at 2765 GB/s = {f['tokens_per_s']:,.0f} tokens/s per host")
    if decode_bytes is not None:
        lines.append(f"XLA-visible bytes of one decode call: {decode_bytes / 1e9:.2f} GB (the while loop body is "
                     f"counted once: ≈ one step's weight reads; the paged-attention kernel's KV reads are not "
                     f"included) → a step reads ≈ {decode_bytes / 1e9:.2f} + {f['kv_gb']:.1f} GB vs the floor's "
                     f"{f['weights_gb'] + f['kv_gb']:.1f} GB")
    # 8 x H100 (one node), analytic
    gpus = [_Dev("NVIDIA H100 80GB HBM3", "gpu", i) for i in range(8)]
    tp_g = engine_setup.tensor_parallel(cfg.rollout, QWEN3_8B, 8, "gpu")
    training_g = engine_setup.param_count(QWEN3_8B) * 12 / 8
    weights_g = engine_setup.param_count(QWEN3_8B) * 2 / tp_g
    budget_g = engine_setup.AUTO_FRACTION * (HBM["NVIDIA H100"] - training_g - weights_g)
    spec_g = engine_setup.plan(cfg, QWEN3_8B, tp=tp_g, budget_bytes=budget_g,
                               rows=cfg.rl.prompts_per_step * cfg.rl.group_size, device=gpus[0])
    g = decode_floor(QWEN3_8B, spec_g, tp_g, jnp.bfloat16, BANDWIDTH["NVIDIA H100"], cfg.data.max_prompt_len,
                     cfg.rollout.max_new_tokens)
    lines.append("")
    lines.append(f"8×H100 node (ANALYTIC ESTIMATE, not compiled): TP {tp_g}, training state {training_g / 1e9:.1f} GB + "
                 f"inference weights {weights_g / 1e9:.1f} GB per GPU, KV budget {budget_g / 1e9:.1f} GB per GPU → "
                 f"{spec_g.num_slots} slots, {spec_g.num_pages} pages; decode step floor: {g['weights_gb']:.2f} GB + "
                 f"{g['kv_gb']:.1f} GB → {g['floor_ms']:.1f} ms at 3350 GB/s = {g['tokens_per_s']:,.0f} tokens/s per node")
    head = (f"jax {jax.__version__}; libtpu compile on a CPU host; Qwen3-8B shapes (36 layers, hidden 4096, "
            f"8 KV heads × 128); bf16 weights and KV; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    text = "\n".join([head, ""] + lines)
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(f"\n## Rollout engine — Qwen3-8B fit and decode bandwidth floor\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
