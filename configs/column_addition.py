"""The study's second task (`presets.column_addition`): 4-digit addition of 5 terms with a
column-by-column scratchpad of 106–112 tokens on an 8-layer model.
--config=configs/column_addition.py:soft
"""
from jaxrl_entropy.presets import column_addition


def get_config(variant: str = "full"):
    return column_addition(variant or "full")
