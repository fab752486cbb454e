"""The lazy `kernels` namespace: every public name resolves to a function, in any access order."""
import importlib
import sys


def test_public_names_are_functions_in_any_order():
    saved = {k: v for k, v in sys.modules.items() if k == "kernels" or k.startswith("kernels.")}
    try:
        _check()
    finally:  # other tests in this process keep the module objects they imported
        for name in [k for k in sys.modules if k == "kernels" or k.startswith("kernels.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def _check():
    # a public name first, or the submodule that shares the function's name imported directly
    for first in ("flash_attention", "entropy_attention", "attention_lse", "kernels.entropy_attention"):
        for name in list(sys.modules):
            if name == "kernels" or name.startswith("kernels."):
                del sys.modules[name]
        if first.startswith("kernels."):
            importlib.import_module(first)
            kernels = sys.modules["kernels"]
        else:
            kernels = importlib.import_module("kernels")
            getattr(kernels, first)
        for name in kernels.__all__:
            assert callable(getattr(kernels, name)) and not hasattr(getattr(kernels, name), "__path__"), name
            assert type(getattr(kernels, name)).__name__ == "function", (first, name)
