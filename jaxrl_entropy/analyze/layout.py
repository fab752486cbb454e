"""Which metrics a set of runs holds and in what order tables and plots show them."""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from jaxrl_entropy.analyze.runs import Run

BASELINE = "full"
#: Variants listed first, in this order; other names follow in order of appearance.
VARIANT_ORDER = ("full", "random", "anchor", "explorer", "soft")
SUBSET_ORDER = ("anchor", "explorer", "random", "full")
GEOMETRY_METRICS = ("cos_full", "norm", "cos_prev")
#: Pairs of token subsets compared within each run (the paper's anchor vs explorer claims).
SUBSET_CONTRASTS = (("anchor", "explorer"), ("anchor", "random"), ("explorer", "random"))
TRAIN_TAIL_METRICS = ("reward/mean", "accuracy", "response_len/mean", "grad_norm", "clip_frac")
TRAINING_PLOT_METRICS = ("response_len/mean", "grad_norm", "clip_frac", "loss", "accuracy")
THRESHOLD_METRICS = ("entropy/anchor_threshold", "entropy/explorer_threshold")
ENTROPY_QUANTILES = (10, 25, 50, 75, 90)
ENTROPY_TABLE_METRICS = (
    "entropy/spearman_pred",
    "entropy/spearman_pos",
    "controls/partial_corr_pred",
    "controls/partial_corr_pos",
)
#: Controls logged with the gradient geometry: is a token's gradient alignment with the full-token
#: update explained by its attention entropy beyond position, predictive entropy and length?
CONTROL_TABLE_METRICS = (
    "controls/align_raw_corr",
    "controls/align_partial_corr",
    "controls/align_partial_spearman",
    "controls/matched_anchor_align",
    "controls/matched_explorer_align",
)
#: Training metrics are summarised over this many last logged steps (single steps are noisy).
TAIL_STEPS = 10

_MEAN_AT_K = re.compile(r"^eval/(?P<bench>.+)/mean@(?P<k>\d+)$")
_PASS_AT_K = re.compile(r"^eval/(?P<bench>.+)/pass@(?P<k>\d+)$")
_GEOMETRY = re.compile(r"^geometry/(?P<subset>[^/]+)/(?P<metric>[^/]+)$")


@dataclasses.dataclass(frozen=True)
class Layout:
    """The runs grouped by variant, and the metric columns they hold, in display order."""

    variants: list[str]
    groups: dict[str, list[Run]]  # variant → its runs, by seed
    keys: list[str]  # every numeric metric in any run
    main_cols: list[str]  # eval/accuracy, then eval/<bench>/mean@k
    pass_cols: list[str]  # eval/<bench>/pass@k
    other_eval: list[str]  # any other eval/... metric
    subsets: list[str]  # token subsets with geometry/<subset>/<metric>
    geo_metrics: list[str]  # the <metric>s of those


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def canonical(names: Sequence[str], order: Sequence[str]) -> list[str]:
    """`names` with those in `order` first (in that order), the rest after, as they came."""
    return [x for x in order if x in names] + [x for x in names if x not in order]


def _keys(runs: Sequence[Run]) -> list[str]:
    seen: dict[str, None] = {}
    for r in runs:
        for rec in r.records:
            for k, v in rec.items():
                if is_number(v):
                    seen.setdefault(k, None)
    return list(seen)


def _eval_columns(keys: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """(accuracy + mean@k columns, pass@k columns, other eval keys), in a stable order."""
    def by_bench(pat: re.Pattern) -> list[str]:
        hits = [(m.group("bench"), int(m.group("k")), k) for k in keys if (m := pat.match(k))]
        return [k for *_, k in sorted(hits)]

    mean_k, pass_k = by_bench(_MEAN_AT_K), by_bench(_PASS_AT_K)
    main_cols = (["eval/accuracy"] if "eval/accuracy" in keys else []) + mean_k
    other = sorted(k for k in keys if k.startswith("eval/") and k not in main_cols and k not in pass_k)
    return main_cols, pass_k, other


def _geometry_layout(keys: Sequence[str]) -> tuple[list[str], list[str]]:
    matches = [m for k in keys if (m := _GEOMETRY.match(k))]
    subsets = list(dict.fromkeys(m.group("subset") for m in matches))
    metrics = list(dict.fromkeys(m.group("metric") for m in matches))
    return canonical(subsets, SUBSET_ORDER), canonical(metrics, GEOMETRY_METRICS)


# Config keys that may differ between the seeds of one variant: the seed itself, and settings that
# change how a run is executed or recorded, not what it computes.
PER_RUN_KEYS = ("name", "seed", "train.progress", "train.log_every", "train.checkpoint_every",
                "train.keep_checkpoints", "train.on_corrupt_checkpoint", "parallel.", "rollout.engine",
                "rollout.kv_cache_gib", "rollout.max_slots", "rollout.decode_chunk", "rollout.prefill_tokens",
                "rollout.page_size", "rollout.tensor_parallel")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _default_config() -> dict[str, Any]:
    from jaxrl_entropy.config import base_config
    return _flat(base_config().to_dict())


def check_comparable(groups: dict[str, list[Run]]) -> None:
    """Runs averaged as the seeds of one variant must be one experiment: refuse (ValueError naming
    the keys and runs) when their `config.json`s differ beyond `PER_RUN_KEYS` (other data, group
    size, learning rate, steps...). Runs without a config.json are not checked."""
    problems = []
    defaults = _default_config()
    for variant, rs in groups.items():
        # a key an older run's config.json lacks (added to the library since) counts as its default
        flats = [(r, {**defaults, **_flat(r.config)}) for r in rs if r.config]
        if len(flats) < 2:
            continue
        ref_run, ref = flats[0]
        for r, f in flats[1:]:
            keys = sorted(k for k in set(ref) | set(f) if ref.get(k) != f.get(k)
                          and not any(k == p or (p.endswith(".") and k.startswith(p)) for p in PER_RUN_KEYS))
            if keys:
                diffs = ", ".join(f"{k} ({ref.get(k)!r} in {ref_run.path}, {f.get(k)!r} in {r.path})" for k in keys[:4])
                problems.append(f"variant {variant!r}: {diffs}{' …' if len(keys) > 4 else ''}")
    if problems:
        raise ValueError("analyze: runs grouped as seeds of one variant (by config.name) differ in what they "
                         "compute, so their mean would mix experiments: " + "; ".join(problems) +
                         ". Give such runs different names (--config.name=...) or analyze them separately.")


def layout_of(runs: Sequence[Run]) -> Layout:
    variants = canonical(list(dict.fromkeys(r.name for r in runs)), VARIANT_ORDER)
    groups = {v: sorted((r for r in runs if r.name == v), key=lambda r: (r.seed, r.path)) for v in variants}
    check_comparable(groups)
    keys = _keys(runs)
    main_cols, pass_cols, other_eval = _eval_columns(keys)
    subsets, geo_metrics = _geometry_layout(keys)
    return Layout(variants, groups, keys, main_cols, pass_cols, other_eval, subsets, geo_metrics)
