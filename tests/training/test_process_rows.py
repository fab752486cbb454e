"""Host-side rows split over processes (`parallel.process_rows` / `gather_rows`): each process
generates and scores its own share, every process ends with every row. Several processes are
simulated by threads: `jax.process_index()` is the thread's, `process_allgather` concatenates
what every thread contributed (the real collective runs in `tests/cli/test_multihost.py`)."""
import threading
import types
import zlib

import numpy as np
import pytest

import jax
from jax.experimental import multihost_utils

from conftest import tiny_config
from jaxrl_entropy.training import evaluate, rollout
from jaxrl_entropy import parallel
from jaxrl_entropy.models.sampler import SampleOutput


class _World:
    def __init__(self, n: int):
        self.n, self.local, self.barrier, self.slots = n, threading.local(), threading.Barrier(n, timeout=60), [None] * n

    def index(self) -> int:
        return self.local.i

    def allgather(self, x, tiled=False):
        assert tiled
        self.slots[self.local.i] = np.asarray(x)
        self.barrier.wait()
        out = np.concatenate(self.slots)
        self.barrier.wait()
        return out

    def run(self, fn):
        out, errors = [None] * self.n, []

        def main(i):
            self.local.i = i
            try:
                out[i] = fn(i)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=main, args=(i,)) for i in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out


@pytest.fixture
def world(monkeypatch):
    def make(n: int) -> _World:
        w = _World(n)
        monkeypatch.setattr(jax, "process_count", lambda: n)
        monkeypatch.setattr(jax, "process_index", w.index)
        monkeypatch.setattr(multihost_utils, "process_allgather", w.allgather)
        return w
    return make


def test_shares_by_hand(world):
    w = world(3)
    assert w.run(lambda i: parallel.process_rows(10)) == [(0, 4, 4), (4, 8, 4), (8, 10, 4)]
    assert w.run(lambda i: parallel.process_rows(2)) == [(0, 1, 1), (1, 2, 1), (2, 2, 1)]  # the last has none
    full = np.arange(20).reshape(10, 2)
    for got in w.run(lambda i: parallel.gather_rows([full[slice(*parallel.process_rows(10)[:2])]], 10)[0]):
        np.testing.assert_array_equal(got, full)


def _fake_scorer(log: list):
    """A verdict that is a pure function of the text (the real verifier is tested elsewhere);
    records which process scored which texts."""
    def score(texts, truths, **_):
        log.append((jax.process_index(), list(texts)))
        ok = [zlib.crc32(t.encode()) % 2 == 0 for t in texts]
        return [types.SimpleNamespace(score=1.0 if c else -1.0, correct=c) for c in ok]
    return score


def _sample(vocab: int):
    def sample(ids, mask, *_):  # a response per row, a function of the row's prompt and position
        n, N = ids.shape[0], 6
        rows = [np.random.default_rng([zlib.crc32(ids[r].tobytes()), r]) for r in range(n)]
        tokens = np.stack([g.integers(3, vocab, N) for g in rows]).astype(np.int32)
        lengths = np.array([1 + r % N for r in range(n)], np.int32)
        return SampleOutput(tokens=tokens, lengths=lengths, logprobs=np.zeros((n, N), np.float32),
                            finished=np.ones(n, bool))
    return sample


def test_rollout_scores_each_row_once_on_its_process(world, monkeypatch):
    from jaxrl_entropy.training import data_setup
    from jaxrl_entropy.data.pipeline import PromptBatcher

    cfg = tiny_config(**{"rl.overlong_buffer": 0})
    tok = data_setup.tokenizer_for(cfg)
    records, _, _ = data_setup.datasets(cfg)
    log = []
    monkeypatch.setattr(rollout, "score_responses", _fake_scorer(log))
    sample = _sample(len(tok))
    w = world(2)

    def one_process(i):
        batcher = PromptBatcher(records, tok, batch_size=4, max_prompt_len=64, seed=0, shard_index=i, shard_count=2)
        collector = rollout.RolloutCollector(cfg, tok, batcher, records, None, (tok.eos_token_id,))
        return collector.generate_and_score(0, 0, lambda ids, mask, key, sp: sample(ids, mask))

    outs = w.run(one_process)
    M = 4 * cfg.rl.group_size
    texts = evaluate.decode_responses(tok, outs[0]["response"], outs[0]["lengths"])
    want = np.array([1.0 if zlib.crc32(t.encode()) % 2 == 0 else -1.0 for t in texts], np.float32)
    for out in outs:
        assert out["reward"].shape == (M,)
        np.testing.assert_array_equal(out["reward"], want)
        np.testing.assert_array_equal(out["correct"], want > 0)
    assert sorted((i, len(t)) for i, t in log) == [(0, M // 2), (1, M // 2)]   # each row scored once
    assert dict(log)[0] == texts[:M // 2] and dict(log)[1] == texts[M // 2:]


def test_evaluation_scores_each_row_once_on_its_process(world, monkeypatch):
    from jaxrl_entropy.training import data_setup

    cfg = tiny_config()
    tok = data_setup.tokenizer_for(cfg)
    records, _, _ = data_setup.datasets(cfg)
    spec = evaluate.EvalSpec(k=2, batch_prompts=3, max_problems=5, max_prompt_len=64)
    sample = _sample(len(tok))
    calls = []
    log = []
    monkeypatch.setattr(evaluate, "score_responses", _fake_scorer(log))
    one = evaluate.score_benchmark(lambda ids, mask, c: calls.append(1) or sample(ids, mask), tok, records, spec)
    single = {k: v for k, v in one.items()}
    log.clear()
    w = world(2)
    outs = w.run(lambda i: evaluate.score_benchmark(lambda ids, mask, c: sample(ids, mask), tok, records, spec))
    for out in outs:
        np.testing.assert_array_equal(out["correct"], single["correct"])
        assert out[f"mean@{spec.k}"] == single[f"mean@{spec.k}"]
    per_process = {i: sum(len(t) for j, t in log if j == i) for i in (0, 1)}
    assert per_process == {0: len(calls) * 3, 1: len(calls) * 3}   # 6 rows per call, 3 each
