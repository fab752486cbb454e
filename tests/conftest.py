"""Session-wide test set-up: 8 fake CPU devices for sharding tests, no network, tiny fixtures."""
import os

# Must happen before jax is imported anywhere in the session.
# Sharding tests need 8 devices: force the count even when XLA_FLAGS is already set (a silent skip
# of every sharding test would otherwise hide their failures).
_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
# No compiler speed-ups here (LLVM -O0 aborted inside XLA on some AVX-512 CPUs): the suite runs
# the programs users run. XLA_FLAGS already set by the caller are kept.
# The 8 devices are 8 threads on 2 cores: on a loaded machine one can miss XLA:CPU's 40 s deadline
# for joining a collective, and XLA aborts the whole process (SIGABRT in rendezvous.cc, seen with two
# training runs beside the suite). 10 minutes keeps a starved test slow rather than dead.
_deadline = "--xla_cpu_collective_call_terminate_timeout_seconds"
_flags += [] if any(f.startswith(_deadline) for f in _flags) else [f"{_deadline}=600"]
os.environ["XLA_FLAGS"] = " ".join(_flags + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib
import pathlib

import pytest

# the checkout: tests sit in folders that mirror the package, at any depth below tests/
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_fixture_module(name: str):
    """A helper module of tests/fixtures/, loaded by its path (`fixtures` is also a PyPI package name)."""
    import importlib.util

    path = pathlib.Path(__file__).parent / "fixtures" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"jaxrl_test_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# files in the published formats of the paper's data and of a Qwen3 checkpoint (`from conftest import real_format`)
real_format = _load_fixture_module("real_format")


def require_torch():
    """torch for live parity tests: skipped when absent, unless JAXRL_REQUIRE_TORCH=1 (CI) makes
    its absence a failure, so a broken CI install cannot turn the parity tests into silent skips."""
    if os.environ.get("JAXRL_REQUIRE_TORCH") == "1":
        return importlib.import_module("torch")
    return pytest.importorskip("torch")


def require_libtpu():
    """libtpu (the TPU compiler, `pip install -e '.[tpu]'`) for ahead-of-time compile tests on a
    CPU host: skipped when absent, unless JAXRL_REQUIRE_LIBTPU=1 (set with the tpu extra installed) makes its absence a failure."""
    if os.environ.get("JAXRL_REQUIRE_LIBTPU") == "1":
        return importlib.import_module("libtpu")
    return pytest.importorskip("libtpu")


@pytest.fixture(scope="session")
def tpu_devices():
    """Factory: the devices of a real TPU slice (`"v5p:2x2x1"`, `"v5e:2x2"`, ...) from the TPU
    compiler, for `jit(...).trace(abstract).lower().compile()` with no TPU attached."""
    require_libtpu()
    # libtpu takes a machine-wide lock file: without this, a second process (another xdist
    # worker) fails with "Internal error when accessing libtpu multi-process lockfile"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    cache = {}

    def get(topology: str = "v5p:2x2x1"):
        if topology not in cache:
            cache[topology] = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
        return cache[topology]

    return get


@pytest.fixture(scope="session")
def torch():
    return require_torch()


@pytest.fixture(scope="session")
def make_hf_qwen3(tmp_path_factory, torch):
    """Factory: a random tiny HF `Qwen3ForCausalLM` saved to a directory; returns (model, dir).

    Weights are perturbed away from HF's init (unit norms, tiny projections) so that every
    parameter matters in the comparison. Cached per config within the session.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cache = {}

    def make(*, vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=20, tie_word_embeddings=False,
             rope_theta=10000.0, scale=0.1, seed=0, max_shard_size=None):
        key = (vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
               num_key_value_heads, head_dim, tie_word_embeddings, rope_theta, scale, seed, max_shard_size)
        if key not in cache:
            torch.manual_seed(seed)
            cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size,
                              intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
                              num_attention_heads=num_attention_heads,
                              num_key_value_heads=num_key_value_heads, head_dim=head_dim,
                              tie_word_embeddings=tie_word_embeddings, rope_theta=rope_theta,
                              attn_implementation="eager")
            model = Qwen3ForCausalLM(cfg).eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * scale)
            path = tmp_path_factory.mktemp("hf_qwen3")
            kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
            model.save_pretrained(path, **kwargs)
            cache[key] = (model, str(path))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def real_format_files(tmp_path_factory):
    """The paper's data in its published formats (`fixtures/real_format.py`), written once:
    {"dapo": DAPO-Math-17k parquet, "aime": verl-layout AIME parquet with repeats, "math500": JSONL}."""
    d = tmp_path_factory.mktemp("real_format_data")
    return {"dapo": real_format.write_dapo_math(d / "dapo-math-17k.parquet"),
            "aime": real_format.write_aime_verl(d / "aime-2024.parquet"),
            "math500": real_format.write_math500(d / "test.jsonl")}


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(tmp_path_factory):
    """(directory, {added token: id}) of a Qwen3-shaped byte-level BPE tokenizer (no model, no torch)."""
    d = tmp_path_factory.mktemp("qwen3_tokenizer")
    return str(d), real_format.write_qwen3_tokenizer(d)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory, torch):
    """(directory, {added token: id}) of a tiny random Qwen3 checkpoint with every file a real one has."""
    d = tmp_path_factory.mktemp("tiny_qwen3")
    return str(d), real_format.write_tiny_qwen3(d, torch)


CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
             # a size limit turns on jax's file lock around cache reads and writes: the xdist
             # workers and the CLI processes tests start write the same directory concurrently
             "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30)}


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
    """Tests, both xdist workers and the CLI processes tests start (multi-host runs, `reproduce`
    variants, fault injection) compile the same programs: one on-disk cache for all of them,
    through the environment so that subprocesses inherit it."""
    import jax

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base   # shared by the workers
    path = root / "jax_cache"
    path.mkdir(exist_ok=True)
    os.environ.update(CACHE_ENV, JAX_COMPILATION_CACHE_DIR=str(path))
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(CACHE_ENV["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_compilation_cache_max_size", int(CACHE_ENV["JAX_COMPILATION_CACHE_MAX_SIZE"]))
    yield


def metrics_rows(workdir: str) -> list[dict]:
    """The records of a run's `metrics.jsonl` (local or gs://), read by the project's one reader."""
    from jaxrl_entropy.rundir import fileio, metrics

    return metrics.read_metrics(fileio.join(workdir, metrics.METRICS_FILE))


# The tiny model and rollout of every test that trains, written once: `tiny_config()` applies them to
# the demo config (library tests), `TINY_CLI_FLAGS` passes them on the command line (CLI tests).
TINY = {
    "train.progress": False,
    "model.arch.hidden_size": 32, "model.arch.intermediate_size": 64, "model.arch.num_hidden_layers": 2,
    "model.arch.num_attention_heads": 4, "model.arch.num_key_value_heads": 2, "model.arch.head_dim": 8,
    "model.logits_chunk": 16, "rollout.max_new_tokens": 16,
    "rl.prompts_per_step": 4, "rl.group_size": 4, "rl.mini_batch_prompts": 2, "rl.micro_batch_size": 8,
    "rl.overlong_buffer": 4, "rl.dynamic_sampling": False,
    "optim.lr": 1e-3, "optim.warmup_steps": 0,
    "eval.k": 2, "data.synthetic.eval_size": 8,
}
TINY_CLI_FLAGS = [f"--config.{key}={value}" for key, value in TINY.items()]

# what library tests also want by default: a 3-step run without the warm-up, saving and evaluating often
_TINY_LIBRARY = {"train.steps": 3, "train.sft_steps": 0, "train.checkpoint_every": 2, "eval.every": 2,
                 "parallel.data": -1, "parallel.fsdp": 1, "parallel.tensor": 1}


def tiny_config(**overrides):
    """A trainer config that runs a step in seconds on a CPU: a 2-layer Qwen3 on the synthetic task."""
    from jaxrl_entropy import presets
    from jaxrl_entropy.config import set_key

    c = presets.demo()
    for key, value in {**TINY, **_TINY_LIBRARY, **overrides}.items():
        set_key(c, key, value)
    return c


def pytest_collection_modifyitems(config, items):
    """`torch` on every test that uses torch (through the fixtures that bring it in), so that
    `-m "not torch"` runs without the parity tests."""
    for item in items:
        if {"torch", "make_hf_qwen3"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.torch)
