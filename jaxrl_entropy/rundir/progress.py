"""Progress bars on long work (warm-up, RL steps, evaluation): tqdm on process 0, nothing elsewhere."""
from __future__ import annotations

import sys

import jax


class NullBar:
    def update(self, n=1): pass
    def set_postfix(self, **kw): pass
    def close(self): pass


def bar(total: int, desc: str, enabled: bool, initial: int = 0):
    if not enabled or jax.process_index() != 0:
        return NullBar()
    from tqdm.auto import tqdm
    # In a log file (not a terminal) redraw rarely, so the log stays readable.
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)
