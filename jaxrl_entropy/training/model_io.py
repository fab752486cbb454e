"""Parameters in and out of runs, without building a trainer (no training data, optimiser
compilation or verifier pool): evaluate a run or a HF directory, convert orbax ⇄ HF.

    cfg, policy, step, tok = model_io.policy_from_run(None, "runs/demo")   # the run's own config.json
    metrics = model_io.evaluate_for_cli(cfg, policy, step, tok)
    model_io.checkpoint_to_hf(None, "runs/demo", "/tmp/hf")
    model_io.hf_to_checkpoint(cfg, "/ckpt/Qwen3-8B-Base", "runs/from_hf")

Reading never changes a run: its checkpoints are opened read-only and verified against their
checksum manifests. Writing never mixes old and new files: an HF export is written into a staging
directory and swapped in whole; a new orbax workdir must be new (or empty).
"""
from __future__ import annotations

import json
import logging
import os
import re

import ml_collections

from jaxrl_entropy import config as config_lib
from jaxrl_entropy.rundir import fileio
from jaxrl_entropy.training import model_setup
from jaxrl_entropy.rundir.checkpoint import CheckpointCorruptError, CheckpointRotatedError, Checkpointer
from jaxrl_entropy.training.model_setup import Policy
from jaxrl_entropy.models import qwen3

log = logging.getLogger("jaxrl_entropy")


def run_dir_of(checkpoint: str) -> str:
    """Accept a train workdir or its `checkpoints/` subdirectory (local or gs://)."""
    path = fileio.absolute(checkpoint).rstrip("/")
    if path.rsplit("/", 1)[-1] == "checkpoints":
        path = path.rsplit("/", 1)[0]
    if not fileio.exists(fileio.join(path, "checkpoints")):
        raise FileNotFoundError(f"{checkpoint}: no checkpoints/ directory; pass the workdir of a `train` run")
    return path


def config_for_run(cfg: ml_collections.ConfigDict | None, workdir: str,
                   overrides: dict | None = None) -> ml_collections.ConfigDict:
    """`cfg` when given, else the run's own `config.json` with `overrides` (dotted key -> value,
    the command line's `--config.KEY=VALUE`) applied on top and checked like any config."""
    saved = fileio.join(workdir, "config.json")
    if cfg is not None:
        return cfg
    if not fileio.exists(saved):
        raise FileNotFoundError(f"{saved} not found; pass --config for this run")
    cfg = config_lib.from_json_text(fileio.read_text(saved), source=saved)
    if overrides:
        for key, value in overrides.items():
            config_lib.set_key(cfg, key, value)
        log.info("using %s with the command line's overrides: %s", saved,
                 ", ".join(f"{k}={v!r}" for k, v in overrides.items()))
        cfg = config_lib.validate(cfg)
    return cfg


def _validated(cfg: config_lib.AnyConfig) -> config_lib.Config:
    """The typed config, once every check (the devices' included) passed."""
    import jax
    return config_lib.typed(config_lib.validate_for_runtime(cfg, num_devices=jax.device_count(),
                                                            num_processes=jax.process_count()))


def _tokenizer(cfg):
    from jaxrl_entropy.training import data_setup
    return data_setup.tokenizer_for(cfg)


# a live run that saves faster than a reader reads could rotate every step it picks
_ROTATION_RETRIES = 3


def policy_from_run(cfg: ml_collections.ConfigDict | None, checkpoint: str, *, overrides: dict | None = None):
    """(config, policy with the latest checkpoint's parameters, its step, tokenizer) of a train run."""
    workdir = run_dir_of(checkpoint)
    cfg = _validated(config_for_run(cfg, workdir, overrides))
    checkpointer = Checkpointer(fileio.join(workdir, "checkpoints"), read_only=True)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint yet")
        tokenizer = _tokenizer(cfg)
        mesh = model_setup.build_mesh(cfg.parallel)
        policy = model_setup.abstract_policy(cfg, mesh, model_setup.architecture(cfg.model, tokenizer))
        try:
            for attempt in range(_ROTATION_RETRIES + 1):
                try:
                    policy.params, _ = checkpointer.restore_params(step, policy.params)
                    break
                except CheckpointRotatedError as e:
                    checkpointer.reload()
                    newest = checkpointer.latest_step()
                    if attempt == _ROTATION_RETRIES or newest is None:
                        raise CheckpointRotatedError(f"{e} It happened {attempt + 1} times in a row; stop the run "
                                                     "or copy a step aside, then read the copy.") from None
                    log.warning("%s Reading the newest step, %d, instead.", e, newest)
                    step = newest
        except CheckpointRotatedError:
            raise
        except CheckpointCorruptError as e:
            older = [s for s in checkpointer.all_steps() if s < step]
            raise CheckpointCorruptError(
                f"{e} Older steps: {older}. Running `jaxrl-entropy train` on this workdir with "
                "--config.train.on_corrupt_checkpoint=fallback moves the damaged step aside (then eval and "
                "convert read the newest intact step); or put back the damaged file from a copy.") from None
    finally:
        checkpointer.close()
    return cfg, policy, step, tokenizer


def policy_from_hf(cfg: config_lib.AnyConfig, hf: str):
    """(config pointing at `hf`, policy with its weights, tokenizer) for a local HF directory."""
    cfg = config_lib.with_key(config_lib.with_key(config_lib.typed(cfg), "model.hf_dir", hf), "train.sft_steps", 0)
    cfg = _validated(cfg)
    tokenizer = _tokenizer(cfg)
    return cfg, model_setup.load_policy(cfg, model_setup.build_mesh(cfg.parallel), tokenizer), tokenizer


def evaluate_for_cli(cfg: ml_collections.ConfigDict, policy: Policy, step: int, tokenizer, *,
                     progress: bool = True) -> dict[str, float]:
    """mean@k / pass@k of `policy` on the config's evaluation sets (the `eval` command)."""
    from jaxrl_entropy.training import data_setup
    from jaxrl_entropy.training import evaluate as eval_lib
    from jaxrl_entropy.rundir import progress as progress_lib
    from jaxrl_entropy.rl.rewards import MathVerifier
    from jaxrl_entropy.training.rollout import PolicySampler

    eval_sets, _ = data_setup.fit_eval_sets(cfg, tokenizer, data_setup.eval_sets(cfg))
    if not eval_sets:
        return {}
    spec = eval_lib.spec_for(cfg, policy.mesh)
    bar = progress_lib.bar(eval_lib.num_problems(eval_sets, spec), "eval", progress and cfg.train.progress)
    verifier = MathVerifier(timeout_s=cfg.rl.math_verify_timeout_s) if cfg.rl.math_verify else None
    try:
        return eval_lib.evaluate_policy(cfg, PolicySampler(policy, cfg), policy.params, step, tokenizer, eval_sets,
                                        policy.mesh, model_setup.eos_ids(tokenizer, policy.arch),
                                        verifier=verifier, progress=bar.update)
    finally:
        bar.close()
        if verifier is not None:
            verifier.close()


# what an HF model directory holds (weights, index, configs, tokenizer): all `--overwrite` may remove
_HF_FILES = re.compile(r"^(config\.json|generation_config\.json|model.*\.safetensors|model\.safetensors\.index\.json|"
                       r"tokenizer.*|special_tokens_map\.json|vocab\.(json|txt)|merges\.txt|added_tokens\.json|"
                       r"chat_template\.(jinja|json))$")


def check_hf_target(out_dir: str, *, overwrite: bool, source: str = "") -> None:
    """Refuse (FileExistsError) a non-empty export directory unless `overwrite`; and, even then, one
    that holds anything an HF export does not (a run directory, other data): `--overwrite` replaces
    an old export, it does not delete arbitrary files."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise FileExistsError(f"--to_hf={out_dir} is a file, not a directory")
    entries = sorted(os.listdir(out_dir))
    if not entries:
        return
    shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
    if not overwrite:
        raise FileExistsError(
            f"--to_hf={out_dir} is not empty ({shown}): writing into it would mix the new export with old files "
            "(an old sharded export's index would still send loaders to its stale weights). Pass --overwrite to "
            "replace it (the old files are removed), or choose a new directory.")
    foreign = [e for e in entries if not _HF_FILES.match(e) or os.path.isdir(os.path.join(out_dir, e))]
    if foreign:
        raise FileExistsError(
            f"--to_hf={out_dir} holds files that are not part of an HF export ({', '.join(foreign[:6])}); "
            "--overwrite only replaces an old export: choose another directory, or remove those files yourself.")


# Written first by `convert --to_orbax` and removed as its last act: a workdir that holds it is a
# conversion that never finished (killed, disk full). `train` refuses it (it would otherwise start
# from random weights); the same `convert` command replaces it.
CONVERSION_MARKER = ".convert-incomplete"


def unfinished_conversion(workdir: str) -> str | None:
    """The HF directory an unfinished `convert --to_orbax` into `workdir` read from, or None."""
    marker = fileio.join(workdir, CONVERSION_MARKER)
    if not fileio.exists(marker):
        return None
    try:
        return json.loads(fileio.read_text(marker)).get("hf", "?")
    except ValueError:
        return "?"


def check_new_workdir(workdir: str) -> None:
    """`convert --to_orbax` starts a run: its workdir must be new or empty (two runs never mix),
    or hold an unfinished conversion, which is then started over."""
    if not fileio.exists(workdir) or not (fileio.is_remote(workdir) or os.listdir(workdir)):
        return
    source = unfinished_conversion(workdir)
    if source is None:
        raise FileExistsError(f"--to_orbax={workdir} already exists and is not empty (a run?): converting into it "
                              "would mix two runs. Choose a new directory, or delete it first.")
    log.warning("%s holds a conversion that never finished (from %s): starting it over", workdir, source)
    fileio.rmtree(workdir)


def checkpoint_to_hf(cfg: ml_collections.ConfigDict | None, checkpoint: str, out_dir: str, *, dtype=None,
                     overwrite: bool = False, should_stop=None, max_shard_bytes: int = 5 * 2**30,
                     overrides: dict | None = None) -> None:
    """The latest checkpoint of a run → a HF directory (weights, config, tokenizer).

    Written into `<out_dir>.partial` and renamed into place when complete, so `out_dir` holds
    either its old contents or the whole new export, never a mix; with `overwrite` an old export
    there is removed. `should_stop()` (a stop request, asked between weight shards) raises
    `preemption.StopRequested` and removes the partial export."""
    import jax

    check_hf_target(out_dir, overwrite=overwrite, source=checkpoint)
    cfg, policy, _, tokenizer = policy_from_run(cfg, checkpoint, overrides=overrides)
    out_dir = os.path.abspath(out_dir).rstrip("/")
    staging, replaced = f"{out_dir}.partial", f"{out_dir}.replaced"
    writer = jax.process_index() == 0
    if writer:
        for leftover in (staging, replaced):  # of an export that was killed
            fileio.rmtree(leftover)
    _barrier("jaxrl_export_start")
    try:
        qwen3.save_pretrained(policy.module(), staging, dtype=dtype, tokenizer=tokenizer, should_stop=should_stop,
                              max_shard_bytes=max_shard_bytes)
        if writer:
            with open(os.path.join(staging, "generation_config.json"), "w") as f:
                json.dump(generation_config(cfg, tokenizer, policy.arch), f, indent=2)
    except BaseException:
        if writer:
            fileio.rmtree(staging)
        raise
    if writer:
        if os.path.exists(out_dir):
            os.rename(out_dir, replaced)
            os.rename(staging, out_dir)
            fileio.rmtree(replaced)
        else:
            os.rename(staging, out_dir)
    _barrier("jaxrl_export_done")


def generation_config(cfg: ml_collections.ConfigDict, tokenizer, arch: qwen3.Qwen3Config) -> dict:
    """The export's `generation_config.json`: `transformers`' `generate` then stops where this
    library's rollouts do (every id of `model_setup.eos_ids`: Qwen's `<|im_end|>` and `<|endoftext|>`).
    The source checkpoint's file (`model.hf_dir`), when there is one, supplies the other fields
    (its sampling defaults) and keeps its eos list when that holds the same ids."""
    source = os.path.join(cfg.model.hf_dir, "generation_config.json") if cfg.model.hf_dir else ""
    out: dict = {}
    if source and os.path.isfile(source):
        try:
            with open(source) as f:
                out = json.load(f)
        except ValueError as e:
            log.warning("%s is not valid JSON (%s): the export gets a generation_config.json of its own", source, e)
    eos = list(model_setup.eos_ids(tokenizer, arch))
    given = out.get("eos_token_id")
    given = given if isinstance(given, list) else [given]
    out["eos_token_id"] = given if sorted(given) == eos else eos
    out["pad_token_id"] = tokenizer.pad_token_id
    if arch.bos_token_id is not None:
        out.setdefault("bos_token_id", arch.bos_token_id)
    out.pop("transformers_version", None)  # written by transformers itself; this file is not
    return out


def _barrier(name: str) -> None:
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def hf_to_checkpoint(cfg: ml_collections.ConfigDict, hf: str, workdir: str) -> None:
    """A HF directory → the step-0 checkpoint of a new run (sharded as the config's mesh says), with
    its config.json: `train --workdir=WORKDIR` then starts RL from these weights."""
    import jax

    from jaxrl_entropy.training import step_programs
    from jaxrl_entropy.rundir.locking import claim_workdir
    check_new_workdir(workdir)
    cfg, policy, _ = policy_from_hf(cfg, hf)
    tx = step_programs.optimizer_from_config(cfg)
    opt_state = jax.jit(tx.init, out_shardings=step_programs.policy_opt_state_shardings(tx, policy))(policy.params)
    lock = claim_workdir(workdir)
    checkpointer = Checkpointer(fileio.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints)
    marker = fileio.join(workdir, CONVERSION_MARKER)
    try:
        if jax.process_index() == 0:
            fileio.write_text(marker, json.dumps({"hf": fileio.absolute(hf)}))
            fileio.write_text(fileio.join(workdir, "config.json"), config_lib.to_json(cfg))
        checkpointer.save(0, {"params": policy.params, "opt_state": opt_state},
                          {"step": 0, "sft_done": True, "skipped_total": 0})
        _barrier("jaxrl_to_orbax_saved")
        if jax.process_index() == 0:
            fileio.remove(marker)  # the last act: the run is complete
    finally:
        checkpointer.close()
        if lock is not None:
            lock.release()
