"""DBP through the method registry: a params target, depth then width, and the target report in the metrics."""

import pytest
import torch

from pfgdf_plugin.config import ConfigError
from pfgdf_plugin.measure import count_params
from pfgdf_plugin.models import build_model
from pfgdf_plugin.pruning import METHODS, PruneContext, prune

X = torch.randn(1, 3, 32, 32)


def _loader():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(20, 3, 32, 32, generator=g), torch.arange(20) % 10) for _ in range(2)]


def test_params_target_by_depth_then_width_reports_requested_and_reached():
    model = build_model("vgg16_bn", width=0.25)
    dense = count_params(model)
    res = prune(model, X, "dbp", params={"params": 12.0, "num_batches": 2}, ignored_layers=["classifier"],
                ctx=PruneContext(train_loader=_loader()))
    metrics, _ = METHODS.get("dbp").report(res, None)
    rep = metrics["dbp"]["target"]
    assert rep["target"] == {"params": 12.0} and rep["met"] is True
    assert rep["reached"] == pytest.approx(dense / count_params(res.model)) and rep["reached"] >= 12.0
    assert rep["width"]["ratio"] > 0 and rep["depth"]["blocks"] == len(metrics["dbp"]["removed"]) == 9
    assert {"removed", "macs_ratio", "latency_ratio", "blocks"} <= set(metrics["dbp"])
    assert res.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert count_params(model) == dense  # prune() worked on a copy


@pytest.mark.parametrize("params,match", [
    ({"params": 2.0, "macs": 2.0}, "set exactly one target of blocks, macs, params, latency; got macs=2.0, params=2.0"),
    ({"params": 0.5}, r"params must be a ratio >= 1 \(dense / pruned\), got 0.5"),
    ({"blocks": 2, "depth_share": -0.1}, r"depth_share must be in \[0, 1\], got -0.1"),
    ({"blocks": 2, "width_importance": "taylor"}, "width_importance must be one of l1, lamp, discrimination, none"),
])
def test_bad_dbp_recipe_params_are_named(params, match):
    with pytest.raises(ConfigError, match=match):
        prune(build_model("resnet20", width=0.25), X, "dbp", params=params, ctx=PruneContext(train_loader=_loader()))


def test_a_latency_target_reports_depth_and_width_together(monkeypatch):
    """The reached ratio of prune(target=...) is the whole model's, not the depth step's (a stand-in clock:
    latency = MACs)."""
    from pfgdf_plugin.measure import count_macs
    from pfgdf_plugin.meter import paired_timer

    def macs_clock(models, shape, batch_sizes, **kwargs):
        x = torch.zeros(1, *shape)
        return {n: {b: {"median_ms": count_macs(m, x) / 1e6} for b in batch_sizes} for n, m in models.items()}

    monkeypatch.setattr(paired_timer.__globals__["measure"], "measure_latency", macs_clock)
    model = build_model("vgg16_bn", width=0.25)
    res = prune(model, X, "dbp", params={"depth_share": 0.5, "num_batches": 2}, ignored_layers=["classifier"],
                target={"latency": 3.0}, ctx=PruneContext(train_loader=_loader()))
    rep = res.extra["dbp_target"]
    assert rep["width"]["ratio"] > 0 and res.extra["dbp_latency_ratio"] < 3.0  # depth delivered only a part
    assert res.extra["target"]["reached"] == pytest.approx(rep["reached"])
    assert res.extra["target"]["reached"] == pytest.approx(count_macs(model, X) / count_macs(res.model, X), rel=1e-6)
    assert res.extra["target"]["met"] is True
