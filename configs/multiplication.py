"""The study's second task (`presets.multiplication`): 2-digit long multiplication with a scratchpad
of 104–145 tokens on an 8-layer model. --config=configs/multiplication.py:soft
"""
from jaxrl_entropy.presets import multiplication


def get_config(variant: str = "full"):
    return multiplication(variant or "full")
