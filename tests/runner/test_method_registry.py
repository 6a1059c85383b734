"""The method registry: one typed parameter set per method, every problem named by its key path,
and each method's own report hook."""

import dataclasses
import inspect

import pytest
import torch

from pfgdf_plugin.config import ConfigError
from pfgdf_plugin.methods.params import Params
from pfgdf_plugin.pruning import METHODS, PruneResult, parse_params, prune, validate_params
from pfgdf_plugin.recipe import recipe_from_dict


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_validates_into_its_params_dataclass(name):
    method = METHODS.get(name)
    assert issubclass(method.params, Params) and method.params.__dataclass_params__.frozen
    params, errors = parse_params(method, {})
    if name == "dbp":  # a target is required
        assert params is None and errors == [
            "prune.params: set exactly one target of blocks, macs, params, latency; got none"]
    else:
        assert errors == [] and isinstance(params, method.params)


def test_defaults_come_from_the_method_dataclasses():
    spp, _ = parse_params(METHODS.get("spp"), {})
    assert spp.interval == 10 and spp.max_epochs == 2.0
    mpd, _ = parse_params(METHODS.get("mpd"), {})
    assert mpd.compression == 10.0 and mpd.blocks is None
    mpd, _ = parse_params(METHODS.get("mpd"), {"blocks": 4})
    assert mpd.compression is None and mpd.blocks == 4


@pytest.mark.parametrize("method,params,expected", [
    ("pfgdf", {"k": -1, "statistic": "median"},
     ["prune.params.k must be > 0, got -1.0",
      "prune.params.statistic must be one of mean, abs_mean, l2; got 'median'"]),
    ("pfgdf", {"k": "big", "kk": 1},
     ["unknown key 'prune.params.kk' for method 'pfgdf' (known: k, statistic, mode, min_channels, "
      "tail_threshold, group_reduction, select)", "prune.params.k must be float, got 'big'"]),
    ("spp", {"max_epochs": 0, "rounding": "up"},
     ["prune.params.max_epochs must be > 0, got 0.0",
      "prune.params.rounding must be one of ceil, floor, round; got 'up'"]),
    ("mpd", {"blocks": 2, "compression": 4.0},
     ["prune.params: give compression or blocks, not both; got compression=4.0, blocks=2"]),
    ("dbp", {"blocks": 0, "reference": "next"},
     ["prune.params.reference must be one of previous, input; got 'next'", "prune.params.blocks must be >= 1, got 0"]),
])
def test_every_problem_is_named_by_its_key_path(method, params, expected):
    assert sorted(parse_params(METHODS.get(method), params)[1]) == sorted(expected)


def test_a_key_one_framework_does_not_use_is_an_error():
    errors = validate_params(METHODS.get("pfgdf"), {"group_reduction": "max"}, None, "nni")
    assert errors == ["prune.params.group_reduction is used only via torch_pruning, not 'nni'; remove it"]
    assert validate_params(METHODS.get("pfgdf"), {"group_reduction": "max"}, None, "torch_pruning") == []


def test_recipe_lists_problems_of_params_and_other_sections_together():
    with pytest.raises(ConfigError) as e:
        recipe_from_dict({"prune": {"method": "spp", "ratio": 0.5, "params": {"A": -1, "u": 2}},
                          "data": {"batch_size": 0}})
    assert len(e.value.errors) == 3 and any(err.startswith("prune.params.A") for err in e.value.errors)


def test_prune_raises_config_error_with_every_problem():
    with pytest.raises(ConfigError, match=r"prune.params.k must be > 0.*\n.*prune.params.mode"):
        prune(torch.nn.Linear(2, 2), torch.randn(1, 2), "pfgdf", params={"k": 0, "mode": "x"})


def _fake_result(name):
    extra = {"spp": {"spp_steps": 3, "spp_finished": True, "spp_history": {}, "spp_history_every": 1},
             "dbp": {"dbp_removed": ["a"], "dbp_macs_ratio": 1.5, "dbp_latency_ratio": None, "dbp_blocks": {}},
             "mpd": {"mpd_compression": 4.0, "mpd_folded": [], "mpd_snapshot": {}}}.get(name, {})
    return PruneResult(torch.nn.Identity(), {}, name, "torch_pruning", extra)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_reports_its_own_metrics(name):
    metrics, plots = METHODS.get(name).report(_fake_result(name), None)
    expected = {"spp": {"spp": {"steps": 3, "finished": True}},
                "dbp": {"dbp": {"removed": ["a"], "macs_ratio": 1.5, "latency_ratio": None, "blocks": {}}},
                "mpd": {"mpd": {"compression": 4.0, "folded": [], "kernels": {}}}}.get(name, {})
    assert metrics == expected and plots == []


def test_the_stages_know_no_method_by_name():
    from pfgdf_plugin.runner import stages

    source = inspect.getsource(stages)
    for name in METHODS.names():
        assert f'"{name}"' not in source and f"'{name}'" not in source
    assert "extra[" not in source and ".extra.get(" not in source
    assert [f.__name__ for f in stages.STAGES] == ["data_stage", "dense_stage", "prune_stage", "finetune_stage",
                                                   "quantize_stage", "export_stage", "measure_stage", "report_stage"]
    assert {f.name for f in dataclasses.fields(stages.RunState)} >= {"recipe", "stage", "data", "dense", "result",
                                                                     "metrics"}


@pytest.mark.parametrize("framework", ["torch_pruning", "nni"])
def test_pfgdf_select_l1_with_a_fixed_ratio_is_refused_before_pruning(framework):
    from pfgdf_plugin.models import build_model

    model = build_model("lenet5")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="prune.params.select='l1' chooses among the band's own"):
        prune(model, torch.randn(1, 3, 32, 32), "pfgdf", framework, {"select": "l1"}, ratio=0.5,
              inplace=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
