"""The RL loop: sample → reward → old-policy forward (log-probs + probe entropy) → token weights →
optimiser updates; with evaluation, metrics, checkpoints and resume.

    trainer = Trainer(config, workdir)
    trainer.run()

State lives here (parameters, optimiser state, step, data-iterator position); the maths lives in
`rl/` (pure functions), the compiled programs in `step_programs`, generation and scoring in
`rollout`, the demo's warm-up in `warmup`, evaluation in `evaluate`.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxrl_entropy import config as config_lib
from jaxrl_entropy import evaluate as eval_lib
from jaxrl_entropy import fileio, model_setup, parallel, progress, rng, step_programs, warmup
from jaxrl_entropy.checkpoint import Checkpointer
from jaxrl_entropy.data.pipeline import PromptBatcher
from jaxrl_entropy.metrics import MetricsWriter
from jaxrl_entropy.preemption import PreemptionGuard
from jaxrl_entropy.rl import advantages as adv_lib
from jaxrl_entropy.rl import diagnostics, entropy_stats
from jaxrl_entropy.rl import train_step as ts
from jaxrl_entropy.rl.rewards import MathVerifier
from jaxrl_entropy.rollout import PolicySampler, RolloutCollector, logp_diff_metrics

log = logging.getLogger("jaxrl_entropy")


class Trainer:
    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str):
        self.cfg = cfg = config_lib.validate(cfg)
        self.workdir = workdir
        fileio.makedirs(workdir)
        self.mesh = model_setup.build_mesh(cfg)
        self._check_batch_divisibility()

        from jaxrl_entropy import data_setup  # local: keeps `import trainer` light for tests
        self.tokenizer = data_setup.tokenizer_for(cfg)
        self.train_records, self.eval_sets, self.task = data_setup.datasets(cfg)

        self.policy = model_setup.load_policy(cfg, self.mesh, self.tokenizer)
        self.params = self.policy.params
        self.eos_ids = model_setup.eos_ids(self.tokenizer, self.policy.arch)
        self.geometry = diagnostics.GeometryTracker() if cfg.train.geometry_every else None
        self.programs = step_programs.build(cfg, self.policy, step_programs.make_optimizer(cfg),
                                            sketch=self.geometry.sketch if self.geometry else None)
        self.opt_state = self.programs.init_opt_state(self.params)
        self.sampler = PolicySampler(self.policy, cfg, progress=cfg.train.progress)
        self.batcher = PromptBatcher(self.train_records, self.tokenizer, batch_size=cfg.rl.prompts_per_step,
                                     max_prompt_len=cfg.data.max_prompt_len, seed=cfg.seed,
                                     shuffle=cfg.data.shuffle)
        self.verifier = MathVerifier(timeout_s=cfg.rl.math_verify_timeout_s) if cfg.rl.math_verify else None
        self.collector = RolloutCollector(cfg, self.tokenizer, self.batcher, self.train_records, self.verifier,
                                          self.eos_ids)
        self.checkpointer = Checkpointer(fileio.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints)
        self.step = 0
        self.sft_done = cfg.train.sft_steps == 0
        self.sft_report: dict[str, float] = {}
        self.skipped_total = 0
        self.preemption = PreemptionGuard()
        self._resume_or_start()

    @property
    def graphdef(self):
        return self.policy.graphdef

    def _check_batch_divisibility(self):
        cfg, d = self.cfg, parallel.batch_divisor(self.mesh)
        if cfg.rl.micro_batch_size % d:
            raise config_lib.ConfigError(
                f"config.rl.micro_batch_size={cfg.rl.micro_batch_size} must be a multiple of the data-parallel "
                f"size {d} (mesh data × fsdp = {dict(self.mesh.shape)})")

    # ------------------------------------------------------------------ checkpoints
    def _state(self):
        return {"params": self.params, "opt_state": self.opt_state}

    def save(self):
        meta = {"step": self.step, "data": self.batcher.get_state(), "sft_done": self.sft_done,
                "skipped_total": self.skipped_total}
        self.checkpointer.save(self.step, self._state(), meta)
        log.info("saved checkpoint at step %d in %s", self.step, self.checkpointer.directory)

    def _resume_or_start(self):
        latest = self.checkpointer.latest_step()
        config_path = fileio.join(self.workdir, "config.json")
        if latest is None or not fileio.exists(config_path):  # new run, or one started from a copied checkpoint
            if jax.process_index() == 0:
                fileio.write_text(config_path, config_lib.to_json(self.cfg))
            if latest is None:
                return
        else:
            changed = _diff(json.loads(fileio.read_text(config_path)), json.loads(config_lib.to_json(self.cfg)))
            if changed:
                log.warning("resuming %s with a changed config: %s", self.workdir, ", ".join(changed))
        state, meta = self.checkpointer.restore(latest, self._state())
        self.params, self.opt_state = state["params"], state["opt_state"]
        self.step = int(meta["step"])
        self.sft_done = bool(meta.get("sft_done", True))
        self.skipped_total = int(meta.get("skipped_total", 0))
        if "data" in meta:  # absent in a checkpoint converted from HF weights: the stream's start
            self.batcher.set_state(meta["data"])
        log.info("resumed from step %d (%s)", self.step, self.checkpointer.directory)

    # ------------------------------------------------------------------ one RL step
    def _sample(self, ids, mask, key, sp):
        return self.sampler(self.params, ids, mask, key, sp)

    def train_step(self) -> dict[str, float]:
        cfg, step, prog = self.cfg, self.step, self.programs
        t0 = time.time()
        batch, metrics = self.collector.collect(step, self._sample)
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
        data = dict(seqs, old_logp=st["old_logp"], weights=weights)
        data = {k: data[k] for k in step_programs.UPDATE_KEYS}
        if cfg.train.geometry_every and step % cfg.train.geometry_every == 0:
            metrics.update(self._geometry(data, st))

        M = mask.shape[0]
        mb = cfg.rl.mini_batch_prompts * cfg.rl.group_size
        micro = cfg.rl.micro_batch_size
        upd_metrics = []
        for u in range(M // mb):
            part = jax.tree.map(lambda x: x[u * mb:(u + 1) * mb].reshape(mb // micro, micro, *x.shape[1:]), data)
            part = jax.device_put(part, prog.micro_sharding)  # micro-batch rows over data × fsdp
            self.params, self.opt_state, m = prog.update(self.params, self.opt_state, part)
            upd_metrics.append(m)
        upd = {k: float(np.mean([parallel.to_host(m[k]) for m in upd_metrics])) for k in upd_metrics[0]}
        skipped = int(sum(int(parallel.to_host(m["skipped"])) for m in upd_metrics))
        self.skipped_total += skipped
        if skipped:
            log.warning("step %d: %d update(s) skipped because the loss or gradient was not finite", step, skipped)
        metrics.update({"loss": upd["loss"], "pg_loss": upd["pg_loss"], "grad_norm": upd["grad_norm"],
                        "clip_frac": upd["clip_low"] + upd["clip_high"], "clip_frac/low": upd["clip_low"],
                        "clip_frac/high": upd["clip_high"], "clip_frac/dual": upd["dual_clip"],
                        "approx_kl": upd["approx_kl"], "skipped_updates": skipped,
                        "skipped_updates/total": self.skipped_total,
                        "time/rollout_s": t1 - t0, "time/train_s": time.time() - t1})
        return metrics

    def _geometry(self, data, st) -> dict[str, float]:
        """Gradient of each token subset (anchor, explorer, random of the same size, full) vs the
        full-token gradient, on the step's first micro-batch (bounded memory at any scale), and the
        controls on every token's own alignment with the full update."""
        cfg, n = self.cfg, self.cfg.rl.micro_batch_size
        part = jax.tree.map(lambda x: x[:n], data)
        subsets = diagnostics.geometry_subsets(part["response_mask"], st["hnorm"][:n], fraction=cfg.weights.fraction,
                                               rng=rng.step_key(cfg.seed, self.step, rng.GEOMETRY))
        metrics, sketches, align = self.programs.geometry(self.params, part, subsets)
        out = {f"geometry/{k}": float(v) for k, v in self.geometry.update(metrics, sketches).items()}
        out.update(diagnostics.alignment_controls(
            parallel.to_host(align), parallel.to_host(st["hnorm"][:n]), parallel.to_host(st["pred_entropy"][:n]),
            parallel.to_host(part["response_mask"]), fraction=cfg.weights.fraction, seed=self.step))
        return out

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
            self.params, self.sft_report, finished = warmup.sft_warmup(
                cfg, self.graphdef, self.params, task=self.task, records=self.train_records,
                tokenizer=self.tokenizer, batch_sharding=self.programs.batch_sharding, accuracy=accuracy,
                progress=bar, should_stop=lambda: self.preemption.requested)
        finally:
            bar.close()
        self.sft_done = finished
        return finished

    def evaluate(self, step: int, *, progress_bar: bool = False) -> dict[str, float]:
        """mean@k / pass@k on every evaluation set (`progress_bar`: a bar over problems, for `eval`)."""
        if not self.eval_sets:
            return {}
        spec = eval_lib.spec_for(self.cfg, self.mesh)
        bar = progress.bar(eval_lib.num_problems(self.eval_sets, spec), "eval",
                           progress_bar and self.cfg.train.progress)
        try:
            return eval_lib.evaluate_policy(self.cfg, self.sampler, self.params, step, self.tokenizer, self.eval_sets,
                                            self.mesh, self.eos_ids, verifier=self.verifier, progress=bar.update)
        finally:
            bar.close()

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, float]:
        writer = MetricsWriter(self.workdir, enabled=jax.process_index() == 0)
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
        pending = {}  # the warm-up's report goes into the first RL metrics line
        if not self.sft_done:
            if not self.sft_warmup():
                return last
            self.save()
            pending = dict(self.sft_report)
        if self.step >= cfg.train.steps and not pending:
            log.warning("this run already reached config.train.steps=%d in %s: nothing to do (raise "
                        "--config.train.steps to continue it)", cfg.train.steps, self.workdir)
        bar = progress.bar(cfg.train.steps, "rl", cfg.train.progress, initial=self.step)
        while self.step < cfg.train.steps and not self.preemption.requested:
            metrics, pending = dict(pending), {}
            if cfg.eval.every and self.step % cfg.eval.every == 0:
                metrics.update(self.evaluate(self.step))
            metrics.update(self.train_step())
            if self.step % cfg.train.log_every == 0 or "eval/accuracy" in metrics:
                last = writer.write(self.step, metrics)
            self.step += 1
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                            **({"eval": f"{metrics['eval/accuracy']:.3f}"} if "eval/accuracy" in metrics else {}))
            if self.step % cfg.train.checkpoint_every == 0 or self.preemption.requested:
                self.save()
                writer.sync()  # a remote workdir gets the metrics with every checkpoint
        bar.close()
        if pending:  # a warm-up-only run (train.steps=0) still records its report
            last = writer.write(self.step, pending)
        if not self.preemption.requested and self.step >= cfg.train.steps:
            if cfg.eval.every and not parallel.process_0_value(writer.has_eval(self.step)):
                last = writer.write(self.step, self.evaluate(self.step))
            if self.checkpointer.latest_step() != self.step:
                self.save()
        return last

    def close(self):
        self.checkpointer.close()


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out
