"""prune_to_target: the least global ratio that meets a budget, for any importance; named errors."""

import math

import pytest
import torch
import torch_pruning as tp
import torchvision

from pfgdf_plugin import GaussianImportance, TargetError, prune_to_target
from pfgdf_plugin.torch_pruning import target as target_module
from pfgdf_plugin.measure import count_macs, count_params
from pfgdf_plugin.models import build_model

torch.set_num_threads(1)
X = torch.randn(1, 3, 32, 32)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["resnet18", "vgg16_bn_32"])
def test_macs_target_is_reached_within_a_fifth(name):
    if name == "resnet18":
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10)
        ignored = [model.fc]
    else:
        model = build_model("vgg16_bn", width=0.5)
        ignored = [model.classifier]
    dense_macs = count_macs(model, X)
    info = prune_to_target(model, X, tp.importance.MagnitudeImportance(p=1), {"macs": 3.0}, ignored_layers=ignored)
    reached = dense_macs / count_macs(model, X)
    assert 3.0 <= reached <= 3.6
    assert info["reached"] == pytest.approx(reached)
    assert info["target"] == {"macs": 3.0} and 0 < info["ratio"] < 0.95
    assert model(X).shape == (1, 10)


def test_our_importance_reaches_a_params_target():
    model = build_model("resnet20", width=0.5)
    dense = count_params(model)
    info = prune_to_target(model, X, GaussianImportance(), {"params": 2.0}, ignored_layers=[model.fc])
    assert dense / count_params(model) >= 2.0 and info["reached"] >= 2.0
    assert model(X).shape == (1, 10)


def test_latency_target_uses_the_measured_ratio(macs_squared_clock):
    """The search trusts the meter: a deterministic stand-in (MACs ratio squared) replaces the clock."""
    macs_squared_clock(target_module.meet_target)  # the meter prune_to_target really uses
    model = build_model("vgg16_bn", width=0.25)
    dense_macs = count_macs(model, X)
    info = prune_to_target(model, X, tp.importance.MagnitudeImportance(p=1), {"latency": 4.0},
                           ignored_layers=[model.classifier])
    assert info["reached"] >= 4.0
    assert math.sqrt(info["reached"]) == pytest.approx(dense_macs / count_macs(model, X))


@pytest.mark.parametrize("target,match", [
    ({"params": 500.0}, r"target params 500x cannot be reached: .* gives \d+\.\d+x"),
    ({"latency": 2.0, "macs": 3.0}, "give one target at a time, got latency and macs"),
    ({"macs": 0.5}, r"macs must be a finite ratio >= 1 \(dense / pruned\), got 0.5"),
    ({"macs": float("nan")}, "macs must be a finite ratio >= 1"),
    ({"flops": 2.0}, "unknown kind 'flops'"),
    (2.0, "target must be a dict"),
])
def test_bad_or_unreachable_targets_name_the_problem_and_leave_the_model(target, match):
    model = build_model("lenet5")
    before = _state(model)
    with pytest.raises(TargetError, match=match):
        prune_to_target(model, X, tp.importance.MagnitudeImportance(p=1), target)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_ratio_and_a_target_together_is_refused():
    model = build_model("lenet5")
    with pytest.raises(TypeError, match="chooses 'pruning_ratio' itself"):
        prune_to_target(model, X, tp.importance.MagnitudeImportance(p=1), {"macs": 2.0}, pruning_ratio=0.5)


def test_bad_latency_settings_are_named():
    model = build_model("lenet5")
    with pytest.raises(TargetError, match="engine must be one of pytorch, onnxruntime; got 'tvm'"):
        prune_to_target(model, X, tp.importance.MagnitudeImportance(p=1), {"latency": 2.0}, engine="tvm")
    with pytest.raises(TargetError, match="threads must be an integer >= 1, got 0"):
        prune_to_target(model, X, tp.importance.MagnitudeImportance(p=1), {"latency": 2.0}, threads=0)


def test_before_step_runs_on_every_candidate_copy_and_the_model():
    """Taylor reads ``weight.grad``, which ``copy.deepcopy`` drops: the hook puts it back on each copy."""
    model = build_model("lenet5")
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    seen = []

    def load(net):
        seen.append(net)
        for n, p in net.named_parameters():
            p.grad = grads[n].clone()

    info = prune_to_target(model, X, tp.importance.TaylorImportance(), {"params": 2.0}, ignored_layers=[model.fc3],
                           before_step=load)
    assert info["reached"] >= 2.0
    assert len(seen) == len(info["trials"]) + 1 and seen[-1] is model and all(m is not model for m in seen[:-1])
