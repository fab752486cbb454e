"""Fused attention kernels that emit the Shannon entropy of every attention row.

The import name `kernels` is also that of a Hugging Face package (`pip install kernels`). This one
ships inside the `jaxrl-entropy` distribution (version < 0.18), so `transformers`' probe for the HF
package (`transformers.utils.import_utils.is_kernels_available()`) keeps answering False and
`transformers` works beside it. Names load lazily so that probe never pays for importing jax.
"""
from __future__ import annotations

import importlib
import sys
import types

# public name -> module that defines it
_EXPORTS = {
    "reference_attention": "kernels.reference",
    "reference_head_mixture_entropy": "kernels.reference",
    "mixture_entropy_from_probs": "kernels.reference",
    "visible_mask": "kernels.masking",
    "visible_count": "kernels.masking",
    "resolve_backend": "kernels.platform",
    "entropy_attention": "kernels.entropy_attention",
    "flash_attention": "kernels.entropy_attention",
    "head_mixture_entropy": "kernels.head_mixture",
    "attention_probs": "kernels.head_mixture",
    "attention_lse": "kernels.head_mixture",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    # Importing `kernels.entropy_attention` binds the *submodule* to that package attribute;
    # re-bind every public name of the module so the functions win.
    for export, where in _EXPORTS.items():
        if where == _EXPORTS[name]:
            globals()[export] = getattr(module, export)
    return globals()[name]


def __dir__():
    return __all__


class _Namespace(types.ModuleType):
    """`kernels.entropy_attention` is both a submodule and a public function. The import system
    binds the submodule onto the package when it is first imported (for instance by
    `from kernels.entropy_attention import entropy_attention`); keep the function there instead."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Namespace
