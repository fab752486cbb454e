"""`jaxrl-entropy dryrun`: slice names, the HLO reader, the real TPU compiler on a small slice,
a config too large for its slice, the GPU estimate, and Qwen3-8B's architecture from config.json."""
import json
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from conftest import REPO_ROOT
from jaxrl_entropy import chips, presets
from jaxrl_entropy import cli
from jaxrl_entropy.aot import dryrun, hlo_stats
from jaxrl_entropy.training import model_setup

# Qwen3-8B's config.json, as published with the model (the values that change the maths)
QWEN3_8B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=4096, intermediate_size=12288,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                vocab_size=151936, rope_theta=1000000, tie_word_embeddings=False, rms_norm_eps=1e-6,
                max_position_embeddings=40960)
ARCH_DIR = str(REPO_ROOT / "configs" / "arch" / "qwen3-8b")


@pytest.fixture
def qwen3_8b_dir(tmp_path):
    """A directory holding only Qwen3-8B's config.json (no weights)."""
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_8B))
    return str(tmp_path)


def _tiny_dir(tmp_path, **over):
    d = dict(QWEN3_8B, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=128, vocab_size=512)
    d.update(over)
    (tmp_path / "config.json").write_text(json.dumps(d))
    return str(tmp_path)


@pytest.mark.parametrize("name, chip, n, shape", [
    ("v5p-64", "v5p", 32, "2x4x4"),     # v5p names count TensorCores: 2 per chip
    ("v5p-8", "v5p", 4, "2x2x1"),
    ("v4-32", "v4", 16, "2x2x4"),
    ("v5e-256", "v5e", 256, "16x16"),   # v5e / v6e names count chips
    ("v6e-8", "v6e", 8, "2x4"),
    ("v5p:4x4x2", "v5p", 32, "4x4x2"),
    ("h100x8", "h100", 8, "8"),
])
def test_slice_names(name, chip, n, shape):
    t = chips.resolve(name)
    assert (t.chip.name, t.num_chips, t.shape) == (chip, n, shape)


@pytest.mark.parametrize("name", ["v5p-63", "v5p-6", "v7x-8", "h100x16"])
def test_bad_slice_names_say_what_exists(name):
    with pytest.raises(ValueError, match="v5p|TensorCores|GPUs|topology"):
        chips.resolve(name)


def test_hlo_stats_counts_loop_trips_and_collectives():
    """Oracle by hand: a scan of 5 steps, each a [16, 32] @ [32, 24] matmul per device and a psum
    over 8 devices, is 5 × 2·16·32·24 FLOPs and 5 all-reduces of f32[16, 24]."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("d",))

    def per_device(w, xs):
        def body(c, x):
            return c + jax.lax.psum(x @ w, "d"), None
        return jax.lax.scan(body, jnp.zeros((16, 24)), xs)[0]

    fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(None, "d")), out_specs=P()))
    text = fn.lower(jax.ShapeDtypeStruct((32, 24), jnp.float32),
                    jax.ShapeDtypeStruct((5, 16 * 8, 32), jnp.float32)).compile().as_text()
    stats = hlo_stats.analyze(text)
    assert stats.flops == 5 * 2 * 16 * 32 * 24
    assert stats.collectives["all-reduce"].count == 5
    assert stats.collectives["all-reduce"].bytes == 5 * 16 * 24 * 4
    assert stats.unknown_trip_loops == 0


def test_hlo_stats_counts_only_the_rows_a_gather_and_a_scatter_touch():
    """Oracle by hand: a loop of 10 steps that gathers 8 rows of a 32 MiB buffer and scatters them
    back in place moves about 4 × 8 rows per step (gather read + write, update read + write), not
    the buffer (the decode loop's KV pool is such a buffer: counting it whole made the roofline 4×
    the real traffic)."""
    N, D, S, steps = 65536, 128, 8, 10

    def prog(buf, idx):
        def body(i, buf):
            return buf.at[idx + i + 1].set(buf[idx + i] * 2.0)
        return jax.lax.fori_loop(0, steps, body, buf)

    text = jax.jit(prog, donate_argnums=0).lower(jax.ShapeDtypeStruct((N, D), jnp.float32),
                                                 jax.ShapeDtypeStruct((S,), jnp.int32)).compile().as_text()
    stats = hlo_stats.analyze(text)
    rows = S * D * 4
    assert 2 * steps * rows <= stats.bytes <= 8 * steps * rows, stats.bytes
    assert stats.unknown_trip_loops == 0


def test_qwen3_8b_from_config_json_alone(qwen3_8b_dir):
    """Oracle: Qwen3-8B's parameter count by hand from its published widths (8.19 B)."""
    cfg = presets.qwen3_8b_dapo()
    cfg.model.hf_dir = qwen3_8b_dir
    arch = model_setup.architecture(cfg.model)
    mesh = model_setup.build_mesh(cfg.parallel)
    policy = model_setup.abstract_policy(cfg, mesh, arch)
    D, I, L, V, H, K, Dh = 4096, 12288, 36, 151936, 32, 8, 128
    per_layer = D * (H + 2 * K) * Dh + H * Dh * D + 3 * D * I + 2 * D + 2 * Dh
    expected = 2 * V * D + L * per_layer + D
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(policy.params)) == expected == 8_190_735_360
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(policy.params))


def test_shipped_architecture_file_is_qwen3_8b():
    with open(os.path.join(ARCH_DIR, "config.json")) as f:
        shipped = json.load(f)
    assert {k: shipped[k] for k in QWEN3_8B} == QWEN3_8B
    assert sorted(os.listdir(ARCH_DIR)) == ["config.json"]


def _run_cli(args, capsys):
    code = cli.main(["jaxrl-entropy", "dryrun"] + args)
    out = capsys.readouterr()
    return code, out.out, out.err


SMALL = ["--config=configs/qwen3_8b_dapo.py", "--config.data.max_prompt_len=128",
         "--config.rollout.max_new_tokens=128", "--config.rl.prompts_per_step=4", "--config.rl.group_size=4",
         "--config.rl.mini_batch_prompts=2", "--config.rl.micro_batch_size=4", "--config.rl.overlong_buffer=16",
         "--config.model.logits_chunk=64", "--config.entropy.layers=(1,)"]


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)


def test_dryrun_compiles_the_step_for_a_small_tpu_slice(tpu_devices, tmp_path, capsys, in_repo):
    """The real TPU compiler (Mosaic kernels included) on a v5p:2x2x1 slice, tiny widths: every
    step program compiles and fits; the JSON report carries the table's numbers."""
    tpu_devices("v5p:2x2x1")
    out = tmp_path / "report.json"
    code, stdout, _ = _run_cli(SMALL + [f"--config.model.hf_dir={_tiny_dir(tmp_path)}", "--topology=v5p:2x2x1",
                                        "--programs=rollout_stats,update,token_weights", f"--out={out}"], capsys)
    assert code == 0, stdout
    report = json.loads(out.read_text())
    assert report["ok"] and [p["name"] for p in report["programs"]] == ["rollout_stats", "update", "token_weights"]
    update = report["programs"][1]
    # the arguments hold at least this device's quarter of the f32 parameters and Adam's two moments
    n_params = 2 * 512 * 128 + 2 * (128 * 4 * 128 + 2 * 128 * 128 + 3 * 128 * 256)
    assert update["argument_bytes"] >= 3 * 4 * n_params / 4
    assert update["hlo_flops"] > 0 and update["kernel_flops"] > 0 and update["compile_s"] > 0
    assert "| update |" in stdout and "tokens per RL step: 4,096" in stdout
    table = [ln for ln in stdout.splitlines() if ln.startswith("| update |")]
    assert table and table[0] in dryrun.format_report(dryrun.load(str(out)))  # docs regenerate from JSON


def test_geometry_programs_compile_for_a_small_tpu_slice(tpu_devices, tmp_path, capsys, in_repo):
    """`--programs=geometry` selects the group; each gradient comes back sharded like the parameters
    (a replicated gradient would be 4× larger: the host loop keeps two of them)."""
    tpu_devices("v5p:2x2x1")
    out = tmp_path / "report.json"
    code, stdout, _ = _run_cli(SMALL + [f"--config.model.hf_dir={_tiny_dir(tmp_path)}", "--topology=v5p:2x2x1",
                                        "--programs=geometry", f"--out={out}"], capsys)
    assert code == 0, stdout
    by_name = {p["name"]: p for p in json.loads(out.read_text())["programs"]}
    assert list(by_name) == ["geometry/gradient", "geometry/projections", "geometry/norm_and_dot", "geometry/sketch"]
    assert all(p["fits"] for p in by_name.values())
    n_params = 2 * 512 * 128 + 2 * (128 * 4 * 128 + 2 * 128 * 128 + 3 * 128 * 256)
    assert 4 * n_params / 4 * 0.9 <= by_name["geometry/gradient"]["output_bytes"] <= 4 * n_params / 4 * 1.1


def test_dryrun_fails_naming_program_topology_and_buffers(tpu_devices, tmp_path, capsys, in_repo):
    """A dense KV cache of 8192 rows × 4224 slots (17.7 GB per chip) on a 16 GiB v5e chip."""
    tpu_devices("v5e:2x2")
    args = SMALL + [f"--config.model.hf_dir={_tiny_dir(tmp_path, num_attention_heads=4, num_key_value_heads=4)}",
                    "--topology=v5e:2x2", "--programs=generation", "--config.rollout.engine=dense",
                    "--config.rl.prompts_per_step=512",
                    "--config.rl.group_size=16", "--config.rl.mini_batch_prompts=32", "--config.rl.micro_batch_size=16",
                    "--config.rollout.max_new_tokens=4096"]
    code, stdout, stderr = _run_cli(args, capsys)
    assert code == 1
    assert "program 'generation' does not fit on v5e:2x2" in stderr
    assert "largest buffer" in stderr


def test_gpu_topology_is_a_labelled_estimate(tmp_path, capsys, in_repo):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    code, stdout, _ = _run_cli(SMALL + [f"--config.model.hf_dir={_tiny_dir(tmp_path)}", "--topology=h100x8",
                                        "--config.rl.micro_batch_size=8", "--config.rl.mini_batch_prompts=4",
                                        "--programs=update,generation", "--config.rollout.engine=dense"], capsys)
    assert code == 0, stdout
    assert stdout.count("ANALYTIC ESTIMATE (no GPU compiler)") == 2


def test_engine_programs_compile_for_a_tpu_host(tpu_devices, tmp_path, capsys, in_repo):
    """The paged engine's prefill, decode chunk and evaluation decode, compiled (Mosaic's paged
    attention included) for a v5p host; oracle for the pool: its pages × page size × the per-token
    K/V bytes of every layer, computed by hand, lie inside the decode program's arguments."""
    tpu_devices("v5p:2x2x1")
    out = tmp_path / "report.json"
    code, stdout, _ = _run_cli(SMALL + [f"--config.model.hf_dir={_tiny_dir(tmp_path)}", "--topology=v5p:2x2x1",
                                        "--config.rollout.kv_cache_gib=0.25", "--config.eval.every=10",
                                        "--programs=rollout/prefill,rollout/decode,eval/decode", f"--out={out}"],
                               capsys)
    assert code == 0, stdout
    report = json.loads(out.read_text())
    by_name = {p["name"]: p for p in report["programs"]}
    assert set(by_name) == {"rollout/prefill", "rollout/decode", "eval/decode"}
    assert all(p["compiled"] and p["fits"] for p in by_name.values())
    # tiny model: 2 layers, 1 KV head of 128, bf16 → 2 layers × (K + V) × 128 × 2 bytes per token
    per_token = 2 * 2 * 128 * 2
    budget = 0.25 * 2 ** 30
    assert by_name["rollout/decode"]["argument_bytes"] >= 0.9 * budget // per_token * per_token
    assert by_name["rollout/decode"]["calls_per_step"] >= 1


def test_engine_gpu_estimate_sizes_the_pool_for_the_named_gpus(tmp_path, capsys, in_repo):
    """No GPU attached: the engine is sized for an H100 (80 GB), not for the CPU stand-ins; its
    estimate counts the pool, the weights and the training state and says it is an estimate."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    out = tmp_path / "report.json"
    code, stdout, _ = _run_cli(SMALL + [f"--config.model.hf_dir={_tiny_dir(tmp_path)}", "--topology=h100x8",
                                        "--config.rl.micro_batch_size=8", "--config.rl.mini_batch_prompts=4",
                                        "--programs=rollout/decode", f"--out={out}"], capsys)
    assert code == 0, stdout
    rep = json.loads(out.read_text())["programs"][0]
    assert "ANALYTIC ESTIMATE" in rep["estimate"]
    # auto budget: 80 % of an H100's memory after the weights and training state → tens of GiB,
    # where a CPU stand-in would get 1 GiB
    assert rep["total_bytes"] > 40 * 2 ** 30 and rep["fits"]


def test_gpu_estimate_from_a_fresh_process_sets_its_own_devices(tmp_path):
    """The command as a user runs it (no XLA_FLAGS): `jaxrl-entropy dryrun` provides the 8 CPU
    stand-ins itself before jax is imported (a regression: it used to check too late)."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["JAX_PLATFORMS"] = "cpu"
    root = str(REPO_ROOT)
    proc = subprocess.run([sys.executable, "-m", "jaxrl_entropy.cli", "dryrun"] + SMALL + [
        f"--config.model.hf_dir={_tiny_dir(tmp_path)}", "--topology=h100x8", "--config.rl.micro_batch_size=8",
        "--config.rl.mini_batch_prompts=4", "--programs=update"], cwd=root, env=env, capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ANALYTIC ESTIMATE" in proc.stdout
