"""Dynamic sampling through the rollout collector, with a scripted sampler and the real scorer."""
import re

import numpy as np

from conftest import tiny_config
from jaxrl_entropy.training import data_setup
from jaxrl_entropy.data.pipeline import PromptBatcher
from jaxrl_entropy.models.sampler import SampleOutput
from jaxrl_entropy.rl import advantages
from jaxrl_entropy.training.rollout import RolloutCollector


def _collector(cfg, tok, records):
    batcher = PromptBatcher(records, tok, batch_size=cfg.rl.prompts_per_step, max_prompt_len=64, seed=0)
    return RolloutCollector(cfg, tok, batcher, records, None, (tok.eos_token_id,))


def _scripted_sampler(tok, G, calls):
    """Answers a+b right in the first half of each group unless (a + b) % 3 == 0 (then every answer
    is wrong: a constant group that dynamic sampling drops)."""
    def sample(ids, mask, key, sp):
        calls.append(ids.shape[0])
        rows = []
        for i in range(ids.shape[0]):
            a, b = map(int, re.search(r"(\d+)\+(\d+)=", tok.decode(ids[i][mask[i] > 0])).groups())
            right = (a + b) % 3 != 0 and i % G < G // 2
            rows.append(tok(f"\\boxed{{{a + b if right else a + b + 1}}}", add_special_tokens=False)["input_ids"]
                        + [tok.eos_token_id])
        n, width = len(rows), 16
        tokens = np.full((n, width), tok.pad_token_id, np.int32)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
        return SampleOutput(tokens=tokens, lengths=np.array([len(r) for r in rows], np.int32),
                            logprobs=np.zeros((n, width), np.float32), finished=np.ones(n, bool))
    return sample


def test_later_generation_batches_decode_only_the_prompts_needed(monkeypatch):
    """Oracle: the same collection decoding whole batches (verl's way). The groups kept are the
    same, in the same order; fewer rows are decoded."""
    cfg = tiny_config(**{"rl.dynamic_sampling": True, "rl.max_gen_batches": 6, "rl.prompts_per_step": 8,
                         "rl.group_size": 4})
    tok = data_setup.tokenizer_for(cfg)
    records, _, _ = data_setup.datasets(cfg)
    G = cfg.rl.group_size
    lean_calls, whole_calls = [], []
    lean, lean_metrics = _collector(cfg, tok, records).collect(0, _scripted_sampler(tok, G, lean_calls))
    with monkeypatch.context() as m:
        m.setattr(advantages, "prompts_to_generate", lambda target, kept, seen, per_batch, last: per_batch)
        whole, _ = _collector(cfg, tok, records).collect(0, _scripted_sampler(tok, G, whole_calls))
    assert len(whole_calls) >= 2, "the data must need a second batch for this test to say anything"
    assert lean_calls[0] == whole_calls[0] == 8 * G
    assert sum(lean_calls) < sum(whole_calls)
    assert lean_metrics["sampling/generated_rows"] == sum(lean_calls)
    for key in ("prompt_ids", "response", "reward", "correct"):
        np.testing.assert_array_equal(lean[key], whole[key])
    assert lean["correct"].reshape(-1, G).any(1).all() and not lean["correct"].reshape(-1, G).all(1).any()
