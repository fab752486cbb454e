"""Quiet failures of orbax: one failed save or restore makes orbax's writer threads, asyncio tasks
and tensorstore callbacks each report it again (a full disk gave 75 tracebacks). `Checkpointer`
wraps its orbax calls in `orbax_errors_collected()` and raises one error of its own; the CLI calls
`install_orbax_noise_filters()` once, at start-up, for the reports that come after."""
from __future__ import annotations

import contextlib
import gc
import logging

log = logging.getLogger("jaxrl_entropy")


class _DropUnretrieved(logging.Filter):
    """asyncio's "exception was never retrieved" reports of a failed orbax operation's futures."""

    def __init__(self, leftovers: "_LoopClosedLeftovers"):
        super().__init__()
        self.leftovers = leftovers

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.leftovers.sticky and "exception was never retrieved" in record.getMessage())


class _LoopClosedLeftovers:
    """When an orbax operation fails, orbax closes its event loop while tensorstore threads still
    complete I/O; each then fails to call back into the closed loop and tensorstore prints that
    `RuntimeError: Event loop is closed` through `sys.excepthook` (dozens of tracebacks, before and
    after the real error). While an orbax operation runs — and for good once one failed — those
    are dropped; every other exception goes to the hooks that were there before.

    The library only counts the operations (`active`, `sticky`); replacing `sys.excepthook`,
    `sys.unraisablehook` and filtering the `asyncio` logger are process-wide, so the application
    does it once at start-up (`install_orbax_noise_filters`, called by the CLI)."""

    def __init__(self):
        self.active = 0
        self.sticky = False
        self._installed = False

    def _leftover(self, exc) -> bool:
        return (self.active or self.sticky) and isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)

    def install(self) -> None:
        if self._installed:
            return
        import sys
        previous_except, previous_unraisable = sys.excepthook, sys.unraisablehook

        def excepthook(kind, value, tb):
            if not self._leftover(value):
                previous_except(kind, value, tb)

        def unraisablehook(info):
            if not self._leftover(info.exc_value):
                previous_unraisable(info)

        sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
        logging.getLogger("asyncio").addFilter(_DropUnretrieved(self))
        self._installed = True


_LEFTOVERS = _LoopClosedLeftovers()


def install_orbax_noise_filters() -> None:
    """Drop the leftovers of failed orbax operations (tensorstore's `Event loop is closed`
    tracebacks, asyncio's unretrieved-exception reports) from `sys.excepthook`,
    `sys.unraisablehook` and the `asyncio` logger. Process-wide: for applications (the CLI calls
    it at start-up), never called by the library itself. Idempotent."""
    _LEFTOVERS.install()


@contextlib.contextmanager
def orbax_errors_collected():
    """Orbax's writer threads and asyncio tasks each log their own copy of one failure (a full disk
    gave 75 tracebacks). While a save/restore runs, their ERROR records are held back: replayed if
    it succeeds, dropped (after a count at DEBUG level) if it fails — the caller raises one error."""
    held: list[logging.LogRecord] = []

    class _Hold(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.levelno >= logging.ERROR:
                held.append(record)
                return False
            return True

    hold = _Hold()
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    for logger in loggers:
        logger.addFilter(hold)
    _LEFTOVERS.active += 1
    failed = True
    try:
        yield
        failed = False
    finally:
        if failed:
            gc.collect()  # asyncio reports a task's unretrieved exception when the task is collected
        for logger in loggers:
            logger.removeFilter(hold)
        _LEFTOVERS.active -= 1
        if failed:
            log.debug("%d error record(s) from orbax's threads held back", len(held))
            # the failed operation's remaining asyncio futures and tensorstore callbacks report the
            # same failure again when they finish or are finalized, possibly only at interpreter
            # exit: drop those reports from now on (where the application installed the filters)
            _LEFTOVERS.sticky = True
        else:
            for record in held:
                logging.getLogger(record.name).handle(record)
