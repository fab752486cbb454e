"""verl-layout parquet / JSONL sources: files written here with pyarrow and json are the oracle."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxrl_entropy.data.sources import DataError, deduplicate, load_records


def _chat(text):
    return [{"role": "user", "content": text}]


def _write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _write_jsonl(path, rows, blank_lines=False):
    lines = [json.dumps(r) for r in rows]
    if blank_lines:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


CHAT_ROWS = [
    {"prompt": _chat("What is 2+2?"), "reward_model": {"ground_truth": "4", "style": "rule"},
     "data_source": "math_dapo", "extra_info": {"index": 0}},
    {"prompt": [{"role": "system", "content": "Think."}, {"role": "user", "content": "3*3?"}],
     "reward_model": {"ground_truth": "9", "style": "rule"},
     "data_source": "math_dapo", "extra_info": {"index": 1}},
]


def test_parquet_chat_prompts(tmp_path):
    path = _write_parquet(tmp_path / "dapo.parquet", CHAT_ROWS)
    records = load_records(path)
    assert [r["prompt"] for r in records] == [row["prompt"] for row in CHAT_ROWS]
    assert [r["reward_model"]["ground_truth"] for r in records] == ["4", "9"]
    assert [r["data_source"] for r in records] == ["math_dapo", "math_dapo"]
    assert records[1]["extra_info"] == {"index": 1}


def test_jsonl_string_prompts_numbers_and_default_source(tmp_path):
    rows = [
        {"prompt": "1+1=", "reward_model": {"ground_truth": 2}},
        {"prompt": "half of 1", "reward_model": {"ground_truth": 0.5}},
        {"prompt": "3.0 as int", "reward_model": {"ground_truth": 3.0}},
    ]
    path = _write_jsonl(tmp_path / "gsm_small.jsonl", rows, blank_lines=True)
    records = load_records(path)
    assert [r["prompt"] for r in records] == ["1+1=", "half of 1", "3.0 as int"]
    assert [r["reward_model"]["ground_truth"] for r in records] == ["2", "0.5", "3"]
    assert all(r["data_source"] == "gsm_small" for r in records)
    assert all(r["reward_model"]["style"] == "rule" and r["extra_info"] == {} for r in records)
    assert load_records(path, data_source="mine")[0]["data_source"] == "mine"


def test_json_array_list_glob_and_directory(tmp_path):
    (tmp_path / "d").mkdir()
    a = _write_parquet(tmp_path / "d" / "a.parquet", CHAT_ROWS)
    b = _write_jsonl(tmp_path / "d" / "b.jsonl",
                     [{"prompt": "x", "reward_model": {"ground_truth": "1"}}])
    c = tmp_path / "c.json"
    c.write_text(json.dumps([{"prompt": "y", "reward_model": {"ground_truth": "2"}}]))
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    as_list = load_records([b, a, str(c)])
    assert [r["reward_model"]["ground_truth"] for r in as_list] == ["1", "4", "9", "2"]
    assert len(load_records(str(tmp_path / "d" / "*.parquet"))) == 2
    from_dir = load_records(str(tmp_path / "d"))  # sorted: a.parquet, b.jsonl
    assert [r["reward_model"]["ground_truth"] for r in from_dir] == ["4", "9", "1"]
    assert load_records(str(c))[0]["data_source"] == "c"


def test_prompt_key_and_max_records(tmp_path):
    rows = [{"question": f"q{i}", "reward_model": {"ground_truth": str(i)}} for i in range(5)]
    path = _write_jsonl(tmp_path / "q.jsonl", rows)
    records = load_records(path, prompt_key="question", max_records=3)
    assert [r["prompt"] for r in records] == ["q0", "q1", "q2"]


@pytest.mark.parametrize(
    "bad_row, field",
    [
        ({"prompt": "ok", "reward_model": {"style": "rule"}}, "reward_model.ground_truth"),
        ({"prompt": "ok"}, "reward_model"),
        ({"prompt": "   ", "reward_model": {"ground_truth": "1"}}, "'prompt'"),
        ({"prompt": [], "reward_model": {"ground_truth": "1"}}, "'prompt'"),
        ({"prompt": ["just a string"], "reward_model": {"ground_truth": "1"}}, "prompt[0]"),
        ({"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "1"}}, "content"),
        ({"prompt": [{"content": "hi"}], "reward_model": {"ground_truth": "1"}}, "role"),
        ({"prompt": 42, "reward_model": {"ground_truth": "1"}}, "'prompt'"),
        ({"prompt": "ok", "reward_model": {"ground_truth": True}}, "ground_truth"),
        ({"prompt": "ok", "reward_model": {"ground_truth": ["1", "2"]}}, "ground_truth"),
        ({"prompt": "ok", "reward_model": {"ground_truth": "1"}, "data_source": 7}, "data_source"),
    ],
)
def test_malformed_jsonl_row_names_file_row_and_field(tmp_path, bad_row, field):
    good = {"prompt": "fine", "reward_model": {"ground_truth": "1"}}
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, good, bad_row])
    with pytest.raises(DataError) as info:
        load_records(path)
    message = str(info.value)
    assert path in message and "row 2" in message and "line 3" in message
    assert field in message


def test_malformed_parquet_rows(tmp_path):
    rows = [
        {"prompt": "a", "reward_model": {"ground_truth": "1"}},
        {"prompt": "b", "reward_model": {"ground_truth": None}},
    ]
    path = _write_parquet(tmp_path / "missing_gt.parquet", rows)
    with pytest.raises(DataError, match=r"missing_gt\.parquet, row 1.*reward_model\.ground_truth"):
        load_records(path)
    rows = [{"prompt": _chat("a"), "reward_model": {"ground_truth": "1"}},
            {"prompt": _chat(""), "reward_model": {"ground_truth": "2"}}]
    path = _write_parquet(tmp_path / "empty_prompt.parquet", rows)
    with pytest.raises(DataError, match=r"empty_prompt\.parquet, row 1.*prompt"):
        load_records(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="matched no"):
        load_records(str(tmp_path / "absent.parquet"))
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"prompt": "a", "reward_model": {"ground_truth": "1"}}\n{not json\n')
    with pytest.raises(DataError, match=r"broken\.jsonl, row 1.*line 2.*invalid JSON"):
        load_records(str(bad))
    other = tmp_path / "data.csv"
    other.write_text("prompt,answer\n")
    with pytest.raises(DataError, match="Unsupported"):
        load_records(str(other))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="junk.parquet"):
        load_records(str(junk))


def test_non_utf8_byte_names_file_row_line_and_byte(tmp_path):
    good = json.dumps({"prompt": "fine", "reward_model": {"ground_truth": "1"}}).encode()
    bad = '{"prompt": "caf\u00e9?", "reward_model": {"ground_truth": "2"}}'.encode("latin-1")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n\n" + good + b"\n" + bad + b"\n")
    column = bad.index(b"\xe9")  # the oracle: where latin-1 put the one non-ASCII byte
    with pytest.raises(DataError) as info:
        load_records(str(path))
    message = str(info.value)
    assert f"{path}, row 2 (0-based; line 4)" in message
    assert f"b'\\xe9' at byte {column} of the line" in message and "not valid UTF-8" in message
    array = tmp_path / "latin1.json"
    array.write_bytes(b"[\n" + good + b",\n" + bad + b"\n]")
    with pytest.raises(DataError, match=rf"latin1\.json: b'\\xe9' at line 3, byte {column} .*not valid UTF-8"):
        load_records(str(array))


def test_rows_split_only_at_newlines_and_a_bom_is_ignored(tmp_path):
    rows = [{"prompt": "line\u2028separator \u0085 inside", "reward_model": {"ground_truth": "1"}},
            {"prompt": "second", "reward_model": {"ground_truth": "2"}}]
    text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert [r["prompt"] for r in load_records(str(path))] == [r["prompt"] for r in rows]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_ground_truth_is_refused(tmp_path, value):
    path = tmp_path / "nan.jsonl"
    path.write_text('{"prompt": "a", "reward_model": {"ground_truth": 1}}\n'
                    f'{{"prompt": "b", "reward_model": {{"ground_truth": {value}}}}}\n')
    with pytest.raises(DataError, match=r"nan\.jsonl, row 1 .*ground_truth is -?(nan|inf)"):
        load_records(str(path))
    parquet = _write_parquet(tmp_path / "nan.parquet", [{"prompt": "b", "reward_model": {"ground_truth": float(value)}}])
    with pytest.raises(DataError, match=r"nan\.parquet, row 0 .*ground_truth"):
        load_records(parquet)


def test_an_empty_file_among_good_ones_is_reported(tmp_path, caplog):
    good = _write_jsonl(tmp_path / "good.jsonl", [{"prompt": "x", "reward_model": {"ground_truth": "1"}}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with caplog.at_level("WARNING"):
        records = load_records([good, str(empty)])
    assert len(records) == 1
    assert any(str(empty) in r.getMessage() and "no rows" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match="No rows"):
        load_records(str(empty))


def test_dedupe_keeps_first_of_each_prompt_in_order(tmp_path):
    unique = [
        {"prompt": _chat(f"problem {i}"), "reward_model": {"ground_truth": str(i)},
         "extra_info": {"copy": 0}}
        for i in range(3)
    ]
    # DAPO-Math-17k style: every problem repeated many times, interleaved.
    rows = [dict(u, extra_info={"copy": c}) for c in range(5) for u in unique]
    path = _write_parquet(tmp_path / "dup.parquet", rows)
    assert len(load_records(path)) == 15
    records = load_records(path, dedupe=True)
    assert [r["prompt"][0]["content"] for r in records] == ["problem 0", "problem 1", "problem 2"]
    assert all(r["extra_info"] == {"copy": 0} for r in records)
    # A string prompt and a chat prompt with the same text are different prompts.
    mixed = [{"prompt": "p", "reward_model": {"ground_truth": "1", "style": "rule"},
              "data_source": "s", "extra_info": {}},
             {"prompt": _chat("p"), "reward_model": {"ground_truth": "1", "style": "rule"},
              "data_source": "s", "extra_info": {}}]
    assert len(deduplicate(mixed + mixed)) == 2


class _FakeBucketPath:
    """Stands in for `etils.epath.Path` on gs:// URLs, backed by a local directory."""

    root = None  # set per test

    def __init__(self, url):
        self.url = str(url).rstrip("/")

    def _local(self):
        return self.root / self.url.removeprefix("gs://")

    def glob(self, pattern):
        return [_FakeBucketPath("gs://" + p.relative_to(self.root).as_posix())
                for p in self._local().glob(pattern)]

    def iterdir(self):
        return [_FakeBucketPath(f"{self.url}/{p.name}") for p in self._local().iterdir()]

    def is_dir(self):
        return self._local().is_dir()

    def exists(self):
        return self._local().exists()

    def read_bytes(self):
        return self._local().read_bytes()

    def __str__(self):
        return self.url


def test_remote_paths_go_through_epath(tmp_path, monkeypatch):
    import types

    from jaxrl_entropy.data import sources

    (tmp_path / "bucket" / "dapo").mkdir(parents=True)
    _write_parquet(tmp_path / "bucket" / "dapo" / "part0.parquet", CHAT_ROWS)
    _write_jsonl(tmp_path / "bucket" / "dapo" / "part1.jsonl",
                 [{"prompt": "x", "reward_model": {"ground_truth": "1"}}])
    _FakeBucketPath.root = tmp_path
    monkeypatch.setattr(sources, "_epath", lambda: types.SimpleNamespace(Path=_FakeBucketPath))
    by_glob = load_records("gs://bucket/dapo/*.parquet")
    assert [r["reward_model"]["ground_truth"] for r in by_glob] == ["4", "9"]
    by_dir = load_records("gs://bucket/dapo")
    assert [r["data_source"] for r in by_dir] == ["math_dapo", "math_dapo", "part1"]
    with pytest.raises(DataError, match="matched no"):
        load_records("gs://bucket/dapo/none.parquet")

    class _NoDriver(_FakeBucketPath):
        def exists(self):
            raise ImportError("Please install gcsfs to access Google Storage")

    monkeypatch.setattr(sources, "_epath", lambda: types.SimpleNamespace(Path=_NoDriver))
    with pytest.raises(DataError, match="gs://bucket/a.parquet.*pip install gcsfs"):
        load_records("gs://bucket/a.parquet")


def test_an_eval_file_with_repeated_problems_is_scored_once_per_problem(tmp_path, caplog):
    # verl's AIME-2024 parquet holds each of its 30 problems 32 times; here 3 problems × 4 rows
    from jaxrl_entropy import presets
    from jaxrl_entropy.training import data_setup

    problems = [(f"Problem {i}: what is {i}+{i}?", str(2 * i)) for i in range(3)]
    rows = [{"prompt": _chat(q), "reward_model": {"ground_truth": a, "style": "rule"}, "data_source": "aime24",
             "extra_info": {"index": i, "repeat": r}}
            for r in range(4) for i, (q, a) in enumerate(problems)]
    path = _write_parquet(tmp_path / "aime24.parquet", rows)
    cfg = presets.demo()
    cfg.data.synthetic.eval_size = 0
    cfg.eval.benchmarks = f"aime24={path}"
    with caplog.at_level("INFO", logger="jaxrl_entropy"):
        evals = data_setup.eval_sets(cfg)
    assert [r["prompt"][0]["content"] for r in evals["aime24"]] == [q for q, _ in problems]
    assert [r["reward_model"]["ground_truth"] for r in evals["aime24"]] == [a for _, a in problems]
    assert "aime24: 12 rows, 3 distinct problems" in caplog.text
