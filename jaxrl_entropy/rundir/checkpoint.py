"""Orbax checkpoints of a run: parameters, optimiser state, step, data-iterator state — saved so
that they can be verified, and never rotated away while they are the last good one.

The RNG needs no slot: every random draw of step s derives from `fold_in(key(seed), s)`, so the
step number restores it.

A save is two commits. Orbax writes the step into a temporary directory and renames it (a job
killed mid-save leaves the previous checkpoint intact, and the temporary directory is ignored).
Then, as the save's last act, a checksum manifest (`checksums.json`: the size and sha256 of every
file of the step, hashed in parallel by all processes) is written atomically into the step.
`restore` checks the manifest before orbax reads anything: a flipped byte, a truncated or missing
file (`manifest.ocdbt`, `_METADATA`, a data file, all of `state/`) is a `CheckpointCorruptError`
naming the step and the file, never a silent load of damaged parameters. A step without a
manifest (written before manifests existed, or killed between the two commits) is restored with a
warning that it could not be verified.

Rotation (`keep`) is done here, not by orbax: the newest `keep` steps are kept, and so is the
newest step saved while the run was healthy (`save(..., healthy=True)`), so a run that skips every
update for a while can never rotate its last good parameters away.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxrl_entropy.rundir import fileio
# the orbax noise filters live in their own module; `install_orbax_noise_filters` stays importable here
from jaxrl_entropy.rundir.orbax_noise import install_orbax_noise_filters, orbax_errors_collected  # noqa: F401

log = logging.getLogger("jaxrl_entropy")

MANIFEST = "checksums.json"
ON_CORRUPT = ("fail", "fallback")
_CHUNK = 16 * 2**20


class CheckpointCorruptError(Exception):
    """A checkpoint step whose files do not match its checksum manifest, or that orbax cannot read."""


class CheckpointRotatedError(CheckpointCorruptError):
    """A step that vanished while it was read: the run writing the workdir rotated it away after
    saving newer ones (`train.keep_checkpoints`). Nothing is damaged; the newest step is readable."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint whose arrays do not fit this run's model / optimiser."""


class CheckpointWriteError(OSError):
    """A save that failed (full disk, lost permissions); the previous checkpoint is intact."""


class Checkpointer:
    """The checkpoints of one run directory (`<workdir>/checkpoints`).

    read_only: open an existing directory for `eval` / `convert` — nothing is created, written,
    rotated or moved (a run is never changed by reading it).
    """

    def __init__(self, directory: str, *, keep: int = 3, read_only: bool = False):
        self.directory = fileio.absolute(directory)
        self.keep = keep
        self.read_only = read_only
        if read_only and not fileio.exists(self.directory):
            raise FileNotFoundError(f"{self.directory}: no checkpoint directory")
        self._health: dict[int, bool] = {}
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        if read_only:  # orbax warns that the directory it was asked to open read-only is read-only
            absl_log.setLevel(max(level, logging.ERROR))
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=None, create=not read_only, read_only=read_only,
                                                     enable_async_checkpointing=False),
                item_names=("state", "meta"),
            )
        finally:
            absl_log.setLevel(level)
        if not read_only:
            self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Temporary directories of saves that never committed (a job killed mid-save, a second
        Ctrl-C during one): orbax ignores them, so without this they stay, holding their space, for
        good. The workdir's lock makes this process the only writer, so none is in progress."""
        if jax.process_index() != 0 or fileio.is_remote(self.directory):
            return
        import glob
        for path in glob.glob(fileio.join(self.directory, "*.orbax-checkpoint-tmp*")):
            log.warning("removing %s, the temporary directory of a save that never finished", path)
            with contextlib.suppress(OSError):
                fileio.rmtree(path)

    # ------------------------------------------------------------------ listing
    def all_steps(self) -> list[int]:
        """Steps orbax committed, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def step_dir(self, step: int) -> str:
        return fileio.join(self.directory, str(step))

    def healthy(self, step: int) -> bool:
        """Whether `step` was saved by a healthy run (True when its manifest does not say)."""
        if step not in self._health:
            manifest = self._read_manifest(step)
            self._health[step] = bool(manifest.get("healthy", True)) if isinstance(manifest, dict) else True
        return self._health[step]

    def newest_healthy_step(self) -> int | None:
        good = [s for s in self.all_steps() if self.healthy(s)]
        return good[-1] if good else None

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: Any, meta: dict, *, healthy: bool = True) -> None:
        """state: a pytree of arrays (params, opt_state); meta: JSON-serialisable. `healthy=False`
        marks a step saved while the run was skipping every update (rotation keeps an older one)."""
        if self.read_only:
            raise RuntimeError(f"{self.directory} was opened read-only")
        try:
            with orbax_errors_collected():
                self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                  meta=ocp.args.JsonSave(meta)), force=True)
                self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 — orbax/tensorstore raise ValueError, RuntimeError, OSError...
            self._remove_partial(step)
            raise self._write_error(step, e) from None
        try:
            self._write_manifest(step, healthy)
        except OSError as e:
            raise self._write_error(step, e) from None
        self._health[step] = healthy
        self._rotate()

    def _write_manifest(self, step: int, healthy: bool) -> None:
        root = self.step_dir(step)
        files = [f for f in fileio.list_files(root) if f != MANIFEST and not f.startswith(MANIFEST + ".")]
        sums = _hash_files(root, files)
        if jax.process_index() == 0:
            manifest = {"version": 1, "step": step, "healthy": healthy, "algorithm": "sha256",
                        "files": {f: {"size": size, "sha256": digest} for f, (size, digest) in sums.items()}}
            fileio.write_text(fileio.join(root, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
        _barrier(f"jaxrl_manifest_{step}")  # every process sees the commit before going on

    def _rotate(self) -> None:
        if not self.keep:
            return
        steps = self.all_steps()
        keep = set(steps[-self.keep:])
        good = self.newest_healthy_step()
        if good is not None and good not in keep:
            keep.add(good)
            log.info("keeping checkpoint step %d: the newest saved before the current run of skipped updates", good)
        for s in steps:
            if s not in keep:
                self._manager.delete(s)
                self._health.pop(s, None)

    def _remove_partial(self, step: int) -> None:
        """A failed save's temporary directory (it holds the space a full disk needs back)."""
        if jax.process_index() != 0 or fileio.is_remote(self.directory):
            return
        import glob
        for path in glob.glob(fileio.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
            with contextlib.suppress(OSError):
                fileio.rmtree(path)

    def _write_error(self, step: int, e: BaseException) -> CheckpointWriteError:
        text = _describe(e)
        full = _is_disk_full(e)
        latest = [s for s in self.all_steps() if s != step]
        previous = (f"the previous checkpoint (step {latest[-1]}) is intact" if latest
                    else "no earlier checkpoint exists")
        cause = "the disk is full (no space left on device)" if full else text
        fix = "free space on that disk" if full else "fix the cause"
        err = CheckpointWriteError(f"saving checkpoint step {step} to {self.directory} failed: {cause}. The run "
                                   f"stopped; {previous}. {fix[0].upper() + fix[1:]}, then run the same "
                                   "command again to resume.")
        err.errno = errno.ENOSPC if full else getattr(e, "errno", None)
        return err

    # ------------------------------------------------------------------ verify and restore
    def _read_manifest(self, step: int) -> dict | None | str:
        """The manifest; None when there is none; a string describing why it cannot be read."""
        path = fileio.join(self.step_dir(step), MANIFEST)
        if not fileio.exists(path):
            return None
        try:
            manifest = json.loads(fileio.read_text(path))
            if not isinstance(manifest.get("files"), dict):
                raise ValueError("no 'files' entry")
            return manifest
        except (ValueError, OSError, UnicodeDecodeError) as e:
            return f"its checksum manifest {MANIFEST} is unreadable ({e})"

    def verify(self, step: int) -> bool:
        """Check every file of `step` against its manifest. True: verified; False: no manifest
        (unverifiable, logged); raises CheckpointCorruptError naming the damaged file."""
        root = self.step_dir(step)
        manifest = self._read_manifest(step)
        if manifest is None:
            log.warning("checkpoint step %d in %s has no %s (saved before checksum manifests, or killed "
                        "between orbax's commit and the manifest): restoring it unverified",
                        step, self.directory, MANIFEST)
            return False
        if isinstance(manifest, str):
            raise CheckpointCorruptError(self._damage_message(step, manifest))
        expected = manifest["files"]
        present = set(fileio.list_files(root))
        problems = [f"{f} is missing" for f in sorted(expected) if f not in present]
        listed = [f for f in sorted(expected) if f in present]
        sums = _hash_files(root, listed)
        for f in listed:
            size, digest = sums[f]
            want = expected[f]
            if size != want["size"]:
                problems.append(f"{f} has {size} bytes where {want['size']} were saved")
            elif digest != want["sha256"]:
                problems.append(f"{f} does not match its saved checksum (sha256 {digest[:12]}… instead of "
                                f"{want['sha256'][:12]}…)")
        if problems:
            more = f" (and {len(problems) - 1} more damaged file(s))" if len(problems) > 1 else ""
            raise CheckpointCorruptError(self._damage_message(step, problems[0] + more))
        return True

    def _damage_message(self, step: int, what: str) -> str:
        return f"checkpoint step {step} in {self.directory} is damaged: {what}. Nothing was restored from it."

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """`abstract_state`: the state's structure with target shardings (e.g. from jax.eval_shape
        plus `.sharding`), so every array comes back straight into its sharding. Verifies first."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            abstract_state)
        self.verify(step)
        out = self._orbax_restore(step, ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                           meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_params(self, step: int, abstract_params: Any) -> tuple[Any, dict]:
        """Only the parameters of a checkpoint (and its meta): what `eval` and `convert` need,
        without reading the optimiser state. Verifies first."""
        target = {"params": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            abstract_params)}
        restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
        try:
            self.verify(step)
            out = self._orbax_restore(step, ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
                meta=ocp.args.JsonRestore()))
        except (CheckpointCorruptError, OSError):
            # a live run may remove the step under a reader (eval / convert of a running workdir):
            # that is rotation, not damage, and "corrupt" would send the user to the fallback mode
            if not fileio.exists(self.step_dir(step)):
                raise CheckpointRotatedError(
                    f"checkpoint step {step} in {self.directory} was removed while it was being read: the run "
                    f"writing this workdir keeps its newest train.keep_checkpoints steps and rotated this one "
                    f"away after saving newer ones. Nothing is damaged.") from None
            raise
        return out["state"]["params"], out["meta"]

    def reload(self) -> None:
        """See the steps as they are on disk now (another process may have saved or rotated some)."""
        self._manager.reload()

    def _orbax_restore(self, step: int, args) -> Any:
        try:
            with orbax_errors_collected():
                return self._manager.restore(step, args=args)
        except ValueError as e:
            if "structures do not match" in str(e) or "shape" in str(e):
                raise CheckpointMismatchError(
                    f"checkpoint {self.directory}/{step} does not fit this run's model/optimiser (was the "
                    f"architecture, the HF checkpoint or the optimiser changed?); start a new --workdir or "
                    f"restore with the original config.\n{_describe(e)}") from None
            raise CheckpointCorruptError(self._unreadable_message(step, e)) from None
        except Exception as e:  # noqa: BLE001 — tensorstore/orbax failures of a damaged step
            raise CheckpointCorruptError(self._unreadable_message(step, e)) from None

    def _unreadable_message(self, step: int, e: BaseException) -> str:
        return f"checkpoint step {step} in {self.directory} could not be read: {_describe(e)}."

    def restore_latest(self, abstract_state: Any, *, on_corrupt: str = "fail") -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest checkpoint, or None when there is none.

        A damaged newest step: `on_corrupt="fail"` raises CheckpointCorruptError (one paragraph:
        the step, the file, the way out); `"fallback"` logs it, moves the step aside to
        `<step>.corrupt` (kept for inspection, ignored by orbax) and tries the next older step.
        """
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt={on_corrupt!r} is not one of {ON_CORRUPT}")
        damaged: list[str] = []
        for step in reversed(self.all_steps()):
            try:
                state, meta = self.restore(step, abstract_state)
            except CheckpointCorruptError as e:
                older = [s for s in self.all_steps() if s < step]
                if on_corrupt == "fail" or self.read_only:
                    way_out = (f"To resume from the newest intact older step (of {older}), run again with "
                               f"--config.train.on_corrupt_checkpoint=fallback (the damaged step is moved aside to "
                               f"{self.step_dir(step)}.corrupt, not deleted); or put back the damaged file from a "
                               "copy." if older else
                               "No older step exists: put back the damaged file from a copy, or start a new --workdir.")
                    raise CheckpointCorruptError(f"{e} {way_out}") from None
                moved = self.quarantine(step)
                log.error("%s Falling back to an older step (train.on_corrupt_checkpoint='fallback'); the damaged "
                          "step is kept at %s.", e, moved)
                damaged.append(f"{step} (moved to {moved})")
                continue
            if damaged:
                log.warning("resumed from step %d, the newest intact checkpoint; damaged: %s", step,
                            ", ".join(damaged))
            return step, state, meta
        if damaged:
            raise CheckpointCorruptError(f"no intact checkpoint left in {self.directory}: damaged step(s) "
                                         f"{', '.join(damaged)}. Put back the damaged files from a copy, or "
                                         "start a new --workdir.")
        return None

    def quarantine(self, step: int) -> str:
        """Move a damaged step aside (`<step>.corrupt`, `.corrupt-2`, ...): orbax ignores it, a later
        save of the same step does not collide with it, and it stays there for inspection."""
        target = self.step_dir(step) + ".corrupt"
        n = 1
        while fileio.exists(target):
            n += 1
            target = f"{self.step_dir(step)}.corrupt-{n}"
        _barrier(f"jaxrl_quarantine_name_{step}")  # every process chose the name before it is taken
        if jax.process_index() == 0:
            fileio.rename(self.step_dir(step), target)
        _barrier(f"jaxrl_quarantine_{step}")
        self._manager.reload()
        self._health.pop(step, None)
        return target

    def delete(self, step: int) -> None:
        self._manager.delete(step)
        self._health.pop(step, None)

    def close(self):
        try:
            with orbax_errors_collected():
                self._manager.close()
        except Exception as e:  # noqa: BLE001 — closing after a failed save must not hide that failure
            log.debug("closing the checkpoint manager of %s: %s", self.directory, e)


# ---------------------------------------------------------------------- helpers
def _sha256(path: str) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with fileio.open_binary(path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _hash_files(root: str, files: list[str]) -> dict[str, tuple[int, str]]:
    """{file: (size, sha256 hex)}; with several processes each hashes every n-th file and the
    results are all-gathered, so every process gets the same table (a collective)."""
    n, me = jax.process_count(), jax.process_index()
    mine = {f: _sha256(fileio.join(root, f)) for f in files[me::n]}
    if n == 1 or not files:
        return mine
    from jax.experimental import multihost_utils
    table = np.zeros((len(files), 40), np.uint8)  # 8 bytes of size, 32 of digest
    for i, f in enumerate(files):
        if f in mine:
            size, digest = mine[f]
            table[i, :8] = np.frombuffer(np.int64(size).tobytes(), np.uint8)
            table[i, 8:] = np.frombuffer(bytes.fromhex(digest), np.uint8)
    table = np.asarray(multihost_utils.process_allgather(table)).max(axis=0)  # one writer per row
    return {f: (int(np.frombuffer(table[i, :8].tobytes(), np.int64)[0]), table[i, 8:].tobytes().hex())
            for i, f in enumerate(files)}


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _causes(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _describe(e: BaseException) -> str:
    """The root cause of an orbax/tensorstore failure in one line (their messages run to pages)."""
    root = list(_causes(e))[-1]
    text = " ".join(str(root).split()) or type(root).__name__
    return text if len(text) <= 400 else text[:400] + " …"


def _is_disk_full(e: BaseException) -> bool:
    return any(getattr(c, "errno", None) == errno.ENOSPC or "No space left on device" in str(c)
               or "os_error_code='28'" in str(c) for c in _causes(e))
