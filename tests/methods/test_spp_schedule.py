"""SPPSchedule: SPP's per-iteration schedule, checked on small hand-computed cases."""

import copy
import math

import pytest
import torch

from pfgdf_plugin.errors import SPPError
from pfgdf_plugin.methods.spp import SPPParams, SPPSchedule, checked_params

NORMS = {"a": torch.tensor([1.0, 4.0, 2.0, 3.0])}


def _schedule(interval=1, A=0.5, seed=0, max_steps=None, **groups):
    s = SPPSchedule(SPPParams(interval=interval, A=A, seed=seed), max_steps=max_steps)
    for name, (channels, ratio) in (groups or {"a": (4, 0.5)}).items():
        s.add(name, channels, ratio)
    return s


def test_defaults_are_sppparams():
    s = SPPSchedule()
    assert s.params == SPPParams() and s.params.interval == 10
    assert s.max_steps is None and s.steps == 0 and not s.stopped


def test_updates_every_interval_calls_with_the_hand_computed_increments():
    s = _schedule(interval=3)
    seen = []

    def norms(names):
        seen.append((s.steps, list(names)))
        return NORMS

    updated = [s.step(norms).updated for _ in range(7)]
    assert updated == [False, False, True, False, False, True, False]
    assert seen == [(3, ["a"]), (6, ["a"])]  # the norms are asked for only when an update is due
    # one update, N_left = 2: alpha = ln(8) / 2, delta(0) = A, delta(1) = A * 8 ** -0.5, delta(2) = 0,
    # delta(3) < 0 (clipped at p = 0); the second update adds the same again
    p = s.probabilities()["a"]
    assert p[0] == 1.0 and p[1] == 0.0 and p[3] == 0.0
    assert p[2].item() == pytest.approx(2 * 0.5 / math.sqrt(8))
    assert s.state_dict()["groups"]["a"]["updates"] == 2


def test_every_call_draws_the_keep_masks_from_the_seeded_generator_in_the_order_added():
    s = SPPSchedule(SPPParams(interval=100, seed=7))
    for name, channels in (("a", 3), ("b", 5)):
        s.add(name, channels, 0.5).probabilities.fill_(0.5)
    s.step(NORMS)  # not due: no update, only the draws
    g = torch.Generator().manual_seed(7)
    expected_a = torch.rand(3, dtype=torch.float64, generator=g) >= 0.5
    expected_b = torch.rand(5, dtype=torch.float64, generator=g) >= 0.5
    masks = s.masks()
    assert torch.equal(masks["a"], expected_a) and torch.equal(masks["b"], expected_b)


def test_copies_are_ranked_on_their_mean_and_removed_together():
    s = SPPSchedule(SPPParams(interval=1, A=1.0))
    s.add("g", channels=6, ratio=0.3, copies=2)  # 3 positions, ceil(0.9) = 1 to remove
    # per position: mean of (1, 5), (2, 6), (3, 7) = 3, 4, 5 -> position 0 is the weakest
    result = s.step({"g": torch.tensor([1.0, 2.0, 3.0, 5.0, 6.0, 7.0])})
    assert s.finished and list(result.finished) == ["g"]
    assert s.removal_plan()["g"].tolist() == [0, 3]
    assert s.masks(alive_only=True, channels=True)["g"].tolist() == [False, True, True, False, True, True]
    assert s.summary()["g"] == {"channels": 6, "target": 2, "removed": 2, "finished_at": 1}
    # norms given once per position are taken as they are
    t = SPPSchedule(SPPParams(interval=1, A=1.0))
    t.add("g", channels=6, ratio=0.3, copies=2)
    t.step({"g": torch.tensor([3.0, 4.0, 5.0])})
    assert torch.equal(t.probabilities()["g"], s.probabilities()["g"])


def test_finishing_gives_the_survivors_rescale_factors():
    s = SPPSchedule(SPPParams(interval=1, A=0.5))
    s.add("a", 4, 0.5).probabilities.copy_(torch.tensor([0.99, 0.99, 0.3, 0.0], dtype=torch.float64))
    result = s.step({"a": torch.tensor([1.0, 2.0, 3.0, 4.0])})
    # ranks 0 and 1 gain A and A / sqrt(8): both reach p = 1; rank 2 sits at N_left (delta 0)
    assert result.updated and torch.allclose(result.finished["a"], torch.tensor([0.0, 0.0, 0.7, 1.0],
                                                                                dtype=torch.float64))
    assert s.probabilities()["a"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert s.masks()["a"].tolist() == [False, False, True, True]  # a finished group draws nothing


def test_stop_rule_every_target_reached_or_the_budget_spent():
    s = _schedule(A=1.0, max_steps=10)
    while not s.stopped:
        result = s.step(NORMS)
    assert s.finished and result.stopped and s.steps == 2  # A = 1: one removal per update
    assert s.step(NORMS).updated is False and s.steps == 2  # nothing happens after stopping

    budget = SPPSchedule(SPPParams(interval=2, A=0.05), max_steps=3)
    state = budget.add("a", 4, 0.5)
    results = [budget.step(NORMS) for _ in range(4)]
    assert [r.stopped for r in results] == [False, False, True, False]
    assert budget.stopped and not budget.finished and budget.steps == 3
    assert state.closed and bool((state.probabilities == 0).all()) and bool(state.keep.all())

    endless = _schedule(A=1.0)  # without a budget only stop() stops
    for _ in range(5):
        assert not endless.step(NORMS).stopped
    assert endless.finished and not endless.stopped and endless.steps == 5
    endless.stop()
    assert endless.stopped


def test_state_dict_round_trip_gives_the_same_next_masks_and_probabilities():
    s = _schedule(interval=2, A=0.2, seed=5, a=(8, 0.5), b=(6, 0.5))
    norms = {"a": torch.arange(8.0), "b": torch.tensor([3.0, 1.0, 2.0, 6.0, 5.0, 4.0])}
    for _ in range(3):
        s.step(norms)
    saved = copy.deepcopy(s.state_dict())
    trail = []
    for _ in range(6):
        s.step(norms)
        trail.append((s.probabilities(), s.masks()))

    resumed = _schedule(interval=2, A=0.2, seed=0, a=(8, 0.5), b=(6, 0.5))
    resumed.load_state_dict(saved)
    assert resumed.steps == 3
    for probs, masks in trail:
        resumed.step(norms)
        assert all(torch.equal(probs[n], p) for n, p in resumed.probabilities().items())
        assert all(torch.equal(masks[n], m) for n, m in resumed.masks().items())


def test_errors_name_the_group_and_change_nothing():
    s = _schedule(a=(4, 0.5), b=(6, 0.5))
    with pytest.raises(SPPError, match=r"group 'b': norms hold NaN/Inf values"):
        s.step({"a": torch.ones(4), "b": torch.tensor([1.0, float("nan"), 2.0, 3.0, 4.0, 5.0])})
    assert all(bool((p == 0).all()) for p in s.probabilities().values())  # 'a' was not updated either
    with pytest.raises(SPPError, match=r"group 'b': expected 6 norms"):
        s.step({"a": torch.ones(4), "b": torch.ones(5)})
    with pytest.raises(SPPError, match=r"group 'b': no norms given"):
        s.step({"a": torch.ones(4)})

    saved = s.state_dict()
    other = _schedule(a=(4, 0.5), b=(8, 0.5))
    with pytest.raises(SPPError, match=r"group 'b': it holds 6 positions, this group has 8"):
        other.load_state_dict(saved)
    assert other.steps == 0 and bool((other.probabilities()["a"] == 0).all())
    with pytest.raises(SPPError, match=r"does not match .* \(missing: \['c'\], unexpected: \['b'\]\)"):
        _schedule(a=(4, 0.5), c=(6, 0.5)).load_state_dict(saved)
    with pytest.raises(SPPError, match="group 'a' is already tracked"):
        s.add("a", 4, 0.5)
    with pytest.raises(SPPError, match="group 'x': 5 channels do not split into 2 equal copies"):
        s.add("x", 5, 0.5, copies=2)


def test_checked_params_lists_every_problem():
    assert checked_params(0.5) == SPPParams()
    with pytest.raises(SPPError) as info:
        checked_params(1.5, ["training_steps must be an integer >= 1, got 0"], interval=0, A=-1, seed="x",
                       rounding="up")
    assert isinstance(info.value, ValueError)
    assert info.value.problems == [
        "ratio must be in (0, 1), got 1.5", "interval must be an integer >= 1, got 0", "A must be > 0, got -1",
        "seed must be an integer, got 'x'", "rounding must be one of ceil, floor, round; got 'up'",
        "training_steps must be an integer >= 1, got 0"]
    with pytest.raises(SPPError, match="max_steps must be an integer >= 1 or None, got 0"):
        SPPSchedule(max_steps=0)
