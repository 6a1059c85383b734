"""The budget search, with deterministic stand-in meters (no clock)."""

import pytest

from pfgdf_plugin.errors import TargetError
from pfgdf_plugin.methods.target import Target, search


def test_finds_the_least_knob_that_meets_the_target():
    res = search(lambda k: 1.0 + 10.0 * k * k, Target("macs", 3.5), 0.0, 1.0, steps=20)
    assert res.reached >= 3.5
    assert res.knob == pytest.approx(0.5, abs=1e-4)
    assert all(t.reached < 3.5 for t in res.trials if t.knob < res.knob)


def test_integer_knob_and_exact_hit():
    calls = []

    def measure(c):
        calls.append(c)
        return {1: 1.0, 2: 1.8, 3: 2.5, 4: 3.0, 5: 3.9, 6: 4.4, 7: 5.0, 8: 6.0}[c]

    res = search(measure, Target("params", 3.0), 1, 8, integer=True)
    assert (res.knob, res.reached) == (4, 3.0)
    assert all(isinstance(c, int) for c in calls)


def test_already_met_at_the_lowest_knob():
    res = search(lambda k: 2.0, Target("latency", 1.5), 0.0, 1.0)
    assert res.knob == 0.0


def test_unreachable_names_target_and_best():
    with pytest.raises(TargetError, match=r"target latency 50x cannot be reached: .*\(ratio = 0.9\) gives 4.00x"):
        search(lambda k: 4.0, Target("latency", 50.0), 0.0, 0.9, knob_name="ratio")
