"""Group advantages, group filtering and DAPO dynamic sampling, against numpy hand computations."""
import numpy as np
import pytest

from jaxrl_entropy.rl.advantages import (DynamicSamplingError, GroupAccumulator, group_advantages,
                                         keep_groups)


def _np_advantages(r, g, scale_by_std=True, eps=1e-6):
    """Independent float64 oracle, one group at a time (torch.std semantics: ddof=1)."""
    out = np.zeros(len(r))
    for start in range(0, len(r), g):
        grp = np.asarray(r[start:start + g], np.float64)
        if g == 1 or np.all(grp == grp[0]):
            continue
        centred = grp - grp.mean()
        out[start:start + g] = centred / (grp.std(ddof=1) + eps) if scale_by_std else centred
    return out


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_match_numpy(scale_by_std):
    rng = np.random.default_rng(0)
    g = 6
    rewards = np.concatenate([
        rng.integers(0, 2, 6).astype(np.float32),          # 0/1 correctness
        rng.normal(size=6).astype(np.float32),              # shaped rewards
        np.full(6, 0.3, np.float32),                        # constant, inexact in binary
        np.array([1, -1, -1, -1, -1, -1], np.float32),
    ])
    got = np.asarray(group_advantages(rewards, g, scale_by_std=scale_by_std))
    np.testing.assert_allclose(got, _np_advantages(rewards, g, scale_by_std), rtol=1e-5,
                               atol=1e-6)
    assert got.dtype == np.float32


def test_group_advantage_hand_values():
    # Group [1, 0, 0, 0]: mean 0.25, unbiased std sqrt(0.75/3) = 0.5 → (0.75/0.5, −0.25/0.5).
    got = np.asarray(group_advantages(np.array([1.0, 0, 0, 0]), 4, eps=0.0))
    np.testing.assert_allclose(got, [1.5, -0.5, -0.5, -0.5], rtol=1e-6)
    # Dr. GRPO keeps the scale of the rewards.
    got = np.asarray(group_advantages(np.array([2.0, 0, 0, 0]), 4, scale_by_std=False))
    np.testing.assert_allclose(got, [1.5, -0.5, -0.5, -0.5], rtol=1e-6)


def test_constant_group_and_group_of_one_get_zero():
    np.testing.assert_array_equal(np.asarray(group_advantages(np.array([0.1] * 5), 5)), 0.0)
    np.testing.assert_array_equal(np.asarray(group_advantages(np.array([3.0, -1.0]), 1)), 0.0)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(np.zeros(6), 4)


def test_keep_groups():
    r = np.array([1, 1, 1, 0, 0, 0, 0.5, 0.5, 0.5, 2, 0, 1], np.float32)
    np.testing.assert_array_equal(np.asarray(keep_groups(r, 3)), [False, False, False, True])
    r = np.array([1, 1, 1, 0, 0, 0.0, 0, 0, 0, 0, 0, 0], np.float32)
    np.testing.assert_array_equal(np.asarray(keep_groups(r, 6)), [True, False])
    np.testing.assert_array_equal(np.asarray(keep_groups(np.array([1.0, 0.0]), 1)), [False, False])


def _batch(rewards_per_group, tag):
    """Batch of groups of G=2; ids record (tag, group, member) to check order and alignment."""
    rewards = np.asarray(rewards_per_group, np.float32).reshape(-1)
    n = len(rewards)
    ids = np.array([[tag, i // 2, i % 2] for i in range(n)])
    return {"reward": rewards, "ids": ids, "text": [f"{tag}-{i}" for i in range(n)]}


def test_accumulator_fills_in_arrival_order_and_truncates():
    acc = GroupAccumulator(target_groups=3, group_size=2, max_gen_batches=5)
    acc.add(_batch([[1, 1], [1, 0], [0, 0]], tag=0))      # keeps group 1
    assert not acc.full and acc.groups_kept == 1
    acc.add(_batch([[0, 0], [0, 0]], tag=1))              # keeps nothing
    acc.add(_batch([[0, 1], [1, 1], [1, 0], [0, 1]], tag=2))  # keeps 0, 2, 3 → 4 kept
    assert acc.full
    out = acc.take()
    expected_ids = [[0, 1, 0], [0, 1, 1], [2, 0, 0], [2, 0, 1], [2, 2, 0], [2, 2, 1]]
    np.testing.assert_array_equal(out["ids"], expected_ids)
    np.testing.assert_array_equal(out["reward"], [1, 0, 0, 1, 1, 0])
    assert out["text"] == ["0-2", "0-3", "2-0", "2-1", "2-4", "2-5"]
    assert acc.last_stats == {"gen_batches": 3, "groups_seen": 9, "groups_kept": 4}
    # take() resets for the next step.
    assert not acc.full and acc.num_gen_batches == 0


def test_accumulator_raises_with_clear_message():
    acc = GroupAccumulator(target_groups=4, group_size=2, max_gen_batches=2)
    acc.add(_batch([[1, 0], [1, 1]], tag=0))
    with pytest.raises(DynamicSamplingError) as info:
        acc.add(_batch([[0, 0], [0, 1]], tag=1))
    msg = str(info.value)
    assert "max_gen_batches=2" in msg and "kept only 2 of the 4" in msg
    assert "raise max_gen_batches" in msg and "batch size" in msg and "disable" in msg


def test_accumulator_unlimited_and_bad_input():
    acc = GroupAccumulator(target_groups=1, group_size=2, max_gen_batches=0)
    for _ in range(20):
        acc.add(_batch([[1, 1]], tag=0))
    assert not acc.full
    with pytest.raises(RuntimeError, match="add batches until"):
        acc.take()
    with pytest.raises(ValueError, match="differ from the earlier"):
        acc.add({"reward": np.zeros(4)})
    acc = GroupAccumulator(target_groups=1, group_size=2, max_gen_batches=0)
    with pytest.raises(ValueError, match="leading length"):
        acc.add({"reward": np.zeros(4), "x": np.zeros(3)})
    with pytest.raises(KeyError, match="reward"):
        acc.add({"x": np.zeros(4)})


def test_accumulator_filters_on_the_chosen_metric():
    # Group 0: all wrong but shaped rewards differ (overlong penalty) → DAPO drops it when
    # filtering on accuracy; group 1: one right → kept.
    batch = {"reward": np.array([-1.0, -1.5, -1.0, -1.25, 1.0, -1.0], np.float32),
             "correct": np.array([False, False, False, False, True, False]),
             "row": np.arange(6)}
    by_acc = GroupAccumulator(target_groups=1, group_size=3, max_gen_batches=1, metric_key="correct")
    by_acc.add(batch)
    np.testing.assert_array_equal(by_acc.take()["row"], [3, 4, 5])
    by_reward = GroupAccumulator(target_groups=1, group_size=3, max_gen_batches=1)
    by_reward.add(batch)
    np.testing.assert_array_equal(by_reward.take()["row"], [0, 1, 2])


def test_prompts_to_generate_by_hand():
    from jaxrl_entropy.rl.advantages import prompts_to_generate
    # first batch, nothing kept yet, or the last batch the budget allows: the whole batch
    assert prompts_to_generate(16, 0, 0, 16, last=False) == 16
    assert prompts_to_generate(16, 0, 16, 16, last=False) == 16
    assert prompts_to_generate(16, 14, 16, 16, last=True) == 16
    # 14 of 16 kept (rate 7/8), 2 missing: 1.5 · 2 / (7/8) = 3.43 → 4, plus one
    assert prompts_to_generate(16, 14, 16, 16, last=False) == 5
    # 4 of 16 kept (rate 1/4), 12 missing: 1.5 · 12 · 4 = 72 → capped at the batch
    assert prompts_to_generate(16, 4, 16, 16, last=False) == 16
    # already full: still at least one (the caller stops before asking)
    assert prompts_to_generate(16, 16, 16, 16, last=False) == 1
