"""HF safetensors checkpoints ⇄ the parameters of a Flax NNX model named like HF's module tree.

Our parameter path `layers.0.self_attn.q_proj.kernel` is HF's `model.layers.0.self_attn.q_proj.weight`
transposed, so import and export are a name map (`hf_name`) plus a transpose. This module knows the
file layout, not the model: `qwen3.from_pretrained` builds the model abstractly (`nnx.eval_shape`)
and `load_weights` materialises each parameter straight into its target sharding with
`jax.make_array_from_callback`, every device reading only its own slice of the memory-mapped file
(`safe_open(...).get_slice(name)[index]`), so an 8B model never needs a full host copy per device.

Files are read and written by the `safetensors` library (numpy framework). numpy knows the dtype
name "bfloat16" only once `ml_dtypes` is imported, which this module does before opening a file.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", which safe_open(framework="np") asks for)
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxrl_entropy import parallel
from jaxrl_entropy.models.config import CheckpointError

_TRANSPOSED = re.compile(r"\.kernel$")


def hf_name(path: str) -> str:
    """Our parameter path (`layers.0.self_attn.q_proj.kernel`) → HF tensor name."""
    name = _TRANSPOSED.sub(".weight", path)
    if path == "embed_tokens":
        name = "embed_tokens.weight"
    return name if name.startswith("lm_head") else "model." + name


def flat_params(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Dot-joined parameter path → Variable (works on abstract models too)."""
    _, state = nnx.split(model, nnx.Param)
    return {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


class _TensorIndex:
    """Which file holds each tensor of a checkpoint directory (sharded with an index, or not),
    with one open `safe_open` handle per file."""

    def __init__(self, hf_dir: str):
        index_path = os.path.join(hf_dir, "model.safetensors.index.json")
        self._handles: dict[str, Any] = {}
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
                for name in self.handle(path).keys():
                    self.where[name] = path

    def handle(self, path: str):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(path, framework="np")
            except SafetensorError as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        return self._handles[path]

    def slice(self, name: str):
        """(file path, lazy slice of tensor `name`: `.get_shape()`, `[index]` reads that block)."""
        path = self.where[name]
        handle = self.handle(path)
        if name not in handle.keys():
            raise CheckpointError(f"{path}: no tensor named {name!r} (model.safetensors.index.json says "
                                  "it is in this file)")
        return path, handle.get_slice(name)


def load_weights(model: nnx.Module, hf_dir: str, *, mesh=None) -> nnx.Module:
    """`model` (usually abstract, from `nnx.eval_shape`) with every parameter read from `hf_dir`.

    Each parameter keeps the dtype `model` declares (the file's dtype is converted); under `mesh`
    it is sharded by `parallel.param_sharding` and each device reads only its block.
    """
    index = _TensorIndex(hf_dir)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", None)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    new_leaves = []
    for path_tuple, var in flat:
        path = ".".join(str(p) for p in path_tuple)
        shape = tuple(var.shape)
        name = hf_name(path)
        if name not in index.where:
            raise CheckpointError(
                f"{hf_dir}: tensor {name!r} missing from the checkpoint (needed for parameter {path}; "
                f"tie_word_embeddings={tied} in config.json)")
        file_path, src = index.slice(name)
        transpose = bool(_TRANSPOSED.search(path))
        src_shape = tuple(src.get_shape())
        if (tuple(reversed(src_shape)) if transpose else src_shape) != shape:
            expect = tuple(reversed(shape)) if transpose else shape
            raise CheckpointError(
                f"{file_path}: tensor {name!r} has shape {src_shape} but config.json implies "
                f"{expect}; the weights do not match the config")
        new_leaves.append(var.replace(_materialise(path, src, transpose, shape, var.dtype, mesh)))
    state = nnx.from_flat_state([(p, leaf) for (p, _), leaf in zip(flat, new_leaves)])
    return nnx.merge(graphdef, state)


def _materialise(path, src, transpose, shape, dtype, mesh):
    full = tuple(slice(None) for _ in shape)

    def read(index):
        # our index is over the transposed (kernel) layout: read the mirrored block of the file
        block = src[tuple(reversed(index))].T if transpose else src[index]
        return np.asarray(block).astype(dtype)

    if mesh is None:
        return jnp.asarray(read(full))
    sharding = parallel.param_sharding(path, shape, mesh)
    return jax.make_array_from_callback(shape, sharding, lambda idx: read(tuple(idx)))


def _host_array(var, store_dtype, transpose: bool) -> np.ndarray:
    arr = var[...]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        arr = multihost_utils.process_allgather(arr, tiled=True)
    arr = np.asarray(jax.device_get(arr))
    if store_dtype is not None:
        arr = arr.astype(store_dtype)
    return np.ascontiguousarray(arr.T if transpose else arr)


def _write_safetensors(tensors: dict[str, np.ndarray], path: str) -> None:
    """Atomically (temp file + rename): a killed export never leaves a half-written shard that a
    later load would take for a checkpoint. `format: pt` is the metadata transformers requires."""
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def _stop_if_asked(should_stop) -> None:
    if should_stop is not None and should_stop():
        from jaxrl_entropy.rundir.preemption import StopRequested
        raise StopRequested()


def save(model: nnx.Module, out_dir: str, *, dtype=None, tokenizer=None,
         max_shard_bytes: int = 5 * 2**30, should_stop=None) -> None:
    """Write `config.json` + safetensors (sharded with an index past `max_shard_bytes`).

    `model` needs a `config` with `to_hf_dict` (a `Qwen3Config`). dtype: storage dtype (default:
    the parameters' own). Only process 0 writes on multi-host. Shards are planned from shapes
    first and gathered one shard at a time, so host memory peaks at one shard. `should_stop()` is
    asked before every shard and once after the last (a collective on several processes, asked the
    same number of times on each; a one-shard model is asked too); True raises
    `preemption.StopRequested`, leaving `out_dir` incomplete (write into a staging directory, as
    `model_io.checkpoint_to_hf` does).
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
    for fname, paths in zip(names, plan):
        _stop_if_asked(should_stop)
        shard = {hf_name(p): _host_array(params[p], store_dtype, bool(_TRANSPOSED.search(p))) for p in paths}
        if writer:
            _write_safetensors(shard, os.path.join(out_dir, fname))
        weight_map.update({name: fname for name in shard})
        total += sum(a.nbytes for a in shard.values())
    _stop_if_asked(should_stop)  # a request during the last (or only) shard: before anything is final
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
