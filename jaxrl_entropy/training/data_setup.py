"""From a config to a tokenizer, training records and evaluation sets (the only place that reads
`config.data`, `config.tokenizer` and `config.eval.benchmarks`)."""
from __future__ import annotations

import logging
import os

import ml_collections

from jaxrl_entropy import config as config_lib
from jaxrl_entropy.config import ConfigError, DataConfig, EvalConfig, train_layout
from jaxrl_entropy.data.pipeline import LengthReport, fit_prompt_lengths
from jaxrl_entropy.data.sources import DataError, deduplicate, load_records
from jaxrl_entropy.data.synthetic import ArithmeticTask
from jaxrl_entropy.data.tokenizer import build_demo_tokenizer, load_tokenizer

log = logging.getLogger("jaxrl_entropy")


def tokenizer_for(cfg: ml_collections.ConfigDict):
    path = cfg.tokenizer or cfg.model.hf_dir
    if path:
        return load_tokenizer(path)
    if cfg.data.kind != "synthetic":
        raise ConfigError("config.tokenizer is empty and config.model.hf_dir is empty: real data needs the "
                          "tokenizer of its model; set config.tokenizer=/path/to/tokenizer_dir")
    return build_demo_tokenizer()


def synthetic_task(cfg: ml_collections.ConfigDict) -> ArithmeticTask:
    s = cfg.data.synthetic
    return ArithmeticTask(digits=s.digits, num_terms=s.num_terms, ops=s.ops, chat=s.chat, scratchpad=s.scratchpad,
                          seed=cfg.seed)


def parse_benchmarks(spec: str) -> dict[str, str]:
    """"aime24=/data/aime24.parquet,math500=/data/math500.parquet" → {name: path}."""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if "=" not in item:
            raise ConfigError(f"config.eval.benchmarks entry {item!r} must look like name=path")
        name, path = (s.strip() for s in item.split("=", 1))
        if not name or not path:
            raise ConfigError(f"config.eval.benchmarks entry {item!r} must look like name=path")
        out[name] = path
    return out


def eval_sets(cfg: ml_collections.ConfigDict) -> dict[str, list[dict]]:
    """{benchmark: records}: the synthetic task's held-out split (synthetic data) and every
    `eval.benchmarks` file."""
    evals = {}
    if cfg.data.kind == "synthetic" and cfg.data.synthetic.eval_size:
        evals["synthetic_heldout"] = synthetic_task(cfg).records("test", cfg.data.synthetic.eval_size)
    for name, path in parse_benchmarks(cfg.eval.benchmarks).items():
        if not path.startswith("gs://") and not os.path.exists(path) and not any(c in path for c in "*?["):
            raise ConfigError(f"config.eval.benchmarks: file for {name!r} not found: {path}")
        try:
            rows = load_records(path)  # verl's layout: other layouts go through `jaxrl-entropy prepare-data`
        except DataError as e:
            raise DataError(f"config.eval.benchmarks entry {name!r}: {e}") from None
        # verl's AIME files repeat each problem (30 × 32 rows): scored as rows, mean@k would weigh
        # and cost 32× and mean something else. Each distinct problem is scored once, with eval.k samples.
        evals[name] = deduplicate(rows)
        if len(evals[name]) < len(rows):
            log.info("eval set %s: %d rows, %d distinct problems; each is scored once with eval.k=%d samples",
                     name, len(rows), len(evals[name]), cfg.eval.k)
    return evals


def datasets(cfg: ml_collections.ConfigDict):
    """(train records, {benchmark: records}, the synthetic task or None)."""
    task = None
    if cfg.data.kind == "synthetic":
        task = synthetic_task(cfg)
        n_train = min(cfg.data.synthetic.train_size, task.num_expressions - int(task.num_expressions * 0.2))
        train = task.records("train", n_train)
    else:
        files = [p.strip() for p in cfg.data.train_files.split(",") if p.strip()]
        train = load_records(files, dedupe=cfg.data.dedupe, layout=train_layout(cfg))
    return train, eval_sets(cfg), task


def train_source(data: DataConfig) -> str:
    """Where the training records come from, for messages."""
    data = config_lib.section_of(data, "data", "train_source")
    if data.kind == "synthetic":
        return "the synthetic task (data.synthetic.*)"
    return f"data.train_files={data.train_files}"


def eval_source(evaluation: EvalConfig, name: str) -> str:
    """Where evaluation set `name` comes from, for messages."""
    evaluation = config_lib.section_of(evaluation, "eval", "eval_source")
    path = parse_benchmarks(evaluation.benchmarks).get(name)
    return f"eval.benchmarks {name}={path}" if path else f"the synthetic task's held-out split ({name})"


def fit_prompts(data: DataConfig, tokenizer, records: list[dict],
                source: str) -> tuple[list[dict], LengthReport]:
    """`records` under `data.truncation` for prompts longer than `data.max_prompt_len` (see
    `pipeline.fit_prompt_lengths`: raises, drops or keeps them, and logs the count)."""
    data = config_lib.section_of(data, "data", "fit_prompts")
    return fit_prompt_lengths(records, tokenizer, max_prompt_len=data.max_prompt_len,
                              truncation=data.truncation, source=source)


def fit_eval_sets(cfg: ml_collections.ConfigDict, tokenizer,
                  evals: dict[str, list[dict]]) -> tuple[dict[str, list[dict]], list[LengthReport]]:
    """`fit_prompts` for every evaluation set."""
    fitted, reports = {}, []
    for name, records in evals.items():
        fitted[name], report = fit_prompts(cfg.data, tokenizer, records, eval_source(cfg.eval, name))
        reports.append(report)
    return fitted, reports


def length_metrics(train: LengthReport, evals: list[LengthReport] = ()) -> dict[str, int]:
    """Step-0 metrics: prompts truncated / dropped for length, training and evaluation data."""
    return {"data/prompts_truncated": train.truncated, "data/prompts_dropped": train.dropped,
            "data/eval_prompts_truncated": sum(r.truncated for r in evals),
            "data/eval_prompts_dropped": sum(r.dropped for r in evals)}
