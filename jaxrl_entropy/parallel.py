"""The one place for device meshes and sharding rules.

A parameter's path names its logical axes (`PARAM_AXES`); an activation names its own
(`constrain(x, ("batch", "act_seq", "act_embed"), mesh)`); both map to mesh axes through the one
table `LOGICAL_RULES`. Everything else asks this module for a `NamedSharding`.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimiser state
sharded over it), `tensor` (heads / MLP / vocab split).
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters: FSDP shards the model dimension, tensor parallelism heads / MLP / vocabulary
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    # activations: rows over every data-parallel axis (fsdp included: FSDP gathers weights, never
    # activations), the model dimension whole, heads / MLP / vocabulary as their weights
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv": None,
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}

# parameter path (dot-joined, as `nnx.to_flat_state` gives it) -> logical axes
PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"embed_tokens$", ("vocab", "embed")),
    (r"self_attn\.(q|k|v)_proj\.kernel$", ("embed", "heads")),
    (r"self_attn\.(q|k|v)_proj\.bias$", ("heads",)),
    (r"self_attn\.o_proj\.kernel$", ("heads", "embed")),
    (r"mlp\.(gate|up)_proj\.kernel$", ("embed", "mlp")),
    (r"mlp\.down_proj\.kernel$", ("mlp", "embed")),
    (r"lm_head\.kernel$", ("embed", "vocab")),
    (r"(norm|layernorm)\.weight$", ("norm",)),
]

log = logging.getLogger(__name__)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A `Mesh(('data', 'fsdp', 'tensor'))` over all (or the given) devices; -1 fills the rest.

    On TPUs the devices are laid out by their physical coordinates
    (`jax.experimental.mesh_utils.create_device_mesh`), so the innermost mesh axes (tensor, then
    fsdp: the ones with the most traffic) run over neighbouring chips on the ICI torus.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1 (auto), got {fill}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into mesh {sizes}")
        sizes[fill[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"mesh {sizes} needs {math.prod(sizes.values())} devices but {len(devices)} are available; "
            "set parallel.data/fsdp/tensor so their product is the device count (or use -1 for one of them)")
    shape = (sizes["data"], sizes["fsdp"], sizes["tensor"])
    return Mesh(_device_grid(shape, devices), MESH_AXES)


def _device_grid(shape: tuple[int, ...], devices: list) -> np.ndarray:
    if devices and getattr(devices[0], "platform", "") == "tpu" and hasattr(devices[0], "coords"):
        from jax.experimental import mesh_utils
        try:
            return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError) as e:  # an unusual slice: keep the given order
            log.warning("mesh %s: no physical layout (%s); devices kept in their listed order", shape, e)
    return np.asarray(devices, dtype=object).reshape(shape)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, path):
            if len(axes) != ndim:
                raise ValueError(f"parameter {path}: rule {axes} has {len(axes)} axes but the array has {ndim}")
            return axes
    return (None,) * ndim


def _logical_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, not_divisible) -> P:
    """PartitionSpec from logical axes (`LOGICAL_RULES`); a dim its mesh axes do not divide gets
    `not_divisible(dim, ax, names, size)`."""
    out = []
    for ax, dim in zip(axes, shape):
        mesh_ax = LOGICAL_RULES.get(ax) if ax else None
        if mesh_ax is not None:
            names = mesh_ax if isinstance(mesh_ax, tuple) else (mesh_ax,)
            size = math.prod(mesh.shape[n] for n in names)
            if size == 1:
                mesh_ax = None
            elif dim % size:
                mesh_ax = not_divisible(dim, ax, names, size)
        out.append(mesh_ax)
    return P(*out)


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec of a parameter from logical axes; a dim that the mesh axes do not divide
    stays replicated (with a warning)."""
    def replicate(dim, ax, names, size):
        log.warning("dim %d (logical %r) not divisible by mesh axes %s (%d): replicated", dim, ax, names, size)
        return None
    return _logical_spec(axes, shape, mesh, replicate)


def activation_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec of an activation from logical axes. A dim the mesh axes do not divide is left
    to the compiler (`P.UNCONSTRAINED`): forcing it replicated would gather it."""
    unknown = [a for a in axes if a and a not in LOGICAL_RULES]
    if unknown:
        raise KeyError(f"activation axes {unknown} are not in LOGICAL_RULES (jaxrl_entropy/parallel.py): add a rule for each")
    return _logical_spec(axes, shape, mesh, lambda *_: P.UNCONSTRAINED)


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None) -> jax.Array:
    """`x` laid out by its logical axes (`LOGICAL_RULES`); a no-op without a mesh or on one device.

    Inside a jitted program this keeps activations where the rules say (rows over data × fsdp):
    without it the partitioner may follow an FSDP-sharded weight and gather whole micro-batches.
    """
    if mesh is None or mesh.size == 1:
        return x
    if len(axes) != x.ndim:
        raise ValueError(f"constrain: {len(axes)} logical axes {tuple(axes)} for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, activation_spec(axes, x.shape, mesh)))


def cast_sharded(params: Any, dtype, mesh: Mesh | None, *, keep: str = r"embed_tokens$|norm\.weight$") -> Any:
    """Floating parameters in `dtype`, each cast where its shard lies, so the all-gathers of FSDP move
    `dtype` (bf16: half the bytes of f32). Leaves whose path matches `keep` stay as they are
    (the embedding is gathered by rows, never whole; norms are tiny)."""

    def one(path, x):
        name = _path_name(path)
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype or re.search(keep, name):
            return x
        y = x.astype(dtype)
        if mesh is None or mesh.size == 1:
            return y
        return jax.lax.with_sharding_constraint(y, param_sharding(name, x.shape, mesh))

    return jax.tree_util.tree_map_with_path(one, params)


def use_sharding(path: str, shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """Where a parameter is used: its stored sharding without the data-parallel mesh axes (FSDP
    gathers it whole along them; tensor-parallel splits stay)."""
    batch = set(LOGICAL_RULES["batch"])
    spec = []
    for entry in spec_for(logical_axes(path, len(shape)), shape, mesh):
        names = entry if isinstance(entry, tuple) else (entry,)
        kept = tuple(n for n in names if n is not None and n not in batch)
        spec.append(kept[0] if len(kept) == 1 else (kept or None))
    return NamedSharding(mesh, P(*spec))


def gather_for_use(params: Any, mesh: Mesh | None) -> Any:
    """Parameters (a pure dict, or a module's sub-dict: `PARAM_AXES` match path suffixes) laid out
    for use (`use_sharding`). Called where a layer starts, inside its remat boundary: each layer's
    weights are gathered just before it runs (again in its backward pass), their gradients come
    back reduce-scattered to the shards, and the partitioner never has to guess (left alone it may
    rotate activation-sized partial sums around the ring instead of gathering the weight)."""
    if mesh is None or mesh.size == 1:
        return params
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.lax.with_sharding_constraint(x, use_sharding(_path_name(path), x.shape, mesh)), params)


def constrain_params(tree: Any, mesh: Mesh | None) -> Any:
    """A parameter-shaped tree (gradients, updates) laid out as the parameters are stored."""
    if mesh is None or mesh.size == 1:
        return tree
    return jax.lax.with_sharding_constraint(tree, param_shardings(tree, mesh))


def param_sharding(path: str, shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical_axes(path, len(shape)), shape, mesh))


def _path_name(path) -> str:
    """`layers.3.mlp.up_proj.kernel` from a pytree key path (the names `PARAM_AXES` matches)."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pure-dict parameter tree (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(lambda path, x: param_sharding(_path_name(path), x.shape, mesh),
                                            params)


def opt_state_shardings(opt_state_abstract: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Optimiser-state shardings: a leaf that mirrors a parameter (Adam's mu/nu) takes that
    parameter's sharding; everything else (step counts) is replicated."""

    def dict_path(path) -> str:
        return _path_name(k for k in path if isinstance(k, jax.tree_util.DictKey))

    by_path = {dict_path(p): s for p, s in jax.tree_util.tree_flatten_with_path(params_shardings)[0]}

    def one(path, leaf):
        s = by_path.get(dict_path(path))
        return s if s is not None and len(leaf.shape) > 0 else replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, opt_state_abstract)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dim split over data × fsdp, the rest replicated."""
    return NamedSharding(mesh, P(LOGICAL_RULES["batch"], *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    """The global batch must be a multiple of this (the number of data-parallel shards)."""
    return math.prod(mesh.shape[a] for a in LOGICAL_RULES["batch"])


def host_to_global(array, sharding: NamedSharding) -> jax.Array:
    """A host numpy array that every process holds in full → a global array in `sharding`; each
    device copies only its own slice (works the same on one host and on a multi-host pod)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as a full numpy array on every process."""
    if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def process_rows(num_rows: int) -> tuple[int, int, int]:
    """This process's contiguous share of `num_rows` host-side rows (generation, scoring):
    (lo, hi, share), rows [lo, hi) of at most `share` = ceil(rows / processes)."""
    n, i = jax.process_count(), jax.process_index()
    share = -(-num_rows // n)
    return min(num_rows, i * share), min(num_rows, (i + 1) * share), share


def gather_rows(parts: Sequence[np.ndarray], num_rows: int) -> list[np.ndarray]:
    """Every process's `process_rows` share of each array, concatenated in process order: the
    full `[num_rows, ...]` arrays on every process (shares padded to one size for the collective)."""
    if jax.process_count() == 1:
        return [np.asarray(x) for x in parts]
    from jax.experimental import multihost_utils
    _, _, share = process_rows(num_rows)
    padded = [np.concatenate([x, np.zeros((share - len(x),) + x.shape[1:], x.dtype)]) for x in map(np.asarray, parts)]
    return [np.asarray(multihost_utils.process_allgather(x, tiled=True))[:num_rows] for x in padded]


def process_0_value(flag: bool) -> bool:
    """Process 0's value of `flag` on every host (only process 0 writes metrics, and a decision
    that gates a collective, such as evaluating, must be the same everywhere)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))
