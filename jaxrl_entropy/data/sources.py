"""Reading prompt datasets from parquet and JSONL files, in verl's layout or another one.

A row in verl's layout holds `prompt` (a string, or chat messages `[{"role": ..., "content": ...}]`),
`reward_model.ground_truth` (string or number), and optionally `data_source` and `extra_info`.
Other layouts name their prompt and answer columns (`layout.RowLayout`: MATH-500's `problem` and
`answer`), and a bare problem can be put into the paper's prompt template. Every row is validated; a
malformed one raises `DataError` naming the file, the row and the field, and a file without the
columns names the columns it has and the setting to change. Paths may be one path, a list, a glob or
a directory; `gs://` (and other remote) paths go through `etils.epath`, the file system layer orbax
and grain use.
"""

from __future__ import annotations

import glob as globlib
import io
import json
import logging
import math
import os
from typing import Any, Iterable, Sequence

import pyarrow.parquet as pq

from jaxrl_entropy.data.layout import VERL_ANSWER_KEY, RowLayout, apply_template, get_field

PARQUET_SUFFIXES = (".parquet", ".pq")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
_GLOB_CHARS = "*?["
log = logging.getLogger("jaxrl_entropy")

_KNOWN_FIELDS = ("prompt", "reward_model", "data_source", "extra_info")  # verl's columns that are read
_UTF8_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """A dataset file or row that cannot be used; the message says where and how to fix it."""


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _epath():
    try:
        from etils import epath  # pylint: disable=import-outside-toplevel
    except ImportError as err:  # pragma: no cover - etils ships with orbax
        raise DataError(
            "Reading remote paths (gs://...) needs etils: `pip install 'etils[epath]' gcsfs`."
        ) from err
    return epath


def _local(path: str) -> str:
    return path.removeprefix("file://")


def resolve_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expands a path, a list of paths, globs and directories into a sorted list of data files.

    A directory contributes its parquet and JSON(L) files (not recursive). Order is sorted
    within each entry and follows the order of `paths` across entries, so it is deterministic.
    """
    entries = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not entries:
        raise DataError("No data paths given: set the config key `data.train_files` (or the "
                        "`paths` argument) to a file, a list, a glob or a directory.")
    files: list[str] = []
    for entry in entries:
        entry = os.fspath(entry)
        matched = _expand(entry)
        if not matched:
            raise DataError(
                f"Data path {entry!r} matched no parquet/JSONL file. Check the path (and the "
                f"glob pattern); supported suffixes: {PARQUET_SUFFIXES + JSON_SUFFIXES}."
            )
        files.extend(matched)
    return files


def _remote_failure(path: str, err: Exception) -> DataError:
    hint = (" Install the file-system driver: `pip install gcsfs` (gs://) or `s3fs` (s3://)."
            if isinstance(err, ImportError) else " Check the path and your credentials.")
    return DataError(f"Cannot access remote data path {path!r}: {err}.{hint}")


def _expand(entry: str) -> list[str]:
    data_suffixes = PARQUET_SUFFIXES + JSON_SUFFIXES
    if _is_remote(entry):
        try:
            return _expand_remote(entry, data_suffixes)
        except DataError:
            raise
        except Exception as err:  # the driver's own errors: missing package, auth, network
            raise _remote_failure(entry, err) from err
    local = _local(entry)
    if any(c in local for c in _GLOB_CHARS):
        return sorted(p for p in globlib.glob(local) if os.path.isfile(p))
    if os.path.isdir(local):
        return sorted(
            os.path.join(local, f) for f in os.listdir(local) if f.endswith(data_suffixes)
        )
    return [local] if os.path.isfile(local) else []


def _expand_remote(entry: str, data_suffixes: tuple[str, ...]) -> list[str]:
    epath = _epath()
    if any(c in entry for c in _GLOB_CHARS):
        # epath globs relative to a directory: split the pattern at its first glob segment.
        parts = entry.split("/")
        first = next(i for i, p in enumerate(parts) if any(c in p for c in _GLOB_CHARS))
        base, pattern = "/".join(parts[:first]), "/".join(parts[first:])
        return sorted(str(p) for p in epath.Path(base).glob(pattern))
    path = epath.Path(entry)
    if path.is_dir():
        return sorted(str(c) for c in path.iterdir() if str(c).endswith(data_suffixes))
    return [entry] if path.exists() else []


def _read_bytes(path: str) -> bytes:
    if _is_remote(path):
        try:
            return _epath().Path(path).read_bytes()
        except Exception as err:  # the driver's own errors: missing package, auth, network
            raise _remote_failure(path, err) from err
    with open(path, "rb") as f:
        return f.read()


def _stem(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    for suffix in PARQUET_SUFFIXES + JSON_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _utf8(raw: bytes, where: str, *, whole_file: bool = False) -> str:
    """`raw` decoded as UTF-8; a bad byte is a DataError naming the file, row and position."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1)
        line = raw.count(b"\n", 0, err.start) + 1
        at = f"line {line}, byte {column}" if whole_file else f"byte {column} of the line"
        raise DataError(
            f"{where}: {raw[err.start:err.start + 1]!r} at {at} (0-based) is not valid UTF-8. "
            "Data files must be UTF-8: re-encode the file (e.g. `iconv -f latin1 -t utf-8`) or "
            "fix the row."
        ) from None


def _columns_of(rows: list[tuple[str, Any]]) -> list[str]:
    """The keys of a JSON file's objects, in order of first appearance."""
    seen: dict[str, None] = {}
    for _, row in rows:
        if isinstance(row, dict):
            seen.update(dict.fromkeys(row))
    return list(seen)


def _read_located_rows(path: str, wanted: Sequence[str] = _KNOWN_FIELDS) -> tuple[list[tuple[str, Any]], list[str]]:
    """Rows of one file, each with where it is ("row i" (0-based), plus the line for JSONL), and
    the file's columns. Of a parquet file only the `wanted` columns are read."""
    if path.endswith(PARQUET_SUFFIXES):
        source: Any = path if not _is_remote(path) else io.BytesIO(_read_bytes(path))
        try:
            schema = pq.read_schema(source)
            if isinstance(source, io.BytesIO):
                source.seek(0)
            # Only the layout's columns: DAPO-style files carry large unused ones.
            columns = [c for c in dict.fromkeys(wanted) if c in schema.names]
            rows = pq.read_table(source, columns=columns).to_pylist()
        except Exception as err:  # pyarrow raises several types for unreadable files
            raise DataError(f"Cannot read parquet file {path!r}: {err}") from err
        return [(f"{path}, row {i} (0-based)", row) for i, row in enumerate(rows)], list(schema.names)
    if path.endswith(JSON_SUFFIXES):
        raw = _read_bytes(path).removeprefix(_UTF8_BOM)
        if path.endswith(".json") and raw.lstrip().startswith(b"["):
            try:
                rows = json.loads(_utf8(raw, path, whole_file=True))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: invalid JSON ({err}).") from err
            located = [(f"{path}, row {i} (0-based)", row) for i, row in enumerate(rows)]
            return located, _columns_of(located)
        located = []
        # Split on b"\n" only: str.splitlines would also split inside a row at U+2028 and
        # other separators that JSON allows unescaped in strings.
        for line_number, raw_line in enumerate(raw.split(b"\n"), start=1):
            if not raw_line.strip():
                continue
            where = f"{path}, row {len(located)} (0-based; line {line_number})"
            line = _utf8(raw_line, where)
            try:
                located.append((where, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{where}: invalid JSON ({err.msg}). Each line of a JSONL file must be one "
                    "JSON object."
                ) from err
        return located, _columns_of(located)
    raise DataError(
        f"Unsupported data file {path!r}: use parquet ({', '.join(PARQUET_SUFFIXES)}) or "
        f"JSON lines ({', '.join(JSON_SUFFIXES)})."
    )


def _normalise_prompt(value: Any, where: str, key: str) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field {key!r} is an empty string; every row needs a "
                            "non-empty prompt (drop the row or fill it in).")
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise DataError(f"{where}: field {key!r} is an empty message list; give at least "
                            'one message {"role": "user", "content": "..."}.')
        messages = []
        for i, message in enumerate(value):
            if not isinstance(message, dict):
                raise DataError(
                    f"{where}: field {key}[{i}] is a {type(message).__name__}, expected a message "
                    'object {"role": ..., "content": ...}.'
                )
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str) or not role:
                raise DataError(f"{where}: field {key}[{i}].role is missing or not a string "
                                '(use "system", "user" or "assistant").')
            if not isinstance(content, str):
                raise DataError(f"{where}: field {key}[{i}].content is missing or not a string.")
            messages.append({"role": role, "content": content})
        if not any(m["content"].strip() for m in messages):
            raise DataError(f"{where}: field {key!r} has only empty message contents.")
        return messages
    if value is None:
        raise DataError(f"{where}: field {key!r} is missing (or null) in this row. Each row needs a prompt "
                        "string or a list of chat messages in that column.")
    raise DataError(f"{where}: field {key!r} is a {type(value).__name__}; expected a string or "
                    'a list of {"role", "content"} messages.')


def _normalise_ground_truth(value: Any, where: str, key: str = VERL_ANSWER_KEY) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]  # OlympiadBench's `final_answer` is a list holding the one answer
    if isinstance(value, bool) or value is None or not isinstance(value, (str, int, float)):
        what = "missing" if value is None else f"a {type(value).__name__}"
        if isinstance(value, (list, tuple)):
            what = (f"a list of {len(value)} answers (one answer per row: join them into one string, or "
                    "leave the row out)")
        example = ('e.g. {"reward_model": {"ground_truth": "81", "style": "rule"}}' if key == VERL_ANSWER_KEY
                   else f'e.g. {{"{key}": "81"}}')
        raise DataError(f"{where}: field {key} is {what}; it must be a string or a number, {example}.")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(
                f"{where}: field {key} is {value!r}, which no answer can "
                "match; give the answer as a string or a finite number (or drop the row)."
            )
        # JSON writers turn 3 into 3.0; the answer "3" must still match.
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    if not text:
        raise DataError(f"{where}: field {key} is an empty string.")
    return text


def _templated(prompt: str | list[dict[str, str]], layout: RowLayout, where: str) -> str | list[dict[str, str]]:
    if not layout.template:
        return prompt
    if not isinstance(prompt, str):
        raise DataError(
            f"{where}: a prompt template is set ({layout.setting('prompt_template')}), but field "
            f"{layout.prompt_key!r} holds chat messages. The template is for a bare problem text; chat messages "
            "are used as they are (DAPO-Math-17k's and verl's AIME files already hold the instruction). Set "
            f"{layout.setting('prompt_template')}='' for this file.")
    return apply_template(layout.template, prompt)


def normalise_row(
    row: Any, *, where: str, default_source: str, prompt_key: str = "prompt",
    layout: RowLayout | None = None,
) -> dict[str, Any]:
    """Validates one raw row and returns the normalised record (see module docstring).

    `where` names the row in error messages ("file.jsonl, row 3"); `default_source` is the
    `data_source` of a row without one; `layout` says which columns hold the prompt and the answer
    and the template for a bare problem (default: verl's layout, with `prompt_key` as its prompt column).
    """
    layout = layout or RowLayout(prompt_key=prompt_key)
    if not isinstance(row, dict):
        raise DataError(f"{where}: row is a {type(row).__name__}, expected an object.")
    prompt = _templated(_normalise_prompt(get_field(row, layout.prompt_key), where, layout.prompt_key), layout, where)
    reward_model = row.get("reward_model")
    if layout.answer_key == VERL_ANSWER_KEY:
        if not isinstance(reward_model, dict):
            raise DataError(
                f"{where}: field reward_model is {'missing' if reward_model is None else 'not an object'}"
                '; expected {"reward_model": {"ground_truth": ..., "style": "rule"}}.'
            )
        style = reward_model.get("style") or "rule"
    else:
        style = (reward_model.get("style") if isinstance(reward_model, dict) else None) or "rule"
    ground_truth = _normalise_ground_truth(get_field(row, layout.answer_key), where, layout.answer_key)
    data_source = row.get("data_source")
    if data_source is None:
        data_source = default_source
    elif not isinstance(data_source, str) or not data_source:
        raise DataError(f"{where}: field data_source must be a non-empty string, got "
                        f"{data_source!r} (or leave it out: the file name is used).")
    extra_info = row.get("extra_info")
    if extra_info is None:
        extra_info = {}
    elif not isinstance(extra_info, dict):
        raise DataError(f"{where}: field extra_info must be an object, got "
                        f"{type(extra_info).__name__}.")
    return {
        "prompt": prompt,
        "reward_model": {"ground_truth": ground_truth, "style": str(style)},
        "data_source": data_source,
        "extra_info": dict(extra_info),
        "where": where,  # for later messages about the row (a prompt too long for data.max_prompt_len)
    }


def prompt_key_of(prompt: str | list[dict[str, str]]) -> tuple:
    """Hashable identity of a prompt, for de-duplication."""
    if isinstance(prompt, str):
        return ("text", prompt)
    return ("chat",) + tuple((m["role"], m["content"]) for m in prompt)


def deduplicate(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keeps the first record of every distinct prompt (DAPO-Math-17k repeats each 100×)."""
    first: dict[tuple, dict[str, Any]] = {}
    conflicts = 0
    for record in records:
        key = prompt_key_of(record["prompt"])
        kept = first.setdefault(key, record)
        if kept is not record and (
            kept["reward_model"]["ground_truth"] != record["reward_model"]["ground_truth"]
        ):
            conflicts += 1
    if conflicts:
        log.warning(
            "deduplicate: %d duplicate prompts had a different ground truth than their first "
            "occurrence; the first one was kept.", conflicts,
        )
    return list(first.values())


def load_records(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    dedupe: bool = False,
    prompt_key: str = "prompt",
    data_source: str | None = None,
    max_records: int | None = None,
    layout: RowLayout | None = None,
) -> list[dict[str, Any]]:
    """Reads and validates rows from parquet/JSONL files, in verl's layout or the one `layout` names.

    Args:
      paths: a file, a glob, a directory, or a list of them (local or `gs://`).
      dedupe: keep only the first row of every distinct prompt (after the template).
      prompt_key: the column holding the prompt in verl's layout (verl's `data.prompt_key`); ignored
        when `layout` is given.
      data_source: overrides the default `data_source` of rows without one (default: file stem).
      max_records: keep at most this many records (after de-duplication), in file order.
      layout: the prompt and answer columns and the template for a bare problem (`layout.RowLayout`);
        default verl's. A file without those columns raises `DataError` naming the columns it has
        and the settings that read it.

    Returns:
      Records `{"prompt", "reward_model": {"ground_truth": str, "style"}, "data_source",
      "extra_info", "where"}` ("where": the file and row it was read from).
    """
    layout = layout or RowLayout(prompt_key=prompt_key)
    wanted = (*_KNOWN_FIELDS, *layout.columns())
    records: list[dict[str, Any]] = []
    for path in resolve_paths(paths):
        default_source = data_source if data_source is not None else _stem(path)
        rows, columns = _read_located_rows(path, wanted)
        if not rows:
            log.warning("data file %s has no rows: it adds nothing to the dataset.", path)
        elif (message := layout.missing_column_message(path, columns)) is not None:
            raise DataError(message)
        records.extend(
            normalise_row(row, where=where, default_source=default_source, layout=layout)
            for where, row in rows
        )
    if dedupe:
        records = deduplicate(records)
    if max_records is not None:
        records = records[:max_records]
    if not records:
        raise DataError(f"No rows in {paths!r}: the data files are empty.")
    return records
