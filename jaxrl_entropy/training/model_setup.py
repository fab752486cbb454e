"""From a config to a device mesh and a sharded policy: what `train`, `eval`, `convert` and
`dryrun` share (none of them needs the others' data, optimiser or compiled step).

    mesh = model_setup.build_mesh(cfg.parallel)
    policy = model_setup.load_policy(cfg, mesh, tokenizer)       # real weights (HF dir or random init)
    policy = model_setup.abstract_policy(cfg, mesh, arch)         # shapes and shardings only (dryrun)
    policy.graphdef, policy.params, policy.shardings, policy.arch
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import ml_collections
from flax import nnx

from jaxrl_entropy import parallel
from jaxrl_entropy import config as config_lib
from jaxrl_entropy.config import ConfigError, ModelConfig, ParallelConfig
from jaxrl_entropy.models import qwen3, sampler
from jaxrl_entropy.models.config import DTYPES  # config name → dtype


@dataclasses.dataclass
class Policy:
    """The model as the trainer holds it: the module structure (`graphdef`) and its parameters as
    a pure dict of (global, sharded) arrays — or of `jax.ShapeDtypeStruct`s for an abstract policy."""
    graphdef: Any
    params: Any
    shardings: Any
    arch: qwen3.Qwen3Config
    mesh: jax.sharding.Mesh

    def module(self, params=None) -> qwen3.Qwen3:
        """A `Qwen3` module over `params` (default: the held ones), for calls outside jit."""
        return nnx.merge(self.graphdef, self.params if params is None else params)


def build_mesh(axes: ParallelConfig, devices=None) -> jax.sharding.Mesh:
    """The device mesh of the config's `parallel` section."""
    axes = config_lib.section_of(axes, "parallel", "build_mesh")
    return parallel.make_mesh(axes.data, axes.fsdp, axes.tensor, devices=devices)


def kernel_backend(model: ModelConfig, mesh) -> str | None:
    """`model.kernel_backend`, or the shell for the mesh's platform: the mesh decides, not the host,
    so `dryrun` on a CPU host builds Mosaic kernels for a TPU mesh (None = the kernels' own choice)."""
    model = config_lib.section_of(model, "model", "kernel_backend")
    if model.kernel_backend:
        return model.kernel_backend
    return {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(mesh.devices.flat[0].platform)


def runtime_options(model: ModelConfig, mesh) -> qwen3.RuntimeOptions:
    model = config_lib.section_of(model, "model", "runtime_options")
    m = model
    return qwen3.RuntimeOptions(
        dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype], attention=m.attention,
        probe_attention=m.probe_attention, kernel_backend=kernel_backend(model, mesh), remat=m.remat,
        logits_chunk=m.logits_chunk,
        kernel_mesh=mesh)  # read only by the kernel paths (any name of them)


def architecture(model: ModelConfig, tokenizer=None) -> qwen3.Qwen3Config:
    """The model's architecture: `model.hf_dir`'s config.json, or `model.arch` (random init, with the
    vocabulary of `tokenizer` padded to a multiple of 128 as Qwen3's is)."""
    model = config_lib.section_of(model, "model", "architecture")
    if model.hf_dir:
        return qwen3.Qwen3Config.from_json_file(f"{model.hf_dir.rstrip('/')}/config.json")
    if tokenizer is None:
        raise ValueError("architecture(): a random-init model needs the tokenizer (its vocabulary size)")
    a = model.arch
    return qwen3.Qwen3Config(
        vocab_size=int(math.ceil(len(tokenizer) / 128) * 128), hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size, num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads, num_key_value_heads=a.num_key_value_heads,
        head_dim=a.head_dim, rope_theta=a.rope_theta, tie_word_embeddings=a.tie_word_embeddings,
        rms_norm_eps=a.rms_norm_eps, eos_token_id=tokenizer.eos_token_id)


def load_policy(cfg: ml_collections.ConfigDict, mesh, tokenizer) -> Policy:
    """The policy with real weights, each array straight into its shard: from `model.hf_dir`, or a
    random init from `model.arch` (seed `cfg.seed`)."""
    options = runtime_options(cfg.model, mesh)
    if cfg.model.hf_dir:
        kwargs = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
        dtype, param_dtype = kwargs.pop("dtype"), kwargs.pop("param_dtype")
        model = qwen3.from_pretrained(cfg.model.hf_dir, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **kwargs)
        if tokenizer is not None and model.config.vocab_size < len(tokenizer):
            raise ConfigError(
                f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                f"{model.config.vocab_size}; use the tokenizer that came with {cfg.model.hf_dir}")
    else:
        model = qwen3.init_random(architecture(cfg.model, tokenizer), options, seed=cfg.seed)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    shardings = parallel.param_shardings(params, mesh)
    return Policy(graphdef, jax.device_put(params, shardings), shardings, model.config, mesh)


def abstract_policy(cfg: ml_collections.ConfigDict, mesh, arch: qwen3.Qwen3Config) -> Policy:
    """The policy as shapes, dtypes and shardings only (nothing allocated): for ahead-of-time
    compilation (`jaxrl-entropy dryrun`)."""
    options = runtime_options(cfg.model, mesh)
    model = nnx.eval_shape(lambda: qwen3.Qwen3(arch, options, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    shapes = nnx.to_pure_dict(state)
    shardings = parallel.param_shardings(shapes, mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    return Policy(graphdef, params, shardings, arch, mesh)


def graphdef_with(policy: Policy, **options) -> Any:
    """The policy's module structure with other runtime options (e.g. `attention="blockwise"` for a
    forward-mode pass); the parameters fit it unchanged."""
    opts = dataclasses.replace(policy.module().options, **options)  # merge: no copy, any leaves
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: qwen3.Qwen3(policy.arch, opts, rngs=nnx.Rngs(0))))
    return graphdef


def eos_ids(tokenizer, arch: qwen3.Qwen3Config) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's EOS, the model config's, and Qwen's chat
    end markers when the vocabulary has them."""
    ids = set(sampler.as_tuple(tokenizer.eos_token_id))
    ids |= set(sampler.as_tuple(arch.eos_token_id))
    for tok in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return tuple(sorted(ids))
