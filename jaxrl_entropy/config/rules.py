"""What a config value may be: `Range` (numbers), `Choice` (names), and `setting()`, which declares
a field of a config section with its default, its rule and what it means."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any


class ConfigError(ValueError):
    """A config value or key that cannot work; the message names the key and the fix."""


_INTERVAL = re.compile(r"^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$")


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed numbers: an interval in the usual notation ("(0, 1]", "[1, inf)"); `also` lists
    single values allowed outside it (-1 = "fill the rest"); `why` is said when a value is
    refused. NaN and ±inf are never allowed."""
    interval: str
    also: tuple = ()
    why: str = ""

    def __post_init__(self):
        if not _INTERVAL.match(self.interval):
            raise ValueError(f"bad interval {self.interval!r}")

    def allows(self, value: float) -> bool:
        if value in self.also:
            return True
        if not math.isfinite(value):
            return False
        lo_bracket, lo, hi, hi_bracket = _INTERVAL.match(self.interval).groups()
        lo, hi = float(lo), float(hi)
        above = value >= lo if lo_bracket == "[" else value > lo
        below = value <= hi if hi_bracket == "]" else value < hi
        return above and below

    def describe(self) -> str:
        extra = "".join(f" or {v}" for v in self.also)
        return f"must lie in {self.interval}{extra}{': ' + self.why if self.why else ''}"


@dataclasses.dataclass(frozen=True)
class Choice:
    """Allowed strings."""
    options: tuple[str, ...]
    why: str = ""

    def allows(self, value: str) -> bool:
        return value in self.options

    def describe(self) -> str:
        return f"is not one of {list(self.options)}{': ' + self.why if self.why else ''}"


Rule = Range | Choice

POSITIVE_INT = Range("[1, inf)")
COUNT = Range("[0, inf)")
POSITIVE = Range("(0, inf)")
PROBABILITY = Range("[0, 1]")
TOP_P = Range("(0, 1]", why="nucleus sampling keeps this share of the probability mass (1 = off)")
# Upper bounds far past any real model or batch: a typo (hidden_size=1e9, group_size=1e8) otherwise
# runs into the memory of the machine, or a generation that never ends, instead of this message.
SIZE_WHY = "far beyond any real setting: probably a typo"
MESH_AXIS = Range("[1, inf)", also=(-1,), why="devices along this mesh axis (-1: all the devices left)")


def setting(default: Any, rule: Rule | None = None, doc: str = "") -> Any:
    """A field of a config section: its default, the rule its values obey (None: any value of the
    default's type: a path, a label, a switch) and what it means."""
    return dataclasses.field(default=default, metadata={"rule": rule, "doc": doc})


def check_value(key: str, value: Any, default: Any, rule: Rule | None) -> Any:
    """`value` for `config.<key>` if it has the default's type and obeys `rule` (a list becomes a
    tuple, an int where a float is expected stays as given); otherwise ConfigError naming the key."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, tuple):
        ok = isinstance(value, (tuple, list, int, float)) and not isinstance(value, bool)
        if isinstance(value, list):
            value = tuple(value)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"config.{key}={value!r} has type {type(value).__name__}; "
                          f"expected {type(default).__name__} (default {default!r})")
    if rule is not None and not rule.allows(value):
        raise ConfigError(f"config.{key}={value!r} {rule.describe()}")
    return value
