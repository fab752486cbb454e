"""Gradient geometry of token subsets: how large, how aligned with the full gradient, how stable.

For subsets of response tokens (anchors, explorers, a random subset of the same size, all
tokens), compare the gradient of each subset's loss with the full-token gradient: "similar norm ≠
similar direction".  The loss of a subset uses the **selected-token normalisation**: its own
``Σ w·mask`` as denominator (``policy_subset_loss`` builds such a loss), so every subset's loss
is a mean over its own tokens and norms are comparable across subsets of different sizes.

Gradients are flattened over all parameter leaves and reduced in float32.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_entropy.rl.loss import loss_denominator, policy_loss
from jaxrl_entropy.rl.token_weights import token_weights

__all__ = [
    "tree_dot",
    "tree_norm",
    "tree_norm_and_dot",
    "cosine_tree",
    "geometry_subsets",
    "random_subset_name",
    "split_halves",
    "split_half_metrics",
    "policy_subset_loss",
    "subset_gradients",
    "geometry_from_grads",
    "geometry_and_sketches",
    "loop_geometry",
    "subset_metrics",
    "gradient_geometry",
    "GradientSketch",
    "GeometryTracker",
    "token_projections",
    "alignment_controls",
]

LossFn = Callable[[object, jax.Array], jax.Array]  # (params, weights_BxT) -> scalar


def tree_dot(a, b) -> jax.Array:
    """``<a, b>`` over all leaves (float32 accumulation)."""
    leaves = jax.tree.leaves(jax.tree.map(
        lambda x, y: jnp.vdot(jnp.ravel(x).astype(jnp.float32), jnp.ravel(y).astype(jnp.float32)),
        a, b))
    return sum(leaves, jnp.zeros((), jnp.float32))


def tree_norm(a) -> jax.Array:
    """Euclidean norm of a pytree flattened over all leaves."""
    return jnp.sqrt(tree_dot(a, a))


def _safe_cos(dot, na, nb) -> jax.Array:
    denom = na * nb
    return jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, 1.0), 0.0)


def cosine_tree(a, b) -> jax.Array:
    """Cosine similarity of two pytrees flattened over all leaves; 0 if either is zero."""
    return _safe_cos(tree_dot(a, b), tree_norm(a), tree_norm(b))


# suffixes of the two row halves of a subset (`split_halves`); never metric names of their own
HALF_A, HALF_B = "#half_a", "#half_b"


def random_subset_name(fraction: float) -> str:
    """``random@0.05``: a random subset of `fraction` of the tokens (the token-count curve)."""
    return f"random@{fraction:g}"


def geometry_subsets(mask_BxT: jax.Array, attn_entropy_BxT: jax.Array, *, fraction: float = 0.2,
                     rng: jax.Array, random_fractions: tuple[float, ...] = (),
                     halves: bool = False, layer_entropy: dict[str, jax.Array] | None = None
                     ) -> dict[str, jax.Array]:
    """The standard subsets: ``full``, ``anchor``, ``explorer`` and ``random`` (same size k), each
    ``[B, T]``; plus a random subset per entry of ``random_fractions`` (``random@f``: cos_full against
    the number of tokens a subset holds); plus, per entry ``name → [B, T]`` of ``layer_entropy`` (one
    probe layer's Hnorm alone), the anchors and explorers that entropy picks (``anchor@name``,
    ``explorer@name``); with ``halves`` each subset's restriction to the first and to the second half
    of the rows (``<name>#half_a`` / ``#half_b``, see :func:`split_half_metrics`)."""
    common = dict(mask_BxT=mask_BxT, attn_entropy_BxT=attn_entropy_BxT, rng=rng)
    subsets = {name: token_weights(name, fraction=fraction, **common)[0]
               for name in ("full", "anchor", "explorer", "random")}
    for i, f in enumerate(random_fractions):
        subsets[random_subset_name(f)] = token_weights(
            "random", fraction=f, **dict(common, rng=jax.random.fold_in(rng, i + 1)))[0]
    for layer, h_BxT in (layer_entropy or {}).items():
        for name in ("anchor", "explorer"):
            subsets[f"{name}@{layer}"] = token_weights(name, fraction=fraction,
                                                       **dict(common, attn_entropy_BxT=h_BxT))[0]
    if halves:
        subsets.update(split_halves(subsets))
    return subsets


def split_halves(subsets: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Each subset `[B, T]` restricted to rows `[0, B/2)` and to rows `[B/2, B)`: two disjoint halves
    of the same batch (whole groups of G adjacent rows when B/2 is a multiple of G)."""
    out = {}
    for name, w in subsets.items():
        first = (jnp.arange(w.shape[0]) < w.shape[0] // 2)[:, None]
        out[name + HALF_A] = jnp.where(first, w, 0.0)
        out[name + HALF_B] = jnp.where(first, 0.0, w)
    return out


def split_half_metrics(metrics: dict[str, jax.Array], sketches: dict[str, object]
                       ) -> tuple[dict[str, jax.Array], dict[str, object]]:
    """Volatility within one batch: ``<name>/cos_halves``, the cosine between the subset's gradients
    on two disjoint halves of the rows (from their sketches), in place of the halves' own metrics;
    returns (metrics, sketches) without the halves."""
    is_half = lambda name: name.endswith(HALF_A) or name.endswith(HALF_B)
    out = {k: v for k, v in metrics.items() if not is_half(k.split("/")[0])}
    kept = {n: s for n, s in sketches.items() if not is_half(n)}
    for name in kept:
        if name + HALF_A in sketches and name + HALF_B in sketches:
            out[f"{name}/cos_halves"] = cosine_tree(sketches[name + HALF_A], sketches[name + HALF_B])
    return out, kept


def policy_subset_loss(logp_fn: Callable[[object], jax.Array], *, old_logp: jax.Array,
                       adv: jax.Array, mask: jax.Array, **loss_kwargs) -> LossFn:
    """``loss_fn(params, weights)`` for :func:`gradient_geometry` from the policy loss.

    ``logp_fn(params) -> [B, T]`` log-probs of the sampled tokens.  Each subset is normalised by
    its own ``Σ w·mask`` (selected-token normalisation).  ``loss_kwargs`` go to ``policy_loss``
    (eps_low, eps_high, clip_c).
    """

    def loss_fn(params, weights_BxT):
        denom = loss_denominator(weights_BxT, mask, "selected")
        loss, _ = policy_loss(logp_fn(params), old_logp, adv, mask, weights_BxT, denom=denom,
                              **loss_kwargs)
        return loss

    return loss_fn


def _check_subsets(subsets: dict, full: str) -> list[str]:
    if full not in subsets:
        raise KeyError(f"gradient_geometry: the full-token subset {full!r} is not among the "
                       f"subsets {sorted(subsets)}; pass it, or name it with full=.")
    return list(subsets)


def subset_gradients(loss_fn: LossFn, params, subsets: dict[str, jax.Array], *,
                     method: str = "vmap") -> dict[str, object]:
    """Gradient of ``loss_fn(params, w)`` w.r.t. params for each subset's weights ``w``.

    ``vmap`` stacks the weights ``[S, B, T]`` and computes all S gradients in one batched pass
    (fast, S copies of the gradient live at once); ``loop`` computes them one after another.
    """
    names = list(subsets)
    grad_fn = jax.grad(loss_fn)
    if method == "vmap":
        w_SxBxT = jnp.stack([jnp.asarray(subsets[n], jnp.float32) for n in names])
        g_stacked = jax.vmap(grad_fn, in_axes=(None, 0))(params, w_SxBxT)
        return {n: jax.tree.map(lambda g, i=i: g[i], g_stacked) for i, n in enumerate(names)}
    if method == "loop":
        return {n: grad_fn(params, jnp.asarray(subsets[n], jnp.float32)) for n in names}
    raise ValueError(f"subset_gradients: method={method!r} must be 'vmap' or 'loop'.")


def geometry_from_grads(grads: dict[str, object], *, full: str = "full") -> dict[str, jax.Array]:
    """Metrics of :func:`gradient_geometry` from already computed subset gradients."""
    _check_subsets(grads, full)
    g_full = grads[full]
    n_full = tree_norm(g_full)
    out = {}
    for name, g in grads.items():
        out.update(subset_metrics(name, tree_norm(g), tree_dot(g, g_full), n_full))
    return out


def subset_metrics(name: str, norm, dot, n_full) -> dict[str, jax.Array]:
    """``<name>/norm``, ``<name>/cos_full`` and ``<name>/proj_full`` of a subset gradient g from
    ``|g|``, ``<g, g_full>`` and ``|g_full|``."""
    return {
        f"{name}/norm": norm,
        f"{name}/cos_full": _safe_cos(dot, norm, n_full),
        # Length of the subset gradient along the full gradient's direction.
        f"{name}/proj_full": jnp.where(n_full > 0, dot / jnp.where(n_full > 0, n_full, 1.0), 0.0),
    }


def geometry_and_sketches(loss_fn: LossFn, params, subsets: dict[str, jax.Array], *,
                          full: str = "full", method: str = "vmap",
                          sketch: Callable[[object], object] | None = None,
                          ) -> tuple[dict[str, jax.Array], dict[str, object]]:
    """:func:`gradient_geometry` plus ``sketch(grad)`` of every subset gradient (empty dict when
    ``sketch`` is None).  Pure and jit-able (``sketch`` is a :class:`GradientSketch`).

    With ``method="loop"`` (:func:`loop_geometry`) the full gradient is computed first and each other
    subset gradient is reduced to its metrics (and sketch) right away, so at most two gradients
    are needed at once.
    """
    _check_subsets(subsets, full)
    sketches: dict[str, object] = {}
    if method == "vmap":
        grads = subset_gradients(loss_fn, params, subsets, method="vmap")
        if sketch is not None:
            sketches = {n: sketch(g) for n, g in grads.items()}
        return geometry_from_grads(grads, full=full), sketches
    if method != "loop":
        raise ValueError(f"gradient_geometry: method={method!r} must be 'vmap' or 'loop'.")
    grad_fn = jax.grad(loss_fn)
    return loop_geometry(lambda w: grad_fn(params, jnp.asarray(w, jnp.float32)), subsets, full=full,
                         sketch=sketch)


def tree_norm_and_dot(g, g_full) -> tuple[jax.Array, jax.Array]:
    """``(|g|, <g, g_full>)`` over all leaves."""
    return tree_norm(g), tree_dot(g, g_full)


def loop_geometry(grad_of: Callable[[jax.Array], object], subsets: dict[str, jax.Array], *,
                  full: str = "full", sketch: Callable[[object], object] | None = None, full_grad=None,
                  norm_and_dot: Callable = tree_norm_and_dot) -> tuple[dict[str, jax.Array], dict[str, object]]:
    """The ``loop`` method of :func:`geometry_and_sketches` over any gradient function: the full
    gradient first (or ``full_grad``), then each other subset's gradient, reduced to its metrics
    (and sketch) at once, so at most two gradients are alive.

    Runs traced (inside one jitted program) or on the host over separately compiled programs
    (``grad_of(w)`` a jitted gradient, ``norm_and_dot(g, g_full) -> (|g|, <g, g_full>)`` jitted):
    the second is how the pod-scale step runs it, so that no program holds more than one gradient
    computation (`step_programs.GeometryPrograms`)."""
    _check_subsets(subsets, full)
    g_full = full_grad if full_grad is not None else grad_of(subsets[full])
    n_full = norm_and_dot(g_full, g_full)[0]
    metrics: dict[str, jax.Array] = {}
    sketches: dict[str, object] = {}
    for name, w in subsets.items():
        g = g_full if name == full else grad_of(w)
        norm, dot = norm_and_dot(g, g_full)
        metrics.update(subset_metrics(name, norm, dot, n_full))
        if sketch is not None:
            sketches[name] = sketch(g)
        del g  # on the host path, frees this gradient before the next one is computed
    return metrics, sketches


def gradient_geometry(loss_fn: LossFn, params, subsets: dict[str, jax.Array], *,
                      full: str = "full", method: str = "vmap") -> dict[str, jax.Array]:
    """Per subset: ``<name>/norm``, ``<name>/cos_full`` (cosine with the ``full`` subset's
    gradient, 1 for ``full`` itself) and ``<name>/proj_full`` (length of the projection on the
    full gradient's direction), over all parameter leaves flattened.

    ``loss_fn(params, weights_BxT) -> scalar`` must normalise by the subset's own weight sum
    (selected-token normalisation; :func:`policy_subset_loss` builds one).  ``method``: ``vmap``
    (one batched pass, S gradients in memory) or ``loop`` (at most two at once).  Pure and
    jit-able: ``jax.jit(lambda p, s: gradient_geometry(loss_fn, p, s))``.
    """
    return geometry_and_sketches(loss_fn, params, subsets, full=full, method=method)[0]


def _mix32(x):
    """murmur3's 32-bit finaliser: a cheap bijective integer hash (jax or numpy uint32 arrays)."""
    x = x ^ (x >> 16)
    x = x * x.dtype.type(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * x.dtype.type(0xC2B2AE35)
    return x ^ (x >> 16)


def _flat_index_u32(shape: tuple[int, ...]) -> jax.Array:
    """Row-major flat index of every element, in the array's own shape (uint32, wrapping)."""
    idx = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in range(len(shape) - 1, -1, -1):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride & 0xFFFFFFFF)
        stride *= shape[axis]
    return idx


@functools.partial(jax.jit, static_argnames="dim")
def _sketch_leaf(x: jax.Array, salt: jax.Array, dim: int) -> jax.Array:
    """One leaf's count sketch `[dim]`. Hashes are computed in the leaf's own shape (no ravel): a
    leaf sharded over devices stays sharded, each device scatter-adds its own elements and one
    `[dim]` all-reduce combines them. Jitted on its own so that a tree compiles one small program per
    distinct leaf shape, not one scatter per leaf inside the caller's program."""
    h = _mix32(_flat_index_u32(x.shape) ^ salt)
    bucket = (h & jnp.uint32(dim - 1)).astype(jnp.int32)
    sign = jnp.where((h >> 31) == 1, -1.0, 1.0)
    return jnp.zeros((dim,), jnp.float32).at[bucket].add(sign * x.astype(jnp.float32))


def _on_cpu(x: jax.Array) -> bool:
    """A concrete array on CPU devices (inside a jitted program there is no dispatch to order)."""
    return not isinstance(x, jax.core.Tracer) and any(d.platform == "cpu" for d in x.devices())


class GradientSketch:
    """A fixed random linear map of a gradient pytree to ``[dim]`` (a count sketch).

    Parameter i of leaf l (i its row-major flat index) goes to bucket ``h(l, i) mod dim`` with sign
    ``s(l, i) = ±1``, both from an integer hash of (seed, leaf index, flat index): nothing is
    stored, and the map is the same at every step.  ``<S a, S b>`` is an unbiased estimate of
    ``<a, b>``; the cosine error is about ``1/sqrt(dim)`` (exact when there are no bucket
    collisions).  Memory: ``dim`` floats, plus hashes of one leaf's share on each device.
    """

    def __init__(self, dim: int = 1 << 16, seed: int = 0):
        if dim < 1 or dim & (dim - 1):
            raise ValueError(f"GradientSketch: dim={dim} must be a power of two.")
        self.dim = int(dim)
        self.seed = int(seed)

    def leaf_salt(self, leaf_idx: int) -> np.uint32:
        """Leaf l's hash salt, on the host (a plain scalar: no device, so it meets any sharding)."""
        return _mix32(np.array([(self.seed * 0x9E3779B1 + leaf_idx * 0x632BE5AB) & 0xFFFFFFFF], np.uint32))[0]

    def __call__(self, tree) -> jax.Array:
        """`[dim]`: the sum of every leaf's sketch (one jitted program per distinct leaf shape)."""
        out = None
        for leaf_idx, leaf in enumerate(jax.tree.leaves(tree)):
            sketch = _sketch_leaf(leaf, self.leaf_salt(leaf_idx), dim=self.dim)
            if _on_cpu(sketch):
                # The leaves' programs are independent, so asynchronous dispatch lets them all run
                # at once; each has an all-reduce whose in-process rendezvous needs a thread per
                # device. On a CPU (many fake devices, few cores) the pool can run out of threads
                # with every program waiting for its missing participant, and XLA aborts the
                # process after 40 s ("Termination timeout for all reduce"). One at a time.
                sketch.block_until_ready()
            out = sketch if out is None else out + sketch
        return jnp.zeros((self.dim,), jnp.float32) if out is None else out


def sketch_leaf_program(sketch: GradientSketch) -> Callable:
    """`(leaf, salt) -> [dim]`: the jitted program `sketch` runs on each leaf (for `dryrun`)."""
    return jax.jit(lambda leaf, salt: _sketch_leaf(leaf, salt, dim=sketch.dim))


class GeometryTracker:
    """Adds ``<name>/cos_prev`` (volatility: cosine between this and the previous geometry step's
    gradient of the same subset) to the gradient-geometry metrics.

    Memory: with ``projection_dim`` (default 2**16) only a :class:`GradientSketch` of each subset
    gradient is kept (``dim`` floats per subset) and cos_prev is the cosine of the sketches
    (error ~ 1/sqrt(dim)); ``projection_dim=None`` keeps the exact gradients (one copy of the
    parameters per subset: small models only).  The first step has no ``cos_prev``.

    Inside a jitted step, compute ``metrics, sketches = geometry_and_sketches(loss_fn, params,
    subsets, sketch=tracker.sketch)`` and, outside, ``metrics = tracker.update(metrics,
    sketches)``; or call ``tracker.step(...)`` eagerly.
    """

    def __init__(self, projection_dim: int | None = 1 << 16, seed: int = 0):
        self.sketch: Callable[[object], object] = (
            GradientSketch(projection_dim, seed) if projection_dim is not None
            else (lambda tree: tree))
        self._prev: dict[str, object] | None = None
        self._jitted: tuple[tuple, Callable] | None = None   # (key, compiled fn) of last step()

    def update(self, metrics: dict[str, jax.Array],
               sketches: dict[str, object]) -> dict[str, jax.Array]:
        """Returns ``metrics`` plus ``<name>/cos_prev`` for the subsets seen at the previous
        update, then remembers ``sketches`` (outputs of ``self.sketch``) for the next one."""
        out = dict(metrics)
        if self._prev is not None:
            for name, s in sketches.items():
                if name in self._prev:
                    out[f"{name}/cos_prev"] = cosine_tree(s, self._prev[name])
        self._prev = dict(sketches)
        return out

    def step(self, loss_fn: LossFn, params, subsets: dict[str, jax.Array], *,
             full: str = "full", method: str = "vmap") -> dict[str, jax.Array]:
        """Convenience outside a train step: this step's geometry (jitted; recompiled when
        ``loss_fn`` is a different object than at the previous call), with ``cos_prev``."""
        key = (loss_fn, full, method)
        if self._jitted is None or self._jitted[0] != key:
            fn = jax.jit(lambda p, s: geometry_and_sketches(loss_fn, p, s, full=full,
                                                            method=method, sketch=self.sketch))
            self._jitted = (key, fn)
        metrics, sketches = self._jitted[1](params, subsets)
        return self.update(metrics, sketches)


def token_projections(per_token_loss_fn: Callable, params, direction) -> jax.Array:
    """Projection of every token's own gradient on a direction, `[B, T]`, in one forward-mode pass.

    `per_token_loss_fn(params) -> [B, T]` (each token's loss L_t); returns
    <∇L_t, d> / |d| for all t at once (a JVP along d), so no per-token gradient is ever built.
    With d the full-token gradient this is each token's alignment with the full update, the
    per-token target the controls correlate with attention entropy.
    """
    _, proj = jax.jvp(per_token_loss_fn, (params,), (direction,))
    return proj / jnp.maximum(tree_norm(direction), 1e-30)


def alignment_controls(align_BxT, hnorm_BxT, pred_entropy_BxT, mask_BxT, *, fraction: float,
                       seed: int) -> dict[str, float]:
    """Is a token's gradient alignment with the full update (`token_projections`) explained by its
    attention entropy beyond position, predictive entropy and response length? (host numpy)

    `controls/align_*`: raw and partial correlations (`entropy_stats.control_correlations`);
    `controls/matched_anchor_align` / `matched_explorer_align`: mean alignment of anchors and
    explorers matched on position × predictive-entropy bins (`stats.matched_subsets`).
    """
    from jaxrl_entropy import stats
    from jaxrl_entropy.rl import entropy_stats

    align, hnorm, pred = (np.asarray(x) for x in (align_BxT, hnorm_BxT, pred_entropy_BxT))
    mask = np.asarray(mask_BxT)
    position = np.broadcast_to(np.arange(mask.shape[1]), mask.shape)
    length = np.broadcast_to(mask.sum(1, keepdims=True), mask.shape)
    out = entropy_stats.control_correlations(hnorm, align, position, pred, length, mask=mask,
                                             prefix="controls/align_")
    valid = mask.astype(bool)
    h, a = hnorm[valid], align[valid]
    strata = np.stack([position[valid], pred[valid]], axis=1)
    try:
        low, high = stats.matched_subsets(h, strata, min(fraction, 0.5), bins=4, seed=seed)
    except ValueError:  # too few tokens to match
        return out
    if len(low) and len(high):
        out["controls/matched_anchor_align"] = float(np.mean(a[low]))
        out["controls/matched_explorer_align"] = float(np.mean(a[high]))
        out["controls/matched_n"] = int(len(low))
    return out
