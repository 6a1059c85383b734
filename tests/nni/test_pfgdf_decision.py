"""The NNI adapter of PFGDF only translates: its defaults, checks and band masks are methods/pfgdf's."""

import copy
import inspect

import pytest
import torch
import torch.nn as nn

from pfgdf_plugin.errors import PFGDFError
from pfgdf_plugin.methods import pfgdf
from pfgdf_plugin.methods.pfgdf import PFGDFParams
from pfgdf_plugin.models import build_model
from pfgdf_plugin.nni import PFGDFPruner


def _pruned(mask: torch.Tensor) -> list:
    return (mask.reshape(mask.shape[0], -1).abs().sum(1) == 0).nonzero().flatten().tolist()


def test_constructor_defaults_are_pfgdf_params():
    defaults = PFGDFParams.defaults()
    sig = inspect.signature(PFGDFPruner.__init__).parameters
    knobs = [n for n in sig if n in defaults]
    assert knobs == ["k", "statistic", "mode", "min_channels", "tail_threshold", "select"]
    assert sig["k"].default is None  # not given (a target may choose it): PFGDFParams.k
    knobs.remove("k")
    assert {n: sig[n].default for n in knobs} == {n: defaults[n][1] for n in knobs}


def test_every_bad_value_is_listed_and_the_model_stays_unwrapped():
    model = build_model("vgg16_bn", width=0.125)
    with pytest.raises(PFGDFError) as info:
        PFGDFPruner(model, [{"op_types": ["Conv2d"]}], k=-1, statistic="median", min_channels=0)
    assert [p.split(" ")[0] for p in info.value.problems] == ["k", "statistic", "min_channels"]
    assert not any(hasattr(m, "_nni_wrapper") for m in model.modules())
    pruner = PFGDFPruner(model, [{"op_types": ["Conv2d"]}], k=2, mode="tail")
    assert pruner.params == PFGDFParams(k=2.0, mode="tail")
    assert (pruner.k, pruner.pfgdf_mode, pruner.mode) == (2.0, "tail", "pruning")  # NNI's own mode untouched
    pruner.unwrap_model()


@pytest.mark.parametrize("knobs,block,max_ratio", [
    ({"k": 3.0, "min_channels": 6}, 4, None), ({"k": 1.0}, 2, 0.4),
    ({"mode": "tail", "tail_threshold": 0.45}, 1, None)])
def test_band_masks_are_decide_group_on_the_layer_scores(knobs, block, max_ratio):
    torch.manual_seed(0)
    model = build_model("vgg16_bn", width=0.25)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    entry = {"op_types": ["Conv2d"], "internal_metric_block": block}
    if max_ratio is not None:
        entry["max_sparse_ratio"] = max_ratio
    pruner = PFGDFPruner(copy.deepcopy(model), [entry], **knobs)
    _, masks = pruner.compress()
    assert sum(d["pruned"] for d in pruner.decisions.values()) > 0
    for name, w in weights.items():
        stats = pfgdf.layer_statistics(w, pruner.params, layer=name)
        want = pfgdf.decide_group(stats.scores.float(), pruner.params, block, max_ratio or 1.0)
        assert _pruned(masks[name]["weight"]) == sorted(want.prune.tolist()), name
        d = pruner.decisions[name]
        assert (d["mu"], d["sigma"], d["statistic"]) == (stats.mu, stats.sigma, stats.statistic.float().tolist())
        assert d["channels"] - d["pruned"] >= block * max(1, -(-pruner.params.min_channels // block))


def test_select_l1_keeps_the_band_counts_and_drops_the_smallest_l1_filters():
    torch.manual_seed(0)
    model = build_model("vgg16_bn", width=0.25)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    band = PFGDFPruner(copy.deepcopy(model), [{"op_types": ["Conv2d"]}])
    _, band_masks = band.compress()
    l1 = PFGDFPruner(copy.deepcopy(model), [{"op_types": ["Conv2d"]}], select="l1")
    _, l1_masks = l1.compress()
    differ = 0
    for name, w in weights.items():
        got = _pruned(l1_masks[name]["weight"])
        assert len(got) == len(_pruned(band_masks[name]["weight"])), name
        norms = w.reshape(w.shape[0], -1).abs().sum(1)
        assert sorted(got) == sorted(torch.argsort(norms)[:len(got)].tolist()), name
        differ += got != _pruned(band_masks[name]["weight"])
    assert differ > 0 and l1.select == "l1"
