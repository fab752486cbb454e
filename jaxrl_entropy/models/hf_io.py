"""HF checkpoint interchange: a `config.json` + `*.safetensors` directory ⇄ a Flax `Qwen3`.

Loading never builds the full model on the host first: the model is created abstractly
(`nnx.eval_shape`), and each parameter is materialised straight into its target sharding with
`jax.make_array_from_callback`, every device reading only its own slice of the memory-mapped file.
"""
from __future__ import annotations

import glob
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_entropy import parallel
from jaxrl_entropy.models import qwen3
from jaxrl_entropy.models.config import CheckpointError, Qwen3Config
from jaxrl_entropy.models.safetensors_io import SafetensorsFile, save_file

_TRANSPOSED = re.compile(r"\.kernel$")


def hf_name(path: str) -> str:
    """Our parameter path (`layers.0.self_attn.q_proj.kernel`) → HF tensor name."""
    name = _TRANSPOSED.sub(".weight", path)
    if path == "embed_tokens":
        name = "embed_tokens.weight"
    return name if name.startswith("lm_head") else "model." + name


def flat_params(model: qwen3.Qwen3) -> dict[str, nnx.Variable]:
    """Dot-joined parameter path → Variable (works on abstract models too)."""
    _, state = nnx.split(model, nnx.Param)
    return {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


class _TensorIndex:
    """Which file holds each tensor of a checkpoint directory (sharded with an index, or not)."""

    def __init__(self, hf_dir: str):
        index_path = os.path.join(hf_dir, "model.safetensors.index.json")
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: malformed index (need a 'weight_map' object): {e}") from None
            for name, fname in weight_map.items():
                path = os.path.join(hf_dir, fname)
                if not os.path.isfile(path):
                    raise CheckpointError(f"{index_path}: tensor {name!r} points to missing file {fname}")
                self.where[name] = path
        else:
            paths = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
            if not paths:
                raise CheckpointError(
                    f"{hf_dir}: no *.safetensors files (PyTorch .bin checkpoints are not read; convert "
                    "them with transformers' `save_pretrained(..., safe_serialization=True)`)")
            for path in paths:
                for name in self._open(path).keys():
                    self.where[name] = path

    def _open(self, path: str) -> SafetensorsFile:
        if path not in self.files:
            self.files[path] = SafetensorsFile(path)
        return self.files[path]

    def get(self, name: str) -> tuple[SafetensorsFile, np.ndarray]:
        f = self._open(self.where[name])
        return f, f[name]


def load(hf_dir: str, *, dtype=jnp.float32, param_dtype=None, mesh=None, **options) -> qwen3.Qwen3:
    """Read a HF Qwen3 directory into a `Qwen3`, sharded over `mesh` when given.

    dtype: compute dtype; param_dtype: storage dtype (default: dtype). `options` go to
    `RuntimeOptions` (attention implementations, remat, ...).
    """
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: not a directory; pass a local HF checkpoint directory "
                              "(config.json + *.safetensors). Nothing is downloaded from a hub.")
    cfg = Qwen3Config.from_json_file(os.path.join(hf_dir, "config.json"))
    opts = qwen3.RuntimeOptions(dtype=dtype, param_dtype=param_dtype or dtype, **options)
    abstract = nnx.eval_shape(lambda: qwen3.Qwen3(cfg, opts, rngs=nnx.Rngs(0)))
    index = _TensorIndex(hf_dir)
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    new_leaves = []
    for path_tuple, var in flat:
        path = ".".join(str(p) for p in path_tuple)
        shape, want_dtype = var.shape, var.dtype
        name = hf_name(path)
        if name not in index.where:
            raise CheckpointError(
                f"{hf_dir}: tensor {name!r} missing from the checkpoint (needed for parameter {path}; "
                f"tie_word_embeddings={cfg.tie_word_embeddings} in config.json)")
        src_file, src = index.get(name)
        transpose = bool(_TRANSPOSED.search(path))
        src_shape = tuple(reversed(src.shape)) if transpose else tuple(src.shape)
        if src_shape != tuple(shape):
            expect = tuple(reversed(shape)) if transpose else tuple(shape)
            raise CheckpointError(
                f"{src_file.path}: tensor {name!r} has shape {tuple(src.shape)} but config.json implies "
                f"{expect}; the weights do not match the config")
        new_leaves.append(var.replace(_materialise(path, src, transpose, shape, want_dtype, mesh)))
    state = nnx.from_flat_state([(p, leaf) for (p, _), leaf in zip(flat, new_leaves)])
    return nnx.merge(graphdef, state)


def _materialise(path, src, transpose, shape, dtype, mesh):
    def read(index=None):
        if index is None:
            block = src.T if transpose else src
        elif transpose:
            block = src[tuple(reversed(index))].T
        else:
            block = src[index]
        return np.asarray(block).astype(dtype)

    if mesh is None:
        return jnp.asarray(read())
    sharding = parallel.param_sharding(path, shape, mesh)
    return jax.make_array_from_callback(tuple(shape), sharding, lambda idx: read(tuple(idx)))


def _host_array(var, store_dtype, transpose: bool) -> np.ndarray:
    arr = var[...]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        arr = multihost_utils.process_allgather(arr, tiled=True)
    arr = np.asarray(jax.device_get(arr))
    if store_dtype is not None:
        arr = arr.astype(store_dtype)
    return np.ascontiguousarray(arr.T) if transpose else arr


def save(model: qwen3.Qwen3, out_dir: str, *, dtype=None, tokenizer=None,
         max_shard_bytes: int = 5 * 2**30, should_stop=None) -> None:
    """Write `config.json` + safetensors (sharded with an index past `max_shard_bytes`).

    dtype: storage dtype (default: the parameters' own). Only process 0 writes on multi-host.
    Shards are planned from shapes first and gathered one shard at a time, so host memory peaks
    at one shard. `should_stop()` is asked between shards (a collective on several processes);
    True raises `preemption.StopRequested`, leaving `out_dir` incomplete (write into a staging
    directory, as `model_io.checkpoint_to_hf` does).
    """
    os.makedirs(out_dir, exist_ok=True)
    params = flat_params(model)
    store_dtype = np.dtype(dtype) if dtype is not None else None
    plan, size = [[]], 0
    for path, var in params.items():
        nbytes = int(np.prod(var.shape)) * (store_dtype or np.dtype(var.dtype)).itemsize
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(path)
        size += nbytes
    names = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    writer = jax.process_index() == 0
    weight_map, total = {}, 0
    for i, (fname, paths) in enumerate(zip(names, plan)):
        if i and should_stop is not None and should_stop():
            from jaxrl_entropy.preemption import StopRequested
            raise StopRequested()
        shard = {hf_name(p): _host_array(params[p], store_dtype, bool(_TRANSPOSED.search(p))) for p in paths}
        if writer:
            save_file(shard, os.path.join(out_dir, fname))
        weight_map.update({name: fname for name in shard})
        total += sum(a.nbytes for a in shard.values())
    if not writer:
        return
    first = np.dtype(store_dtype or next(iter(params.values())).dtype)
    dtype_name = {"bfloat16": "bfloat16", "float16": "float16"}.get(str(first), "float32")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(model.config.to_hf_dict(torch_dtype=dtype_name), f, indent=2)
    if len(plan) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
