"""When the gradient-geometry probe runs, and what `dryrun` counts for it (by hand)."""
from conftest import tiny_config
from jaxrl_entropy.training import step_programs


def test_geometry_probe_steps_by_hand():
    every_3 = tiny_config(**{"train.geometry_every": 3})
    assert [s for s in range(10) if step_programs.geometry_probe_due(every_3.train, s)] == [0, 3, 6, 9]
    consecutive = tiny_config(**{"train.geometry_every": 3, "train.geometry_consecutive": True})
    assert [s for s in range(10) if step_programs.geometry_probe_due(consecutive.train, s)] == [0, 1, 3, 4, 6, 7, 9]
    off = tiny_config(**{"train.geometry_every": 0, "train.geometry_consecutive": True})
    assert not any(step_programs.geometry_probe_due(off.train, s) for s in range(5))


def test_geometry_calls_per_step_by_hand():
    base = {"train.geometry_every": 4}
    assert step_programs.geometry_calls_per_step(tiny_config(**base).train) == (0.25, 4)
    assert step_programs.geometry_calls_per_step(tiny_config(**base, **{
        "train.geometry_consecutive": True, "train.geometry_random_fractions": (0.1, 0.5),
        "train.geometry_halves": True}).train) == (0.5, 18)   # (4 + 2 subsets) × (itself + 2 halves)
    # two geometry layers add an anchor and an explorer each: (4 + 2·2) × 3 with halves
    assert step_programs.geometry_calls_per_step(tiny_config(**base, **{
        "train.geometry_layers": (0, 0.9), "train.geometry_halves": True}).train) == (0.25, 24)


def test_geometry_layers_resolve_to_indices_and_bad_ones_name_the_key():
    import pytest

    from jaxrl_entropy.config import ConfigError
    import types
    arch = types.SimpleNamespace(num_hidden_layers=8)
    # 0.25 · 8 = 2, 0.9 · 8 = 7.2 → 7, −1 → 7 (a duplicate, dropped)
    train = tiny_config(**{"train.geometry_layers": (0.25, 0.9, -1)}).train
    assert step_programs.geometry_layers(train, arch) == (2, 7)
    with pytest.raises(ConfigError, match="config.train.geometry_layers"):
        step_programs.geometry_layers(tiny_config(**{"train.geometry_layers": (9,)}).train, arch)
    from jaxrl_entropy import config as config_lib
    with pytest.raises(ConfigError, match="config.train.geometry_layers item 1.5"):
        config_lib.typed(tiny_config(**{"train.geometry_layers": (1.5,)}))
