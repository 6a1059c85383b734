"""methods/dbp: the block-type registry, and planning with the MACs counter and timer the caller passes in."""

import sys
import types

import pytest
import torch
import torch.nn as nn

from pfgdf_plugin.methods import dbp
from pfgdf_plugin.methods.dbp import blocks as dbp_blocks


class _Residual(nn.Module):
    def __init__(self, channels=4, stride=1):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y if self.stride != 1 else x + y


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so registrations here do not outlive the test."""
    monkeypatch.setattr(dbp_blocks, "_BLOCK_TYPES", dict(dbp_blocks._BLOCK_TYPES))
    return dbp_blocks._BLOCK_TYPES


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 1), _Residual(), _Residual(stride=2), _Residual())


def test_a_registered_type_is_one_candidate_and_its_rule_decides(registry):
    x = torch.randn(1, 3, 8, 8)
    # unregistered: the residual blocks are not nn.Sequential runs, so nothing is found
    with pytest.raises(dbp.DBPError, match="no removable block"):
        dbp.find_blocks(_net(), x)
    dbp.register_block_type(_Residual, lambda m: m.stride == 1)
    assert _Residual in dbp.registered_block_types()
    found = dbp.find_blocks(_net(), x)
    assert [(b.name, b.members, b.kind) for b in found] == [("1", ("1",), "residual"), ("3", ("3",), "residual")]


def test_a_type_named_by_string_is_looked_up_only_once_its_module_is_imported(registry, monkeypatch):
    dbp.register_block_type("dbp_test_zoo.blocks:Res", lambda m: True)
    x = torch.randn(1, 3, 8, 8)
    module = types.ModuleType("dbp_test_zoo.blocks")
    module.Res = _Residual
    with pytest.raises(dbp.DBPError, match="no removable block"):
        dbp.find_blocks(_net(), x)  # the module is not in sys.modules: nothing matches, nothing is imported
    assert "dbp_test_zoo.blocks" not in sys.modules
    monkeypatch.setitem(sys.modules, "dbp_test_zoo.blocks", module)
    # the rule accepts every one; the shape check still drops the stride-2 block
    assert [b.name for b in dbp.find_blocks(_net(), x)] == ["1", "3"]


def test_bad_registrations_are_refused(registry):
    with pytest.raises(ValueError, match="must read 'package.module:ClassName', got 'Res'"):
        dbp.register_block_type("Res", lambda m: True)
    with pytest.raises(TypeError, match="block_type must be an nn.Module subclass"):
        dbp.register_block_type(int, lambda m: True)
    with pytest.raises(TypeError, match="removable must be a callable"):
        dbp.register_block_type(_Residual, True)


def test_the_model_zoo_registers_its_residual_blocks():
    import pfgdf_plugin.models as models

    types_ = dbp.registered_block_types()
    assert models.BasicBlock in types_
    assert {"torchvision.models.resnet:BasicBlock", "torchvision.models.resnet:Bottleneck"} <= set(types_)


# --------------------------------------------------------------------------- planning with passed-in meters


def _stack(n=4):
    return nn.Sequential(nn.Conv2d(3, 4, 1), *[nn.Conv2d(4, 4, 1) for _ in range(n)])


def _convs(m):
    return float(sum(isinstance(c, nn.Conv2d) for c in m.modules()))


def test_block_macs_and_macs_ratio_come_from_the_given_counter():
    x = torch.randn(1, 3, 4, 4)
    net = _stack()
    found = dbp.find_blocks(net, x, macs_fn=_convs)
    assert [b.macs for b in found] == [1, 1, 1, 1]
    assert [b.macs for b in dbp.find_blocks(net, x)] == [None] * 4
    plan = dbp.plan_removal(net, found, ["4", "1", "2", "3"], {"macs": 1.6}, x, macs_fn=_convs)
    assert plan.removed == ["4", "1"] and plan.macs_ratio == pytest.approx(5 / 3)  # 5/4 < 1.6 <= 5/3
    assert _convs(net) == 5  # the caller's model is untouched
    plan = dbp.plan_removal(net, found, ["4", "1"], {"blocks": 1}, x)
    assert plan.removed == ["4"] and plan.macs_ratio is None and plan.latency_ratio is None


def test_latency_target_with_a_deterministic_timer():
    x = torch.randn(1, 3, 4, 4)
    net = _stack()
    found = dbp.find_blocks(net, x)
    seen = []

    def timer(dense, pruned):
        seen.append(_convs(pruned))
        return _convs(dense), _convs(pruned)

    plan = dbp.plan_removal(net, found, ["3", "2", "1", "4"], {"latency": 2.0}, x, latency_fn=timer)
    # every block removed first (5/1: reachable), then 5/4, 5/3, 5/2 = 2.0: stop
    assert seen == [1.0, 4.0, 3.0, 2.0]
    assert plan.removed == ["3", "2", "1"] and plan.latency_ratio == pytest.approx(2.5)
    assert [m["removed"] for m in plan.measurements] == [1, 2, 3]
    # a ratio of 1 needs no removal and no timing
    seen.clear()
    plan = dbp.plan_removal(net, found, ["3"], {"latency": 1.0}, x, latency_fn=timer)
    assert plan.removed == [] and plan.latency_ratio == 1.0 and seen == []


def test_latency_target_unreachable_or_not_met():
    x = torch.randn(1, 3, 4, 4)
    net = _stack()
    found = dbp.find_blocks(net, x)
    with pytest.raises(dbp.DBPError, match=r"target latency ratio 9 cannot be met: removing all 2 candidate "
                                           r"block\(s\) measured a latency ratio of 1.667 \(5.000 ms -> 3.000 ms"):
        dbp.plan_removal(net, found, ["1", "2"], {"latency": 9}, x, latency_fn=lambda d, p: (_convs(d), _convs(p)))
    answers = iter([(10.0, 1.0), (10.0, 9.0), (10.0, 8.0)])  # fast when all are gone, then noisy
    with pytest.raises(dbp.DBPError, match=r"target latency ratio 2 was not met: with all 2 block\(s\) removed "
                                           r"the latency ratio measured 1.250"):
        dbp.plan_removal(net, found, ["1", "2"], {"latency": 2}, x, latency_fn=lambda d, p: next(answers))


def test_targets_without_their_meter_are_refused_before_any_work():
    x = torch.randn(1, 3, 4, 4)
    net = _stack()
    found = dbp.find_blocks(net, x)
    with pytest.raises(TypeError, match="a 'macs' target needs macs_fn"):
        dbp.plan_removal(net, found, ["1"], {"macs": 1.2}, x)
    with pytest.raises(TypeError, match="a 'latency' target needs latency_fn"):
        dbp.plan_removal(net, found, ["1"], {"latency": 1.2}, x)
    data = [(torch.randn(8, 3, 4, 4), torch.arange(8) % 2)]
    with pytest.raises(TypeError, match="a 'latency' target needs latency_fn"):
        dbp.prune_(net, x, data, {"latency": 1.2})
    assert not any(isinstance(m, nn.Identity) for m in net.modules())


def test_latency_input_shape():
    assert dbp.latency_input_shape((torch.randn(2, 3, 8, 8),)) == (3, 8, 8)
    with pytest.raises(dbp.DBPError, match=r"one image batch tensor \[B, C, H, W\], got Tensor"):
        dbp.latency_input_shape(torch.randn(2, 8))


def test_params_defaults_are_the_functions_defaults():
    import inspect

    d = dbp.DBPParams()
    for fn in (dbp.prune_, dbp.score_blocks):
        sig = inspect.signature(fn).parameters
        assert {k: sig[k].default for k in ("num_batches", "holdout", "seed", "reference")} == {
            "num_batches": d.num_batches, "holdout": d.holdout, "seed": d.seed, "reference": d.reference}
