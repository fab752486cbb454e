"""Parameters in and out of runs, without building a trainer (no training data, optimiser
compilation or verifier pool): evaluate a run or a HF directory, convert orbax ⇄ HF.

    cfg, policy, step = model_io.policy_from_run(None, "runs/demo")   # the run's own config.json
    metrics = model_io.evaluate(cfg, policy, step)
    model_io.checkpoint_to_hf(None, "runs/demo", "/tmp/hf")
    model_io.hf_to_checkpoint(cfg, "/ckpt/Qwen3-8B-Base", "runs/from_hf")
"""
from __future__ import annotations

import ml_collections

from jaxrl_entropy import config as config_lib
from jaxrl_entropy import fileio, model_setup
from jaxrl_entropy.checkpoint import Checkpointer
from jaxrl_entropy.model_setup import Policy
from jaxrl_entropy.models import qwen3


def run_dir_of(checkpoint: str) -> str:
    """Accept a train workdir or its `checkpoints/` subdirectory (local or gs://)."""
    path = fileio.absolute(checkpoint).rstrip("/")
    if path.rsplit("/", 1)[-1] == "checkpoints":
        path = path.rsplit("/", 1)[0]
    if not fileio.exists(fileio.join(path, "checkpoints")):
        raise FileNotFoundError(f"{checkpoint}: no checkpoints/ directory; pass the workdir of a `train` run")
    return path


def config_for_run(cfg: ml_collections.ConfigDict | None, workdir: str) -> ml_collections.ConfigDict:
    """`cfg` when given, else the run's own `config.json`."""
    saved = fileio.join(workdir, "config.json")
    if cfg is None:
        if not fileio.exists(saved):
            raise FileNotFoundError(f"{saved} not found; pass --config for this run")
        return config_lib.from_json_text(fileio.read_text(saved), source=saved)
    return cfg


def _tokenizer(cfg):
    from jaxrl_entropy import data_setup
    return data_setup.tokenizer_for(cfg)


def policy_from_run(cfg: ml_collections.ConfigDict | None, checkpoint: str):
    """(config, policy with the latest checkpoint's parameters, its step, tokenizer) of a train run."""
    workdir = run_dir_of(checkpoint)
    cfg = config_lib.validate(config_for_run(cfg, workdir))
    checkpointer = Checkpointer(fileio.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint yet")
        tokenizer = _tokenizer(cfg)
        mesh = model_setup.build_mesh(cfg)
        policy = model_setup.abstract_policy(cfg, mesh, model_setup.architecture(cfg, tokenizer))
        policy.params, _ = checkpointer.restore_params(step, policy.params)
    finally:
        checkpointer.close()
    return cfg, policy, step, tokenizer


def policy_from_hf(cfg: ml_collections.ConfigDict, hf: str):
    """(config pointing at `hf`, policy with its weights, tokenizer) for a local HF directory."""
    cfg = cfg.copy_and_resolve_references()
    cfg.model.hf_dir = hf
    cfg.train.sft_steps = 0
    cfg = config_lib.validate(cfg)
    tokenizer = _tokenizer(cfg)
    return cfg, model_setup.load_policy(cfg, model_setup.build_mesh(cfg), tokenizer), tokenizer


def evaluate(cfg: ml_collections.ConfigDict, policy: Policy, step: int, tokenizer, *,
             progress: bool = True) -> dict[str, float]:
    """mean@k / pass@k of `policy` on the config's evaluation sets (the `eval` command)."""
    from jaxrl_entropy import data_setup
    from jaxrl_entropy import evaluate as eval_lib
    from jaxrl_entropy import progress as progress_lib
    from jaxrl_entropy.rl.rewards import MathVerifier
    from jaxrl_entropy.rollout import PolicySampler

    eval_sets = data_setup.eval_sets(cfg)
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


def checkpoint_to_hf(cfg: ml_collections.ConfigDict | None, checkpoint: str, out_dir: str, *, dtype=None) -> None:
    """The latest checkpoint of a run → a HF directory (weights, config, tokenizer)."""
    _, policy, _, tokenizer = policy_from_run(cfg, checkpoint)
    qwen3.save_pretrained(policy.module(), out_dir, dtype=dtype, tokenizer=tokenizer)


def hf_to_checkpoint(cfg: ml_collections.ConfigDict, hf: str, workdir: str) -> None:
    """A HF directory → the step-0 checkpoint of a new run (sharded as the config's mesh says), with
    its config.json: `train --workdir=WORKDIR` then starts RL from these weights."""
    import jax

    from jaxrl_entropy import step_programs
    cfg, policy, _ = policy_from_hf(cfg, hf)
    tx = step_programs.make_optimizer(cfg)
    opt_state = jax.jit(tx.init, out_shardings=step_programs.opt_state_shardings(tx, policy))(policy.params)
    fileio.makedirs(workdir)
    fileio.write_text(fileio.join(workdir, "config.json"), config_lib.to_json(cfg))
    checkpointer = Checkpointer(fileio.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints)
    try:
        checkpointer.save(0, {"params": policy.params, "opt_state": opt_state},
                          {"step": 0, "sft_done": True, "skipped_total": 0})
    finally:
        checkpointer.close()
