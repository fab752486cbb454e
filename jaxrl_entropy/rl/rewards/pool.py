"""A pool of spawned worker processes that kills any call running past its time limit.

Guarantees (what :class:`~jaxrl_entropy.rl.rewards.MathVerifier` relies on):

- every call has a hard wall-clock limit from the moment a ready worker takes it; a worker that
  runs past it, dies (crash, OOM kill) or raises gives the call its ``default`` answer;
- a worker that ran past its limit is killed (SIGKILL) and replaced, so the pool keeps working,
  and a worker killed from outside at any moment, even idle, is replaced too;
- workers are started with ``spawn`` (or ``forkserver``), never ``fork``: the parent holds JAX's
  threads and locks, which a forked child would inherit in an undefined state;
- each worker has its own pipe, so a worker that dies mid-message cannot block the others.

Why not ``pebble`` (checked with 5.2.3): its workers share one pipe guarded by a process-shared
lock, so a worker killed while holding it (the OOM killer, mid-transaction) stalls the whole pool
(pebble#163), and a worker killed while idle, with no task in flight, breaks the pool for good
(every later ``schedule`` raises ``RuntimeError``), which we reproduced. Both are failures the
trainer must survive, and the pool below is small.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import threading
import time
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Sequence

__all__ = ["KillingPool"]

_log = logging.getLogger(__name__)
_READY = "ready"


def _worker_main(conn: Any, fn: Callable[..., Any], warm_up: tuple | None) -> None:
    """Worker loop: answer ``args`` requests with ``(True, fn(*args))`` until sent None or killed.

    An exception in ``fn`` is answered ``(False, None)``: the caller uses its default.
    """
    if warm_up is not None:
        try:
            fn(*warm_up)  # pays slow imports (sympy) before the first timed call
        except Exception:  # noqa: BLE001 - a failing warm-up shows up on real calls
            pass
    conn.send(_READY)
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        try:
            reply: tuple[bool, Any] = (True, fn(*request))
        except Exception:  # noqa: BLE001 - any failure of the call means "no answer"
            reply = (False, None)
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


@dataclasses.dataclass
class _Worker:
    process: Any
    conn: Any
    state: str  # "starting" | "idle" | "busy"
    deadline: float
    task: int = -1
    served: int = 0  # calls answered


class KillingPool:
    """Runs ``fn(*args)`` in spawned worker processes with a hard limit per call.

    Args:
      fn: the function the workers run; must be picklable (a module-level function) and its
        results too.
      workers: number of worker processes; :meth:`map` uses them in parallel.
      timeout_s: hard limit per call, seconds, from the moment a ready worker takes it.
      startup_timeout_s: limit for a worker to start, import ``fn``'s module and run ``warm_up``;
        separate from ``timeout_s`` because a spawn plus heavy imports takes about a second.
      warm_up: arguments of one call each worker makes before it reports ready (its errors are
        ignored), or None.
      mp_context: ``"spawn"`` (default) or ``"forkserver"``.
      name: prefix of the worker process names and of error messages.

    Workers start when the pool is created, so their start-up overlaps other work. Calls are
    serialised (thread-safe). Workers are daemons: they also die with the parent. After
    ``3 * workers`` start failures in a row the pool gives up (logs an error) and every later call
    answers its default at once.
    """

    _MAX_START_FAILURES_PER_WORKER = 3

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        workers: int,
        timeout_s: float,
        startup_timeout_s: float = 120.0,
        warm_up: tuple | None = None,
        mp_context: str = "spawn",
        name: str = "KillingPool",
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"{name}: timeout_s must be > 0 seconds, got {timeout_s}.")
        if startup_timeout_s <= 0:
            raise ValueError(
                f"{name}: startup_timeout_s must be > 0 seconds, got {startup_timeout_s}."
            )
        if workers < 1:
            raise ValueError(f"{name}: workers must be >= 1, got {workers}.")
        if mp_context not in ("spawn", "forkserver"):
            raise ValueError(
                f"{name}: mp_context must be 'spawn' or 'forkserver', got {mp_context!r} "
                "('fork' is unsafe after jax has started its threads)."
            )
        self.name = name
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self._fn = fn
        self._warm_up = warm_up
        self._ctx = multiprocessing.get_context(mp_context)
        self._lock = threading.Lock()
        self._closed = False
        self._start_failures = 0
        self._broken = False
        self._workers = [self._start_worker() for _ in range(workers)]

    # -- worker management -------------------------------------------------------------------

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, self._fn, self._warm_up),
            daemon=True,
            name=f"{self.name}-worker",
        )
        process.start()
        child_conn.close()  # the parent keeps only its end: EOF then means the worker died
        return _Worker(process, parent_conn, "starting", time.monotonic() + self.startup_timeout_s)

    @staticmethod
    def _kill(worker: _Worker) -> None:
        try:
            worker.conn.close()
        except OSError:
            pass
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5.0)

    def _fail(self, idx: int) -> None:
        """Kill worker ``idx`` and start a fresh one; give up after repeated start failures.

        A worker that dies before it has answered a call, other than by a call it was running
        (a hang or a crash: the call's fault), failed to start.
        """
        w = self._workers[idx]
        failed_at_start = w.state == "starting" or (w.state == "idle" and w.served == 0)
        self._kill(self._workers[idx])
        self._workers[idx] = self._start_worker()
        if not failed_at_start:
            return
        self._start_failures += 1
        if self._start_failures >= self._MAX_START_FAILURES_PER_WORKER * len(self._workers):
            _log.error(
                "%s: workers failed to start %d times in a row; the pool is off from now on "
                "(every call answers its default). Check that the worker function's module "
                "imports in a fresh interpreter.",
                self.name,
                self._start_failures,
            )
            self._broken = True

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (for monitoring and tests)."""
        return [w.process.pid for w in self._workers]

    @property
    def broken(self) -> bool:
        """True once the pool has given up on starting workers."""
        return self._broken

    # -- public API --------------------------------------------------------------------------

    def map(self, args_list: Sequence[tuple], *, default: Any) -> list[Any]:
        """``[fn(*args) for args in args_list]``, spread over the workers.

        Every entry starts as ``default`` and is replaced only by an answer that arrives in time;
        a call that runs past ``timeout_s`` has its worker killed and replaced.
        """
        if self._closed:
            raise RuntimeError(f"{self.name}: used after close(); create a new one.")
        results = [default] * len(args_list)
        if not args_list:
            return results
        with self._lock:
            pending = collections.deque(range(len(args_list)))
            requeued: set[int] = set()
            while not self._broken:
                for idx in range(len(self._workers)):
                    self._dispatch(idx, args_list, pending, requeued)
                waiting = [
                    (idx, w) for idx, w in enumerate(self._workers) if w.state in ("starting", "busy")
                ]
                if not pending and not any(w.state == "busy" for _, w in waiting):
                    break
                wait_s = max(0.0, min(w.deadline for _, w in waiting) - time.monotonic())
                ready = multiprocessing.connection.wait([w.conn for _, w in waiting], timeout=wait_s)
                now = time.monotonic()
                for idx, w in waiting:
                    if w.conn in ready:
                        try:
                            msg = w.conn.recv()
                        except (EOFError, OSError):  # the worker died (crash, OOM kill)
                            if w.state == "busy" and w.task not in requeued:
                                # Killed from outside, or the call crashed it: one more try
                                # on a fresh worker tells the two apart.
                                requeued.add(w.task)
                                pending.appendleft(w.task)
                            self._fail(idx)
                            continue
                        if w.state == "starting":
                            if msg == _READY:
                                w.state = "idle"
                            else:
                                self._fail(idx)
                        else:
                            ok, value = msg
                            if ok:
                                results[w.task] = value
                            w.state = "idle"
                            w.served += 1
                            self._start_failures = 0  # a worker that answers: the set-up works
                    elif now >= w.deadline:  # a hang: kill it so it never blocks the caller
                        self._fail(idx)
        return results

    def _dispatch(
        self, idx: int, args_list: Sequence[tuple], pending: collections.deque, requeued: set[int]
    ) -> None:
        """Hand pending calls to worker ``idx`` while it is idle (at most one is in flight)."""
        while pending and self._workers[idx].state == "idle":
            w = self._workers[idx]
            if not w.process.is_alive():  # killed while idle (e.g. the OOM killer)
                self._fail(idx)
                return
            task = pending.popleft()
            try:
                payload = ForkingPickler.dumps(tuple(args_list[task]))
            except Exception:  # noqa: BLE001 - unpicklable arguments: the call keeps its default
                continue
            try:
                w.conn.send_bytes(payload)
            except (OSError, EOFError, ValueError):
                if task not in requeued:  # not started: a fresh worker takes it, once
                    requeued.add(task)
                    pending.appendleft(task)
                self._fail(idx)
                return
            w.task, w.state = task, "busy"
            w.deadline = time.monotonic() + self.timeout_s

    def close(self) -> None:
        """Stop the workers (politely, then by force). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, EOFError, ValueError):
                pass
        for w in self._workers:
            w.process.join(timeout=1.0)
            self._kill(w)

    def __enter__(self) -> "KillingPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; daemon workers also die with the parent
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
