"""The jitted pieces of one RL step, as pure functions of (params, batch).

Layout of a rollout batch of M sequences: the prompt, left-padded to P, then the response,
right-padded to N: `input_ids [M, P + N]`. Response token r (index P + r) is produced by the
hidden state at index P + r − 1, so that row's log-prob, predictive entropy and *attention
entropy* belong to token r: the attention row that decided the token, over the keys it could see
(the prompt and the response tokens before r).

    stats  = rollout_stats(graphdef, params, batch, spec)        # old log-probs + Hnorm, one forward
    params, opt_state, metrics = update(graphdef, params, opt_state, minibatch, spec, tx)
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import kernels
from jaxrl_entropy.rl import diagnostics
from jaxrl_entropy.rl import loss as loss_lib
from jaxrl_entropy.rl.token_weights import normalized_entropy


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static settings of the jitted step (hashable: part of the compilation key)."""
    prompt_len: int
    response_len: int
    probe_layers: tuple[int, ...]
    aggregation: str = "head_mixture"
    temperature: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    clip_c: float = 10.0
    kl_coef: float = 0.0
    entropy_coef: float = 0.0


def build_sequences(prompt_ids_MxP, prompt_mask_MxP, response_MxN, lengths_M) -> dict[str, np.ndarray]:
    """Concatenate prompts and responses (host numpy); `response_mask [M, N]` marks tokens up to
    each length (EOS included)."""
    response_MxN = np.asarray(response_MxN)
    N = response_MxN.shape[1]
    resp_mask = np.arange(N)[None, :] < np.asarray(lengths_M)[:, None]
    return {
        "input_ids": np.concatenate([np.asarray(prompt_ids_MxP), response_MxN], axis=1).astype(np.int32),
        "attention_mask": np.concatenate([np.asarray(prompt_mask_MxP).astype(bool), resp_mask],
                                         axis=1).astype(np.int32),
        "response": response_MxN.astype(np.int32),
        "response_mask": resp_mask,
    }


def policy_forward(model, batch: dict[str, jax.Array], spec: StepSpec, *, probe: bool):
    """log π(response) `[M, N]`, predictive entropy `[M, N]` and (probe=True) normalised attention
    entropy Hnorm `[M, N]` averaged over the probe layers."""
    P, N = spec.prompt_len, spec.response_len
    layers = spec.probe_layers if probe else ()
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], probe_layers=layers,
                mixture=spec.aggregation == "head_mixture", return_logits=False)
    rows = slice(P - 1, P + N - 1)
    logp, pred_entropy = model.token_logprobs(out.hidden[:, rows], batch["response"], temperature=spec.temperature)
    if not probe:
        return logp, pred_entropy, None
    M, T = batch["input_ids"].shape
    n_visible = kernels.visible_count(batch["attention_mask"], M, T)[:, rows]
    hnorms = []
    for layer in layers:
        if spec.aggregation == "head_mixture":
            h = out.mixture_entropy[layer][:, rows]
        else:
            h = jnp.mean(out.entropy[layer][:, rows], axis=-1)
        hnorms.append(normalized_entropy(h, n_visible))
    return logp, pred_entropy, jax.lax.stop_gradient(sum(hnorms) / len(hnorms))


def rollout_stats(graphdef, params, batch: dict[str, jax.Array], spec: StepSpec, chunk: int):
    """One forward of the old policy over the rollout, `chunk` sequences at a time: the old
    log-probs, predictive entropy and Hnorm, each `[M, N]`."""
    model = nnx.merge(graphdef, params)
    M = batch["input_ids"].shape[0]
    keys = ("input_ids", "attention_mask", "response")
    chunks = {k: batch[k].reshape(M // chunk, chunk, *batch[k].shape[1:]) for k in keys}

    def one(c):
        return policy_forward(model, c, spec, probe=True)

    logp, pred, hnorm = jax.lax.map(one, chunks)
    flat = lambda x: x.reshape(M, -1)
    return {"old_logp": flat(logp), "pred_entropy": flat(pred), "hnorm": flat(hnorm)}


def minibatch_loss(graphdef, params, micro: dict[str, jax.Array], spec: StepSpec, denom, token_denom):
    """Loss of one micro-batch, normalised by the mini-batch's global denominators."""
    model = nnx.merge(graphdef, params)
    logp, pred_entropy, _ = policy_forward(model, micro, spec, probe=False)
    return loss_lib.policy_loss(
        logp, micro["old_logp"], micro["advantage"], micro["response_mask"], micro["weights"],
        denom=denom, token_denom=token_denom, eps_low=spec.eps_low, eps_high=spec.eps_high,
        clip_c=spec.clip_c, ref_logp=micro.get("ref_logp") if spec.kl_coef else None, kl_coef=spec.kl_coef,
        pred_entropy=pred_entropy if spec.entropy_coef else None, entropy_coef=spec.entropy_coef)


def accumulate_grads(graphdef, params, minibatch: dict[str, jax.Array], spec: StepSpec, denom, token_denom):
    """Sum of micro-batch gradients (leading axis of `minibatch`) = the mini-batch gradient."""
    grad_fn = jax.grad(lambda p, m: minibatch_loss(graphdef, p, m, spec, denom, token_denom), has_aux=True)

    def body(carry, micro):
        g_acc, m_acc = carry
        g, m = grad_fn(params, micro)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, m)), None

    first = jax.tree.map(lambda x: x[0], minibatch)
    zeros_g = jax.tree.map(jnp.zeros_like, params)
    zeros_m = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, first)[1]))
    (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), minibatch)
    return grads, metrics


def update(graphdef, params, opt_state, minibatch: dict[str, jax.Array], spec: StepSpec,
           tx: optax.GradientTransformation, normalization: str):
    """One optimiser update from a mini-batch `[n_micro, micro, ...]`.

    A non-finite loss or gradient skips the update (params and optimiser state unchanged) and
    reports `skipped = 1`.
    """
    mask = minibatch["response_mask"]
    denom = loss_lib.loss_denominator(minibatch["weights"], mask, normalization)
    token_denom = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
    grads, summed = accumulate_grads(graphdef, params, minibatch, spec, denom, token_denom)
    metrics = loss_lib.finalize_metrics(summed)
    grad_norm = diagnostics.tree_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    metrics.update(grad_norm=grad_norm, skipped=(~finite).astype(jnp.int32))
    return keep(new_params, params), keep(new_opt_state, opt_state), metrics


def make_optimizer(lr: float, *, b1: float, b2: float, weight_decay: float, warmup_steps: int,
                   grad_clip: float) -> optax.GradientTransformation:
    """AdamW with linear warm-up and global-norm clipping (counted in optimiser updates)."""
    # always a schedule (never a bare float), so the optimiser-state tree, and with it every
    # checkpoint, has the same structure whatever warmup_steps is
    schedule = optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps > 0 else optax.constant_schedule(lr)
    return optax.chain(optax.clip_by_global_norm(grad_clip),
                       optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
