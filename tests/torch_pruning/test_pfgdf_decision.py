"""The Torch-Pruning adapter of PFGDF only translates: its defaults, checks and decisions are methods/pfgdf's."""

import inspect

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from pfgdf_plugin import GaussianImportance, PFGDFError, PFGDFPruner
from pfgdf_plugin.methods import pfgdf
from pfgdf_plugin.methods.pfgdf import PFGDFParams


def _grouped(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


X = torch.randn(1, 3, 8, 8)


@pytest.mark.parametrize("cls", [GaussianImportance, PFGDFPruner])
def test_constructor_defaults_are_pfgdf_params(cls):
    defaults = PFGDFParams.defaults()
    sig = inspect.signature(cls.__init__).parameters
    knobs = [n for n in sig if n in defaults]
    assert len(knobs) == (4 if cls is GaussianImportance else 7)
    if cls is PFGDFPruner:  # k: None = not given (a target may choose it), resolved to PFGDFParams.k
        assert sig["k"].default is None and PFGDFPruner(_grouped(), X).k == defaults["k"][1]
        knobs.remove("k")
    assert {n: sig[n].default for n in knobs} == {n: defaults[n][1] for n in knobs}


def test_every_bad_value_is_listed_before_the_model_is_traced():
    model = _grouped()
    with pytest.raises(PFGDFError) as info:
        PFGDFPruner(model, X, k=0, statistic="median", mode="bands", min_channels=0, tail_threshold=2.0,
                    group_reduction="sum", max_pruning_ratio=1.5)
    assert len(info.value.problems) == 7
    assert "max_pruning_ratio must be in [0, 1], got 1.5" in str(info.value)
    with pytest.raises(PFGDFError, match="group_reduction must be one of mean, max, first; got 'sum'"):
        GaussianImportance(group_reduction="sum")
    with pytest.raises(PFGDFError, match="statistic must be one of"):
        GaussianImportance(statistic="median")


def test_knobs_are_read_only_views_of_params():
    pruner = PFGDFPruner(_grouped(), X, k=2, min_channels=3, ignored_layers=[])
    assert pruner.params == PFGDFParams(k=2.0, min_channels=3)
    assert (pruner.k, pruner.min_channels, pruner.mode) == (2.0, 3, "band")
    with pytest.raises(AttributeError):
        pruner.k = 1.0
    imp = GaussianImportance(mode="tail")
    assert imp.params.mode == imp.mode == "tail"


@pytest.mark.parametrize("knobs", [{"k": 3.0, "min_channels": 6}, {"k": 1.0}, {"mode": "tail", "tail_threshold": 0.45}])
def test_grouped_layers_are_decided_by_decide_group(knobs):
    model = _grouped()
    pruner = PFGDFPruner(model, X, ignored_layers=[model[9]], max_pruning_ratio=0.9, **knobs)
    expected = {}
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types):
        root = group[0].dep.target.module
        groups = pruner._get_channel_groups(group)
        d = pfgdf.decide_group(pruner.estimate_importance(group), pruner.params, groups, 0.9)
        expected[pruner.DG._module2name[root]] = (groups, d.prune.tolist())
    assert any(idxs for _, idxs in expected.values())
    assert expected["0"][0] == expected["3"][0] == 4  # the grouped conv couples both groups
    pruner.step()
    for name, (groups, idxs) in expected.items():
        entry = pruner.report[name]
        assert entry["pruned_idxs"] == idxs, name
        kept = entry["channels"] - entry["pruned"]
        assert kept >= groups * max(1, -(-pruner.params.min_channels // groups))
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize("mode", ["band", "tail"])
def test_report_statistics_are_layer_statistics(mode):
    model = _grouped(seed=1)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    pruner = PFGDFPruner(model, X, mode=mode, ignored_layers=[model[9]])
    pruner.step()
    for name in ("0", "3", "6"):
        want = pfgdf.layer_statistics(weights[name], pruner.params)
        entry = pruner.report[name]
        assert (entry["mu"], entry["sigma"]) == (want.mu, want.sigma)
        assert entry["statistic"] == want.statistic.float().tolist()


def test_metapruner_with_gaussian_importance_still_ranks_by_the_layer_scores():
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 5, 3))
    dg = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 8, 8))
    group = dg.get_pruning_group(model[0], tp.prune_conv_out_channels, list(range(12)))
    got = GaussianImportance(statistic="l2")(group)
    want = pfgdf.layer_statistics(model[0].weight, PFGDFParams(statistic="l2")).scores.float()
    assert torch.allclose(got, want, atol=1e-6)


def test_select_l1_keeps_the_band_counts_and_drops_the_smallest_group_l1():
    model = _grouped()
    twin = _grouped()
    band = PFGDFPruner(twin, X, ignored_layers=[twin[-1]])
    band.step()
    pruner = PFGDFPruner(model, X, select="l1", ignored_layers=[model[-1]])
    first = model[0]
    group = pruner.DG.get_pruning_group(first, tp.prune_conv_out_channels, list(range(first.out_channels)))
    norms = tp.importance.MagnitudeImportance(p=1)(group)
    pruner.step()
    assert {n: e["pruned"] for n, e in pruner.report.items()} == {n: e["pruned"] for n, e in band.report.items()}
    chosen = pruner.report["0"]["pruned_idxs"]
    assert 0 < len(chosen) and sorted(chosen) == sorted(torch.argsort(norms)[:len(chosen)].tolist())
    assert model(X).shape == (1, 3)
