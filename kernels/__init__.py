"""Fused attention kernels that emit the Shannon entropy of every attention row.

The import name `kernels` is also that of a Hugging Face package (`pip install kernels`); this
one carries no distribution version of that name, so `transformers` keeps treating the HF package
as absent (`transformers.utils.import_utils.is_kernels_available()` stays False).
"""
from kernels.masking import visible_count, visible_mask
from kernels.reference import reference_attention, reference_head_mixture_entropy

__all__ = [
    "reference_attention",
    "reference_head_mixture_entropy",
    "visible_mask",
    "visible_count",
]
