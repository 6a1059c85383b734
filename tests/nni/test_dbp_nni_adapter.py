"""The NNI DBP adapter: defaults from DBPParams, the project's MACs counter, a timer passed in."""

import inspect

import pytest
import torch

from pfgdf_plugin.measure import count_macs
from pfgdf_plugin.methods import dbp
from pfgdf_plugin.models import build_model
from pfgdf_plugin.nni.dbp import DBPPruner


def _data(classes=10):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(20, 3, 32, 32, generator=g), torch.arange(20) % classes) for _ in range(2)]


def test_defaults_are_dbp_params():
    d = dbp.DBPParams()
    sig = inspect.signature(DBPPruner).parameters
    assert {k: sig[k].default for k in ("num_batches", "holdout", "reference", "seed")} == {
        "num_batches": d.num_batches, "holdout": d.holdout, "reference": d.reference, "seed": d.seed}


def test_selected_blocks_carry_the_project_counter_macs():
    model = build_model("resnet20", width=0.25)
    x = torch.randn(1, 3, 32, 32)
    dense = count_macs(model, x)
    pruner = DBPPruner(model, [{"op_names": ["layer1.1", "layer2.1"], "sparse_ratio": 0.5}], data=_data(),
                       example_inputs=x)
    assert [b.name for b in pruner.blocks] == ["layer1.1", "layer2.1"]
    pruner.compress()
    removed = [b for b in pruner.blocks if b.name in pruner.removed]
    assert len(removed) == 1 and count_macs(model, x) == dense - removed[0].macs


def test_a_given_latency_timer_decides_a_latency_target():
    model = build_model("resnet20", width=0.25)
    x = torch.randn(1, 3, 32, 32)
    answers = iter([(4.0, 1.0), (4.0, 3.5), (4.0, 2.0)])
    pruner = DBPPruner(model, [{"op_types": ["BasicBlock"]}], data=_data(), example_inputs=x,
                       target={"latency": 1.9}, latency_fn=lambda dense, pruned: next(answers))
    pruner.compress()
    assert len(pruner.removed) == 2
    assert [m["ratio"] for m in pruner.result.plan.measurements] == [4.0 / 3.5, 2.0]


def test_params_target_and_target_report_depth_only():
    from pfgdf_plugin.measure import count_params
    from pfgdf_plugin.methods import dbp as dbp_methods

    model = build_model("resnet20", width=0.25)
    dense = count_params(model)
    pruner = DBPPruner(model, [{"op_types": ["BasicBlock"]}], data=_data(), target={"params": 1.2})
    pruner.compress()
    rep = pruner.target_report
    assert rep["target"] == {"params": 1.2} and rep["width"] is None and pruner.width_ratio == 0.0
    assert rep["reached"] == pytest.approx(dense / count_params(model)) and rep["reached"] >= 1.2
    fresh = build_model("resnet20", width=0.25)
    with pytest.raises(dbp_methods.DBPTargetError, match=r"target params ratio 50 cannot be met: removing all 7 "
                                                         r"candidate block\(s\) reaches a params ratio of"):
        DBPPruner(fresh, [{"op_types": ["BasicBlock"]}], data=_data(), target={"params": 50}).compress()
    assert not any(isinstance(m, torch.nn.Identity) for m in fresh.modules())
