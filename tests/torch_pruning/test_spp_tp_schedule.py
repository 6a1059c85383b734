"""The Torch-Pruning SPPPruner on top of SPPSchedule: SPPParams's defaults, every bad value at once."""

import inspect

import pytest
import torch
import torch.nn as nn

from pfgdf_plugin.errors import SPPError
from pfgdf_plugin.methods.spp import SPPParams, SPPSchedule
from pfgdf_plugin.torch_pruning.spp import SPPPruner


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 3))


def test_constructor_defaults_are_sppparams():
    sig = inspect.signature(SPPPruner.__init__).parameters
    for name, default in SPPParams().to_dict().items():
        assert sig[name].default == default, name
    assert sig["interval"].default == 10


def test_bad_values_are_all_listed_before_the_model_is_touched():
    model = _model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SPPError) as info:
        SPPPruner(model, torch.randn(1, 3, 8, 8), pruning_ratio=1.5, interval=0, A=0, seed=2.0,
                  rounding="up", pruning_ratio_dict={model[3]: 1.0})
    assert isinstance(info.value, ValueError)
    assert info.value.problems == [
        "ratio must be in (0, 1), got 1.5", "interval must be an integer >= 1, got 0", "A must be > 0, got 0",
        "seed must be an integer, got 2.0", "rounding must be one of ceil, floor, round; got 'up'",
        "pruning_ratio_dict values must be in [0, 1), got 1.0 for Conv2d"]
    assert model.training and not any(m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_schedule_counts_the_updates_with_the_default_interval():
    model = _model()
    pruner = SPPPruner(model, torch.randn(1, 3, 8, 8), A=0.5, ignored_layers=[model[7]], seed=3)
    assert isinstance(pruner.schedule, SPPSchedule) and pruner.params == SPPParams(A=0.5, seed=3)
    assert pruner.generator is pruner.schedule.generator
    for _ in range(9):
        pruner.update()
    assert pruner.steps == 9 and all(bool((p == 0).all()) for p in pruner.probabilities().values())
    pruner.update()  # the 10th call ranks and updates
    assert pruner.steps == 10 and all(p.max() == 0.5 for p in pruner.probabilities().values())
    state = pruner.state_dict()
    assert state["steps"] == 10 and state["pruned"] is False and state["config"]["interval"] == 10
