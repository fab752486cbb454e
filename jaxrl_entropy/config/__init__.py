"""The run config: one schema of typed sections, turned from `ml_collections` once, at the boundary.

Users write and override `ml_collections` configs (`base_config()`, config files with
`get_config()`, `--config.KEY=VALUE`); `typed(cfg)` turns one into a `Config` of frozen sections
(`config.rollout`, `config.rl`, ...), each of which checks its own keys on construction (types, the
rule each field declares, the keys that must fit together), with errors that name the
`--config.` key. The code below the CLI and the trainer takes the section it needs.

    sections.py  every key: its default, its rule, what it means
    rules.py     Range / Choice, and `setting()` that declares a field
    convert.py   ConfigDict ↔ Config, `base_config()`, `config.json`
    runtime.py   the checks that need the devices or the model's depth
"""
from jaxrl_entropy.config.convert import (AnyConfig, as_dict, base_config, field_of, flatten, free_text_keys,
                                          from_json_file, from_json_text, get_key, schema_keys, section_of, set_key, to_json, typed, validate, with_key)
from jaxrl_entropy.config.placeholders import PLACEHOLDER, check_placeholders, placeholders
from jaxrl_entropy.config.rules import Choice, ConfigError, Range
from jaxrl_entropy.config.runtime import check_micro_batch, mesh_sizes, model_num_layers, validate_for_runtime
from jaxrl_entropy.config.sections import (AGGREGATIONS, DATA_KINDS, ArchConfig, Config, DataConfig, DryrunConfig,
                                           EntropyConfig,
                                           EvalConfig, ModelConfig, OptimConfig, ParallelConfig, RLConfig,
                                           RolloutConfig, Section, SyntheticConfig, TrainConfig, WeightsConfig,
                                           as_tuple)



def train_layout(cfg: AnyConfig):
    """The columns and prompt template `data.train_files` are read with (`DataConfig.layout`)."""
    return typed(cfg).data.layout()


__all__ = [
    "AGGREGATIONS", "AnyConfig", "ArchConfig", "Choice", "Config", "ConfigError", "DATA_KINDS", "DataConfig",
    "DryrunConfig", "PLACEHOLDER", "check_placeholders", "field_of", "free_text_keys", "placeholders",
    "EntropyConfig", "EvalConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "RLConfig", "Range",
    "RolloutConfig", "Section", "SyntheticConfig", "TrainConfig", "WeightsConfig", "as_dict", "as_tuple", "base_config",
    "check_micro_batch", "flatten", "from_json_file", "from_json_text", "get_key", "mesh_sizes", "model_num_layers",
    "schema_keys", "section_of", "set_key", "to_json", "train_layout", "typed", "validate", "validate_for_runtime", "with_key",
]
