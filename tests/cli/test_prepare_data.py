"""`jaxrl-entropy prepare-data`: another layout → verl's, checked against the published DAPO-Math-17k
schema and rows written by hand (`fixtures/real_format.py`)."""
import json

import pyarrow.parquet as pq

from conftest import real_format
from jaxrl_entropy import cli
from jaxrl_entropy.data.sources import load_records

MATH500 = ["--prompt_key=problem", "--answer_key=answer", "--prompt_template=dapo", "--data_source=math500"]


def _prepare(*args):
    return cli.main(["jaxrl-entropy", "prepare-data", *args])


def test_math500_becomes_verl_rows_with_the_paper_prompt(tmp_path, real_format_files, capsys):
    out = tmp_path / "math500.parquet"
    assert _prepare(f"--in={real_format_files['math500']}", f"--out={out}", *MATH500) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 rows (3 distinct prompts; data_source math500)" in printed
    assert real_format.dapo_prompt(real_format.MATH500_ROWS[0]["problem"]) in printed  # the first prompt, to read
    # the columns and types of DAPO-Math-17k's file (extra_info is ours: the row's index and origin)
    schema, dapo = pq.read_schema(out), real_format.VERL_SCHEMA
    assert schema.names == dapo.names
    assert all(schema.field(c).type == dapo.field(c).type for c in ("data_source", "prompt", "ability",
                                                                     "reward_model"))
    rows = pq.read_table(out).to_pylist()
    assert rows[2] == {"data_source": "math500",
                       "prompt": [{"content": real_format.dapo_prompt("Simplify $\\frac{6}{8}$."), "role": "user"}],
                       "ability": "MATH", "reward_model": {"ground_truth": "\\frac{3}{4}", "style": "rule"},
                       "extra_info": {"index": 2, "source": f"{real_format_files['math500']}, row 2 (0-based; line 3)"}}
    # what train and eval read from it, in verl's layout with no settings
    assert [r["prompt"][0]["content"] for r in load_records(str(out))] == [
        real_format.dapo_prompt(r["problem"]) for r in real_format.MATH500_ROWS]


def test_jsonl_output_and_a_verl_file_passes_through(tmp_path, real_format_files):
    out = tmp_path / "aime.jsonl"
    assert _prepare(f"--in={real_format_files['aime']}", f"--out={out}") == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == real_format.AIME_REPEATS * len(real_format.AIME_PROBLEMS)  # repeats kept: eval drops them
    assert rows[0]["prompt"] == [{"content": real_format.dapo_prompt(real_format.AIME_PROBLEMS[0][0]), "role": "user"}]
    assert rows[0]["reward_model"] == {"ground_truth": "738", "style": "rule-lighteval/MATH_v2"}
    assert rows[0]["data_source"] == "aime24"


def test_an_existing_output_is_kept_unless_overwrite(tmp_path, real_format_files, capsys):
    out = tmp_path / "m.parquet"
    out.write_text("mine")
    assert _prepare(f"--in={real_format_files['math500']}", f"--out={out}", *MATH500) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_text() == "mine"
    assert _prepare(f"--in={real_format_files['math500']}", f"--out={out}", *MATH500, "--overwrite") == 0
    assert pq.read_table(out).num_rows == 3
    assert _prepare(f"--in={out}", f"--out={out}", "--overwrite") == 1
    assert "also an input" in capsys.readouterr().err


def test_errors_name_the_flag_to_set(tmp_path, real_format_files, capsys):
    src = real_format_files["math500"]
    assert _prepare(f"--in={src}", f"--out={tmp_path / 'a.parquet'}") == 1
    err = capsys.readouterr().err
    assert f"{src}: no prompt column 'prompt'" in err and "columns found: problem, solution, answer" in err
    assert "--prompt_key=problem --answer_key=answer --prompt_template=dapo" in err
    assert _prepare(f"--in={src}", f"--out={tmp_path / 'a.parquet'}", "--prompt_template=Q: {q}") == 2
    assert "--prompt_template: prompt template 'Q: {q}'" in capsys.readouterr().err
    assert _prepare(f"--in={src}", f"--out={tmp_path / 'a.csv'}", *MATH500) == 1
    assert "name a parquet" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_console_script_lists_prepare_data(capsys):
    assert cli.main(["jaxrl-entropy", "--help"]) == 0
    assert "jaxrl-entropy prepare-data --in=FILE --out=OUT.parquet" in capsys.readouterr().out
