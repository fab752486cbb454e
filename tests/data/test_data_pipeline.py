"""Grain prompt pipeline: padding/truncation against a hand tokenisation, sharding, determinism,
and checkpoint/resume against an uninterrupted iterator."""

import json
import re

import numpy as np
import pytest

from jaxrl_entropy.data.pipeline import LengthReport, PromptBatcher, encode_sft_batch
from jaxrl_entropy.data.sources import DataError
from jaxrl_entropy.data.tokenizer import build_demo_tokenizer

GEN_PROMPT = "<|im_start|>assistant\n"
_SPECIALS = {"<|im_start|>": 1, "<|im_end|>": 2}


def oracle_ids(text: str) -> list[int]:
    """Hand tokenisation for the demo tokenizer: ' '..'~' → 4.., '\n' → 99, two specials."""
    out = []
    for piece in re.split(r"(<\|im_start\|>|<\|im_end\|>)", text):
        if piece in _SPECIALS:
            out.append(_SPECIALS[piece])
        else:
            out.extend(99 if ch == "\n" else ord(ch) - 28 for ch in piece)
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


def make_records(n):
    return [
        {"prompt": [{"role": "user", "content": f"{i}+{i}="}],
         "reward_model": {"ground_truth": str(2 * i), "style": "rule"},
         "data_source": f"src{i % 3}", "extra_info": {"index": i}}
        for i in range(n)
    ]


def batcher(records, tokenizer, **kwargs):
    defaults = dict(batch_size=4, max_prompt_len=32, seed=0, shard_index=0, shard_count=1)
    defaults.update(kwargs)
    return PromptBatcher(records, tokenizer, **defaults)


def take(it, k):
    return [next(it) for _ in range(k)]


def test_left_padding_is_exact(tokenizer):
    records = make_records(4)
    batch = next(batcher(records, tokenizer, shuffle=False, max_prompt_len=30))
    assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape == (4, 30)
    assert batch["attention_mask"].dtype == np.int32
    for row, i in enumerate(batch["record_index"]):
        text = f"<|im_start|>user\n{i}+{i}=<|im_end|>\n{GEN_PROMPT}"
        ids = oracle_ids(text)
        expected = [0] * (30 - len(ids)) + ids  # pad id of the demo tokenizer is 0
        assert batch["input_ids"][row].tolist() == expected
        assert batch["attention_mask"][row].tolist() == [0] * (30 - len(ids)) + [1] * len(ids)
        assert batch["prompt_text"][row] == text
        assert batch["ground_truth"][row] == str(2 * i)
        assert batch["data_source"][row] == f"src{i % 3}"
    assert batch["record_index"].tolist() == [0, 1, 2, 3]


def test_truncation_left_right_and_error(tokenizer):
    long_text = "a long question " * 4 + "What is 1+1?"
    records = [{"prompt": long_text, "reward_model": {"ground_truth": "2"}, "data_source": "x"}]
    full = oracle_ids(f"<|im_start|>user\n{long_text}<|im_end|>\n{GEN_PROMPT}")
    assert len(full) > 20
    left = next(batcher(records, tokenizer, batch_size=1, max_prompt_len=20))
    assert left["input_ids"][0].tolist() == full[-20:]  # keeps the question's end + gen prompt
    assert left["attention_mask"][0].tolist() == [1] * 20
    right = next(batcher(records, tokenizer, batch_size=1, max_prompt_len=20, truncation="right"))
    assert right["input_ids"][0].tolist() == full[:20]
    with pytest.raises(DataError, match="max_prompt_len"):
        next(batcher(records, tokenizer, batch_size=1, max_prompt_len=20, truncation="error"))
    # Without a chat template the prompt string is tokenised as is.
    plain = next(batcher(records, tokenizer, batch_size=1, max_prompt_len=20,
                         use_chat_template=False))
    assert plain["input_ids"][0].tolist() == oracle_ids(long_text)[-20:]
    assert plain["prompt_text"] == [long_text]


def test_shards_are_disjoint_and_cover_the_global_batch(tokenizer):
    records = make_records(24)
    single = batcher(records, tokenizer, batch_size=8, num_epochs=1)
    global_batches = [b["record_index"].tolist() for b in single]
    assert len(global_batches) == 3
    assert sorted(sum(global_batches, [])) == list(range(24))  # one epoch: each record once
    shards = [
        [b["record_index"].tolist()
         for b in batcher(records, tokenizer, batch_size=8, num_epochs=1, shard_index=s,
                          shard_count=4)]
        for s in range(4)
    ]
    for k, global_batch in enumerate(global_batches):
        pieces = [shards[s][k] for s in range(4)]
        assert all(len(p) == 2 for p in pieces)
        assert sum(pieces, []) == global_batch  # disjoint, covering, in order


def test_same_seed_same_batches_and_epochs_reshuffle(tokenizer):
    records = make_records(12)
    a = [b["record_index"].tolist() for b in take(batcher(records, tokenizer, seed=5), 6)]
    b = [b["record_index"].tolist() for b in take(batcher(records, tokenizer, seed=5), 6)]
    c = [b["record_index"].tolist() for b in take(batcher(records, tokenizer, seed=6), 6)]
    assert a == b and a != c
    epoch0, epoch1 = sum(a[:3], []), sum(a[3:], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1
    unshuffled = take(batcher(records, tokenizer, shuffle=False), 4)
    assert sum((x["record_index"].tolist() for x in unshuffled), []) == list(range(12)) + [0, 1, 2, 3]


def test_finite_epochs_drop_incomplete_batch(tokenizer):
    records = make_records(10)
    it = batcher(records, tokenizer, batch_size=4, num_epochs=2, shard_index=1, shard_count=2)
    assert len(it) == 5  # 20 prompts // 4
    assert len(list(it)) == 5
    with pytest.raises(StopIteration):
        next(it)
    with pytest.raises(DataError, match="batch"):
        batcher(make_records(3), tokenizer, batch_size=4, num_epochs=1)
    with pytest.raises(ValueError, match="multiple of shard_count"):
        batcher(records, tokenizer, batch_size=6, shard_count=4)


def _same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], np.ndarray):
                np.testing.assert_array_equal(x[key], y[key])
            else:
                assert x[key] == y[key]


def test_resume_from_state_matches_uninterrupted(tokenizer):
    records = make_records(10)
    reference = take(batcher(records, tokenizer, seed=3), 9)

    first = batcher(records, tokenizer, seed=3)
    take(first, 4)
    state = json.loads(json.dumps(first.get_state()))  # survives a JSON checkpoint
    assert state["batches_consumed"] == 4

    resumed = batcher(records, tokenizer, seed=3)
    resumed.set_state(state)
    _same(take(resumed, 5), reference[4:])
    _same(take(first, 5), reference[4:])

    # Resuming on 2 processes gives each its half of the same global batches.
    halves = []
    for s in range(2):
        part = batcher(records, tokenizer, seed=3, shard_index=s, shard_count=2)
        part.set_state(state)
        halves.append(take(part, 5))
    for k in range(5):
        joined = halves[0][k]["record_index"].tolist() + halves[1][k]["record_index"].tolist()
        assert joined == reference[4 + k]["record_index"].tolist()


def test_set_state_rejects_a_different_run(tokenizer):
    records = make_records(10)
    state = batcher(records, tokenizer, seed=3).get_state()
    with pytest.raises(DataError, match="seed"):
        batcher(records, tokenizer, seed=4).set_state(state)
    with pytest.raises(DataError, match="num_records"):
        batcher(make_records(11), tokenizer, seed=3).set_state(state)


def test_default_shard_comes_from_jax(tokenizer):
    it = PromptBatcher(make_records(8), tokenizer, batch_size=4, max_prompt_len=32, seed=0)
    assert (it.shard_index, it.shard_count) == (0, 1)


def test_threaded_reading_gives_the_same_batches(tokenizer):
    records = make_records(20)
    _same(take(batcher(records, tokenizer, num_threads=2), 7),
          take(batcher(records, tokenizer), 7))


def test_encode_sft_batch_layout(tokenizer):
    prompts = [[{"role": "user", "content": "2+3="}], "7+8="]
    responses = ["\\boxed{5}", "7+8: 7+8=15 c1 so \\boxed{15}"]
    batch = encode_sft_batch(tokenizer, prompts, responses, max_prompt_len=24,
                             max_response_len=12)
    assert batch["input_ids"].shape == (2, 36)
    p0 = oracle_ids(f"<|im_start|>user\n2+3=<|im_end|>\n{GEN_PROMPT}")
    r0 = oracle_ids("\\boxed{5}") + [2]  # eos = <|im_end|>
    expected0 = [0] * (24 - len(p0)) + p0 + r0 + [0] * (12 - len(r0))
    assert batch["input_ids"][0].tolist() == expected0
    assert batch["loss_mask"][0].tolist() == [0] * 24 + [1] * len(r0) + [0] * (12 - len(r0))
    assert batch["attention_mask"][0].tolist() == (
        [0] * (24 - len(p0)) + [1] * (len(p0) + len(r0)) + [0] * (12 - len(r0)))
    # Too long a response is cut to R and loses its eos.
    r1 = oracle_ids(responses[1])[:12]
    assert batch["input_ids"][1, 24:].tolist() == r1
    assert batch["loss_mask"][1, 24:].tolist() == [1] * 12


def test_trim_padding_drops_empty_columns_and_keeps_the_loss():
    """Columns by hand; the warm-up loss of the trimmed batch equals the full batch's (oracle: the
    untrimmed computation), so the trim only removes work."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxrl_entropy.training import warmup
    from jaxrl_entropy.data.pipeline import trim_padding
    from jaxrl_entropy.models import qwen3
    mask = np.zeros((3, 16), np.int32)
    mask[0, 5:9] = mask[1, 4:11] = mask[2, 6:8] = 1          # tokens in columns 4..10 (7 wide)
    rng = np.random.default_rng(0)
    batch = {"input_ids": np.where(mask, rng.integers(1, 30, mask.shape), 0).astype(np.int32),
             "attention_mask": mask, "loss_mask": mask * (np.arange(16) >= 7)}
    out = trim_padding(batch, multiple=4)                      # 7 → 8 columns: 4..11
    for k in batch:
        np.testing.assert_array_equal(out[k], batch[k][:, 4:12])
    late = {k: np.roll(v, 5, axis=1) for k, v in batch.items()}  # tokens in 9..15: widened to the left
    np.testing.assert_array_equal(trim_padding(late, multiple=4)["attention_mask"], late["attention_mask"][:, 8:16])
    cfg = qwen3.Qwen3Config(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    graphdef, state = nnx.split(qwen3.init_random(cfg, qwen3.RuntimeOptions(logits_chunk=4), seed=0))
    params = nnx.to_pure_dict(state)
    loss = jax.jit(lambda b: warmup.sft_loss(graphdef, params, b))
    full = float(loss({k: jnp.asarray(v) for k, v in batch.items()}))
    trimmed = float(loss({k: jnp.asarray(v) for k, v in out.items()}))
    assert trimmed == pytest.approx(full, rel=1e-5) and full > 0


# ------------------------------------------------------------------ data.truncation
def _length_rows():
    """Six chat prompts for `max_prompt_len=25`: the template adds 19 tokens to a user message, so
    contents of ≤ 6 characters fit and rows 1, 3 and 4 (9, 14 and 7 characters) do not."""
    contents = ["1+1=", "What is 2+2?", "3+3=", "How much is 12+34?", "5+5 = ?", "6+6="]
    return [{"prompt": [{"role": "user", "content": c}], "reward_model": {"ground_truth": str(i)},
             "data_source": "t", "extra_info": {"index": i}} for i, c in enumerate(contents)]


def _hand_length(content: str) -> int:
    return len(oracle_ids(f"<|im_start|>user\n{content}<|im_end|>\n{GEN_PROMPT}"))


@pytest.fixture
def length_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "long.parquet"
    pq.write_table(pa.Table.from_pylist(_length_rows()), path)
    return str(path)


def test_fit_prompt_lengths_error_names_file_row_length_and_both_ways_out(tokenizer, length_file, caplog):
    from jaxrl_entropy.data.pipeline import fit_prompt_lengths
    from jaxrl_entropy.data.sources import load_records

    records = load_records(length_file)
    assert [_hand_length(r["prompt"][0]["content"]) for r in records] == [23, 31, 23, 37, 26, 23]
    with caplog.at_level("WARNING", logger="jaxrl_entropy"), pytest.raises(DataError) as e:
        fit_prompt_lengths(records, tokenizer, max_prompt_len=25, truncation="error", source=f"data.train_files={length_file}")
    msg = str(e.value)
    assert f"{length_file}, row 1 " in msg and "31 tokens" in msg and "max_prompt_len=25" in msg
    assert "--config.data.max_prompt_len=37" in msg and "--config.data.truncation=left" in msg
    assert "--config.data.truncation=drop" in msg and "3 of 6" in msg
    warning, = [r for r in caplog.records if r.levelname == "WARNING"]
    assert length_file in warning.getMessage() and "3 of 6" in warning.getMessage()
    assert "data.truncation" in warning.getMessage()


def test_fit_prompt_lengths_drop_and_left_count_exactly_those_rows(tokenizer, length_file, caplog):
    from jaxrl_entropy.data.pipeline import fit_prompt_lengths
    from jaxrl_entropy.data.sources import load_records

    records = load_records(length_file)
    with caplog.at_level("WARNING", logger="jaxrl_entropy"):
        kept, report = fit_prompt_lengths(records, tokenizer, max_prompt_len=25, truncation="drop", source="src")
    assert kept == [records[i] for i in (0, 2, 5)]
    assert (report.dropped, report.truncated, report.over) == (3, 0, ((1, 31), (3, 37), (4, 26)))
    assert "3 of 6" in caplog.records[-1].getMessage() and "dropping" in caplog.records[-1].getMessage()

    caplog.clear()
    with caplog.at_level("WARNING", logger="jaxrl_entropy"):
        kept, report = fit_prompt_lengths(records, tokenizer, max_prompt_len=25, truncation="left", source="src")
    assert kept == records and (report.truncated, report.dropped) == (3, 0)
    assert "3 of 6" in caplog.records[-1].getMessage() and "last tokens" in caplog.records[-1].getMessage()
    # the batcher then keeps each long prompt's last 25 tokens (the question's end + generation prompt)
    batch = next(batcher(kept, tokenizer, batch_size=6, max_prompt_len=25, shuffle=False, truncation="left"))
    for row, content in enumerate(r["prompt"][0]["content"] for r in records):
        full = oracle_ids(f"<|im_start|>user\n{content}<|im_end|>\n{GEN_PROMPT}")
        assert batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist() == full[-25:]

    # prompts that fit: nothing logged, nothing counted; a limit nothing fits under: drop refuses
    caplog.clear()
    with caplog.at_level("WARNING", logger="jaxrl_entropy"):
        kept, report = fit_prompt_lengths(records, tokenizer, max_prompt_len=37, truncation="error", source="src")
    assert kept == records and report.over == () and not caplog.records
    with pytest.raises(DataError, match="leaves none"):
        fit_prompt_lengths(records, tokenizer, max_prompt_len=5, truncation="drop", source="src")
    with pytest.raises(ValueError, match="data.truncation"):
        fit_prompt_lengths(records, tokenizer, max_prompt_len=25, truncation="right", source="src")


def test_batcher_error_mode_names_the_config_keys(tokenizer):
    records = _length_rows()
    with pytest.raises(DataError, match=r"--config\.data\.max_prompt_len.*--config\.data\.truncation=left"):
        next(batcher(records, tokenizer, batch_size=6, max_prompt_len=25, shuffle=False, truncation="error"))


def test_eval_sets_go_through_data_truncation(tokenizer, length_file, caplog):
    from jaxrl_entropy import presets
    from jaxrl_entropy.training import data_setup

    cfg = presets.demo()
    cfg.eval.benchmarks = f"long={length_file}"
    cfg.data.truncation = "drop"
    with caplog.at_level("WARNING", logger="jaxrl_entropy"):
        evals, reports = data_setup.fit_eval_sets(cfg, tokenizer, data_setup.eval_sets(cfg))
    assert [r["extra_info"]["index"] for r in evals["long"]] == [0, 2, 5]
    assert len(evals["synthetic_heldout"]) == cfg.data.synthetic.eval_size   # the demo's prompts fit
    no_train = LengthReport("train", "drop", 25, 8)
    assert data_setup.length_metrics(no_train, reports) == {
        "data/prompts_truncated": 0, "data/prompts_dropped": 0,
        "data/eval_prompts_truncated": 0, "data/eval_prompts_dropped": 3}
    assert any(f"eval.benchmarks long={length_file}" in r.getMessage() for r in caplog.records)
