"""The checks that need what only a running job knows: the devices, the processes, the model's
depth (from `model.hf_dir`'s config.json, no weights read)."""
from __future__ import annotations

import math

from jaxrl_entropy.config.convert import AnyConfig, section_of, typed
from jaxrl_entropy.config.rules import ConfigError
from jaxrl_entropy.config.sections import ModelConfig, ParallelConfig, RLConfig


def model_num_layers(model: ModelConfig) -> int:
    """The model's depth: from `model.hf_dir`'s config.json (no weights read) or `model.arch`."""
    model = section_of(model, "model", "model_num_layers")
    if model.hf_dir:
        from jaxrl_entropy.models.config import read_hf_config
        return read_hf_config(model.hf_dir).num_hidden_layers
    return model.arch.num_hidden_layers


def mesh_sizes(parallel: ParallelConfig, num_devices: int) -> dict[str, int]:
    """`parallel.data/fsdp/tensor` with -1 resolved against `num_devices`; ConfigError if they do
    not multiply to the device count."""
    parallel = section_of(parallel, "parallel", "mesh_sizes")
    sizes = {"data": parallel.data, "fsdp": parallel.fsdp, "tensor": parallel.tensor}
    fill = [k for k, v in sizes.items() if v == -1]
    known = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if num_devices % known:
            raise ConfigError(f"config.parallel.{fill[0]}=-1 cannot fill {num_devices} devices: the other axes "
                              f"({sizes}) multiply to {known}, which does not divide {num_devices}")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(f"config.parallel.data × fsdp × tensor = {math.prod(sizes.values())} ({sizes}) but "
                          f"there are {num_devices} devices; make the product {num_devices} or set one axis to -1")
    return sizes


def check_micro_batch(rl: RLConfig, sizes: dict[str, int]) -> None:
    """Every micro-batch (and the old-policy forward's chunks) must split evenly over the
    data-parallel devices (`parallel.data` × `parallel.fsdp`, `sizes` = the mesh's axis sizes);
    otherwise a `ConfigError` that says what to set."""
    rl = section_of(rl, "rl", "check_micro_batch")
    d = sizes.get("data", 1) * sizes.get("fsdp", 1)  # the batch axes of parallel.LOGICAL_RULES
    micro = rl.micro_batch_size
    if micro % d == 0:
        return
    mini = rl.mini_batch_prompts * rl.group_size
    good = [m for m in range(d, mini + 1, d) if mini % m == 0]
    fix = (f"set --config.rl.micro_batch_size={good[0]}" if good else
           f"raise rl.mini_batch_prompts × rl.group_size ({mini}) to a multiple of {d}")
    k, tensor = d // math.gcd(d, micro), sizes.get("tensor", 1)
    alt = (f"; or move a factor {k} to tensor parallelism: --config.parallel.tensor={tensor * k} "
           f"(data-parallel size {d // k})")
    raise ConfigError(
        f"config.rl.micro_batch_size={micro} must be a multiple of the data-parallel size {d} "
        f"(config.parallel.data × config.parallel.fsdp, mesh {sizes}: every device takes "
        f"micro_batch_size / {d} rows); {fix}{alt}")


def validate_for_runtime(cfg: AnyConfig, *, num_devices: int, num_processes: int = 1,
                         num_layers: int | None = None) -> AnyConfig:
    """`cfg` itself once it is checked (`typed`) together with the checks that need the model's depth
    and the devices, all before any weight is read or anything compiled.

    num_devices: `jax.device_count()`; num_processes: `jax.process_count()`; num_layers: the
    model's depth (default `model_num_layers(cfg.model)`, which reads only config.json).
    """
    c = typed(cfg)
    sizes = mesh_sizes(c.parallel, num_devices)
    check_micro_batch(c.rl, sizes)
    data_parallel = sizes["data"] * sizes["fsdp"]  # the batch is split over both (parallel.LOGICAL_RULES)
    if c.train.sft_steps and c.train.sft_batch_size % data_parallel:
        raise ConfigError(f"config.train.sft_batch_size={c.train.sft_batch_size} must be a multiple of the "
                          f"data-parallel size {data_parallel} (config.parallel.data × config.parallel.fsdp)")
    if c.rl.prompts_per_step % num_processes:
        raise ConfigError(f"config.rl.prompts_per_step={c.rl.prompts_per_step} must be a multiple of the "
                          f"number of processes ({num_processes}): each loads an equal share of the prompts")
    layers = model_num_layers(c.model) if num_layers is None else num_layers
    for item in c.entropy.probe_layers:
        if isinstance(item, int) and not -layers <= item < layers:
            where = f"config.json of {c.model.hf_dir}" if c.model.hf_dir else "config.model.arch"
            raise ConfigError(f"config.entropy.layers item {item} is out of range for a model with {layers} layers "
                              f"({where}); use an index in [{-layers}, {layers}) or a depth fraction in [0, 1]")
    return cfg
