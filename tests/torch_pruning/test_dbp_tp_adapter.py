"""The Torch-Pruning DBP adapter: defaults from DBPParams, the project's MACs counter, a timer passed in."""

import inspect

import torch
import torch.nn as nn

from pfgdf_plugin.measure import count_macs
from pfgdf_plugin.methods import dbp
from pfgdf_plugin.models import build_model
from pfgdf_plugin.torch_pruning.dbp import DBPPruner


def _data(classes=10):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(20, 3, 32, 32, generator=g), torch.arange(20) % classes) for _ in range(2)]


def test_defaults_are_dbp_params():
    d = dbp.DBPParams()
    sig = inspect.signature(DBPPruner).parameters
    assert {k: sig[k].default for k in ("num_batches", "holdout", "reference", "seed")} == {
        "num_batches": d.num_batches, "holdout": d.holdout, "reference": d.reference, "seed": d.seed}


def test_block_macs_are_what_the_project_counter_saves():
    model = build_model("resnet20", width=0.25)
    x = torch.randn(1, 3, 32, 32)
    pruner = DBPPruner(model, x, data=_data(), target={"blocks": 2})
    dense = count_macs(model, x)
    pruner.step()
    removed = [b for b in pruner.blocks if b.name in pruner.removed]
    assert count_macs(model, x) == dense - sum(b.macs for b in removed)
    assert pruner.result.plan.macs_ratio == dense / count_macs(model, x)
    assert all(pruner.report[b.name]["macs"] == b.macs > 0 for b in pruner.blocks)


def test_a_given_latency_timer_decides_a_latency_target():
    model = build_model("resnet20", width=0.25)
    calls = []

    def timer(dense, pruned):  # one "millisecond" per convolution: 21 in ResNet-20, two per block
        calls.append(pruned)
        return tuple(float(sum(isinstance(m, nn.Conv2d) for m in net.modules())) for net in (dense, pruned))

    pruner = DBPPruner(model, torch.randn(1, 3, 32, 32), data=_data(), target={"latency": 1.15}, latency_fn=timer)
    pruner.step()
    assert len(pruner.removed) == 2 and len(calls) == 3  # 21/19 < 1.15 <= 21/17
    assert pruner.result.plan.latency_ratio == 21 / 17
