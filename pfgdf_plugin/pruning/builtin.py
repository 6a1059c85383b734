"""The frameworks' own criteria (l1, l2, fpgm, random), registered so a recipe or a bench can
compare against them on the same model and budget. They take no ``prune.params``."""

from __future__ import annotations

from typing import Callable

from ..measure import filters_per_layer
from .common import channel_report, nni_config, nni_finish
from .registry import Method, NoParams, PruneResult, register

BUILTINS = ("l1", "l2", "fpgm", "random")


def _tp_builtin(importance_factory: Callable[[], object]):
    def run(model, example_inputs, params, ratio, ignored, ctx, ratio_dict=None) -> PruneResult:
        import torch_pruning as tp

        before = filters_per_layer(model)
        tp.pruner.MetaPruner(model, example_inputs, importance=importance_factory(), pruning_ratio=ratio or 0.0,
                             pruning_ratio_dict=ratio_dict, ignored_layers=ignored).step()
        return PruneResult(model, channel_report(before, model))

    return run


def _nni_builtin(cls_name: str):
    def run(model, example_inputs, params, ratio, ignored, ctx, config=None) -> PruneResult:
        import nni.compression.pruning as nni_pruning

        before = filters_per_layer(model)
        config = config or nni_config(model, example_inputs, ignored, ratio)
        pruner = getattr(nni_pruning, cls_name)(model, config)
        _, masks = pruner.compress()
        pruner.unwrap_model()
        return nni_finish(model, masks, example_inputs, config, before)

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
    needs_ratio=True))
register(Method(
    "l2", "built-in L2-norm filter pruning (Torch-Pruning MagnitudeImportance(p=2) / NNI L2NormPruner)",
    params=NoParams, run={"torch_pruning": _tp_builtin(_magnitude(2)), "nni": _nni_builtin("L2NormPruner")},
    needs_ratio=True))
register(Method(
    "fpgm", "built-in geometric-median filter pruning (NNI FPGMPruner)",
    params=NoParams, run={"nni": _nni_builtin("FPGMPruner")}, needs_ratio=True))
register(Method(
    "random", "built-in random filter pruning (Torch-Pruning RandomImportance), a floor to beat",
    params=NoParams, run={"torch_pruning": _tp_builtin(_random)}, needs_ratio=True))
