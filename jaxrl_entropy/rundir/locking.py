"""One writer per run directory: a second `train` (a double launch, or a scheduler restarting a job
that is still alive) on a workdir in use exits at once, saying which process holds it.

    lock = WorkdirLock(workdir)      # raises WorkdirBusyError naming the holder
    ...
    lock.release()

Local (and NFS) workdirs: an OS file lock (`fcntl.flock`) on `<workdir>/.lock`. The kernel releases
it when the holder dies however it dies (`kill -9` included), so a stale lock cannot exist; the
file's contents (pid, host, start time, command) only say who holds it.

Object stores (`gs://...`) have no locks. There the lock is a *lease*: `<workdir>/.lock.json` with
the holder and a heartbeat the holder rewrites every `heartbeat_s` (60 s). A job refuses to start
while the lease is fresher than `ttl_s` (5 minutes); a holder that died (kill -9, a lost VM) leaves
a stale lease that the next job takes over once it has expired. After writing its lease a job
reads it back a few seconds later and refuses if another job's lease replaced it. Limitation: GCS
offers no atomic create through the file API used here, so two jobs started within that moment
may, in rare timing, both start — the lease catches a double launch or a restart, not a race.

On several processes only process 0 takes the lock (all of them share the workdir).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

from jaxrl_entropy.rundir import fileio

log = logging.getLogger("jaxrl_entropy")

LOCK_FILE = ".lock"
LEASE_FILE = ".lock.json"


class WorkdirBusyError(Exception):
    """Another live job holds the run directory."""


def _holder_info() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500]}


def _describe(info: dict) -> str:
    if not info:
        return "another process (it has not written its details yet)"
    return (f"process {info.get('pid')} on host {info.get('host')} (started {info.get('started')}: "
            f"{info.get('command', '?')})")


class WorkdirLock:
    """Hold `workdir` for writing until `release()` (or the process's death, for a local lock).

    mode: "auto" (flock locally, a lease on an object store), or "flock" / "lease" explicitly (the
    lease works on any path, which is how it is tested).
    """

    def __init__(self, workdir: str, *, mode: str = "auto", ttl_s: float = 300.0, heartbeat_s: float = 60.0,
                 settle_s: float = 2.0):
        self.workdir = workdir
        self.mode = ("lease" if fileio.is_remote(workdir) else "flock") if mode == "auto" else mode
        self.ttl_s, self.heartbeat_s, self.settle_s = ttl_s, heartbeat_s, settle_s
        self._fd: int | None = None
        self._token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        fileio.makedirs(workdir)
        if self.mode == "flock":
            self._acquire_flock()
        else:
            self._acquire_lease()

    # ------------------------------------------------------------------ flock
    def _acquire_flock(self) -> None:
        import fcntl
        path = os.path.join(self.workdir, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                with open(path) as f:
                    info = json.loads(f.read() or "{}")
            except (OSError, ValueError):
                info = {}
            raise WorkdirBusyError(
                f"{self.workdir} is in use by {_describe(info)}: one job writes a run directory at a time. "
                "Wait for that job to end (or stop it), or choose another --workdir.") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder_info()).encode())
        self._fd = fd

    # ------------------------------------------------------------------ lease
    def _lease_path(self) -> str:
        return fileio.join(self.workdir, LEASE_FILE)

    def _read_lease(self) -> dict | None:
        try:
            return json.loads(fileio.read_text(self._lease_path()))
        except (OSError, ValueError):
            return None

    def _busy(self, lease: dict) -> WorkdirBusyError:
        left = self.ttl_s - (time.time() - float(lease.get("heartbeat", 0)))
        return WorkdirBusyError(
            f"{self.workdir} is in use by {_describe(lease)}: its lease ({self._lease_path()}) was renewed "
            f"{time.time() - float(lease.get('heartbeat', 0)):.0f} s ago. One job writes a run directory at a "
            f"time: wait for that job to end, or, if it died, for its lease to expire (in {max(left, 0):.0f} s); "
            "or choose another --workdir.")

    def _write_lease(self) -> None:
        fileio.write_text(self._lease_path(), json.dumps(dict(self._info, token=self._token,
                                                              heartbeat=time.time())))

    def _acquire_lease(self) -> None:
        lease = self._read_lease()
        if lease and time.time() - float(lease.get("heartbeat", 0)) < self.ttl_s:
            raise self._busy(lease)
        if lease:
            log.warning("taking over the expired lease of %s on %s", _describe(lease), self.workdir)
        self._token, self._info = uuid.uuid4().hex, _holder_info()
        self._write_lease()
        time.sleep(self.settle_s)  # a job that started at the same moment has written its own by now
        lease = self._read_lease()
        if not lease or lease.get("token") != self._token:
            self._token = None
            raise self._busy(lease or {})
        self._thread = threading.Thread(target=self._heartbeat, name="workdir-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            lease = self._read_lease()
            if lease and lease.get("token") != self._token:
                log.error("the lease on %s was taken by %s (this job's heartbeat stalled longer than %.0f s): "
                          "two jobs may now write this run directory", self.workdir, _describe(lease), self.ttl_s)
                return
            try:
                self._write_lease()
            except OSError as e:
                log.warning("could not renew the lease on %s: %s", self.workdir, e)

    # ------------------------------------------------------------------ release
    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
        if self._token is not None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            lease = self._read_lease()
            if lease and lease.get("token") == self._token:
                fileio.remove(self._lease_path())
            self._token = None

    def __enter__(self) -> "WorkdirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_workdir(workdir: str) -> WorkdirLock | None:
    """Check that the workdir and its checkpoint directory are writable (on every process: each
    writes its own checkpoint shards) and lock the workdir (process 0). Every process raises if
    any check failed anywhere, so none is left waiting in a collective."""
    import jax

    from jaxrl_entropy.rundir.preemption import any_process
    lock, error = None, None
    try:
        fileio.check_writable(workdir, "workdir")
        fileio.check_writable(fileio.join(workdir, "checkpoints"), "checkpoint directory")
        if jax.process_index() == 0:
            lock = WorkdirLock(workdir)
    except (OSError, WorkdirBusyError) as e:
        error = e
    if any_process(error is not None):
        if lock is not None:
            lock.release()
        raise error or WorkdirBusyError(f"another process of this job could not claim {workdir}; see its message")
    return lock
