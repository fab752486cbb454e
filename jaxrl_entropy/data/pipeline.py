"""Grain pipeline of tokenised, left-padded prompt batches for rollouts.

Order of operations (all on `grain.MapDataset`, so every batch is a pure function of its index):

    records → shuffle(seed), reshuffled every epoch → repeat(num_epochs)
            → render (chat template) + tokenise + left-truncate + left-pad to P
            → batches of `batch_size // shard_count` → this shard's slice of every global batch

A *global* batch is `batch_size` consecutive elements of the shuffled stream; process `s` of
`n` receives rows `[s·b, (s+1)·b)` of each (b = batch_size / n). So the union of the shards'
k-th batches is the k-th batch a single process would see, and the iterator state (the number
of global batches consumed) is the same on every process and independent of the topology:
a run can resume on a different number of hosts.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from jaxrl_entropy.data.sources import DataError, prompt_key_of
from jaxrl_entropy.data.truncation import TRUNCATION_MODES

log = logging.getLogger("jaxrl_entropy")

_STATE_VERSION = 1
# What the trainer sets each resumable field from, for error messages.
_STATE_CONFIG_KEYS = {
    "seed": "config key `seed`",
    "shuffle": "config key `data.shuffle`",
    "batch_size": "config key `rl.prompts_per_step`",
    "num_records": "the same data: `data.train_files` and `data.dedupe`, or `data.synthetic.*`",
}
_TRUNCATIONS = ("left", "right", "error")


def render_prompt(
    prompt: str | Sequence[dict[str, str]],
    tokenizer: Any,
    *,
    use_chat_template: bool,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The text the model sees for a prompt.

    With a chat template: a string prompt becomes one user message, and the generation prompt
    (`<|im_start|>assistant\\n` for Qwen) is appended. Without: a string is used as is; chat
    messages are joined by newlines.
    """
    if use_chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=False,
            **(chat_template_kwargs or {}),
        )
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt)


def left_pad(ids: Sequence[int], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """`ids` right-aligned in `[length]` int32 (pad on the left), with its attention mask."""
    out = np.full((length,), pad_id, dtype=np.int32)
    mask = np.zeros((length,), dtype=np.int32)
    if len(ids):
        out[length - len(ids):] = ids
        mask[length - len(ids):] = 1
    return out, mask


class PromptEncoder:
    """Record → dict of one left-padded prompt (`input_ids` [P], `attention_mask` [P], text)."""

    def __init__(
        self,
        records: Sequence[dict[str, Any]],
        tokenizer: Any,
        *,
        max_prompt_len: int,
        truncation: str = "left",
        use_chat_template: bool | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ):
        if truncation not in _TRUNCATIONS:
            raise ValueError(f"truncation must be one of {_TRUNCATIONS}, got {truncation!r}.")
        if max_prompt_len <= 0:
            raise ValueError(f"max_prompt_len must be positive, got {max_prompt_len}.")
        if tokenizer.pad_token_id is None:
            raise DataError(
                "The tokenizer has no pad token: load it with "
                "`jaxrl_entropy.data.tokenizer.load_tokenizer`, which falls back to eos."
            )
        self.records = records
        self.tokenizer = tokenizer
        self.max_prompt_len = max_prompt_len
        self.truncation = truncation
        if use_chat_template is None:
            use_chat_template = getattr(tokenizer, "chat_template", None) is not None
        self.use_chat_template = use_chat_template
        self.chat_template_kwargs = chat_template_kwargs
        self.pad_id = int(tokenizer.pad_token_id)

    def token_ids(self, index: int) -> tuple[str, list[int]]:
        """Rendered text and its token ids, before truncation and padding."""
        record = self.records[index]
        text = render_prompt(
            record["prompt"], self.tokenizer, use_chat_template=self.use_chat_template,
            chat_template_kwargs=self.chat_template_kwargs,
        )
        # A chat template already writes every special token; adding BOS again would double it.
        ids = self.tokenizer(text, add_special_tokens=not self.use_chat_template)["input_ids"]
        return text, list(ids)

    def __call__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        text, ids = self.token_ids(index)
        if len(ids) > self.max_prompt_len:
            if self.truncation == "error":
                raise DataError(
                    f"Prompt of record {index} (data_source {record['data_source']!r}, "
                    f"extra_info {record.get('extra_info')}) has {len(ids)} tokens, more than "
                    f"max_prompt_len={self.max_prompt_len}. Raise --config.data.max_prompt_len, or set "
                    "--config.data.truncation=left (keeps the end of the prompt) or =drop."
                )
            # verl's "left" truncation keeps the end: the question and the generation prompt.
            ids = ids[-self.max_prompt_len:] if self.truncation == "left" else ids[: self.max_prompt_len]
        input_ids, attention_mask = left_pad(ids, self.max_prompt_len, self.pad_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "ground_truth": record["reward_model"]["ground_truth"],
            "data_source": record["data_source"],
            "prompt_text": text,
            "record_index": np.int64(index),
        }


@dataclasses.dataclass(frozen=True)
class LengthReport:
    """Prompts of one data set longer than the limit: `over` holds (record index, token length)
    in record order; `mode` says what was done with them (see `fit_prompt_lengths`)."""
    source: str
    mode: str
    limit: int
    num_records: int
    over: tuple[tuple[int, int], ...] = ()

    @property
    def truncated(self) -> int:
        return len(self.over) if self.mode == "left" else 0

    @property
    def dropped(self) -> int:
        return len(self.over) if self.mode == "drop" else 0


def prompt_lengths(records: Sequence[dict[str, Any]], tokenizer: Any, *, use_chat_template: bool | None = None,
                   chat_template_kwargs: dict[str, Any] | None = None) -> np.ndarray:
    """`[N]` token length of every record's rendered prompt, as `PromptEncoder` tokenises it.
    Each distinct prompt is rendered once (DAPO-Math-17k repeats each problem 100×)."""
    encoder = PromptEncoder(records, tokenizer, max_prompt_len=1, use_chat_template=use_chat_template,
                            chat_template_kwargs=chat_template_kwargs)
    seen: dict[tuple, int] = {}
    out = np.zeros(len(records), np.int64)
    for i, record in enumerate(records):
        key = prompt_key_of(record["prompt"])
        if key not in seen:
            seen[key] = len(encoder.token_ids(i)[1])
        out[i] = seen[key]
    return out


def _where(records: Sequence[dict[str, Any]], index: int, source: str) -> str:
    """A record's file and row when `load_records` read it, else its index in `source`."""
    return records[index].get("where") or f"{source}, record {index} (0-based)"


def fit_prompt_lengths(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    max_prompt_len: int,
    truncation: str,
    source: str,
    use_chat_template: bool | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], LengthReport]:
    """Apply `data.truncation` to the prompts longer than `max_prompt_len` tokens, once, before
    any batch is made (a mid-run error, or a silently shorter prompt, is what this replaces).

    truncation: "error" raises `DataError` naming the first such row, its length, the limit and
    both ways out; "drop" returns the records without them; "left" keeps them all (the encoder
    left-truncates them: the end of the prompt, question and generation prompt, survives; the
    paper's and verl's recipe). Every mode logs a WARNING with the count, naming `source` (the file
    or the config key the records came from) and the key to change.

    Returns (records, report); a record's index in the returned list is what batches carry as
    `record_index`, so callers must use the returned list everywhere.
    """
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES} (config data.truncation), got {truncation!r}")
    lengths = prompt_lengths(records, tokenizer, use_chat_template=use_chat_template,
                             chat_template_kwargs=chat_template_kwargs)
    over_idx = np.flatnonzero(lengths > max_prompt_len)
    report = LengthReport(source, truncation, max_prompt_len, len(records),
                          tuple((int(i), int(lengths[i])) for i in over_idx))
    if not len(over_idx):
        return list(records), report
    action = {"error": "stopping (data.truncation=error)",
              "drop": "dropping them (data.truncation=drop)",
              "left": "keeping their last tokens (data.truncation=left)"}[truncation]
    log.warning("%s: %d of %d prompts are longer than data.max_prompt_len=%d tokens (longest %d); %s. "
                "Change --config.data.max_prompt_len or --config.data.truncation=error|drop|left",
                source, len(over_idx), len(records), max_prompt_len, int(lengths[over_idx].max()), action)
    if truncation == "error":
        first = int(over_idx[0])
        raise DataError(
            f"{_where(records, first, source)}: the prompt has {int(lengths[first])} tokens (chat template "
            f"included), more than data.max_prompt_len={max_prompt_len}; {len(over_idx)} of {len(records)} "
            f"prompts in {source} are too long (longest {int(lengths[over_idx].max())}). Raise the limit "
            f"(--config.data.max_prompt_len={int(lengths[over_idx].max())} fits them all), or set "
            f"--config.data.truncation=left (keep each prompt's last tokens) or "
            f"--config.data.truncation=drop (leave those prompts out)."
        )
    if truncation == "left":
        return list(records), report
    keep = np.ones(len(records), bool)
    keep[over_idx] = False
    if not keep.any():
        raise DataError(f"{source}: every one of its {len(records)} prompts is longer than data.max_prompt_len="
                        f"{max_prompt_len} tokens, so data.truncation=drop leaves none; raise "
                        f"--config.data.max_prompt_len or use --config.data.truncation=left.")
    return [r for r, k in zip(records, keep) if k], report


def collate(elements: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks arrays along a new batch axis; strings become lists."""
    batch: dict[str, Any] = {}
    for key, first in elements[0].items():
        values = [e[key] for e in elements]
        batch[key] = values if isinstance(first, str) else np.stack(values)
    return batch


class PromptBatcher:
    """Deterministic, shardable, checkpointable iterator of prompt batches.

    Yields dicts of numpy arrays / lists with `b = batch_size // shard_count` rows:
      "input_ids" [b, P] int32, left-padded with the tokenizer's pad id (P = max_prompt_len),
      "attention_mask" [b, P] int32 (1 on prompt tokens),
      "ground_truth", "data_source", "prompt_text" (rendered, before truncation): list[str],
      "record_index" [b] int64 (position of the record in `records`).

    Args:
      records: normalised records (`sources.load_records`, `ArithmeticTask.records`).
      tokenizer: a HF tokenizer with a pad token (`tokenizer.load_tokenizer`).
      batch_size: prompts per *global* batch (all processes together); a multiple of
        shard_count.
      max_prompt_len: P; longer prompts are truncated per `truncation` ("left" keeps the end).
      seed: shuffle seed (each epoch is reshuffled with a seed derived from it).
      shuffle: shuffle records (False: file order, repeated).
      num_epochs: passes over the records; None repeats forever. Batches may straddle an epoch
        boundary; a last incomplete global batch is dropped.
      shard_index, shard_count: this process's shard; default `jax.process_index()` and
        `jax.process_count()`.
      use_chat_template: None → use the tokenizer's chat template when it has one.
      chat_template_kwargs: extra template variables (e.g. `{"enable_thinking": False}`).
      num_threads: grain reader threads (0: encode in the calling thread, the default; the
        records are in memory and encoding is cheap).
    """

    def __init__(
        self,
        records: Sequence[dict[str, Any]],
        tokenizer: Any,
        *,
        batch_size: int,
        max_prompt_len: int,
        seed: int,
        shuffle: bool = True,
        num_epochs: int | None = None,
        shard_index: int | None = None,
        shard_count: int | None = None,
        truncation: str = "left",
        use_chat_template: bool | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        num_threads: int = 0,
    ):
        if shard_index is None or shard_count is None:
            import jax  # pylint: disable=import-outside-toplevel

            shard_index = jax.process_index() if shard_index is None else shard_index
            shard_count = jax.process_count() if shard_count is None else shard_count
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}.")
        if batch_size <= 0 or batch_size % shard_count:
            raise ValueError(
                f"batch_size={batch_size} must be a positive multiple of shard_count="
                f"{shard_count} (the number of processes): each process loads "
                "batch_size / shard_count prompts (the trainer passes `rl.prompts_per_step`)."
            )
        if not records:
            raise DataError("PromptBatcher got no records.")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}.")
        if num_epochs is not None and num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive or None, got {num_epochs}.")
        self.batch_size = batch_size
        self.local_batch_size = batch_size // shard_count
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.seed = seed
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.num_records = len(records)
        self.encoder = PromptEncoder(
            records, tokenizer, max_prompt_len=max_prompt_len, truncation=truncation,
            use_chat_template=use_chat_template, chat_template_kwargs=chat_template_kwargs,
        )
        if num_epochs is None:
            self.num_batches: int | None = None
        else:
            self.num_batches = self.num_records * num_epochs // batch_size
            if self.num_batches == 0:
                raise DataError(
                    f"{self.num_records} records × {num_epochs} epochs do not fill one batch of "
                    f"{batch_size}; lower batch_size (the trainer passes `rl.prompts_per_step`) or "
                    "raise num_epochs."
                )
        self._dataset = self._build_dataset()
        self._read_options = grain.ReadOptions(
            num_threads=num_threads, prefetch_buffer_size=max(1, 2 * num_threads)
        )
        self._iterator = self._dataset.to_iter_dataset(self._read_options).__iter__()

    def _build_dataset(self) -> grain.MapDataset:
        ds = grain.MapDataset.range(self.num_records)
        if self.shuffle:
            # Shuffle before repeat: ShuffleMapDataset derives a fresh permutation per epoch.
            ds = ds.shuffle(seed=self.seed)
        ds = ds.repeat(self.num_epochs)
        ds = ds.map(self.encoder)
        ds = ds.batch(self.local_batch_size, drop_remainder=True, batch_fn=collate)
        if self.num_batches is not None:
            # Keep whole global batches only, so every shard yields the same number of batches.
            ds = ds[: self.num_batches * self.shard_count]
        return ds[self.shard_index :: self.shard_count]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._iterator)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("PromptBatcher with num_epochs=None is infinite; it has no length.")
        return self.num_batches

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: global batches consumed, plus what it is valid for."""
        return {
            "version": _STATE_VERSION,
            "batches_consumed": int(self._iterator.get_state()["next_index"]),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "num_records": self.num_records,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Resumes at a position from `get_state` (possibly saved with another shard_count)."""
        if state.get("version") != _STATE_VERSION:
            raise DataError(
                f"Data-iterator state has version {state.get('version')!r}, expected "
                f"{_STATE_VERSION}; it was not written by this PromptBatcher."
            )
        for key, config_key in _STATE_CONFIG_KEYS.items():
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"Cannot resume the data iterator: checkpoint has {key}={state.get(key)!r} "
                    f"but this run has {key}={getattr(self, key)!r}. Resume with the values the "
                    f"run started with ({config_key}), or start the data from scratch."
                )
        consumed = int(state["batches_consumed"])
        if consumed < 0 or (self.num_batches is not None and consumed > self.num_batches):
            raise DataError(
                f"Data-iterator state has batches_consumed={consumed}, outside [0, "
                f"{self.num_batches}] for this dataset."
            )
        self._iterator.set_state({"next_index": consumed})


def encode_sft_batch(
    tokenizer: Any,
    prompts: Sequence[str | Sequence[dict[str, str]]],
    responses: Sequence[str],
    *,
    max_prompt_len: int,
    max_response_len: int,
    use_chat_template: bool | None = None,
) -> dict[str, np.ndarray]:
    """Prompt + response pairs in the rollout layout, for a supervised warm-up.

    Prompts are rendered like `PromptBatcher` does and left-padded to P = max_prompt_len;
    responses get the eos token appended and are right-padded to R = max_response_len (a
    response longer than R is cut and loses its eos).

    Returns:
      "input_ids" [B, P+R] int32, "attention_mask" [B, P+R] int32,
      "loss_mask" [B, P+R] int32: 1 on response tokens (targets of the previous position).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses.")
    if tokenizer.eos_token_id is None:
        raise DataError("The tokenizer has no eos token; responses could not end.")
    records = [{"prompt": p, "reward_model": {"ground_truth": ""}, "data_source": "sft"}
               for p in prompts]
    encoder = PromptEncoder(records, tokenizer, max_prompt_len=max_prompt_len,
                            use_chat_template=use_chat_template)
    length = max_prompt_len + max_response_len
    input_ids = np.full((len(prompts), length), encoder.pad_id, dtype=np.int32)
    attention_mask = np.zeros((len(prompts), length), dtype=np.int32)
    loss_mask = np.zeros((len(prompts), length), dtype=np.int32)
    for i, response in enumerate(responses):
        prompt = encoder(i)
        ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        ids = (list(ids) + [tokenizer.eos_token_id])[:max_response_len]
        input_ids[i, :max_prompt_len] = prompt["input_ids"]
        attention_mask[i, :max_prompt_len] = prompt["attention_mask"]
        end = max_prompt_len + len(ids)
        input_ids[i, max_prompt_len:end] = ids
        attention_mask[i, max_prompt_len:end] = 1
        loss_mask[i, max_prompt_len:end] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def trim_padding(batch: dict[str, np.ndarray], *, mask_key: str = "attention_mask",
                 multiple: int = 8) -> dict[str, np.ndarray]:
    """The `[B, T]` arrays of `batch` without the columns in which no row has a token (the left
    padding that every prompt has, the right padding past the longest response), widened back to a
    multiple of `multiple` columns (right side first) so that few distinct widths recur: each new
    width is one more compilation. Positions count from each row's first token, so the model's
    outputs on the kept tokens do not change."""
    mask = np.asarray(batch[mask_key])
    T = mask.shape[1]
    used = np.flatnonzero(mask.any(axis=0))
    if used.size == 0:
        return batch
    lo, hi = int(used[0]), int(used[-1]) + 1
    width = min(T, -(-(hi - lo) // multiple) * multiple)
    hi = min(T, lo + width)
    lo = hi - width
    return {k: v[:, lo:hi] for k, v in batch.items()}
