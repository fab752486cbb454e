"""The `jaxrl_entropy.kernels` namespace: every public name is a function, whatever was imported first."""
import subprocess
import sys

import pytest

NAMES = ("attention_lse", "attention_probs", "entropy_attention", "flash_attention",
         "head_mixture_entropy", "mixture_entropy_from_probs", "reference_attention",
         "reference_head_mixture_entropy", "resolve_backend", "visible_count", "visible_mask")


@pytest.mark.parametrize("first", ["jaxrl_entropy.kernels", "jaxrl_entropy.kernels.flash",
                                   "jaxrl_entropy.kernels.head_mixture", "jaxrl_entropy.models"])
def test_public_names_are_functions_whatever_is_imported_first(first):
    # a fresh interpreter: the order of first imports is what this test is about
    check = (f"import importlib, types; importlib.import_module({first!r}); "
             "from jaxrl_entropy import kernels; "
             f"bad = [n for n in {NAMES!r} if not isinstance(getattr(kernels, n), types.FunctionType)]; "
             "assert not bad, bad; assert sorted(kernels.__all__) == sorted(" + repr(NAMES) + ")")
    subprocess.run([sys.executable, "-c", check], check=True)
