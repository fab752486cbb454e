"""The RL loop: sample → reward → old-policy forward (log-probs + probe entropy) → token weights →
optimiser updates; with evaluation, metrics, checkpoints and resume.

    trainer = Trainer(config, workdir)
    trainer.run()

State lives here; the maths lives in `rl/` (pure functions). Every random draw of step s comes from
`fold_in(key(seed), s)`, so a resumed run repeats exactly what an uninterrupted one would do.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxrl_entropy import config as config_lib
from jaxrl_entropy import evaluate as eval_lib
from jaxrl_entropy import fileio
from jaxrl_entropy import parallel
from jaxrl_entropy.checkpoint import Checkpointer
from jaxrl_entropy.data.pipeline import PromptBatcher, encode_sft_batch
from jaxrl_entropy.metrics import MetricsWriter
from jaxrl_entropy.models import qwen3, sampler
from jaxrl_entropy.rl import advantages as adv_lib
from jaxrl_entropy.rl import diagnostics
from jaxrl_entropy.rl import entropy_stats
from jaxrl_entropy.rl import loss as loss_lib
from jaxrl_entropy.rl import train_step as ts
from jaxrl_entropy.rl.rewards import MathVerifier, overlong_penalty, score_responses
from jaxrl_entropy.rl.token_weights import SoftConfig, token_weights

log = logging.getLogger("jaxrl_entropy")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# fold_in tags that keep the random streams of one step apart
_TAG_SAMPLE, _TAG_WEIGHTS, _TAG_EVAL, _TAG_GEOMETRY = 1, 2, 3, 4


class TrainingError(RuntimeError):
    pass


def _on_process_0(flag: bool) -> bool:
    """Process 0's value of `flag` on every host (only process 0 writes metrics, and a decision
    that gates a collective such as evaluation must be the same everywhere)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def _host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as a full numpy array on every process."""
    if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class Trainer:
    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str):
        self.cfg = config_lib.validate(cfg)
        self.workdir = workdir
        fileio.makedirs(workdir)
        self.mesh = parallel.make_mesh(cfg.parallel.data, cfg.parallel.fsdp, cfg.parallel.tensor)
        self._check_batch_divisibility()

        from jaxrl_entropy import data_setup  # local: keeps `import trainer` light for tests
        self.tokenizer = data_setup.tokenizer_for(cfg)
        self.train_records, self.eval_sets, self.task = data_setup.datasets(cfg)

        self.model = self._build_model()
        self.graphdef, params = nnx.split(self.model)
        self.params_sharding = ts.param_shardings(nnx.to_pure_dict(params), self.mesh)
        self.params = jax.device_put(nnx.to_pure_dict(params), self.params_sharding)
        self.model = None  # the trainer owns params; the module object would hold a stale copy
        self.spec = ts.StepSpec(
            prompt_len=cfg.data.max_prompt_len, response_len=cfg.rollout.max_new_tokens,
            probe_layers=qwen3.resolve_probe_layers(cfg.entropy.layers, self.arch.num_hidden_layers),
            aggregation=cfg.entropy.aggregation, temperature=cfg.rollout.temperature,
            eps_low=cfg.rl.eps_low, eps_high=cfg.rl.eps_high, clip_c=cfg.rl.clip_c,
            kl_coef=cfg.rl.kl_coef, entropy_coef=cfg.rl.entropy_coef)
        self.tx = ts.make_optimizer(cfg.optim.lr, b1=cfg.optim.b1, b2=cfg.optim.b2,
                                    weight_decay=cfg.optim.weight_decay,
                                    warmup_steps=cfg.optim.warmup_steps, grad_clip=cfg.optim.grad_clip)
        self.opt_sharding = ts.opt_state_shardings(jax.eval_shape(self.tx.init, self.params),
                                                   self.params_sharding, self.mesh)
        self.opt_state = jax.jit(self.tx.init, out_shardings=self.opt_sharding)(self.params)
        self.eos_ids = self._eos_ids()
        self.batcher = PromptBatcher(self.train_records, self.tokenizer, batch_size=cfg.rl.prompts_per_step,
                                     max_prompt_len=cfg.data.max_prompt_len, seed=cfg.seed,
                                     shuffle=cfg.data.shuffle)
        self.checkpointer = Checkpointer(fileio.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints)
        self.verifier = MathVerifier(timeout_s=cfg.rl.math_verify_timeout_s) if cfg.rl.math_verify else None
        self.geometry = diagnostics.GeometryTracker() if cfg.train.geometry_every else None
        self.step = 0
        self.sft_done = cfg.train.sft_steps == 0
        self.skipped_total = 0
        self._stop_signal = None
        self._compile()
        self._resume_or_start()

    # ------------------------------------------------------------------ set-up
    def _check_batch_divisibility(self):
        cfg, d = self.cfg, parallel.batch_divisor(self.mesh)
        if cfg.rl.micro_batch_size % d:
            raise config_lib.ConfigError(
                f"config.rl.micro_batch_size={cfg.rl.micro_batch_size} must be a multiple of the data-parallel "
                f"size {d} (mesh data × fsdp = {dict(self.mesh.shape)})")
        if (cfg.rl.prompts_per_step * cfg.rl.group_size) % cfg.rl.micro_batch_size:
            raise config_lib.ConfigError("rl.prompts_per_step × rl.group_size must be a multiple of "
                                         "rl.micro_batch_size")

    def _build_model(self) -> qwen3.Qwen3:
        cfg = self.cfg
        options = dict(attention=cfg.model.attention, probe_attention=cfg.model.probe_attention,
                       kernel_backend=cfg.model.kernel_backend or None, remat=cfg.model.remat,
                       logits_chunk=cfg.model.logits_chunk,
                       kernel_mesh=self.mesh)  # read only by the kernel paths (any name of them)
        dtype, pdtype = _DTYPES[cfg.model.dtype], _DTYPES[cfg.model.param_dtype]
        if cfg.model.hf_dir:
            model = qwen3.from_pretrained(cfg.model.hf_dir, dtype=dtype, param_dtype=pdtype, mesh=self.mesh,
                                          **options)
            if model.config.vocab_size < len(self.tokenizer):
                raise config_lib.ConfigError(
                    f"tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is "
                    f"{model.config.vocab_size}; use the tokenizer that came with {cfg.model.hf_dir}")
        else:
            a = cfg.model.arch
            vocab = int(math.ceil(len(self.tokenizer) / 128) * 128)  # padded like Qwen3's vocabulary
            arch = qwen3.Qwen3Config(
                vocab_size=vocab, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                num_hidden_layers=a.num_hidden_layers, num_attention_heads=a.num_attention_heads,
                num_key_value_heads=a.num_key_value_heads, head_dim=a.head_dim, rope_theta=a.rope_theta,
                tie_word_embeddings=a.tie_word_embeddings, rms_norm_eps=a.rms_norm_eps,
                eos_token_id=self.tokenizer.eos_token_id)
            model = qwen3.init_random(arch, qwen3.RuntimeOptions(dtype=dtype, param_dtype=pdtype, **options),
                                      seed=cfg.seed)
        self.arch = model.config
        return model

    def _eos_ids(self) -> tuple[int, ...]:
        ids = set(sampler.as_tuple(self.tokenizer.eos_token_id))
        ids |= set(sampler.as_tuple(self.arch.eos_token_id))
        for tok in ("<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid >= 0 and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return tuple(sorted(ids))

    def _compile(self):
        spec, cfg = self.spec, self.cfg
        batch_sh = parallel.batch_sharding(self.mesh, 2)
        self._batch_sh = batch_sh
        chunk = cfg.rl.micro_batch_size
        self._rollout_stats = jax.jit(
            lambda p, b: ts.rollout_stats(self.graphdef, p, b, spec, chunk),
            in_shardings=(self.params_sharding, batch_sh), out_shardings=batch_sh)
        opt_sh = self.opt_sharding
        micro_sh = self._micro_sh = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(
            None, parallel.LOGICAL_RULES["batch"]))
        donate = (0, 1) if jax.default_backend() != "cpu" else ()
        self._update = jax.jit(
            lambda p, o, mb: ts.update(self.graphdef, p, o, mb, spec, self.tx, cfg.weights.normalization),
            in_shardings=(self.params_sharding, opt_sh, micro_sh),
            out_shardings=(self.params_sharding, opt_sh, None), donate_argnums=donate)
        soft = SoftConfig(**cfg.weights.soft.to_dict())
        mode, fraction = cfg.weights.mode, cfg.weights.fraction
        if self.geometry is not None:
            graphdef = self.graphdef

            def geometry(params, part, subsets):
                mask = part["response_mask"]
                tok = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)

                def loss_fn(p, w):  # selected-token normalisation: each subset by its own Σw
                    denom = jnp.maximum(jnp.sum(jnp.where(mask, w, 0.0)), 1e-6)
                    return ts.minibatch_loss(graphdef, p, dict(part, weights=w), spec, denom, tok)[0]

                metrics, sketches = diagnostics.geometry_and_sketches(loss_fn, params, subsets, method="loop",
                                                                      sketch=self.geometry.sketch)

                def per_token(p):  # each token's own clipped loss, for its alignment with the update
                    logp, _, _ = ts.policy_forward(nnx.merge(graphdef, p), part, spec, probe=False)
                    loss, _ = loss_lib.ppo_token_loss(logp, part["old_logp"], part["advantage"],
                                                      eps_low=spec.eps_low, eps_high=spec.eps_high,
                                                      clip_c=spec.clip_c)
                    return jnp.where(mask, loss, 0.0)

                # <∇L_t, ∇L_full>/|∇L_full| (= the same for the descent directions): positive when
                # the token's own update points along the full-token update
                g_full = jax.grad(loss_fn)(params, subsets["full"])
                align = diagnostics.token_projections(per_token, params, g_full)
                return metrics, sketches, align

            self._geometry_fn = jax.jit(geometry)
        self._weights = jax.jit(lambda mask, h, pred, rng, step: token_weights(
            mode, mask_BxT=mask, attn_entropy_BxT=h, pred_entropy_BxT=pred, fraction=fraction, rng=rng,
            step=step, soft=soft))

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
        self.batcher.set_state(meta["data"])
        log.info("resumed from step %d (%s)", self.step, self.checkpointer.directory)

    # ------------------------------------------------------------------ rollouts
    def sample(self, ids, mask, rng, params: sampler.SamplingParams):
        ids = parallel.host_to_global(np.asarray(ids, np.int32), self._batch_sh)
        mask = parallel.host_to_global(np.asarray(mask, np.int32), self._batch_sh)
        model = nnx.merge(self.graphdef, self.params)
        return sampler.generate(model, ids, mask, rng, params, state=self.params)

    def _rollout_params(self) -> sampler.SamplingParams:
        r = self.cfg.rollout
        return sampler.SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                      top_k=r.top_k, eos_ids=self.eos_ids, pad_id=self.tokenizer.pad_token_id)

    def generate_and_score(self, step: int, gen_index: int) -> dict[str, Any]:
        """One generation batch: prompts_per_step prompts × G responses, decoded and rewarded."""
        cfg, G = self.cfg, self.cfg.rl.group_size
        batch = next(self.batcher)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            batch = {k: (np.asarray(multihost_utils.process_allgather(v, tiled=True))
                         if isinstance(v, np.ndarray) else v) for k, v in batch.items()}
            batch["ground_truth"] = [self.train_records[i]["reward_model"]["ground_truth"]
                                     for i in batch["record_index"]]
        ids = np.repeat(batch["input_ids"], G, axis=0)
        mask = np.repeat(batch["attention_mask"], G, axis=0)
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), step),
                                                    _TAG_SAMPLE), gen_index)
        out = self.sample(ids, mask, rng, self._rollout_params())
        tokens, lengths = _host(out.tokens), _host(out.lengths)
        texts = eval_lib.decode_responses(self.tokenizer, tokens, lengths)
        truths = [t for t in batch["ground_truth"] for _ in range(G)]
        results = score_responses(texts, truths, verifier=self.verifier, correct_score=cfg.rl.correct_score,
                                  incorrect_score=cfg.rl.incorrect_score)
        score = np.array([r.score for r in results], np.float32)
        reward = score
        if cfg.rl.overlong_buffer:
            reward = score + overlong_penalty(lengths, max_len=cfg.rollout.max_new_tokens,
                                              buffer_len=cfg.rl.overlong_buffer, factor=cfg.rl.overlong_factor)
        return {"prompt_ids": ids, "prompt_mask": mask, "response": tokens, "lengths": lengths,
                "reward": reward.astype(np.float32), "correct": np.array([r.correct for r in results]),
                "finished": _host(out.finished)}

    def collect(self, step: int) -> tuple[dict[str, Any], dict[str, float]]:
        """A full rollout batch (dynamic sampling keeps only groups with reward variance)."""
        cfg = self.cfg
        seen: list[dict] = []
        if not cfg.rl.dynamic_sampling:
            batch = self.generate_and_score(step, 0)
            seen.append(batch)
            extra = {}
        else:
            acc = adv_lib.GroupAccumulator(cfg.rl.prompts_per_step, cfg.rl.group_size, cfg.rl.max_gen_batches,
                                           metric_key="correct")
            gen = 0
            while not acc.full:
                b = self.generate_and_score(step, gen)
                seen.append(b)
                acc.add(b)
                gen += 1
            batch = acc.take()
            extra = {"sampling/gen_batches": acc.last_stats["gen_batches"],
                     "sampling/kept_group_frac": acc.last_stats["groups_kept"] / acc.last_stats["groups_seen"]}
        allr = np.concatenate([b["reward"] for b in seen])
        allc = np.concatenate([b["correct"] for b in seen])
        alll = np.concatenate([b["lengths"] for b in seen])
        allf = np.concatenate([b["finished"] for b in seen])
        metrics = {"reward/mean": float(allr.mean()), "accuracy": float(allc.mean()),
                   "response_len/mean": float(alll.mean()), "response_len/max": int(alll.max()),
                   "response_len/clip_frac": float(1.0 - allf.mean()),
                   "reward/batch_mean": float(batch["reward"].mean()), **extra}
        return batch, metrics

    # ------------------------------------------------------------------ one RL step
    def train_step(self) -> dict[str, float]:
        cfg, step = self.cfg, self.step
        t0 = time.time()
        batch, metrics = self.collect(step)
        t1 = time.time()
        host = ts.build_sequences(batch["prompt_ids"], batch["prompt_mask"], batch["response"], batch["lengths"])
        adv = np.asarray(adv_lib.group_advantages(batch["reward"], cfg.rl.group_size,
                                                  scale_by_std=cfg.rl.scale_adv_by_std))
        host["advantage"] = np.broadcast_to(adv[:, None], host["response_mask"].shape).astype(np.float32)
        seqs = {k: parallel.host_to_global(v, self._batch_sh) for k, v in host.items()}
        st = self._rollout_stats(self.params, {k: seqs[k] for k in ("input_ids", "attention_mask", "response")})
        step_key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        mask = seqs["response_mask"]
        weights, aux = self._weights(mask, st["hnorm"], st["pred_entropy"],
                                     jax.random.fold_in(step_key, _TAG_WEIGHTS), step)
        metrics.update({f"entropy/{k}" if k.endswith("threshold") else f"weights/{k}": float(v)
                        for k, v in aux.items()})
        host_mask = _host(mask)
        dyn = entropy_stats.entropy_dynamics(
            _host(st["hnorm"]), _host(st["pred_entropy"]),
            np.broadcast_to(np.arange(host_mask.shape[1]), host_mask.shape), host_mask,
            fraction=cfg.weights.fraction, response_len_B=_host(batch["lengths"]), seed=step)
        metrics.update({k: v for k, v in dyn.items() if not k.endswith("threshold")})

        data = {"input_ids": seqs["input_ids"], "attention_mask": seqs["attention_mask"],
                "response": seqs["response"], "response_mask": mask, "old_logp": st["old_logp"],
                "advantage": seqs["advantage"], "weights": weights}
        if cfg.train.geometry_every and step % cfg.train.geometry_every == 0:
            metrics.update(self._geometry(data, st, step_key))

        M = mask.shape[0]
        mb = cfg.rl.mini_batch_prompts * cfg.rl.group_size
        micro = cfg.rl.micro_batch_size
        upd_metrics = []
        for u in range(M // mb):
            part = jax.tree.map(lambda x: x[u * mb:(u + 1) * mb].reshape(mb // micro, micro, *x.shape[1:]), data)
            part = jax.device_put(part, self._micro_sh)  # micro-batch rows over data × fsdp
            self.params, self.opt_state, m = self._update(self.params, self.opt_state, part)
            upd_metrics.append(m)
        upd = {k: float(np.mean([_host(m[k]) for m in upd_metrics])) for k in upd_metrics[0]}
        skipped = int(sum(int(_host(m["skipped"])) for m in upd_metrics))
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

    def _geometry(self, data, st, step_key) -> dict[str, float]:
        """Gradient of each token subset (anchor, explorer, random of the same size, full) vs the
        full-token gradient, on the step's first micro-batch (bounded memory at any scale)."""
        cfg = self.cfg
        n = cfg.rl.micro_batch_size
        part = jax.tree.map(lambda x: x[:n], data)
        subsets = diagnostics.geometry_subsets(part["response_mask"], st["hnorm"][:n],
                                               fraction=cfg.weights.fraction,
                                               rng=jax.random.fold_in(step_key, _TAG_GEOMETRY))
        metrics, sketches, align = self._geometry_fn(self.params, part, subsets)
        out = {f"geometry/{k}": float(v) for k, v in self.geometry.update(metrics, sketches).items()}
        out.update(self._controls(_host(align), _host(st["hnorm"][:n]), _host(st["pred_entropy"][:n]),
                                  _host(part["response_mask"])))
        return out

    def _controls(self, align, hnorm, pred, mask) -> dict[str, float]:
        """Is a token's gradient alignment with the full update explained by its attention entropy,
        beyond position, predictive entropy and response length? Partial correlations, and
        anchors vs explorers matched on position and predictive-entropy bins."""
        from jaxrl_entropy import stats
        position = np.broadcast_to(np.arange(mask.shape[1]), mask.shape)
        length = np.broadcast_to(mask.sum(1, keepdims=True), mask.shape)
        out = entropy_stats.control_correlations(hnorm, align, position, pred, length, mask=mask,
                                                 prefix="controls/align_")
        valid = mask.astype(bool)
        h, a = hnorm[valid], align[valid]
        strata = np.stack([position[valid], pred[valid]], axis=1)
        fraction = min(self.cfg.weights.fraction, 0.5)
        try:
            low, high = stats.matched_subsets(h, strata, fraction, bins=4, seed=self.step)
        except ValueError:
            return out
        if len(low) and len(high):
            out["controls/matched_anchor_align"] = float(np.mean(a[low]))
            out["controls/matched_explorer_align"] = float(np.mean(a[high]))
            out["controls/matched_n"] = int(len(low))
        return out

    # ------------------------------------------------------------------ supervised warm-up (demo)
    def sft_warmup(self):
        """Teach the random-init demo model the answer format on reference solutions (reported
        as such): RL needs some correct samples to start from."""
        cfg = self.cfg
        if self.task is None:
            raise config_lib.ConfigError("config.train.sft_steps > 0 needs the synthetic task (it has reference "
                                         "solutions); set train.sft_steps=0 for data.kind='files'")
        tx = optax.adamw(cfg.train.sft_lr, weight_decay=0.0)
        opt = jax.jit(tx.init)(self.params)
        graphdef, P, N = self.graphdef, cfg.data.max_prompt_len, cfg.rollout.max_new_tokens

        def loss_fn(p, b):
            model = nnx.merge(graphdef, p)
            out = model(b["input_ids"], attention_mask=b["attention_mask"], return_logits=False)
            logp, _ = model.token_logprobs(out.hidden[:, :-1], b["input_ids"][:, 1:])
            m = b["loss_mask"][:, 1:].astype(jnp.float32)
            return -jnp.sum(logp * m) / jnp.maximum(jnp.sum(m), 1.0)

        @jax.jit
        def step_fn(p, o, b):
            loss, g = jax.value_and_grad(loss_fn)(p, b)
            upd, o = tx.update(g, o, p)
            return optax.apply_updates(p, upd), o, loss

        rng = np.random.default_rng(cfg.seed)
        records = self.train_records
        target = cfg.train.sft_target_accuracy
        bar = _progress(cfg.train.sft_steps, "sft warm-up", cfg.train.progress)
        self.sft_report = {"sft/steps": 0, "sft/accuracy": float("nan")}
        for i in range(cfg.train.sft_steps):
            if target and i and i % cfg.train.sft_check_every == 0:
                acc = self._sft_accuracy(i)
                self.sft_report = {"sft/steps": i, "sft/accuracy": acc}
                log.info("sft warm-up step %d: sampled accuracy on training prompts %.3f (target %.2f)",
                         i, acc, target)
                if acc >= target:
                    break
            idx = rng.integers(0, len(records), cfg.train.sft_batch_size)
            recs = [records[j] for j in idx]
            enc = encode_sft_batch(self.tokenizer, [r["prompt"] for r in recs],
                                   [self.task.reference_solution(r) for r in recs], max_prompt_len=P,
                                   max_response_len=N)
            enc = {k: parallel.host_to_global(v, self._batch_sh) for k, v in enc.items()}
            self.params, opt, loss = step_fn(self.params, opt, enc)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}")
            self.sft_report["sft/steps"] = i + 1
        bar.close()
        self.sft_done = True

    def _sft_accuracy(self, i: int) -> float:
        """Sampled accuracy (rollout temperature) on 64 training prompts × 2: the warm-up's stop
        rule looks at training data only, never at the held-out split."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, i])
        recs = [self.train_records[j] for j in rng.choice(len(self.train_records), 64, replace=False)]
        spec = eval_lib.EvalSpec(k=2, batch_prompts=64, max_prompt_len=cfg.data.max_prompt_len)
        key = jax.random.fold_in(jax.random.key(cfg.seed), 10_000_000 + i)
        res = eval_lib.evaluate_benchmark(
            lambda ids, m, c: self.sample(ids, m, jax.random.fold_in(key, c), self._rollout_params()),
            self.tokenizer, recs, spec)
        return float(res["mean@2"])

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, step: int, *, progress: bool = False) -> dict[str, float]:
        """mean@k / pass@k on every evaluation set (`progress`: a bar over problems, for `eval`)."""
        cfg = self.cfg
        if not self.eval_sets:
            return {}
        e = cfg.eval
        params = sampler.SamplingParams(max_new_tokens=e.max_new_tokens or cfg.rollout.max_new_tokens,
                                        temperature=e.temperature, top_p=e.top_p, eos_ids=self.eos_ids,
                                        pad_id=self.tokenizer.pad_token_id)
        base = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), step), _TAG_EVAL)
        # rows per sampling call ≈ a rollout batch, and a multiple of the data-parallel size
        d = parallel.batch_divisor(self.mesh)
        unit = d // math.gcd(d, e.k)
        batch = max(1, cfg.rl.prompts_per_step * cfg.rl.group_size // e.k)
        batch = -(-batch // unit) * unit
        spec = eval_lib.EvalSpec(k=e.k, batch_prompts=batch, max_problems=e.max_problems,
                                 max_prompt_len=cfg.data.max_prompt_len)
        total = sum(min(len(r), e.max_problems or len(r)) for r in self.eval_sets.values())
        bar = _progress(total, "eval", progress and cfg.train.progress)
        try:
            return eval_lib.evaluate(lambda ids, m, i: self.sample(ids, m, jax.random.fold_in(base, i), params),
                                     self.tokenizer, self.eval_sets, spec, verifier=self.verifier,
                                     progress=bar.update)
        finally:
            bar.close()

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, frame):
        log.warning("received signal %d: finishing the current step, saving, then stopping", signum)
        self._stop_signal = signum

    def run(self) -> dict[str, float]:
        cfg = self.cfg
        writer = MetricsWriter(self.workdir, enabled=jax.process_index() == 0)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        last: dict[str, float] = {}
        try:
            sft_metrics = {}
            if not self.sft_done:
                self.sft_warmup()
                self.save()
                sft_metrics = dict(self.sft_report)
            if self.step >= cfg.train.steps and not sft_metrics:
                log.warning("this run already reached config.train.steps=%d in %s: nothing to do (raise "
                            "--config.train.steps to continue it)", cfg.train.steps, self.workdir)
            bar = _progress(cfg.train.steps, "rl", cfg.train.progress, initial=self.step)
            while self.step < cfg.train.steps and self._stop_signal is None:
                metrics, sft_metrics = dict(sft_metrics), {}
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    metrics.update(self.evaluate(self.step))
                metrics.update(self.train_step())
                if self.step % cfg.train.log_every == 0 or "eval/accuracy" in metrics:
                    last = writer.write(self.step, metrics)
                self.step += 1
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                                **({"eval": f"{metrics['eval/accuracy']:.3f}"} if "eval/accuracy" in metrics else {}))
                if self.step % cfg.train.checkpoint_every == 0 or self._stop_signal is not None:
                    self.save()
                    writer.sync()  # a remote workdir gets the metrics with every checkpoint
            bar.close()
            if sft_metrics:  # a warm-up-only run (train.steps=0) still records its report
                last = writer.write(self.step, sft_metrics)
            if self._stop_signal is None and self.step >= cfg.train.steps:
                if cfg.eval.every and not _on_process_0(writer.has_eval(self.step)):
                    final = self.evaluate(self.step)
                    last = writer.write(self.step, final)
                if self.checkpointer.latest_step() != self.step:
                    self.save()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            writer.close()
            if self.verifier is not None:
                self.verifier.close()
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


class _NullBar:
    def update(self, n=1): pass
    def set_postfix(self, **kw): pass
    def close(self): pass


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
    if not enabled or jax.process_index() != 0:
        return _NullBar()
    from tqdm.auto import tqdm
    # In a log file (not a terminal) redraw rarely, so the log stays readable.
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)
