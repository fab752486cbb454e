"""The warm-up's stop rule, by hand; its optimiser against a numpy AdamW with clipping."""
import jax.numpy as jnp
import numpy as np
import optax

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
