"""mean@k / pass@k evaluation against hand-computed values, with a scripted 'model'."""
import re
from types import SimpleNamespace

import numpy as np
import pytest

from jaxrl_entropy.training import evaluate as eval_lib
from jaxrl_entropy.data.synthetic import ArithmeticTask
from jaxrl_entropy.data.tokenizer import build_demo_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_demo_tokenizer()


def _scripted_sampler(tok, k, right_samples):
    """Answers problem `a+b` correctly in the first right_samples(a, b) of its k samples."""
    def sample(ids, mask, call):
        texts = []
        for row, (r, m) in enumerate(zip(ids, mask)):
            prompt = tok.decode(r[m.astype(bool)])
            a, b = map(int, re.search(r"(\d+)\+(\d+)=", prompt).groups())
            good = (row % k) < right_samples(a, b)
            texts.append(f"so \\boxed{{{a + b if good else a + b + 1}}}")
        enc = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
        n = max(map(len, enc))
        tokens = np.array([e + [tok.pad_token_id] * (n - len(e)) for e in enc])
        return SimpleNamespace(tokens=tokens, lengths=np.array([len(e) for e in enc]))
    return sample


def test_mean_and_pass_at_k_by_hand(tok):
    records = ArithmeticTask().records("test", 7, seed=0)   # 7 problems, batches of 3: padding used
    k = 4
    rule = lambda a, b: (a + b) % 5                           # 0..4 right samples out of 4 (4 → capped)
    res = eval_lib.score_benchmark(_scripted_sampler(tok, k, rule), tok, records,
                                      eval_lib.EvalSpec(k=k, batch_prompts=3, max_prompt_len=32))
    sums = [int(r["reward_model"]["ground_truth"]) for r in records]
    right = [min(s % 5, k) for s in sums]
    assert res["num_problems"] == 7
    assert res["mean@4"] == pytest.approx(np.mean(right) / k)
    assert res["pass@4"] == pytest.approx(np.mean([c > 0 for c in right]))
    np.testing.assert_array_equal(res["correct"].sum(1), right)


def test_evaluate_averages_benchmarks_unweighted(tok):
    task = ArithmeticTask()
    a, b = task.records("test", 2, seed=0), task.records("test", 6, seed=1)
    always, never = (lambda x, y: 2), (lambda x, y: 0)
    spec = eval_lib.EvalSpec(k=2, batch_prompts=2, max_prompt_len=32)
    m_a = eval_lib.score_benchmarks(_scripted_sampler(tok, 2, always), tok, {"a": a}, spec)
    m_b = eval_lib.score_benchmarks(_scripted_sampler(tok, 2, never), tok, {"b": b}, spec)
    assert m_a["eval/a/mean@2"] == 1.0 and m_b["eval/b/mean@2"] == 0.0
    both = eval_lib.score_benchmarks(_scripted_sampler(tok, 2, lambda x, y: 1), tok, {"a": a, "b": b}, spec)
    assert both["eval/accuracy"] == pytest.approx(0.5)           # mean of the two benchmarks' 0.5
    table = eval_lib.format_table(both, 2)
    assert "| a | 0.5000 | 1.0000 |" in table and "**average** | 0.5000" in table
