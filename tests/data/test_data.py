"""Demo tokenizer and synthetic arithmetic task.

Oracles: a hand-written character → id map (printable ASCII in order after 4 special tokens),
hand-written chat strings, python's own `eval` of the prompt expression, and a regex that
re-checks every arithmetic claim in a scratchpad.
"""

import re

import pytest
import transformers

from jaxrl_entropy.data.synthetic import ArithmeticTask
from jaxrl_entropy.data.tokenizer import build_demo_tokenizer, load_tokenizer
from jaxrl_entropy.rl.rewards import math_reward  # a plain import: a broken reward must fail

_SPECIAL_IDS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|unk|>": 3}


def oracle_ids(text: str) -> list[int]:
    """Independent tokenisation: specials by name, then ' '..'~' → 4.., '\\n' → 99, '\\t' → 100."""
    out = []
    for piece in re.split(r"(<\|endoftext\|>|<\|im_start\|>|<\|im_end\|>)", text):
        if piece in _SPECIAL_IDS:
            out.append(_SPECIAL_IDS[piece])
            continue
        for ch in piece:
            if ch == "\n":
                out.append(99)
            elif ch == "\t":
                out.append(100)
            elif 32 <= ord(ch) < 127:
                out.append(ord(ch) - 32 + 4)
            else:
                out.append(3)
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


# ------------------------------------------------------------------------------ tokenizer


def test_tokenizer_ids_match_char_map_and_round_trip(tokenizer):
    text = "23+58: 3+8=11 c1, 2+5+1=8 so \\boxed{81}\n(7*6)-4 = 38\tAnswer: XYZ ~|`"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == oracle_ids(text)
    assert tokenizer.decode(ids) == text


def test_tokenizer_vocabulary_and_special_tokens(tokenizer):
    assert 64 <= len(tokenizer) <= 128
    assert len(tokenizer) == 4 + 95 + 2
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 1
    assert tokenizer.padding_side == "left"
    # Characters outside the set become <|unk|>, never an error.
    assert tokenizer("é", add_special_tokens=False)["input_ids"] == [3]
    # Special tokens are atomic and decoding can skip them.
    ids = tokenizer("<|im_start|>ab<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids == [1, 69, 70, 2]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"


def test_tokenizer_is_deterministic(tokenizer):
    assert build_demo_tokenizer().get_vocab() == tokenizer.get_vocab()


def test_chat_template_matches_qwen_layout(tokenizer):
    messages = [{"role": "user", "content": "23+58="}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\n23+58=<|im_end|>\n<|im_start|>assistant\n"
    two_turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+1="},
    ]
    text = tokenizer.apply_chat_template(two_turns, add_generation_prompt=False, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1=<|im_end|>\n"


def test_save_and_reload(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    text = "<|im_start|>user\n99+1=<|im_end|>\n"
    messages = [{"role": "user", "content": "4+4="}]
    for reloaded in (
        transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True),
        load_tokenizer(str(tmp_path)),
    ):
        assert reloaded(text, add_special_tokens=False)["input_ids"] == oracle_ids(text)
        assert reloaded.pad_token_id == 0 and reloaded.eos_token_id == 2
        assert reloaded.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        ) == "<|im_start|>user\n4+4=<|im_end|>\n<|im_start|>assistant\n"
    assert load_tokenizer(str(tmp_path)).padding_side == "left"


def test_load_tokenizer_errors_and_pad_fallback(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json") as info:
        load_tokenizer(str(empty))
    assert str(empty) in str(info.value)

    no_pad = build_demo_tokenizer()
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path / "nopad")
    loaded = load_tokenizer(str(tmp_path / "nopad"))
    assert loaded.pad_token == "<|im_end|>" and loaded.pad_token_id == 2


# ------------------------------------------------------------------------------ synthetic task

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_CLAIM = re.compile(r"(-?\d+(?:[+\-*]\d+)+)=(-?\d+)")

TASKS = [
    ArithmeticTask(),
    ArithmeticTask(digits=3, num_terms=3),
    ArithmeticTask(digits=1, num_terms=4),
    ArithmeticTask(digits=2, num_terms=3, ops="+-*"),
    ArithmeticTask(digits=2, num_terms=2, ops="-"),
    ArithmeticTask(digits=2, num_terms=2, ops="*", chat=False),
    ArithmeticTask(digits=2, scratchpad="none"),
    ArithmeticTask(digits=3, ops="*", scratchpad="long"),
]


def _prompt_text(record) -> str:
    prompt = record["prompt"]
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


@pytest.mark.parametrize("task", TASKS, ids=lambda t: f"d{t.digits}n{t.num_terms}{t.ops}{t.scratchpad}")
def test_reference_solutions_are_correct(task):
    for split in ("train", "test"):
        for record in task.records(split, 60, seed=3):
            text = _prompt_text(record)
            assert text.endswith("=")
            expected = eval(text[:-1])  # python's own precedence and arithmetic
            solution = task.reference_solution(record)
            boxed = _BOXED.findall(solution)
            assert boxed and int(boxed[-1]) == expected, (text, solution)
            assert record["reward_model"]["ground_truth"] == str(expected)
            # Every claim "a+b+c=s" / "a*b=p" / "a-b=d" in the scratchpad is true arithmetic.
            for lhs, rhs in _CLAIM.findall(solution.split(":", 1)[-1]):
                assert eval(lhs) == int(rhs), (lhs, rhs, solution)


def test_column_scratchpad_matches_example():
    task = ArithmeticTask()
    record = {"prompt": [{"role": "user", "content": "23+58="}], "extra_info": {}}
    assert task.reference_solution(record) == "23+58: 3+8=11 c1, 2+5+1=8 so \\boxed{81}"
    record = {"prompt": "99+99=", "extra_info": {}}
    assert task.reference_solution(record) == "99+99: 9+9=18 c1, 9+9+1=19 so \\boxed{198}"
    steps = ArithmeticTask(ops="+-*", num_terms=3)
    record = {"prompt": "12-34*5=", "extra_info": {}}
    assert steps.reference_solution(record) == "12-34*5: 34*5=170, 12-170=-158 so \\boxed{-158}"


def test_long_multiplication_scratchpad_by_hand(tokenizer):
    task = ArithmeticTask(digits=2, ops="*", scratchpad="long")
    record = {"prompt": "47*28=", "extra_info": {}}
    assert task.reference_solution(record) == (
        "47*28: 47*8: 7*8=56 c5, 4*8+5=37 so 376; 47*2: 7*2=14 c1, 4*2+1=9 so 94, 940; "
        "376+940: 6+0=6, 7+4=11 c1, 3+9+1=13 so \\boxed{1316}")
    task3 = ArithmeticTask(digits=3, ops="*", scratchpad="long")
    partial = re.compile(r"(\d+)\*(\d): [^;]*? so (\d+)(?:, (\d+))?")
    lengths = []
    for record in task3.records("train", 100, seed=1):
        a, b = (int(t) for t in _prompt_text(record)[:-1].split("*"))
        solution = task3.reference_solution(record)
        found = partial.findall(solution)
        assert [int(d) for _, d, _, _ in found] == [int(d) for d in reversed(str(b))]
        for place, (x, d, product, shifted) in enumerate(found):
            assert int(x) == a and int(product) == a * int(d)
            assert int(shifted or product) == a * int(d) * 10 ** place
        lengths.append(len(tokenizer(solution, add_special_tokens=False)["input_ids"]))
    assert min(lengths) >= 100   # the longer-reasoning task: 100+ response tokens


def test_default_task_response_length_suits_cpu_rl(tokenizer):
    task = ArithmeticTask()
    lengths = [
        len(tokenizer(task.reference_solution(r), add_special_tokens=False)["input_ids"])
        for r in task.records("train", 200)
    ]
    # ≈ 15–40 tokens: long enough for distinct roles, short enough for CPU rollouts (+1 eos).
    assert 15 <= min(lengths) and max(lengths) <= 41


def test_record_layout_and_operand_digits():
    task = ArithmeticTask(digits=3, num_terms=2)
    record = task.problem(5, "train")
    assert set(record) == {"prompt", "reward_model", "data_source", "extra_info"}
    assert record["data_source"] == "synthetic_arith"
    assert record["reward_model"]["style"] == "rule"
    assert record["extra_info"]["index"] == 5 and record["extra_info"]["split"] == "train"
    assert record["prompt"][0]["role"] == "user"
    for r in task.records("train", 100):
        operands = re.split(r"[+\-*]", _prompt_text(r)[:-1])
        assert all(len(o) == 3 and o[0] != "0" for o in operands)
    assert isinstance(ArithmeticTask(chat=False).problem(0, "train")["prompt"], str)


def test_splits_are_disjoint_for_any_seeds():
    task = ArithmeticTask()  # 8100 expressions in all
    train = {_prompt_text(r) for seed in (0, 1) for r in task.records("train", 2000, seed=seed)}
    test = {_prompt_text(r) for seed in (0, 2) for r in task.records("test", 300, seed=seed)}
    assert not train & test
    # The held-out share is close to heldout_fraction (hash split of the whole space).
    all_exprs = [f"{a}+{b}" for a in range(10, 100) for b in range(10, 100)]
    share = sum(task.split_of(e) == "test" for e in all_exprs) / len(all_exprs)
    assert 0.08 < share < 0.12


def test_records_deterministic_distinct_and_seeded():
    task = ArithmeticTask()
    a = task.records("train", 300, seed=7)
    assert a == ArithmeticTask().records("train", 300, seed=7)
    assert len({_prompt_text(r) for r in a}) == 300
    b = task.records("train", 300, seed=8)
    assert [_prompt_text(r) for r in a] != [_prompt_text(r) for r in b]
    assert task.problem(3, "test") == task.problem(3, "test")


def test_invalid_task_configs_raise():
    for kwargs in (
        {"ops": "/"}, {"ops": ""}, {"ops": "++"}, {"num_terms": 1}, {"digits": 0},
        {"scratchpad": "columns", "ops": "+-"}, {"scratchpad": "bogus"},
        {"scratchpad": "long", "ops": "+"}, {"scratchpad": "long", "ops": "*", "num_terms": 3},
        {"heldout_fraction": 0.0},
    ):
        with pytest.raises(ValueError):
            ArithmeticTask(**kwargs)
    with pytest.raises(ValueError, match="split"):
        ArithmeticTask().problem(0, "validation")
    with pytest.raises(ValueError, match="distinct"):
        ArithmeticTask(digits=1).records("test", 50)


def test_reference_solutions_earn_the_project_math_reward():
    """Integration: the demo is scored by the same `math_reward` as real maths."""
    for task in (ArithmeticTask(), ArithmeticTask(ops="+-*", num_terms=3)):
        for record in task.records("train", 30):
            gold = record["reward_model"]["ground_truth"]
            assert math_reward(task.reference_solution(record), gold).correct
            wrong = f"\\boxed{{{int(gold) + 1}}}"
            assert not math_reward(wrong, gold).correct
