"""Fused attention kernels that emit the Shannon entropy of every attention row.

The public entry points:

- `entropy_attention`, `flash_attention` (`flash.py`): the fused flash kernel, with and without row
  entropy; differentiable.
- `head_mixture_entropy`, `attention_probs`, `attention_lse` (`head_mixture.py`): the entropy of the
  head-averaged attention row, full probabilities for short sequences, the log-sum-exp alone.
- `reference_attention`, `reference_head_mixture_entropy`, `mixture_entropy_from_probs`
  (`reference.py`): plain XLA with materialised probabilities, the oracle.
- `visible_mask`, `visible_count` (`masking.py`), `resolve_backend` (`platform.py`).
"""
from __future__ import annotations

from jaxrl_entropy.kernels.flash import entropy_attention, flash_attention
from jaxrl_entropy.kernels.head_mixture import attention_lse, attention_probs, head_mixture_entropy
from jaxrl_entropy.kernels.masking import visible_count, visible_mask
from jaxrl_entropy.kernels.platform import resolve_backend
from jaxrl_entropy.kernels.reference import (mixture_entropy_from_probs, reference_attention,
                                             reference_head_mixture_entropy)

__all__ = [
    "attention_lse", "attention_probs", "entropy_attention", "flash_attention",
    "head_mixture_entropy", "mixture_entropy_from_probs", "reference_attention",
    "reference_head_mixture_entropy", "resolve_backend", "visible_count", "visible_mask",
]
