"""PFGDF's recipe entry: ``prune.params`` is :class:`~pfgdf_plugin.methods.pfgdf.PFGDFParams`."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from ..errors import ConfigError
from ..measure import filters_per_layer
from ..methods.pfgdf import PFGDFParams
from .budget import nni_search
from .common import channel_report, nni_config, nni_finish
from .registry import Method, PruneResult, register

_FIT = ("mu", "sigma", "statistic")  # the per-layer Gaussian fit the report plots


def _add_fit(layers: Dict[str, dict], fits: Dict[str, dict]) -> None:
    for name, entry in fits.items():
        if name in layers:
            layers[name].update({k: v for k, v in entry.items() if k in _FIT})


def _check_select(p: PFGDFParams, ratio) -> None:
    if ratio is not None and p.select != "band":
        raise ConfigError([f"prune.params.select={p.select!r} chooses among the band's own per-layer counts; with "
                           "prune.ratio the Gaussian score ranks the filters (prune.method: l1 is L1 at a fixed "
                           "ratio)"], "method 'pfgdf'")


def _tp_pfgdf(model, example_inputs, p: PFGDFParams, ratio, ignored, ctx) -> PruneResult:
    import torch_pruning as tp

    from ..torch_pruning import GaussianImportance, PFGDFPruner

    _check_select(p, ratio)
    before = filters_per_layer(model)
    if ratio is not None:  # fixed ratio, ranked by the Gaussian score
        imp = GaussianImportance(k=p.k, statistic=p.statistic, mode=p.mode, group_reduction=p.group_reduction)
        tp.pruner.MetaPruner(model, example_inputs, importance=imp, pruning_ratio=ratio,
                             ignored_layers=ignored).step()
        return PruneResult(model, channel_report(before, model), extra={"train_epochs": 0.0})
    knobs = p.to_dict()
    if ctx.target is not None:  # the target chooses k
        knobs.pop("k")
    pruner = PFGDFPruner(model, example_inputs, ignored_layers=ignored, target=ctx.target, timing=ctx.timing, **knobs)
    pruner.step()
    layers = channel_report(before, model)
    _add_fit(layers, pruner.report)
    extra = {"train_epochs": 0.0, "k": pruner.k, "mode": p.mode, "statistic": p.statistic,
             "pruning_history": pruner.pruning_history()}
    if pruner.target_report is not None:
        extra["target_search"] = pruner.target_report
    return PruneResult(model, layers, extra=extra)


def _nni_pfgdf(model, example_inputs, p: PFGDFParams, ratio, ignored, ctx) -> PruneResult:
    from ..nni import PFGDFPruner

    _check_select(p, ratio)
    def compress(net, net_ignored, k):
        config = nni_config(net, example_inputs, net_ignored, ratio)
        pruner = PFGDFPruner(net, config, k=k, statistic=p.statistic, mode=p.mode, min_channels=p.min_channels,
                             tail_threshold=p.tail_threshold, select=p.select)
        _, masks = pruner.compress()
        pruner.unwrap_model()
        return masks, config, pruner

    before = filters_per_layer(model)
    k, search = p.k, None
    if ctx.target is not None:  # the band width that meets the target, found on copies
        search = nni_search(model, example_inputs, ctx, ignored, lambda *a: compress(*a)[:2], 0.01, 8.0, "k")
        k = search["knob"]
    masks, config, pruner = compress(model, ignored, k)
    result = nni_finish(model, masks, example_inputs, config, before)
    _add_fit(result.layers, getattr(pruner, "decisions", {}))
    result.extra.update({"train_epochs": 0.0, "k": k, "mode": p.mode, "statistic": p.statistic})
    if search is not None:
        result.extra["target_search"] = search
    return result


def report(result: PruneResult, plot_dir: Optional[str]) -> Tuple[Dict[str, Any], List[str]]:
    """PFGDF's plot: every layer's statistic with its fitted Gaussian and the pruned band."""
    if plot_dir is None:
        return {}, []
    from ..report import plot_gaussians

    x = result.extra
    path = plot_gaussians(result.layers, float(x.get("k", 1.0)), os.path.join(plot_dir, "pfgdf_gaussian.png"),
                          x.get("mode", "band"), x.get("statistic", "mean"))
    return {}, [path] if path else []


METHOD = register(Method(
    "pfgdf", "Gaussian-distribution filter pruning; per-layer ratios from the k-sigma band",
    params=PFGDFParams, run={"torch_pruning": _tp_pfgdf, "nni": _nni_pfgdf},
    framework_only={"group_reduction": ("torch_pruning",)}, report=report, target_knobs=("k",)))
