"""Files that are not in verl's layout: named columns, the paper's prompt template, and errors that say
which setting reads a file. Oracles: the published texts and rows written by hand in
`fixtures/real_format.py` (DAPO-Math-17k's user message, MATH-500's rows)."""
import json

import pytest

from conftest import real_format
from jaxrl_entropy import presets
from jaxrl_entropy.config import ConfigError, train_layout, validate
from jaxrl_entropy.data import layout
from jaxrl_entropy.data.sources import DataError, load_records
from jaxrl_entropy.training import data_setup


def _files_config(train_files, **data):
    c = presets.demo()
    c.data.kind, c.data.train_files, c.train.sft_steps = "files", str(train_files), 0
    c.data.synthetic.eval_size = 0
    for key, value in data.items():
        c.data[key] = value
    return validate(c)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_the_dapo_template_is_dapo_math_17k_prompt():
    for problem, _ in real_format.DAPO_PROBLEMS + real_format.AIME_PROBLEMS:  # LaTeX braces included
        assert layout.apply_template(layout.resolve_template("dapo"), problem) == real_format.dapo_prompt(problem)


@pytest.mark.parametrize("template, ok", [("", True), ("dapo", True), ("Q: {problem}\nA:", True),
                                          ("Q: {question}", False), ("{problem} and {problem}", False)])
def test_a_template_is_none_a_name_or_a_text_holding_the_problem_once(template, ok):
    if ok:
        layout.resolve_template(template)
    else:
        with pytest.raises(ValueError, match=r"'dapo'.*\{problem\} exactly once"):
            layout.resolve_template(template)


def test_a_plain_problem_file_read_with_the_config_keys_gives_the_paper_prompts(real_format_files):
    cfg = _files_config(real_format_files["math500"], prompt_key="problem", answer_key="answer",
                        prompt_template="dapo")
    train, _, _ = data_setup.datasets(cfg)
    assert [r["prompt"] for r in train] == [real_format.dapo_prompt(r["problem"]) for r in real_format.MATH500_ROWS]
    assert [r["reward_model"]["ground_truth"] for r in train] == ["11", "4", "\\frac{3}{4}"]
    assert {r["data_source"] for r in train} == {"test"}  # the file's name, as for verl files without one


def test_dapo_math_17k_is_read_as_it_is_and_its_repeats_dropped(real_format_files):
    train, _, _ = data_setup.datasets(_files_config(real_format_files["dapo"]))
    assert len(train) == 8  # by hand: DAPO_PROBLEMS holds 8 problems, each written 3 times
    assert [r["prompt"][0]["content"] for r in train] == [real_format.dapo_prompt(q) for q, _ in
                                                          real_format.DAPO_PROBLEMS]
    assert {r["reward_model"]["style"] for r in train} == {"rule-lighteval/MATH_v2"}


def test_one_problem_as_a_plain_row_and_as_a_dapo_row_gives_the_same_tokens(tmp_path, real_format_files,
                                                                            qwen3_tokenizer_dir):
    from jaxrl_entropy.data.pipeline import PromptEncoder
    from jaxrl_entropy.data.tokenizer import load_tokenizer

    problem, answer = real_format.DAPO_PROBLEMS[0]
    plain = load_records(_jsonl(tmp_path / "plain.jsonl", [{"problem": problem, "answer": answer}]),
                         layout=layout.RowLayout("problem", "answer", layout.DAPO_TEMPLATE))
    dapo = load_records(real_format_files["dapo"], max_records=1)
    tokenizer = load_tokenizer(qwen3_tokenizer_dir[0])
    a, b = (PromptEncoder(r, tokenizer, max_prompt_len=256).token_ids(0) for r in (plain, dapo))
    assert a == b
    assert a[0].startswith("<|im_start|>user\nSolve the following") and a[0].endswith("<|im_start|>assistant\n")


def test_a_training_file_without_the_columns_names_them_and_the_config_keys(real_format_files):
    with pytest.raises(DataError) as e:
        data_setup.datasets(_files_config(real_format_files["math500"]))
    message = str(e.value)
    assert real_format_files["math500"] in message
    assert "no prompt column 'prompt'" in message and "no answer column 'reward_model'" in message
    assert "columns found: problem, solution, answer, subject, level, unique_id" in message
    assert ("--config.data.prompt_key=problem --config.data.answer_key=answer "
            "--config.data.prompt_template=dapo") in message
    assert "jaxrl-entropy prepare-data" in message and "docs/data.md" in message


def test_an_eval_file_not_in_verl_layout_points_to_prepare_data(real_format_files):
    cfg = presets.demo()
    cfg.data.synthetic.eval_size = 0
    cfg.eval.benchmarks = f"math500={real_format_files['math500']}"
    with pytest.raises(DataError) as e:
        data_setup.eval_sets(cfg)
    message = str(e.value)
    assert message.startswith("config.eval.benchmarks entry 'math500': ")
    assert (f"jaxrl-entropy prepare-data --in={real_format_files['math500']} --out=<name>.parquet "
            "--prompt_key=problem --answer_key=answer --prompt_template=dapo") in message
    assert "--config.data." not in message  # those keys are for training files only


def test_a_template_over_chat_messages_is_refused(real_format_files):
    cfg = _files_config(real_format_files["dapo"], prompt_template="dapo")
    with pytest.raises(DataError, match=r"row 0 .*--config\.data\.prompt_template.*holds chat messages"):
        data_setup.datasets(cfg)


def test_nested_answer_keys_and_one_answer_lists(tmp_path):
    rows = [{"question": "1+1?", "final_answer": ["2"], "meta": {"answer": 2}},
            {"question": "2+2?", "final_answer": ["$4$"], "meta": {"answer": "4"}}]
    path = _jsonl(tmp_path / "olympiad.jsonl", rows)
    by_list = load_records(path, layout=layout.RowLayout("question", "final_answer"))
    assert [r["reward_model"]["ground_truth"] for r in by_list] == ["2", "$4$"]
    nested = load_records(path, layout=layout.RowLayout("question", "meta.answer"))
    assert [r["reward_model"]["ground_truth"] for r in nested] == ["2", "4"]
    two = _jsonl(tmp_path / "two.jsonl", [{"question": "x^2=1?", "final_answer": ["1", "-1"]}])
    with pytest.raises(DataError, match=r"two.jsonl, row 0 .*field final_answer is a list of 2 answers"):
        load_records(two, layout=layout.RowLayout("question", "final_answer"))


@pytest.mark.parametrize("key, value, message", [
    ("prompt_template", "Q: {question}", "config.data.prompt_template: prompt template 'Q: {question}'"),
    ("prompt_key", "", "config.data.prompt_key='' must name a column"),
    ("answer_key", "reward_model.", "config.data.answer_key='reward_model.' must name a column"),
])
def test_bad_layout_keys_name_the_config_key(key, value, message):
    c = presets.demo()
    c.data[key] = value
    with pytest.raises(ConfigError) as e:
        validate(c)
    assert message in str(e.value)


def test_the_default_layout_is_verls():
    assert train_layout(presets.demo()).is_verl and train_layout(presets.qwen3_8b_dapo()).is_verl
