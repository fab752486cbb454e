"""Progress bars on long work (warm-up, RL steps, evaluation, a rollout): tqdm on process 0, nothing
elsewhere."""
from __future__ import annotations

import logging
import sys
import time

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


class RolloutProgress:
    """Rows finished and tokens/s: a tqdm bar on a terminal (shown only when a rollout takes a
    while), a log line at most every 30 s otherwise; process 0 only."""

    def __init__(self, total: int, enabled: bool, logger: logging.Logger | None = None):
        self.enabled = enabled and jax.process_index() == 0
        self.t0 = self.last_log = time.perf_counter()
        self.log, self.bar, self.total = logger or logging.getLogger("jaxrl_entropy"), None, total
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc="rollout", unit="row", leave=False, delay=5.0, dynamic_ncols=True)

    def update(self, done: int, tokens: int, running: int, pages_used: float):
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = tokens / max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(tok_s=f"{rate:,.0f}", running=running, kv=f"{pages_used:.0%}", refresh=False)
        elif now - self.last_log >= 30.0:
            self.last_log = now
            self.log.info("rollout: %d/%d rows done, %d tokens, %.0f tokens/s, %d running, KV pages %.0f%% used",
                          done, self.total, tokens, rate, running, 100 * pages_used)

    def close(self):
        if self.bar is not None:
            self.bar.close()
