"""target= of PFGDFPruner, SPPPruner and MPDPruner: the budget is met on real models; bad budgets are
named errors that leave the model (weights and train/eval mode) untouched."""

import warnings

import pytest
import torch
import torchvision

from pfgdf_plugin import TargetError
from pfgdf_plugin.measure import count_macs, count_params
from pfgdf_plugin.models import build_model
from pfgdf_plugin.torch_pruning import MPDPruner, PFGDFPruner, SPPPruner
from pfgdf_plugin.torch_pruning import pfgdf as pfgdf_module

torch.set_num_threads(1)
X = torch.randn(1, 3, 32, 32)


def _model(name):
    if name == "resnet18":
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10)
        return model, [model.fc], [model.conv1, model.fc]
    model = build_model("vgg16_bn", width=0.5)
    return model, [model.classifier], [model.features[0]]  # MPD: the 3-channel stem takes 3 blocks at most


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _finish_spp(pruner, model):
    model.train()
    while not pruner.finished:  # no training needed to walk the schedule: large A, interval 1
        pruner.update()
    pruner.step()


@pytest.mark.parametrize("name", ["resnet18", "vgg16_bn_32"])
def test_pfgdf_and_spp_reach_a_macs_target(name):
    model, ignored, _ = _model(name)
    dense = count_macs(model, X)
    pruner = PFGDFPruner(model, X, target={"macs": 3.0}, ignored_layers=ignored)
    pruner.step()
    assert 3.0 <= dense / count_macs(model, X) <= 3.6
    assert pruner.target_report["target"] == {"macs": 3.0} and pruner.k == pruner.target_report["knob"]
    assert model.eval()(X).shape == (1, 10)

    model, ignored, _ = _model(name)
    pruner = SPPPruner(model, X, target={"macs": 3.0}, interval=1, A=0.9, ignored_layers=ignored)
    assert 0 < pruner.params.A and 0 < pruner.target_report["knob"] < 1
    _finish_spp(pruner, model)
    reached = dense / count_macs(model, X)
    assert 3.0 <= reached <= 3.6
    assert reached == pytest.approx(pruner.target_report["reached"], rel=0.02)  # L1 copies: the same structure
    assert model.eval()(X).shape == (1, 10)


@pytest.mark.parametrize("name,kind,low,high", [("resnet18", "macs", 3.0, 3.6), ("vgg16_bn_32", "macs", 3.0, 3.9),
                                                ("resnet18", "params", 3.0, 4.0)])
def test_mpd_searches_one_block_count(name, kind, low, high):
    """One count for every layer moves in whole steps: 3 blocks give 2.8x MACs on VGG, 4 give 3.8x."""
    model, _, ignored = _model(name)
    meter = count_macs if kind == "macs" else lambda m, x: count_params(m)
    dense = meter(model, X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = MPDPruner(model, X, target={kind: 3.0}, ignored_layers=ignored)
    assert pruner.target_report["knob"] == 4
    assert {s["blocks"] for s in pruner.summary()["layers"].values()} == {4}
    pruner.step()
    assert low <= dense / meter(model, X) <= high
    assert dense / meter(model, X) == pytest.approx(pruner.target_report["reached"])
    assert model.eval()(X).shape == (1, 10)


def _bad(make, model, spec):
    model.train()
    before = _state(model)
    with pytest.raises(TargetError) as err:
        make(model, spec)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    return str(err.value)


MAKERS = {
    "pfgdf": lambda m, t, **kw: PFGDFPruner(m, X, target=t, ignored_layers=[m.classifier], **kw),
    "spp": lambda m, t, **kw: SPPPruner(m, X, target=t, ignored_layers=[m.classifier], **kw),
    "mpd": lambda m, t, **kw: MPDPruner(m, X, target=t, ignored_layers=[m.features[0]], **kw),
}
KNOBS = {"pfgdf": {"k": 1.0}, "spp": {"pruning_ratio": 0.5}, "mpd": {"blocks": 2}}


@pytest.mark.parametrize("method", sorted(MAKERS))
def test_bad_targets_are_named_and_leave_the_model_untouched(method):
    model = build_model("vgg16_bn", width=0.25)
    make = MAKERS[method]
    assert "params 1e+06x cannot be reached" in _bad(make, model, {"params": 1e6})
    assert "one target at a time" in _bad(make, model, {"macs": 2.0, "latency": 2.0})
    assert ">= 1" in _bad(make, model, {"macs": 0.5})
    assert "nan" in _bad(make, model, {"macs": float("nan")})
    ((knob, value),) = KNOBS[method].items()
    msg = _bad(lambda m, t: make(m, t, **{knob: value}), model, {"macs": 2.0})
    assert "target=" in msg and f"{knob}={value!r}" in msg and "not both" in msg


def test_mpd_unreachable_target_names_the_best():
    model = build_model("vgg16_bn", width=0.25)
    msg = _bad(MAKERS["mpd"], model, {"params": 500.0})
    assert "params 500x cannot be reached" in msg and "blocks = " in msg


def test_without_a_target_the_defaults_are_the_old_ones():
    model = build_model("vgg16_bn", width=0.25)
    assert PFGDFPruner(model, X, ignored_layers=[model.classifier]).target_report is None
    assert PFGDFPruner(model, X, ignored_layers=[model.classifier]).k == 1.0
    assert SPPPruner(model, X, ignored_layers=[model.classifier]).schedule.summary("channels")
    assert MPDPruner(model, X, ignored_layers=[model.features[0]]).compression == 10.0


def test_latency_target_trusts_the_meter(macs_squared_clock):
    """A deterministic stand-in for the clock (MACs ratio squared): k meets latency 4x = MACs 2x."""
    macs_squared_clock(pfgdf_module.meet_target)
    model = build_model("vgg16_bn", width=0.25)
    dense = count_macs(model, X)
    pruner = PFGDFPruner(model, X, target={"latency": 4.0}, timing={"threads": 1}, ignored_layers=[model.classifier])
    pruner.step()
    assert pruner.target_report["reached"] >= 4.0
    assert 2.0 <= dense / count_macs(model, X) <= 2.4
