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
