"""The NNI SPPPruner on top of SPPSchedule: SPPParams's defaults, every bad value at once, the step budget."""

import inspect
import warnings

import nni
import pytest
import torch
import torch.nn.functional as F
from nni.compression.utils import TorchEvaluator

from pfgdf_plugin.errors import SPPError
from pfgdf_plugin.methods.spp import SPPParams, SPPSchedule
from pfgdf_plugin.models import build_model
from pfgdf_plugin.nni import SPPPruner

KNOBS = ("interval", "A", "u", "seed")


def _evaluator(model):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)

    def training_step(batch, model):
        return F.cross_entropy(model(batch[0]), batch[1])

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        model.train()
        for _ in range(max_steps):
            optimizers.zero_grad()
            training_step((x, y), model).backward()
            optimizers.step()

    return TorchEvaluator(training_func, nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01), training_step)


def test_constructor_defaults_are_sppparams():
    defaults = SPPParams().to_dict()
    for fn in (SPPPruner.__init__, SPPPruner.from_compressor):
        sig = inspect.signature(fn).parameters
        assert {k: sig[k].default for k in KNOBS} == {k: defaults[k] for k in KNOBS}, fn.__name__
    assert inspect.signature(SPPPruner.__init__).parameters["interval"].default == 10


def test_bad_values_are_all_listed_before_the_model_is_wrapped():
    model = build_model("lenet5")
    with pytest.raises(SPPError) as info:
        SPPPruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], _evaluator(model), 0, interval=0,
                  A=0, u=1, seed=1.5)
    assert info.value.problems == [
        "interval must be an integer >= 1, got 0", "A must be > 0, got 0", "u must be in (0, 1), got 1",
        "seed must be an integer, got 1.5", "training_steps must be an integer >= 1, got 0"]
    assert not any(hasattr(m, "_nni_wrapper") for m in model.modules())


def test_the_schedule_updates_every_ten_steps_and_stops_at_the_budget():
    torch.manual_seed(0)
    model = build_model("lenet5")
    pruner = SPPPruner(model, [{"op_names": ["conv1", "conv2"], "sparse_ratio": 0.5}], _evaluator(model),
                       training_steps=12, A=0.5)
    assert isinstance(pruner.schedule, SPPSchedule) and pruner.schedule.max_steps == 12
    assert pruner.params.interval == 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.compress()
    assert pruner.steps == 12 and pruner.stopped and not pruner.finished
    assert {k: v["updates"] for k, v in pruner.state_dict()["groups"].items()} == {"conv1": 1, "conv2": 1}
    assert pruner.summary()["conv2"] == {"filters": 16, "target": 8, "removed": 0, "finished_at": None}
    pruner.unwrap_model()
