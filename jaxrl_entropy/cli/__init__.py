"""The `jaxrl-entropy` console script (`main`) and its commands."""
from jaxrl_entropy.cli.main import main

__all__ = ["main"]
