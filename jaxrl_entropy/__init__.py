"""jaxrl-entropy: RL post-training (GRPO / DAPO) of Qwen3 in JAX, with attention-entropy token weights.

The subpackages name the layers; imports point down only (`tests/test_layers.py` holds the order):

    kernels   fused attention with row entropy (Pallas: TPU, GPU; blockwise XLA; interpret mode)
    parallel, stats, chips   the mesh and sharding rules; statistics; the accelerator table
    rundir    the run directory: checkpoints, lock, preemption, file I/O, metrics, progress
    models    Qwen3 in Flax NNX, HF import/export, the rollout engine and sampler
    rl        the maths: rewards, advantages, token weights, the loss, the train step, diagnostics
    data      grain sources, the synthetic task, tokenizers
    config, presets   the one config schema and the built-in configs
    training  the trainer loop, warm-up, rollout collection, evaluation, the step programs
    aot       `dryrun`: every program compiled for a real slice, its memory and roofline time
    analyze   plots and tables from run directories
    cli       the `jaxrl-entropy` console script
"""
import importlib as _importlib
import warnings as _warnings

# Modules that sat at the package root before the layers had folders (2026-12): the old names keep
# working for `from jaxrl_entropy import trainer`, with a warning naming the new place.
_MOVED = {
    "fileio": "rundir.fileio", "checkpoint": "rundir.checkpoint", "locking": "rundir.locking",
    "preemption": "rundir.preemption", "metrics": "rundir.metrics", "progress": "rundir.progress",
    "trainer": "training.trainer", "warmup": "training.warmup", "rollout": "training.rollout",
    "evaluate": "training.evaluate", "step_programs": "training.step_programs",
    "model_setup": "training.model_setup", "engine_setup": "training.engine_setup",
    "data_setup": "training.data_setup", "rng": "training.rng", "model_io": "training.model_io",
    "dryrun": "aot.dryrun", "hlo_stats": "aot.hlo_stats", "cli_commands": "cli.commands",
    "reproduce": "cli.reproduce",
}


def __getattr__(name: str):
    if name in _MOVED:
        new = f"{__name__}.{_MOVED[name]}"
        _warnings.warn(f"jaxrl_entropy.{name} moved to {new}; import it from there", DeprecationWarning,
                       stacklevel=2)
        return _importlib.import_module(new)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
