"""Stop requests (SIGTERM from a TPU preemption or a scheduler, SIGINT from Ctrl-C), honoured at the
next step boundary of whatever phase is running — warm-up step, generation batch, evaluation batch,
export shard, RL step: the phase stops, the caller saves what there is to save and returns.

    guard = PreemptionGuard()
    with guard:
        for batch in work:
            guard.check()            # raises StopRequested once a stop is agreed
            ...

On several processes (a pod, `train --multihost`) a signal usually reaches one host, or the hosts at
different moments; every process must stop at the *same* boundary or the others hang in the next
collective. So `should_stop()` is an agreement: an all-gather of each process's local flag (a few
bytes, once per boundary), and every process calls it at the same boundaries (the programs are
SPMD: the same loop on every host). JAX's own preemption sync point
(`multihost_utils.reached_preemption_sync_point`) is not used: it only hears SIGTERM (not Ctrl-C),
needs one strictly increasing step counter across all phases, and does not exist on one host.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Callable

import numpy as np

log = logging.getLogger("jaxrl_entropy")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(Exception):
    """Raised at a phase's step boundary once every process has agreed to stop (`signum`: the
    signal this process received, None when another process received it)."""

    def __init__(self, signum: int | None = None):
        self.signum = signum
        name = signal.Signals(signum).name if signum else "a signal to another process"
        super().__init__(f"stopped at a step boundary after {name}")


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any process (a collective on several)."""
    import jax
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


class PreemptionGuard:
    """Context manager: while active, SIGTERM / SIGINT set `requested` instead of killing the job.
    A second Ctrl-C aborts at once (KeyboardInterrupt), without saving.

    `agree(local_flag) -> bool`: how processes agree (default `any_process`); tests may replace it.
    """

    def __init__(self, agree: Callable[[bool], bool] = any_process):
        self.signum: int | None = None
        self._agree = agree
        self._agreed = False
        self._previous: dict = {}

    def _on_signal(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            log.warning("second Ctrl-C: aborting without saving")
            raise KeyboardInterrupt
        log.warning("received signal %s: finishing the current step, saving, then stopping (a second "
                    "Ctrl-C aborts without saving)", signal.Signals(signum).name)
        self.signum = signum

    @property
    def requested(self) -> bool:
        """This process received a stop signal (local; use `should_stop` to decide anything)."""
        return self.signum is not None

    def should_stop(self) -> bool:
        """Whether every process stops at this boundary. A collective on several processes: call it
        at the same boundaries on all of them. Once True it stays True (without communicating)."""
        if not self._agreed:
            self._agreed = self._agree(self.requested)
        return self._agreed

    def check(self) -> None:
        """`should_stop()`, raising `StopRequested` when it is True."""
        if self.should_stop():
            raise StopRequested(self.signum)

    def __enter__(self) -> "PreemptionGuard":
        self._previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            # None: a handler installed outside Python (e.g. by a C++ library); the default is the
            # closest thing Python can put back
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous = {}


def _interrupt_outside_gc_callbacks(signum, frame) -> None:
    """SIGINT before a `PreemptionGuard` is active: KeyboardInterrupt, as Python's default, but never
    inside a garbage-collection callback. jax runs one (`_xla_gc_callback`) at every collection,
    and an exception raised there is printed as "Exception ignored" and lost: Ctrl-C during start-up
    was swallowed in 2 of 5 tries and the run trained to the end. There, the signal is sent again
    a moment later, when the callback has returned."""
    f = frame
    while f is not None:
        if "gc_callback" in f.f_code.co_name:
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            return
        f = f.f_back
    raise KeyboardInterrupt


def install_startup_interrupt_handler() -> None:
    """For applications (the CLI calls it first thing): Ctrl-C during start-up (imports, data,
    compilation) always interrupts; see `_interrupt_outside_gc_callbacks`. Process-wide, so never
    called by the library itself."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _interrupt_outside_gc_callbacks)
