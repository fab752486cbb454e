"""The supervised warm-up of the demo: cross-entropy on the synthetic task's reference solutions
until a target sampled accuracy on *training* prompts (never the held-out split) is reached.

From random weights no sampled answer is ever correct, so RL would have nothing to learn from; the
warm-up is reported as such (`sft/steps`, `sft/accuracy` in the first metrics line).

The stop rule: accuracy is estimated every `train.sft_check_every` steps, and every fifth of that
from the first estimate at half the target on; the warm-up stops when the mean of the last
two estimates reaches the target. Checking often near the target keeps the overshoot small wherever
it runs (CPU numerics differ across machines, and so does the step at which the target is met).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxrl_entropy.training import evaluate as eval_lib
from jaxrl_entropy import parallel
from jaxrl_entropy.config import ConfigError
from jaxrl_entropy.data.pipeline import encode_sft_batch, trim_padding
from jaxrl_entropy.data.truncation import encoder_truncation
from jaxrl_entropy.models.config import DTYPES
from jaxrl_entropy.rl import token_weights as tw, train_step as ts
from jaxrl_entropy.training import rng as rng_lib, step_programs
from jaxrl_entropy.rundir import fileio
from jaxrl_entropy.rundir.checkpoint import Checkpointer

log = logging.getLogger("jaxrl_entropy")

WARMUP_DIR = "warmup"  # a stopped warm-up's progress (removed once the warm-up is done)

CHECK_PROMPTS, CHECK_SAMPLES = 64, 2


@dataclasses.dataclass(frozen=True)
class SftTokens:
    """Which response tokens the warm-up's loss counts (`train.sft_weights`): a paper subset picked
    by the attention entropy of `probe_layers` (averaged, as in RL), or all of them."""
    mode: str = "full"
    fraction: float = 0.2
    probe_layers: tuple[int, ...] = ()
    aggregation: str = "head_mixture"


def sft_loss(graphdef, params, batch: dict[str, jax.Array], tokens: SftTokens = SftTokens(),
             rng: jax.Array | None = None) -> jax.Array:
    """Mean token cross-entropy of the response tokens (`loss_mask`) given the prompt; with
    `tokens.mode` other than full, the mean over the subset of them that RL's `token_weights` picks
    (by each token's attention entropy at the position that predicts it, as RL reads it; `rng` for
    random)."""
    model = nnx.merge(graphdef, params)
    layers = tokens.probe_layers if tokens.mode != "full" else ()
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], probe_layers=layers,
                mixture=tokens.aggregation == "head_mixture", return_logits=False)
    logp, _ = model.token_logprobs(out.hidden[:, :-1], batch["input_ids"][:, 1:])
    m = batch["loss_mask"][:, 1:].astype(jnp.float32)
    if layers:
        rows = slice(0, batch["input_ids"].shape[1] - 1)   # row t predicts token t + 1
        hnorm = ts.mean_response_hnorm(out, batch["attention_mask"], layers, rows, tokens.aggregation)
        w, _ = tw.token_weights(tokens.mode, mask_BxT=m > 0, attn_entropy_BxT=hnorm, fraction=tokens.fraction, rng=rng)
        m = m * w
    return -jnp.sum(logp * m) / jnp.maximum(jnp.sum(m), 1.0)


def sft_tokens(cfg: ml_collections.ConfigDict, arch) -> SftTokens:
    """The warm-up's `SftTokens` from the config, with the probe layers resolved for `arch`."""
    return SftTokens(mode=cfg.train.sft_weights, fraction=float(cfg.weights.fraction),
                     probe_layers=step_programs.probe_layers(cfg.entropy, arch),
                     aggregation=cfg.entropy.aggregation)


def check_schedule(every: int, target: float, estimates: list[float]) -> int:
    """Steps until the next accuracy check: `every`, or `every // 5` once any estimate has reached
    half the target. Half, because accuracy climbs fast near the end: the demo's warm-up went
    0.05 → 0.30 → 0.42 in two intervals, so a 75 % line let the estimate at 0.297 wait a whole
    interval and the run overshoot (held-out 0.49 at RL step 0 for a 0.40 target). Once near, it
    stays near: a noisy estimate below the line must not send the next check `every` steps away."""
    near = any(e >= 0.5 * target for e in estimates)
    return max(1, every // 5) if near else every


def reached(target: float, estimates: list[float]) -> bool:
    """The mean of the last two estimates (one if there is only one) reaches the target."""
    return bool(estimates) and float(np.mean(estimates[-2:])) >= target


@dataclasses.dataclass
class WarmupProgress:
    """Where a stopped warm-up was: with the parameters, all that continuing it exactly needs (the
    data draws of the steps done are replayed from the seed)."""
    step: int                       # warm-up steps done
    opt_state: Any                  # the warm-up optimiser's state (not the RL optimiser's)
    estimates: list[float]          # the sampled-accuracy estimates so far (the stop rule reads them)
    next_check: int
    report: dict[str, float]

    def meta(self) -> dict:
        return {"step": self.step, "estimates": list(self.estimates), "next_check": self.next_check,
                "report": dict(self.report)}

    @classmethod
    def from_meta(cls, meta: dict, opt_state) -> "WarmupProgress":
        return cls(step=int(meta["step"]), opt_state=opt_state, estimates=[float(e) for e in meta["estimates"]],
                   next_check=int(meta["next_check"]), report=dict(meta["report"]))


def optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW at `train.sft_lr`, gradients clipped to a global norm of `train.sft_grad_clip`.

    Clipping is what lets a small batch learn fast without losing steps: unclipped at lr 3e-3 the
    loss can spike (0.58 → 2.0 in one step of a 64-row run at seed 0), and at 16 rows the warm-up
    needs 760 steps to reach the demo's target, 520 clipped (docs/design-notes.md)."""
    return ts.make_optimizer(cfg.train.sft_lr, b1=0.9, b2=0.999, weight_decay=0.0, warmup_steps=0,
                             grad_clip=cfg.train.sft_grad_clip, param_dtype=DTYPES[cfg.model.param_dtype])


def init_opt_state(cfg: ml_collections.ConfigDict, params) -> Any:
    """The warm-up optimiser's initial state, sharded like the parameters (moments) and replicated
    (counts): also the target a saved one is restored into, so it must say where every leaf lives."""
    tx = optimizer(cfg)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    first = jax.tree.leaves(shardings)[0]
    if not isinstance(first, jax.sharding.NamedSharding):
        return jax.jit(tx.init)(params)
    out = parallel.opt_state_shardings(jax.eval_shape(tx.init, params), shardings, first.mesh)
    return jax.jit(tx.init, out_shardings=out)(params)


def sft_warmup(cfg: ml_collections.ConfigDict, graphdef, params, *, task, records, tokenizer,
               batch_sharding, accuracy: Callable[[Any, int], float], progress,
               should_stop: Callable[[], bool] = lambda: False,
               resume: WarmupProgress | None = None, tokens: SftTokens = SftTokens()) -> tuple[Any, dict[str, float], WarmupProgress | None]:
    """Run the warm-up from `params` (continuing `resume`, a stopped warm-up, when given).
    `accuracy(params, step)` is the sampled accuracy on training prompts; `tokens` says which
    response tokens the loss counts (`sft_tokens`); `should_stop()` is asked
    before every step (a collective on several processes). Returns (params, report {sft/steps,
    sft/accuracy}, stopped): `stopped` is None when the warm-up finished, else the progress to save
    and resume from (a stop request ended it early)."""
    if task is None:
        raise ConfigError("config.train.sft_steps > 0 needs the synthetic task (it has reference "
                          "solutions); set train.sft_steps=0 for data.kind='files'")
    t = cfg.train
    tx = optimizer(cfg)
    opt = resume.opt_state if resume is not None else init_opt_state(cfg, params)
    P, N = cfg.data.max_prompt_len, cfg.rollout.max_new_tokens

    @jax.jit
    def step_fn(p, o, b, key):
        loss, g = jax.value_and_grad(lambda p_: sft_loss(graphdef, p_, b, tokens, key))(p)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    rng = np.random.default_rng(cfg.seed)
    estimates: list[float] = []
    next_check = t.sft_check_every
    report = {"sft/steps": 0, "sft/accuracy": float("nan")}
    start = 0
    if resume is not None:
        start, next_check = resume.step, resume.next_check
        estimates, report = list(resume.estimates), dict(resume.report)
        for _ in range(start):  # the same batches as an uninterrupted warm-up from here on
            rng.integers(0, len(records), t.sft_batch_size)
        progress.update(start)
    for i in range(start, t.sft_steps):
        if should_stop():
            return params, report, WarmupProgress(i, opt, estimates, next_check, report)
        if t.sft_target_accuracy and i == next_check:
            estimates.append(accuracy(params, i))
            report = {"sft/steps": i, "sft/accuracy": estimates[-1]}
            log.info("sft warm-up step %d: sampled accuracy on training prompts %.3f (target %.2f)",
                     i, estimates[-1], t.sft_target_accuracy)
            if reached(t.sft_target_accuracy, estimates):
                break
            next_check = i + check_schedule(t.sft_check_every, t.sft_target_accuracy, estimates)
        idx = rng.integers(0, len(records), t.sft_batch_size)
        recs = [records[j] for j in idx]
        enc = trim_padding(encode_sft_batch(tokenizer, [r["prompt"] for r in recs],
                                            [task.reference_solution(r) for r in recs],
                                            max_prompt_len=P, max_response_len=N))
        enc = {k: parallel.host_to_global(v, batch_sharding) for k, v in enc.items()}
        params, opt, loss = step_fn(params, opt, enc, rng_lib.step_key(cfg.seed, rng_lib.SFT_WEIGHTS_OFFSET + i))
        progress.update(1)
        progress.set_postfix(loss=f"{float(loss):.3f}")
        report["sft/steps"] = i + 1
    return params, report, None


def sampled_accuracy(cfg: ml_collections.ConfigDict, tokenizer, records, sample, step: int) -> float:
    """Sampled accuracy (rollout temperature) on CHECK_PROMPTS training prompts × CHECK_SAMPLES.
    `sample(ids, mask, call_index)` returns the sampler's output for those rows."""
    rng = np.random.default_rng([cfg.seed, step])
    recs = [records[j] for j in rng.choice(len(records), CHECK_PROMPTS, replace=False)]
    spec = eval_lib.EvalSpec(k=CHECK_SAMPLES, batch_prompts=CHECK_PROMPTS, max_prompt_len=cfg.data.max_prompt_len,
                             truncation=encoder_truncation(cfg.data.truncation))
    res = eval_lib.score_benchmark(sample, tokenizer, recs, spec)
    return float(res[f"mean@{CHECK_SAMPLES}"])


class WarmupStore:
    """A stopped warm-up's progress in `WORKDIR/warmup/`: the parameters, the warm-up's optimiser
    state and its position, so that running the command again continues the warm-up exactly. Kept
    until the warm-up's result is saved as RL step 0 (`drop`)."""

    def __init__(self, workdir: str, *, on_corrupt: str):
        self.path = fileio.join(workdir, WARMUP_DIR)
        self.on_corrupt = on_corrupt
        self._checkpointer: Checkpointer | None = None

    def _ck(self) -> Checkpointer:
        if self._checkpointer is None:
            self._checkpointer = Checkpointer(self.path, keep=1)
        return self._checkpointer

    def restore(self, cfg: ml_collections.ConfigDict, params) -> tuple[Any, WarmupProgress] | None:
        """(parameters, progress) of a stopped warm-up, or None when there is none."""
        if not fileio.exists(self.path):
            return None
        target = {"params": params, "sft_opt_state": init_opt_state(cfg, params)}
        found = step_programs.restore_latest(self._ck(), target, on_corrupt=self.on_corrupt)
        if found is None:
            return None
        _, state, meta = found
        progress = WarmupProgress.from_meta(meta["sft"], state["sft_opt_state"])
        log.info("resuming the warm-up at its step %d (%s)", progress.step, self.path)
        return state["params"], progress

    def save(self, params, progress: WarmupProgress) -> None:
        ck = self._ck()
        if ck.latest_step() == progress.step:  # stopped again before doing a step: nothing new
            return
        ck.save(progress.step, {"params": params, "sft_opt_state": progress.opt_state}, {"sft": progress.meta()})
        log.info("saved the warm-up's progress at its step %d in %s", progress.step, self.path)

    def drop(self) -> None:
        """Once the warm-up is done and its result saved as RL step 0, its partial saves are stale."""
        self.close()
        if jax.process_index() == 0 and fileio.exists(self.path):
            fileio.rmtree(self.path)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
