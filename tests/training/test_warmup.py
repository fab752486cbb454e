"""The warm-up's stop rule, by hand; its optimiser against a numpy AdamW with clipping."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_entropy.training import warmup
from jaxrl_entropy.config import base_config


def test_checks_every_fifth_from_the_first_estimate_near_the_target_on():
    every, target = 25, 0.4
    assert warmup.check_schedule(every, target, []) == 25
    assert warmup.check_schedule(every, target, [0.0, 0.1, 0.19]) == 25       # 0.19 < 0.5 · 0.4
    assert warmup.check_schedule(every, target, [0.1, 0.21]) == 5
    # the demo's 16-row warm-up read 0.047, 0.297, 0.422, 0.453: at 0.297 it must check often
    assert warmup.check_schedule(100, target, [0.047, 0.297]) == 20
    # a later estimate below the line does not send the next check 25 steps away (it did: a demo run
    # went 0.352, 0.344, 0.297, then 25 steps to 0.422 and 0.648, held-out 0.625 at RL step 0)
    assert warmup.check_schedule(every, target, [0.352, 0.344, 0.297]) == 5
    assert warmup.check_schedule(3, target, [0.35]) == 1


def test_stops_when_the_mean_of_the_last_two_estimates_reaches_the_target():
    assert not warmup.reached(0.4, [])
    assert warmup.reached(0.4, [0.41])                      # one estimate: itself
    assert not warmup.reached(0.4, [0.297, 0.422])          # mean 0.36
    assert warmup.reached(0.4, [0.1, 0.38, 0.42])           # mean 0.40


def _numpy_adam_clipped(grads, *, lr, clip, b1=0.9, b2=0.999, eps=1e-8):
    """AdamW without weight decay on globally clipped gradients, written out in numpy (the oracle)."""
    m = v = 0.0
    x = np.zeros_like(grads[0])
    for t, g in enumerate(grads, start=1):
        g = g * min(1.0, clip / np.linalg.norm(g))
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        x = x - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return x


def test_warmup_optimizer_clips_the_global_gradient_norm_then_adam():
    # a spike (norm 500) then ordinary gradients: unclipped, the spike's square would dominate Adam's
    # second moment for hundreds of steps and shrink every later update (Adam is scale-invariant in
    # one step, not over several, which is why the small-batch warm-up needs the clip)
    cfg = base_config()
    cfg.train.sft_lr, cfg.train.sft_grad_clip = 0.01, 1.0
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=6) * 200.0] + [rng.normal(size=6) * 0.3 for _ in range(4)]
    tx = warmup.optimizer(cfg)
    params = {"w": jnp.zeros(6)}
    state = tx.init(params)
    for g in grads:
        upd, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, upd)
    np.testing.assert_allclose(np.asarray(params["w"]), _numpy_adam_clipped(grads, lr=0.01, clip=1.0), rtol=1e-5, atol=1e-7)
    assert not np.allclose(_numpy_adam_clipped(grads, lr=0.01, clip=1.0),
                           _numpy_adam_clipped(grads, lr=0.01, clip=1e9), atol=1e-4)   # the clip matters here


def _tiny_policy():
    from flax import nnx

    from jaxrl_entropy.models import qwen3
    cfg = qwen3.Qwen3Config(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = qwen3.init_random(cfg, qwen3.RuntimeOptions(logits_chunk=4), seed=0)
    graphdef, state = nnx.split(model)
    return model, graphdef, nnx.to_pure_dict(state)


def test_the_warm_up_loss_over_anchors_or_explorers_is_the_mean_over_the_tokens_rl_would_pick():
    """Oracle: RL's own reading of the same sequences (`policy_forward` splits them into prompt and
    response, a separate path from the warm-up's shifted rows), then the pick and the mean by hand
    in numpy."""
    from jaxrl_entropy.rl import train_step as ts

    model, graphdef, params = _tiny_policy()
    P, N, fraction = 5, 7, 0.25
    rng = np.random.default_rng(1)
    prompt_mask = np.ones((3, P), np.int32)
    prompt_mask[1, :2] = 0                                   # a left-padded prompt
    lengths = np.array([7, 4, 6])                            # right-padded responses
    seq = ts.build_sequences(np.where(prompt_mask, rng.integers(1, 30, (3, P)), 0), prompt_mask,
                             rng.integers(1, 30, (3, N)), lengths)
    spec = ts.StepSpec(prompt_len=P, response_len=N, probe_layers=(1,))
    logp, _, hnorm = ts.policy_forward(model, {k: jnp.asarray(v) for k, v in seq.items()}, spec, probe=True)
    logp, hnorm, valid = np.asarray(logp), np.asarray(hnorm), seq["response_mask"]

    loss_mask = np.concatenate([np.zeros((3, P), np.int32), valid.astype(np.int32)], axis=1)
    batch = {"input_ids": jnp.asarray(seq["input_ids"]), "attention_mask": jnp.asarray(seq["attention_mask"]),
             "loss_mask": jnp.asarray(loss_mask)}
    k = round(fraction * valid.sum())                         # 17 valid tokens → 4
    for mode in ("anchor", "explorer"):
        order = np.argsort(np.where(valid, hnorm if mode == "anchor" else -hnorm, np.inf), axis=None, kind="stable")
        picked = np.zeros(valid.size, bool)
        picked[order[:k]] = True
        expected = -logp.reshape(-1)[picked].mean()
        tokens = warmup.SftTokens(mode=mode, fraction=fraction, probe_layers=(1,))
        got = float(warmup.sft_loss(graphdef, params, batch, tokens))
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    full = float(warmup.sft_loss(graphdef, params, batch))
    np.testing.assert_allclose(full, -logp[valid].mean(), rtol=1e-5)
    assert abs(full - expected) > 1e-3                        # the subsets are not the mean over all


def test_a_random_warm_up_subset_is_a_fraction_of_the_tokens_drawn_from_the_key():
    model, graphdef, params = _tiny_policy()
    rng = np.random.default_rng(2)
    ids = rng.integers(1, 30, (4, 12)).astype(np.int32)
    loss_mask = np.zeros((4, 12), np.int32)
    loss_mask[:, 4:] = 1
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((4, 12), jnp.int32),
             "loss_mask": jnp.asarray(loss_mask)}
    tokens = warmup.SftTokens(mode="random", fraction=0.5, probe_layers=(0,))
    import jax
    a, b = (float(warmup.sft_loss(graphdef, params, batch, tokens, jax.random.key(s))) for s in (0, 1))
    assert a != b                                            # a different key, a different subset
    # every random subset's mean lies between the smallest and largest token losses
    out = model(jnp.asarray(ids), attention_mask=batch["attention_mask"], return_logits=False)
    nll = -np.asarray(model.token_logprobs(out.hidden[:, :-1], jnp.asarray(ids[:, 1:]))[0])[:, 3:]
    assert nll.min() < a < nll.max()


def test_sft_weights_is_a_checked_config_key():
    from jaxrl_entropy.config import ConfigError, typed

    cfg = base_config()
    cfg.train.sft_weights = "anchors"
    with pytest.raises(ConfigError, match="sft_weights"):
        typed(cfg)
