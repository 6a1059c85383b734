"""The frameworks' own criteria (l1, l2, fpgm, random), registered so a recipe or a bench can
compare against them on the same model and budget. They take no ``prune.params``; with
``prune.target`` the global ratio is searched (Torch-Pruning: :func:`pfgdf_plugin.prune_to_target`;
NNI: the pruner and ``speedup`` on copies)."""

from __future__ import annotations

from typing import Callable

from ..measure import filters_per_layer
from .budget import nni_search, timing_of
from .common import channel_report, nni_config, nni_finish
from .registry import Method, NoParams, PruneResult, register

BUILTINS = ("l1", "l2", "fpgm", "random")


def _tp_builtin(importance_factory: Callable[[], object]):
    def run(model, example_inputs, params, ratio, ignored, ctx, ratio_dict=None) -> PruneResult:
        import torch_pruning as tp

        from ..torch_pruning import prune_to_target

        before = filters_per_layer(model)
        if ctx.target is not None:
            t = timing_of(ctx)
            info = prune_to_target(model, example_inputs, importance_factory(), ctx.target, engine=t.engine,
                                   threads=t.threads, batch_size=t.batch_size, warmup=t.warmup, repeats=t.repeats,
                                   ignored_layers=ignored)
            search = {"reached": info["reached"], "knob": info["ratio"], "trials": info["trials"]}
            return PruneResult(model, channel_report(before, model), extra={"target_search": search,
                                                                            "train_epochs": 0.0})
        tp.pruner.MetaPruner(model, example_inputs, importance=importance_factory(), pruning_ratio=ratio or 0.0,
                             pruning_ratio_dict=ratio_dict, ignored_layers=ignored).step()
        return PruneResult(model, channel_report(before, model), extra={"train_epochs": 0.0})

    return run


def _nni_builtin(cls_name: str):
    def run(model, example_inputs, params, ratio, ignored, ctx, config=None) -> PruneResult:
        import nni.compression.pruning as nni_pruning

        def compress(net, net_ignored, r, config=None):
            config = config or nni_config(net, example_inputs, net_ignored, r)
            pruner = getattr(nni_pruning, cls_name)(net, config)
            _, masks = pruner.compress()
            pruner.unwrap_model()
            return masks, config

        before = filters_per_layer(model)
        search = None
        if ctx.target is not None:
            search = nni_search(model, example_inputs, ctx, ignored, compress)
            ratio = search["knob"]
        masks, config = compress(model, ignored, ratio, config)
        result = nni_finish(model, masks, example_inputs, config, before)
        result.extra["train_epochs"] = 0.0
        if search is not None:
            result.extra["target_search"] = search
        return result

    return run


def _magnitude(p: int):
    def make():
        import torch_pruning as tp

        return tp.importance.MagnitudeImportance(p=p, group_reduction="first", normalizer=None)

    return make


def _random():
    import torch_pruning as tp

    return tp.importance.RandomImportance()


register(Method(
    "l1", "built-in L1-norm filter pruning (Torch-Pruning MagnitudeImportance(p=1) / NNI L1NormPruner)",
    params=NoParams, run={"torch_pruning": _tp_builtin(_magnitude(1)), "nni": _nni_builtin("L1NormPruner")},
    needs_ratio=True, target_knobs=()))
register(Method(
    "l2", "built-in L2-norm filter pruning (Torch-Pruning MagnitudeImportance(p=2) / NNI L2NormPruner)",
    params=NoParams, run={"torch_pruning": _tp_builtin(_magnitude(2)), "nni": _nni_builtin("L2NormPruner")},
    needs_ratio=True, target_knobs=()))
register(Method(
    "fpgm", "built-in geometric-median filter pruning (NNI FPGMPruner)",
    params=NoParams, run={"nni": _nni_builtin("FPGMPruner")}, needs_ratio=True, target_knobs=()))
register(Method(
    "random", "built-in random filter pruning (Torch-Pruning RandomImportance), a floor to beat",
    params=NoParams, run={"torch_pruning": _tp_builtin(_random)}, needs_ratio=True, target_knobs=()))
