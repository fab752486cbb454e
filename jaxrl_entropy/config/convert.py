"""Between the config's two forms: the `ml_collections.ConfigDict` users write and override
(`base_config()`, `--config.KEY=VALUE`, config files, a run's `config.json`) and the typed, checked
`Config` of frozen sections the code reads (`typed()`, at the boundary)."""
from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Mapping
from typing import Any

import ml_collections

from jaxrl_entropy.config.rules import ConfigError, check_value
from jaxrl_entropy.config.sections import Config

AnyConfig = ml_collections.ConfigDict | Config


def _is_section(default: Any) -> bool:
    return dataclasses.is_dataclass(default) and not isinstance(default, type)


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def schema_keys(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the schema with its default (`{"rl.group_size": 16, ...}`)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        default = _default(f)
        if _is_section(default):
            out.update(schema_keys(type(default), f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = default
    return out


def field_of(key: str) -> dataclasses.Field:
    """The dataclass field behind a dotted key (`"rollout.top_p"`): its default, rule and doc."""
    cls, *parents, leaf = [Config, *key.split(".")]
    for p in parents:
        cls = type(_default(next(f for f in dataclasses.fields(cls) if f.name == p)))
    return next(f for f in dataclasses.fields(cls) if f.name == leaf)


def free_text_keys() -> list[str]:
    """Keys whose value is any string (paths, labels, lists checked where they are read)."""
    return [k for k, d in schema_keys().items() if isinstance(d, str) and field_of(k).metadata.get("rule") is None]


def as_dict(config: AnyConfig) -> dict[str, Any]:
    """The nested plain dict of either form (what `config.json` holds)."""
    if isinstance(config, ml_collections.ConfigDict):
        return config.to_dict()
    return dataclasses.asdict(config)


def base_config() -> ml_collections.ConfigDict:
    """Every key with its default, as a locked ConfigDict: config files start from it and change
    values; they cannot add keys, so a typo fails at once with the list of valid keys."""
    c = ml_collections.ConfigDict(as_dict(Config()))
    c.lock()
    return c


def flatten(mapping: Mapping, prefix: str = "") -> dict[str, Any]:
    """`{"rl.group_size": 16, ...}` of a nested config (either form's dict, a ConfigDict)."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        if isinstance(v, (Mapping, ml_collections.ConfigDict)):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _build(cls: type, mapping: Mapping, prefix: str) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        default, key = _default(f), f"{prefix}{f.name}"
        value = mapping[f.name]
        if _is_section(default):
            kwargs[f.name] = _build(type(default), value, key + ".")
        else:   # checked again by a Section's own __post_init__; here for plain dataclasses too
            kwargs[f.name] = check_value(key, value, default, f.metadata.get("rule"))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a lower layer's dataclass (token_weights.SoftConfig) names its own field
        raise ConfigError(f"config.{prefix}{str(e).split('.', 1)[1]}" if "." in str(e) else f"config.{prefix}: {e}"
                          ) from None


def typed(cfg: AnyConfig | Mapping) -> Config:
    """The typed, checked `Config` of a ConfigDict (or nested dict, or a `Config`, returned as is).
    Raises ConfigError naming the key: unknown or missing keys, wrong types, values outside their
    rules, keys that do not fit together."""
    if isinstance(cfg, Config):
        return cfg
    given = flatten(cfg)
    schema = schema_keys()
    unknown = sorted(set(given) - set(schema))
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, schema, 1)) else k
                 for k in unknown]
        raise ConfigError(f"unknown config key(s): {', '.join(hints)}")
    missing = sorted(set(schema) - set(given))
    if missing:
        raise ConfigError(f"config is missing key(s) {missing}; build configs from jaxrl_entropy.config.base_config()")
    return _build(Config, cfg, "")


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`cfg` itself once `typed(cfg)` finds nothing wrong (ConfigError naming the key otherwise).
    Needs neither the model nor devices."""
    typed(cfg)
    return cfg


def get_key(cfg: AnyConfig, key: str) -> Any:
    """The value at a dotted key (`"eval.k"`), as `--config.eval.k` names it."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part) if isinstance(node, Config) or dataclasses.is_dataclass(node) else node[part]
    return node


def set_key(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Set the value at a dotted key (`"eval.k"`) of a ConfigDict; the key must exist (it is locked)."""
    parent, _, leaf = key.rpartition(".")
    (get_key(cfg, parent) if parent else cfg)[leaf] = value


def with_key(config: Config, key: str, value: Any) -> Config:
    """A copy of the typed `config` with the dotted `key` set to `value` (checked like any other)."""
    head, _, rest = key.partition(".")
    if not rest:
        return dataclasses.replace(config, **{head: value})
    return dataclasses.replace(config, **{head: with_key(getattr(config, head), rest, value)})


def to_json(cfg: AnyConfig) -> str:
    return json.dumps(as_dict(cfg), indent=2, sort_keys=True, default=str)


def from_json_file(path: str) -> ml_collections.ConfigDict:
    """A run's saved `config.json` back into a checked, locked ConfigDict."""
    with open(path) as f:
        return from_json_text(f.read(), source=path)


def from_json_text(text: str, *, source: str = "config.json") -> ml_collections.ConfigDict:
    cfg = base_config()
    try:
        _update_locked(cfg, json.loads(text), "")
    except (AttributeError, KeyError, json.JSONDecodeError) as e:
        raise ConfigError(f"{source}: {e}") from None
    return validate(cfg)


def _update_locked(cfg: ml_collections.ConfigDict, data: dict, prefix: str) -> None:
    for k, v in data.items():
        if k not in cfg:
            raise ConfigError(f"unknown config key {prefix}{k}")
        if isinstance(cfg[k], ml_collections.ConfigDict):
            _update_locked(cfg[k], v, f"{prefix}{k}.")
        else:
            cfg[k] = tuple(v) if isinstance(v, list) else v


def section_of(value: Any, name: str, caller: str) -> Any:
    """`value` when it is a section; the `name` section of a whole config (either form), with a
    DeprecationWarning: `caller` took the whole config before it took the section it reads."""
    whole = isinstance(value, Config) or (isinstance(value, ml_collections.ConfigDict) and "rl" in value
                                           and "train" in value)
    if not whole:
        return value
    import warnings
    warnings.warn(f"{caller}(cfg) is deprecated: pass the section it reads, {caller}(cfg.{name})",
                  DeprecationWarning, stacklevel=3)
    return get_key(value, name)
