"""Stop requests (SIGTERM from a TPU preemption or a scheduler, SIGINT from Ctrl-C), honoured at the
next step boundary of whatever phase is running: the phase saves what it has and returns."""
from __future__ import annotations

import logging
import signal

log = logging.getLogger("jaxrl_entropy")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionGuard:
    """Context manager: while active, SIGTERM / SIGINT set `requested` instead of killing the job."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _on_signal(self, signum, frame):
        log.warning("received signal %d: finishing the current step, saving, then stopping", signum)
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "PreemptionGuard":
        self._previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
