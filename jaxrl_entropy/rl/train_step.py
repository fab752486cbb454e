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

from jaxrl_entropy import kernels
from jaxrl_entropy import parallel
from jaxrl_entropy.models import qwen3
from jaxrl_entropy.rl import diagnostics, master_weights
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
    return logp, pred_entropy, mean_response_hnorm(out, batch["attention_mask"], layers, rows, spec.aggregation)


def mean_response_hnorm(out, attention_mask_MxT, layers, rows: slice, aggregation: str) -> jax.Array:
    """Hnorm `[M, N]` averaged over the probe `layers` (what token weights read), without gradient."""
    hnorms = response_hnorms(out, attention_mask_MxT, layers, rows, aggregation)
    return jax.lax.stop_gradient(sum(hnorms) / len(hnorms))


def response_hnorms(out, attention_mask_MxT, layers, rows: slice, aggregation: str) -> list[jax.Array]:
    """Hnorm `[M, N]` of each probe layer in `layers` at the response positions `rows`."""
    M, T = attention_mask_MxT.shape
    n_visible = kernels.visible_count(attention_mask_MxT, M, T)[:, rows]
    hnorms = []
    for layer in layers:
        if aggregation == "head_mixture":
            h = out.mixture_entropy[layer][:, rows]
        else:
            h = jnp.mean(out.entropy[layer][:, rows], axis=-1)
        hnorms.append(normalized_entropy(h, n_visible))
    return hnorms


def layer_hnorms(model, batch: dict[str, jax.Array], spec: StepSpec, layers: tuple[int, ...]) -> jax.Array:
    """Hnorm of each of `layers` on its own, `[L, M, N]` (the geometry probe's extra splits,
    `train.geometry_layers`); their mean over L is what `policy_forward` gives with those probe layers."""
    P, N = spec.prompt_len, spec.response_len
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], probe_layers=layers,
                mixture=spec.aggregation == "head_mixture", return_logits=False)
    return jnp.stack(response_hnorms(out, batch["attention_mask"], layers, slice(P - 1, P + N - 1),
                                      spec.aggregation))


def strided_chunks(x_MxR, chunk: int, mesh=None):
    """`[M, ...]` → `[M / chunk, chunk, ...]` where chunk i holds rows i, i + M/chunk, i + 2·M/chunk, …

    Rows sharded in contiguous blocks over the data-parallel devices stay where they are: every
    chunk takes the same number of rows from every device (a contiguous split would put each
    chunk on one device and leave the others idle, or gather it)."""
    M = x_MxR.shape[0]
    out = x_MxR.reshape(chunk, M // chunk, *x_MxR.shape[1:]).swapaxes(0, 1)
    return parallel.constrain(out, (None, "batch") + (None,) * (x_MxR.ndim - 1), mesh)


def unchunk(x_CxKxR) -> jax.Array:
    """Inverse of `strided_chunks`: `[M / chunk, chunk, ...]` → `[M, ...]`."""
    n, chunk = x_CxKxR.shape[:2]
    return x_CxKxR.swapaxes(0, 1).reshape(n * chunk, *x_CxKxR.shape[2:])


def rollout_stats(graphdef, params, batch: dict[str, jax.Array], spec: StepSpec, chunk: int, mesh=None):
    """One forward of the old policy over the rollout, `chunk` sequences at a time: the old
    log-probs, predictive entropy and Hnorm, each `[M, N]`."""
    M = batch["input_ids"].shape[0]
    if M % chunk:
        raise ValueError(f"rollout_stats: {M} rows are not a multiple of the chunk {chunk} (rl.micro_batch_size)")
    keys = ("input_ids", "attention_mask", "response")
    chunks = {k: strided_chunks(batch[k], chunk, mesh) for k in keys}

    def one(c):  # the module is built inside the loop body: its parameters belong to this trace
        return policy_forward(qwen3.merge_for_compute(graphdef, params), c, spec, probe=True)

    logp, pred, hnorm = jax.lax.map(one, chunks)
    return {"old_logp": unchunk(logp), "pred_entropy": unchunk(pred), "hnorm": unchunk(hnorm)}


def minibatch_loss(graphdef, params, micro: dict[str, jax.Array], spec: StepSpec, denom, token_denom):
    """Loss of one micro-batch, normalised by the mini-batch's global denominators."""
    model = qwen3.merge_for_compute(graphdef, params)
    logp, pred_entropy, _ = policy_forward(model, micro, spec, probe=False)
    return loss_lib.policy_loss(
        logp, micro["old_logp"], micro["advantage"], micro["response_mask"], micro["weights"],
        denom=denom, token_denom=token_denom, eps_low=spec.eps_low, eps_high=spec.eps_high,
        clip_c=spec.clip_c, ref_logp=micro.get("ref_logp") if spec.kl_coef else None, kl_coef=spec.kl_coef,
        pred_entropy=pred_entropy if spec.entropy_coef else None, entropy_coef=spec.entropy_coef)


def _accumulator_dtype(dtype):
    """Gradients are summed in float32 at least (bf16 parameters give bf16 micro-batch gradients)."""
    return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else dtype


def accumulate_grads(graphdef, params, minibatch: dict[str, jax.Array], spec: StepSpec, denom, token_denom):
    """Sum of micro-batch gradients (leading axis of `minibatch`) = the mini-batch gradient, in
    float32 (at least) whatever the parameters' dtype."""
    grad_fn = jax.grad(lambda p, m: minibatch_loss(graphdef, p, m, spec, denom, token_denom), has_aux=True)
    mesh = nnx.merge(graphdef, params).options.kernel_mesh

    def body(carry, micro):
        g_acc, m_acc = carry
        g, m = grad_fn(params, micro)
        # each micro-batch's gradient lands on the parameters' shards (a reduce-scatter), never whole
        g = parallel.constrain_params(g, mesh)
        g_acc = jax.tree.map(lambda a, x: a + x.astype(a.dtype), g_acc, g)
        return (g_acc, jax.tree.map(jnp.add, m_acc, m)), None

    first = jax.tree.map(lambda x: x[0], minibatch)
    zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, _accumulator_dtype(p.dtype)), params)
    zeros_m = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, first)[1]))
    (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), minibatch)
    return grads, metrics


def update(graphdef, params, opt_state, minibatch: dict[str, jax.Array], spec: StepSpec,
           tx: optax.GradientTransformation, normalization: str):
    """One optimiser update from a mini-batch `[n_micro, micro, ...]`.

    A non-finite loss, gradient, new parameter or new optimiser state skips the update (params
    and optimiser state unchanged) and reports `skipped = 1` (see `apply_if_finite`).
    """
    mask = minibatch["response_mask"]
    denom = loss_lib.loss_denominator(minibatch["weights"], mask, normalization)
    token_denom = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
    grads, summed = accumulate_grads(graphdef, params, minibatch, spec, denom, token_denom)
    metrics = loss_lib.finalize_metrics(summed)
    grad_norm = diagnostics.tree_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    if not isinstance(opt_state, master_weights.MasterWeightsState):
        # an optimiser without a master copy steps the parameters' own dtype (its state is in it)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    params, opt_state, applied = apply_if_finite(tx, grads, opt_state, params, finite)
    metrics.update(grad_norm=grad_norm, skipped=(~applied).astype(jnp.int32))
    return params, opt_state, metrics


def tree_all_finite(tree) -> jax.Array:
    """True when every floating element of every leaf is finite (a scalar bool)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def apply_if_finite(tx: optax.GradientTransformation, grads, opt_state, params, finite: jax.Array):
    """`tx`'s step applied only when `finite` and the step's results (new parameters, new optimiser
    state) are finite: a NaN from the optimiser itself (e.g. 0/0 in clipping, a NaN learning rate)
    is caught too. Returns (params, opt_state, applied).

    The step is computed twice, never held twice: first only to check it (each leaf's finiteness
    reduces as it is produced), then inside `lax.cond`, whose other branch returns the old state
    unchanged. A `jnp.where(ok, new, old)` would hold the whole new state next to the old one.
    """

    def step(grads, opt_state, params):
        updates, new_opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state

    ok = finite & tree_all_finite(step(grads, opt_state, params))
    new_params, new_opt_state = jax.lax.cond(ok, step, lambda g, o, p: (p, o), grads, opt_state, params)
    return new_params, new_opt_state, ok


def make_optimizer(lr: float, *, b1: float, b2: float, weight_decay: float, warmup_steps: int,
                   grad_clip: float, param_dtype=jnp.float32) -> optax.GradientTransformation:
    """AdamW with linear warm-up and global-norm clipping (counted in optimiser updates).
    `param_dtype`: the parameters' storage dtype; narrower than float32 (bf16), AdamW runs on a
    float32 master copy of them with float32 moments (`master_weights`)."""
    # always a schedule (never a bare float), so the optimiser-state tree, and with it every
    # checkpoint, has the same structure whatever warmup_steps is
    schedule = optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps > 0 else optax.constant_schedule(lr)
    tx = optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
    master = master_weights.master_dtype(param_dtype)
    return tx if master is None else master_weights.wrap(tx, master)
