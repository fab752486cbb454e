"""The presets' stand-in for a path only the user knows (a checkpoint, a data file): `train` refuses
to start while any key still holds one, naming every such key at once."""
from __future__ import annotations

from jaxrl_entropy.config.convert import AnyConfig, as_dict, flatten, free_text_keys
from jaxrl_entropy.config.rules import ConfigError

PLACEHOLDER = "/path/to/"


def placeholders(cfg: AnyConfig) -> dict[str, str]:
    """Keys whose value still holds a preset's placeholder path (`PLACEHOLDER`): key -> value."""
    given = flatten(as_dict(cfg))
    return {key: given[key] for key in free_text_keys()
            if isinstance(given.get(key), str) and PLACEHOLDER in given[key]}


def check_placeholders(cfg: AnyConfig, keys: tuple[str, ...] | None = None) -> None:
    """A `ConfigError` listing every key (of `keys`, default all) that still holds a placeholder
    path, each as the flag that sets it, so that one message says all that is missing."""
    found = {k: v for k, v in placeholders(cfg).items() if keys is None or k in keys}
    if found:
        raise ConfigError(
            f"{len(found)} config key(s) still hold the preset's placeholder paths ({PLACEHOLDER}...): set each "
            "on the command line, with your paths in place of /path/to (local or gs://; model.hf_dir a local "
            "directory on every host):\n" + "\n".join(f"  --config.{k}={v}" for k, v in found.items()))
