"""The CPU demo (the default of `jaxrl-entropy train`). Variant: --config=configs/demo.py:anchor"""
from jaxrl_entropy.presets import demo


def get_config(variant: str = "full"):
    return demo(variant or "full")
