"""DBP to any budget: depth first, then width with prune_to_target where blocks alone fall short."""

import pytest
import torch
import torch.nn as nn
import torchvision

from pfgdf_plugin.errors import DBPError, TargetError
from pfgdf_plugin.measure import count_macs, count_params
from pfgdf_plugin.methods import dbp
from pfgdf_plugin.models import build_model
from pfgdf_plugin.torch_pruning import dbp as dbp_adapter
from pfgdf_plugin.torch_pruning.dbp import DBPPruner

X = torch.randn(1, 3, 32, 32)


def _data(batches=2, batch=20, classes=10):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.arange(batch) % classes) for _ in range(batches)]


def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    mods, state = snap
    now = model.state_dict()
    return [(n, type(m)) for n, m in model.named_modules()] == mods and set(now) == set(state) and all(
        torch.equal(now[k], state[k]) for k in state)


def _conv_shapes(model):
    return [(n, m.in_channels, m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("name", ["resnet18", "vgg16_bn"])
def test_macs_target_3x_is_reached_within_20_percent_and_the_model_runs(name):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10) if name == "resnet18" else build_model("vgg16_bn", width=0.5)
    dense = count_macs(model, X)
    pruner = DBPPruner(model, X, data=_data(), target={"macs": 3.0}, num_batches=2)
    pruner.step()
    reached = dense / count_macs(model, X)
    assert 3.0 <= reached <= 3.6
    rep = pruner.target_report
    assert rep["target"] == {"macs": 3.0} and rep["met"] is True
    assert rep["reached"] == pytest.approx(reached)
    assert rep["depth"]["blocks"] == len(pruner.removed) > 0
    assert all(isinstance(dict(model.named_modules())[m], nn.Identity)
               for b in pruner.blocks if b.name in pruner.removed for m in b.members)
    if name == "resnet18":  # 5 blocks hold 63.6% of the MACs: all go (2.75x), width does the rest
        assert rep["depth"]["met"] is False and len(pruner.removed) == 5
        assert 0 < pruner.width_ratio < 0.2 and rep["width"]["importance"] == "l1"
        assert rep["width"]["target"]["macs"] == pytest.approx(3.0 / rep["depth"]["reached"], rel=1e-6)
    else:  # VGG's 9 blocks hold 81% of the MACs: depth alone
        assert rep["depth"]["met"] is True and rep["width"] is None and pruner.width_ratio == 0.0
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_depth_alone_chooses_the_same_blocks_as_before():
    x = X
    a, b = build_model("resnet20", width=0.25), build_model("resnet20", width=0.25)
    b.load_state_dict(a.state_dict())
    with_width = DBPPruner(a, x, data=_data(), target={"macs": 1.3})
    depth_only = DBPPruner(b, x, data=_data(), target={"macs": 1.3}, width_importance="none")
    with_width.step()
    depth_only.step()
    assert with_width.removed == depth_only.removed and with_width.width_ratio == 0.0
    assert with_width.target_report["width"] is None and with_width.target_report["depth"]["met"]
    assert _conv_shapes(a) == _conv_shapes(b)  # no channel was pruned
    assert with_width.target_report["reached"] == with_width.result.plan.macs_ratio >= 1.3


def test_blocks_target_ignores_the_width_settings():
    model = build_model("resnet20", width=0.25)
    convs = _conv_shapes(model)
    pruner = DBPPruner(model, X, data=_data(), target={"blocks": 7}, depth_share=0.5)
    pruner.step()
    assert len(pruner.removed) == 7 and pruner.width_ratio == 0.0
    assert pruner.target_report == {"target": {"blocks": 7}, "reached": 7, "met": True,
                                    "depth": {"target": {"blocks": 7}, "blocks": 7, "removed": pruner.removed,
                                              "met": True, "reached": 7}, "width": None}
    assert [c for c in _conv_shapes(model)] == [c for c in convs if not any(
        c[0].startswith(m + ".") or c[0] == m for b in pruner.blocks for m in b.members)]


def test_depth_share_splits_the_log_ratio_between_depth_and_width():
    torch.manual_seed(0)
    model = build_model("vgg16_bn", width=0.25)
    dense = count_macs(model, X)
    pruner = DBPPruner(model, X, data=_data(), target={"macs": 3.0}, depth_share=0.5)
    pruner.step()
    rep = pruner.target_report
    assert rep["depth"]["target"]["macs"] == pytest.approx(3.0 ** 0.5)
    assert 3.0 ** 0.5 <= rep["depth"]["reached"] < 3.0 and 0 < len(pruner.removed) < 9
    assert pruner.width_ratio > 0
    assert dense / count_macs(model, X) == pytest.approx(rep["reached"]) and rep["reached"] >= 3.0
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_params_target_by_depth_then_width():
    model = build_model("vgg16_bn", width=0.25)
    dense = count_params(model)
    pruner = DBPPruner(model, X, data=_data(), target={"params": 12.0})  # all 9 blocks: 9.3x
    pruner.step()
    rep = pruner.target_report
    assert rep["target"] == {"params": 12.0} and dense / count_params(model) == pytest.approx(rep["reached"])
    assert 12.0 <= rep["reached"] <= 14.0 and pruner.width_ratio > 0 and len(pruner.removed) == 9
    assert rep["depth"]["reached"] == pytest.approx(pruner.result.plan.params_ratio)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_latency_target_by_depth_then_width_with_a_deterministic_stand_in(monkeypatch):
    """Latency = MACs (no clock): the blocks' timer and the width search's meter both count them."""
    def macs_latency(dense, pruned):
        return float(count_macs(dense, X)), float(count_macs(pruned, X))

    def fake_ratio(dense, candidate, example_inputs, *args):
        d, p = macs_latency(dense, candidate)
        return d / p

    meet_target = dbp_adapter.prune_to_target.__globals__["meet_target"]
    monkeypatch.setitem(meet_target.__globals__, "latency_ratio", fake_ratio)
    model = build_model("vgg16_bn", width=0.25)
    dense = count_macs(model, X)
    pruner = DBPPruner(model, X, data=_data(), target={"latency": 6.0}, latency_fn=macs_latency,
                       timing={"threads": 1, "batch_size": 1})
    pruner.step()
    rep = pruner.target_report
    assert len(pruner.removed) == 9 and rep["depth"]["met"] is False  # all 9 blocks: 4.9x
    assert rep["depth"]["reached"] == pytest.approx(pruner.result.plan.macs_ratio)
    assert rep["width"]["target"]["latency"] == pytest.approx(6.0 / rep["depth"]["reached"], rel=1e-6)
    assert rep["reached"] == pytest.approx(dense / count_macs(model, X)) and 6.0 <= rep["reached"] < 7.2


def test_discrimination_importance_for_the_width_step():
    model = build_model("vgg16_bn", width=0.25)
    dense = count_macs(model, X)
    pruner = DBPPruner(model, X, data=_data(), target={"macs": 6.0}, width_importance="discrimination")
    pruner.step()
    assert pruner.target_report["width"]["importance"] == "discrimination"
    assert dense / count_macs(model, X) >= 6.0 and pruner.width_ratio > 0
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_lamp_width_step_ranks_globally_so_layers_keep_different_shares():
    model = build_model("vgg16_bn", width=0.25)
    dense_shapes = dict((n, o) for n, _, o in _conv_shapes(model))
    dense = count_macs(model, X)
    pruner = DBPPruner(model, X, data=_data(), target={"macs": 3.0}, depth_share=0.5, width_importance="lamp")
    pruner.step()
    assert pruner.target_report["width"]["importance"] == "lamp" and pruner.width_ratio > 0
    assert dense / count_macs(model, X) >= 3.0
    kept = [o / dense_shapes[n] for n, _, o in _conv_shapes(model) if n in dense_shapes]
    assert max(kept) - min(kept) > 0.2  # a uniform ratio keeps about one share in every layer
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unreachable_target_names_the_best_and_leaves_the_model_untouched():
    model = build_model("resnet20", width=0.25)
    snap = _snapshot(model)
    pruner = DBPPruner(model, X, data=_data(), target={"macs": 1e6})
    with pytest.raises(DBPError, match=r"target macs ratio 1e\+06 cannot be reached: removing 7 of 7 block\(s\) "
                                       r"gives \d+\.\d+, and width pruning at the largest global ratio 0.95 gives "
                                       r"\d+\.\d+ against the dense model \(the best reached\)") as err:
        pruner.step()
    assert isinstance(err.value, TargetError) and isinstance(err.value, ValueError)
    assert _same(model, snap) and pruner.result is None and pruner.removed == []


@pytest.mark.parametrize("kwargs,error,match", [
    ({"depth_share": 1.5}, DBPError, r"depth_share must be in \[0, 1\], got 1.5"),
    ({"width_importance": "l2"}, DBPError, "width_importance must be one of l1, lamp, discrimination, none; got 'l2'"),
    ({"max_width_ratio": 1.0}, ValueError, r"max_width_ratio must be a float in \(0, 1\), got 1.0"),
    ({"timing": {"threads": 0}}, TargetError, "threads must be an integer >= 1, got 0"),
    ({"target": {"macs": 3.0, "latency": 2.0}}, TargetError, "give one target at a time, got macs and latency"),
    ({"target": {"params": 0.5}}, TargetError, r"params must be a finite ratio >= 1 \(dense / pruned\), got 0.5"),
    ({"ignored_layers": [nn.Linear(2, 2)]}, TargetError, "ignored_layers holds a Linear that is not a module"),
])
def test_bad_settings_fail_at_construction(kwargs, error, match):
    model = build_model("resnet20", width=0.25)
    args = {"target": {"macs": 2.0}, **kwargs}
    with pytest.raises(error, match=match):
        DBPPruner(model, X, data=_data(), **args)


def test_split_rules():
    t = dbp.Target("macs", 4.0)
    assert dbp.depth_target(t, 1.0) is t and dbp.depth_target(t, 0.0).value == 1.0
    assert dbp.width_target(t, 4.0) is None and dbp.width_target(t, None) is None
    assert dbp.width_target(dbp.Target("blocks", 2), 1.0) is None
    w = dbp.width_target(t, 2.0)
    assert w.kind == "macs" and 2.0 <= w.value < 2.0 + 1e-6
