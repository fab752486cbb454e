"""The RL loop: sample → reward → old-policy forward (log-probs + probe entropy) → token weights →
optimiser updates; with evaluation, metrics, checkpoints and resume.

    trainer = Trainer(config, workdir)     # claims the workdir (one writer), resumes if it holds a run
    trainer.run()                          # SIGTERM / Ctrl-C: stop at the next step boundary, save, return
    trainer.close()                        # releases the workdir

State lives here (parameters, optimiser state, step, data-iterator position); the maths lives in
`rl/` (pure functions), the compiled programs in `step_programs`, generation and scoring in
`rollout`, the demo's warm-up in `warmup`, evaluation in `evaluate`.
"""
from __future__ import annotations

import json
import logging
import time

import jax
import ml_collections
import numpy as np

from jaxrl_entropy import config as config_lib
from jaxrl_entropy.training import evaluate as eval_lib
from jaxrl_entropy.rundir import fileio, progress
from jaxrl_entropy.training import model_io, model_setup, rng, step_programs, warmup
from jaxrl_entropy import parallel
from jaxrl_entropy.rundir.checkpoint import Checkpointer
from jaxrl_entropy.data.pipeline import PromptBatcher
from jaxrl_entropy.data.truncation import encoder_truncation
from jaxrl_entropy.models.config import CheckpointError
from jaxrl_entropy.rundir.locking import claim_workdir
from jaxrl_entropy.rundir.metrics import MetricsWriter
from jaxrl_entropy.rundir.preemption import PreemptionGuard, StopRequested
from jaxrl_entropy.rl import advantages as adv_lib
from jaxrl_entropy.rl import entropy_stats
from jaxrl_entropy.rl import loss as loss_lib
from jaxrl_entropy.rl import train_step as ts
from jaxrl_entropy.rl.rewards import MathVerifier
from jaxrl_entropy.training.geometry_probe import GeometryProbe
from jaxrl_entropy.training.rollout import PolicySampler, RolloutCollector, behaviour_gap_metrics, logp_diff_metrics

log = logging.getLogger("jaxrl_entropy")


# one JSON line per resume with a changed config: {"step": the first step run with it, "changes": [...]}
CONFIG_HISTORY = "config_history.jsonl"


class TrainingDivergedError(RuntimeError):
    """Every update of `train.max_skipped_steps` consecutive steps was skipped as non-finite."""


class Trainer:
    def __init__(self, cfg: config_lib.AnyConfig, workdir: str):
        # every check that can fail does so here, before data is read or anything compiled
        # the boundary: from here on the run reads the typed, checked config (`config.Config`)
        self.cfg = cfg = config_lib.typed(config_lib.validate_for_runtime(cfg, num_devices=jax.device_count(),
                                                                          num_processes=jax.process_count()))
        self.workdir = workdir
        self._lock = claim_workdir(workdir)  # first: a second job on this workdir stops here, at once
        try:
            self._build(cfg, workdir)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: ml_collections.ConfigDict, workdir: str):
        _refuse_unfinished_conversion(workdir)  # before anything is read or compiled
        self.checkpointer = None
        self.warmup_store = warmup.WarmupStore(workdir, on_corrupt=cfg.train.on_corrupt_checkpoint)
        self.verifier = None
        self.mesh = model_setup.build_mesh(cfg.parallel)

        from jaxrl_entropy.training import data_setup  # local: keeps `import trainer` light for tests
        self.tokenizer = data_setup.tokenizer_for(cfg)
        train, evals, self.task = data_setup.datasets(cfg)
        # data.truncation, once, before anything is compiled: an over-long prompt stops the run
        # here, or is dropped / left-truncated with a warning and counted in the step-0 metrics
        self.train_records, train_report = data_setup.fit_prompts(cfg.data, self.tokenizer, train,
                                                                  data_setup.train_source(cfg.data))
        self.eval_sets, eval_reports = data_setup.fit_eval_sets(cfg, self.tokenizer, evals)
        self.data_metrics = data_setup.length_metrics(train_report, eval_reports)

        self.policy = model_setup.load_policy(cfg, self.mesh, self.tokenizer)
        self.params = self.policy.params
        self.eos_ids = model_setup.eos_ids(self.tokenizer, self.policy.arch)
        self.geometry = (GeometryProbe(cfg.train, fraction=cfg.weights.fraction, micro_batch_size=cfg.rl.micro_batch_size,
                                       seed=cfg.seed) if cfg.train.geometry_every else None)
        self.programs = step_programs.build(cfg, self.policy, step_programs.optimizer_from_config(cfg),
                                            sketch=self.geometry.sketch if self.geometry else None)
        self.opt_state = self.programs.init_opt_state(self.params)
        self.sampler = PolicySampler(self.policy, cfg, progress=cfg.train.progress)
        self.batcher = PromptBatcher(self.train_records, self.tokenizer, batch_size=cfg.rl.prompts_per_step,
                                     max_prompt_len=cfg.data.max_prompt_len, seed=cfg.seed,
                                     shuffle=cfg.data.shuffle, truncation=encoder_truncation(cfg.data.truncation))
        self.verifier = MathVerifier(timeout_s=cfg.rl.math_verify_timeout_s) if cfg.rl.math_verify else None
        self.collector = RolloutCollector(cfg, self.tokenizer, self.batcher, self.train_records, self.verifier,
                                          self.eos_ids)
        self.checkpointer = Checkpointer(fileio.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints)
        self.step = 0
        self.sft_done = cfg.train.sft_steps == 0
        self.sft_report: dict[str, float] = {}
        self._pending: dict[str, float] = {}   # the warm-up's report, for the first RL metrics line
        self._warmup_resume: warmup.WarmupProgress | None = None
        self.skipped_total = 0
        self.skipped_streak = 0  # consecutive steps in which every update was skipped
        self.preemption = PreemptionGuard()
        self._resume_or_start()

    @property
    def graphdef(self):
        return self.policy.graphdef

    # ------------------------------------------------------------------ checkpoints
    def _state(self):
        return {"params": self.params, "opt_state": self.opt_state}

    def save(self):
        meta = {"step": self.step, "data": self.batcher.get_state(), "sft_done": self.sft_done,
                "skipped_total": self.skipped_total, "skipped_streak": self.skipped_streak,
                "sft_report": self._pending}
        self.checkpointer.save(self.step, self._state(), meta, healthy=self.skipped_streak == 0)
        log.info("saved checkpoint at step %d in %s", self.step, self.checkpointer.directory)

    def _resume_or_start(self):
        found = step_programs.restore_latest(self.checkpointer, self._state(),
                                             on_corrupt=self.cfg.train.on_corrupt_checkpoint)
        record_config(self.workdir, self.cfg, None if found is None else int(found[2]["step"]))
        if found is None:
            if not self.sft_done and (stopped := self.warmup_store.restore(self.cfg, self.params)) is not None:
                self.params, self._warmup_resume = stopped
            return
        _, state, meta = found
        self.params, self.opt_state = state["params"], state["opt_state"]
        self.step = int(meta["step"])
        self.sft_done = bool(meta.get("sft_done", True))
        self.skipped_total = int(meta.get("skipped_total", 0))
        self.skipped_streak = int(meta.get("skipped_streak", 0))
        if self.step < self.cfg.train.steps:  # stopped before the first RL line carried the warm-up's report
            self._pending = dict(meta.get("sft_report") or {})
        if "data" in meta and int(meta["data"].get("batches_consumed", 0)) > 0:
            self.batcher.set_state(meta["data"])
        elif "data" in meta and meta["data"].get("seed") != self.cfg.seed:
            # A checkpoint that consumed no prompt (a warm-up's step 0) has no position to keep: a run
            # of another seed starting from it (reproduce --warmup-seed) shuffles the data its own way.
            log.info("starting the prompt stream from its beginning with seed %d (the step-0 checkpoint was "
                     "saved by a run of seed %s and consumed none of it)", self.cfg.seed, meta["data"].get("seed"))
        log.info("resumed from step %d (%s)", self.step, self.checkpointer.directory)

    # ------------------------------------------------------------------ one RL step
    def _sample(self, ids, mask, key, sp):
        return self.sampler(self.params, ids, mask, key, sp)

    def train_step(self) -> dict[str, float]:
        cfg, step, prog = self.cfg, self.step, self.programs
        t0 = time.time()
        batch, metrics = self.collector.collect(step, self._sample, should_stop=self.preemption.should_stop)
        self.sampler.release()  # the update needs the memory of the engine's weights
        t1 = time.time()
        host = ts.build_sequences(batch["prompt_ids"], batch["prompt_mask"], batch["response"], batch["lengths"])
        adv = np.asarray(adv_lib.group_advantages(batch["reward"], cfg.rl.group_size,
                                                  scale_by_std=cfg.rl.scale_adv_by_std))
        host["advantage"] = np.broadcast_to(adv[:, None], host["response_mask"].shape).astype(np.float32)
        seqs = {k: parallel.host_to_global(v, prog.batch_sharding) for k, v in host.items()}
        st = prog.rollout_stats(self.params, {k: seqs[k] for k in step_programs.ROLLOUT_KEYS})
        mask = seqs["response_mask"]
        weights, aux = prog.token_weights(mask, st["hnorm"], st["pred_entropy"],
                                          rng.step_key(cfg.seed, step, rng.WEIGHTS), step)
        metrics.update({f"entropy/{k}" if k.endswith("threshold") else f"weights/{k}": float(v)
                        for k, v in aux.items()})
        host_mask = parallel.to_host(mask)
        dyn = entropy_stats.entropy_dynamics(
            parallel.to_host(st["hnorm"]), parallel.to_host(st["pred_entropy"]),
            np.broadcast_to(np.arange(host_mask.shape[1]), host_mask.shape), host_mask,
            fraction=cfg.weights.fraction, response_len_B=np.asarray(batch["lengths"]), seed=step)
        metrics.update({k: v for k, v in dyn.items() if not k.endswith("threshold")})

        metrics.update(logp_diff_metrics(batch["logprobs"], parallel.to_host(st["old_logp"]), host["response_mask"]))
        if self.collector.sampling.top_k or self.collector.sampling.top_p < 1.0:
            metrics.update(behaviour_gap_metrics(batch["behaviour_logprobs"], batch["logprobs"], host["response_mask"]))
        data = dict(seqs, old_logp=st["old_logp"], weights=weights)
        data = {k: data[k] for k in step_programs.UPDATE_KEYS}
        if self.geometry is not None and self.geometry.due(step):
            metrics.update(self.geometry.measure(self.programs, self.params, data, st, step))

        self.params, self.opt_state, upd, skipped, n_updates = step_programs.apply_updates(
            prog, self.params, self.opt_state, data, mini_batch_rows=cfg.rl.mini_batch_prompts * cfg.rl.group_size,
            micro_batch_size=cfg.rl.micro_batch_size)
        self.skipped_total += skipped
        self.skipped_streak = self.skipped_streak + 1 if skipped == n_updates else 0
        if skipped:
            log.warning("step %d: %d update(s) skipped because the loss or gradient was not finite", step, skipped)
        metrics.update(loss_lib.step_metrics(upd))
        metrics.update({"skipped_updates": skipped, "skipped_updates/total": self.skipped_total,
                        "time/rollout_s": t1 - t0, "time/train_s": time.time() - t1})
        return metrics

    # ------------------------------------------------------------------ warm-up and evaluation
    def sft_warmup(self) -> bool:
        """The demo's supervised warm-up (see `warmup`); False when a stop request ended it early."""
        cfg = self.cfg

        def accuracy(params, i):
            key = rng.step_key(cfg.seed, rng.SFT_CHECK_OFFSET + i)
            sp = self.collector.sampling
            return warmup.sampled_accuracy(cfg, self.tokenizer, self.train_records,
                                           lambda ids, m, c: self.sampler(params, ids, m, jax.random.fold_in(key, c),
                                                                          sp), i)

        bar = progress.bar(cfg.train.sft_steps, "sft warm-up", cfg.train.progress)
        try:
            self.params, self.sft_report, stopped = warmup.sft_warmup(
                cfg, self.graphdef, self.params, task=self.task, records=self.train_records,
                tokenizer=self.tokenizer, batch_sharding=self.programs.batch_sharding, accuracy=accuracy,
                progress=bar, should_stop=self.preemption.should_stop, resume=self._warmup_resume,
                tokens=warmup.sft_tokens(cfg, self.policy.arch))
        finally:
            bar.close()
        self._warmup_resume = None
        if stopped is not None:
            self.warmup_store.save(self.params, stopped)
            return False
        self.sft_done = True
        return True

    def evaluate(self, step: int, *, progress_bar: bool = False) -> dict[str, float]:
        """mean@k / pass@k on every evaluation set (`progress_bar`: a bar over problems, for `eval`)."""
        if not self.eval_sets:
            return {}
        spec = eval_lib.spec_for(self.cfg, self.mesh)
        bar = progress.bar(eval_lib.num_problems(self.eval_sets, spec), "eval",
                           progress_bar and self.cfg.train.progress)
        try:
            return eval_lib.evaluate_policy(self.cfg, self.sampler, self.params, step, self.tokenizer, self.eval_sets,
                                            self.mesh, self.eos_ids, verifier=self.verifier, progress=bar.update,
                                            should_stop=self.preemption.should_stop)
        finally:
            bar.close()

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, float]:
        """Train to `train.steps` (warm-up first when configured). A stop request (SIGTERM, Ctrl-C;
        on any process) is honoured at the next boundary of the running phase — warm-up step,
        generation batch, evaluation batch, RL step: what there is is saved (a stopped warm-up's
        progress; the RL state at the last completed step, with the data position of that step's
        start) and `run` returns normally; running again continues exactly."""
        # history cut back to what the restored checkpoint covers (a killed run's later lines are re-run)
        writer = MetricsWriter(self.workdir, enabled=jax.process_index() == 0, resume_step=self.step)
        last: dict[str, float] = {}
        try:
            with self.preemption:
                last = self._loop(writer)
        finally:
            writer.close()
            if self.verifier is not None:
                self.verifier.close()
        return last

    def _loop(self, writer: MetricsWriter) -> dict[str, float]:
        cfg = self.cfg
        last: dict[str, float] = {}
        if not self.sft_done:
            if not self.sft_warmup():
                log.warning("stopped in the warm-up on request; its progress is saved: run the same command "
                            "again to continue it")
                return last
            self._pending = dict(self.sft_report)  # goes into the first RL metrics line
            self.save()
            self.warmup_store.drop()
        if self.step >= cfg.train.steps and not self._pending:
            log.warning("this run already reached config.train.steps=%d in %s: nothing to do (raise "
                        "--config.train.steps to continue it)", cfg.train.steps, self.workdir)
        bar = progress.bar(cfg.train.steps, "rl", cfg.train.progress, initial=self.step)
        stop = self.preemption.should_stop()
        while self.step < cfg.train.steps and not stop:
            data_state = self.batcher.get_state()
            try:
                metrics = dict(self._pending)
                if self.step == 0:
                    metrics.update(self.data_metrics)
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    metrics.update(self.evaluate(self.step))
                metrics.update(self.train_step())
            except StopRequested:
                self.batcher.set_state(data_state)  # the step is re-run from its start on resume
                stop = True
                break
            self._pending = {}
            if self.step % cfg.train.log_every == 0 or "eval/accuracy" in metrics:
                last = writer.write(self.step, metrics)
            self.step += 1
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                            **({"eval": f"{metrics['eval/accuracy']:.3f}"} if "eval/accuracy" in metrics else {}))
            self._check_skipped_streak()
            stop = self.preemption.should_stop()
            if self.step % cfg.train.checkpoint_every == 0 or stop:
                self.save()
                writer.sync()  # a remote workdir gets the metrics with every checkpoint
        bar.close()
        if not stop:
            if self._pending:  # a warm-up-only run (train.steps=0) still records its report
                last = writer.write(self.step, dict(self._pending, **(self.data_metrics if self.step == 0 else {})))
                self._pending = {}
            if cfg.eval.every and not parallel.process_0_value(writer.has_eval(self.step)):
                try:
                    last = writer.write(self.step, self.evaluate(self.step))
                except StopRequested:
                    stop = True
        if self.checkpointer.latest_step() != self.step:
            self.save()
            writer.sync()
        if stop:
            log.warning("stopped at step %d on request; the run is saved: run the same command again to continue",
                        self.step)
        return last

    def _check_skipped_streak(self):
        n, limit = self.skipped_streak, self.cfg.train.max_skipped_steps
        if not limit or n < limit:
            return
        good = self.checkpointer.newest_healthy_step()
        kept = (f"the newest checkpoint saved before them is step {good} (kept for this reason)" if good is not None
                else "no checkpoint was saved before them")
        raise TrainingDivergedError(
            f"steps {self.step - n}..{self.step - 1}: every update of {n} consecutive steps was skipped because its "
            f"loss, gradient or update was not finite, so the parameters stopped changing; stopping "
            f"(config.train.max_skipped_steps={limit}) without saving; {kept}. Look at loss and "
            f"grad_norm in metrics.jsonl for those steps (a learning rate or grad_clip that gives NaN, non-finite "
            f"rewards, damaged weights), fix the cause and run again, or raise --config.train.max_skipped_steps.")

    def close(self):
        """Close the checkpoint managers and release the workdir (idempotent)."""
        for ck in (getattr(self, "checkpointer", None), getattr(self, "warmup_store", None)):
            if ck is not None:
                ck.close()
        self.checkpointer = None
        if getattr(self, "verifier", None) is not None:
            self.verifier.close()
            self.verifier = None
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
            self._lock = None


def _refuse_unfinished_conversion(workdir: str) -> None:
    source = model_io.unfinished_conversion(workdir)
    if source is not None:
        raise CheckpointError(
            f"{workdir} holds a `convert --to_orbax` (from {source}) that never finished: it has no "
            f"weights to start from. Run `jaxrl-entropy convert --hf={source} --to_orbax={workdir}` "
            "again to finish it, or choose another --workdir")


def record_config(workdir: str, cfg: config_lib.AnyConfig, resumed_step: int | None) -> None:
    """`config.json` says what the run is: written for a new run; on a resume (`resumed_step`) with a
    changed config, rewritten, and the change appended to `config_history.jsonl` with the step it
    took effect (eval and analyze read config.json)."""
    config_path = fileio.join(workdir, "config.json")
    if resumed_step is None or not fileio.exists(config_path):  # new, or started from a copied checkpoint
        if jax.process_index() == 0:
            fileio.write_text(config_path, config_lib.to_json(cfg))
        return
    try:
        recorded = json.loads(fileio.read_text(config_path))
    except ValueError as e:
        raise config_lib.ConfigError(
            f"{config_path} is damaged ({e}): it records the run's config. Delete it and run the "
            "same command again (it is written anew from the command line's config)") from None
    changed = _diff(recorded, json.loads(config_lib.to_json(cfg)))
    if not changed:
        return
    log.warning("resuming %s at step %d with a changed config: %s (recorded in config.json and %s)",
                workdir, resumed_step, ", ".join(changed), CONFIG_HISTORY)
    if jax.process_index() == 0:
        history = fileio.join(workdir, CONFIG_HISTORY)
        previous = fileio.read_text(history) if fileio.exists(history) else ""
        fileio.write_text(history, previous + json.dumps({"step": resumed_step, "changes": changed}) + "\n")
        fileio.write_text(config_path, config_lib.to_json(cfg))


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out
