"""The warm-up's stop rule, by hand."""
from jaxrl_entropy import warmup


def test_checks_every_fifth_from_the_first_estimate_near_the_target_on():
    every, target = 25, 0.4
    assert warmup.check_schedule(every, target, []) == 25
    assert warmup.check_schedule(every, target, [0.0, 0.1, 0.29]) == 25       # 0.29 < 0.75 · 0.4
    assert warmup.check_schedule(every, target, [0.1, 0.31]) == 5
    # a later estimate below the line does not send the next check 25 steps away (it did: a demo run
    # went 0.352, 0.344, 0.297, then 25 steps to 0.422 and 0.648, held-out 0.625 at RL step 0)
    assert warmup.check_schedule(every, target, [0.352, 0.344, 0.297]) == 5
    assert warmup.check_schedule(3, target, [0.35]) == 1


def test_stops_when_the_mean_of_the_last_two_estimates_reaches_the_target():
    assert not warmup.reached(0.4, [])
    assert warmup.reached(0.4, [0.41])                      # one estimate: itself
    assert not warmup.reached(0.4, [0.297, 0.422])          # mean 0.36
    assert warmup.reached(0.4, [0.1, 0.38, 0.42])           # mean 0.40
