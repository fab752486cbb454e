"""Writing data files in verl's layout, the one `train` and `eval` read without settings.

    rows = prepare.prepare(["/data/math500/test.jsonl"], "/data/math500.parquet",
                           layout.RowLayout(prompt_key="problem", answer_key="answer",
                                            template=layout.DAPO_TEMPLATE, settings="--"),
                           data_source="math500")

Every output row is `{"data_source", "prompt": [{"role": "user", "content": ...}], "ability": "MATH",
"reward_model": {"ground_truth": str, "style"}, "extra_info": {"index": int, "source": str}}`, the
schema of DAPO-Math-17k and verl's AIME files. Rows are kept as they are, repeats included (`eval`
de-duplicates prompts itself, `train` with `data.dedupe`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from jaxrl_entropy.data.layout import RowLayout
from jaxrl_entropy.data.sources import JSON_SUFFIXES, PARQUET_SUFFIXES, DataError, load_records, prompt_key_of

_MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
VERL_SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", _MESSAGES),
    ("ability", pa.string()),
    ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
    ("extra_info", pa.struct([("index", pa.int64()), ("source", pa.string())])),
])


@dataclasses.dataclass(frozen=True)
class Summary:
    """What `prepare` wrote: rows, distinct prompts, the data sources, and the first row's prompt."""
    out: str
    rows: int
    distinct: int
    data_sources: tuple[str, ...]
    first_prompt: str


def verl_row(record: dict[str, Any], index: int) -> dict[str, Any]:
    """A normalised record (`sources.load_records`) as one row of verl's layout; a plain prompt
    becomes one user message (what `train` renders it as anyway)."""
    prompt = record["prompt"]
    messages = [{"content": prompt, "role": "user"}] if isinstance(prompt, str) else [
        {"content": m["content"], "role": m["role"]} for m in prompt]
    return {"data_source": record["data_source"], "prompt": messages, "ability": "MATH",
            "reward_model": {"ground_truth": record["reward_model"]["ground_truth"],
                             "style": record["reward_model"]["style"]},
            "extra_info": {"index": index, "source": record["where"]}}


def write_rows(rows: list[dict[str, Any]], out: str, *, overwrite: bool = False) -> None:
    """`rows` (`verl_row`s) to `out`: parquet or JSONL by its suffix, written to a temporary file
    and renamed, so `out` never holds half a file."""
    if not out.endswith(PARQUET_SUFFIXES + JSON_SUFFIXES):
        raise DataError(f"--out={out}: name a parquet ({', '.join(PARQUET_SUFFIXES)}) or JSON lines (.jsonl) file")
    if os.path.exists(out) and not overwrite:
        raise DataError(f"--out={out} exists; pass --overwrite to replace it, or choose another name")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise DataError(f"--out={out}: the directory {parent} does not exist; create it first")
    tmp = f"{out}.partial"
    if out.endswith(PARQUET_SUFFIXES):
        pq.write_table(pa.Table.from_pylist(rows, schema=VERL_SCHEMA), tmp)
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(tmp, out)


def prepare(inputs: Sequence[str], out: str, layout: RowLayout, *, data_source: str | None = None,
            overwrite: bool = False) -> Summary:
    """Reads `inputs` (files, globs, directories) with `layout` (columns, prompt template), checks
    every row as `train` would, and writes them to `out` in verl's layout. `data_source` labels every
    row (default: each row's own, else its file's name)."""
    if os.path.abspath(out) in {os.path.abspath(p) for p in inputs}:
        raise DataError(f"--out={out} is also an input; write the converted file under another name")
    records = load_records(list(inputs), layout=layout)
    if data_source:
        records = [{**r, "data_source": data_source} for r in records]
    rows = [verl_row(r, i) for i, r in enumerate(records)]
    write_rows(rows, out, overwrite=overwrite)
    return Summary(out=out, rows=len(rows), distinct=len({prompt_key_of(r["prompt"]) for r in records}),
                   data_sources=tuple(dict.fromkeys(r["data_source"] for r in records)),
                   first_prompt=rows[0]["prompt"][-1]["content"])
