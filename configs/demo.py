"""The CPU demo (`presets.demo`): the config `jaxrl-entropy train` runs when no --config is given.

That default loads the installed `jaxrl_entropy/presets.py` (so it works without this directory);
this file exposes the same config by path, for variants: --config=configs/demo.py:anchor
"""
from jaxrl_entropy.presets import demo


def get_config(variant: str = "full"):
    return demo(variant or "full")
