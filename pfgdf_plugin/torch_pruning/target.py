"""Prune to a budget with any Torch-Pruning importance: search the global ratio that meets a target.

Example:
    >>> import torch, torch_pruning as tp, torchvision
    >>> from pfgdf_plugin import prune_to_target
    >>> model = torchvision.models.resnet18(num_classes=10)
    >>> info = prune_to_target(model, torch.randn(1, 3, 32, 32), tp.importance.MagnitudeImportance(p=1),
    ...                        {"macs": 2.0}, ignored_layers=[model.fc])
    >>> 2.0 <= info["reached"] < 2.5
    True
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch.nn as nn
import torch_pruning as tp

from ..meter import Timing, meet_target, modules_of, ratio_meter, target_or_none

_REFUSED = ("pruning_ratio", "pruning_ratio_dict", "importance", "iterative_steps")


def _pruned(model: nn.Module, example_inputs: Any, importance, ratio: float, ignored: List[nn.Module],
            kwargs: Mapping[str, Any], before_step: Optional[Callable[[nn.Module], None]] = None) -> nn.Module:
    """``model`` itself pruned at ``ratio`` (call it on a copy to measure); ``before_step(model)`` first."""
    fresh = {k: (dict(v) if isinstance(v, dict) else v) for k, v in kwargs.items()}  # BasePruner mutates dicts
    if before_step is not None:
        before_step(model)
    tp.pruner.MetaPruner(model, example_inputs, importance=importance, pruning_ratio=ratio, ignored_layers=ignored,
                         **fresh).step()
    return model


def usable_ratio(model: nn.Module, example_inputs: Any, ignored: List[nn.Module], max_ratio: float,
                 kwargs: Mapping[str, Any]) -> float:
    """``max_ratio``, lowered so that every prunable group keeps a channel.

    Above ``1 - 1 / n`` a group of ``n`` channels would lose them all and Torch-Pruning leaves it
    whole, so the cost would fall again: the search needs a range where it only grows.
    """
    probe = copy.deepcopy(model)
    fresh = {k: (dict(v) if isinstance(v, dict) else v) for k, v in kwargs.items()}
    pruner = tp.pruner.MetaPruner(probe, example_inputs, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.0, ignored_layers=modules_of(probe, model, ignored), **fresh)
    sizes = [len(g[0].idxs) for g in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                                               root_module_types=pruner.root_module_types)]
    sizes = [n for n in sizes if n > 1]
    return min([max_ratio] + [1.0 - 1.0 / n - 1e-6 for n in sizes])


def prune_to_target(model: nn.Module, example_inputs: Any, importance, target: Mapping[str, float], *,
                    engine: str = "pytorch", threads: int = 1, batch_size: int = 1, max_ratio: float = 0.95,
                    steps: int = 10, warmup: int = 5, repeats: int = 30,
                    ignored_layers: Optional[List[nn.Module]] = None,
                    before_step: Optional[Callable[[nn.Module], None]] = None,
                    **metapruner_kwargs) -> Dict[str, Any]:
    """Prune ``model`` in place with ``tp.pruner.MetaPruner`` at the least global ratio that meets ``target``.

    The ratio is found by bisection over copies of the model; the model itself is pruned once, at
    the end, and is left untouched when the target cannot be met.

    Args:
        model: the network to prune (in place, once the ratio is known).
        example_inputs: a batch for tracing (and for timing, ``[N, C, H, W]``).
        importance: any Torch-Pruning importance, built-in or this package's.
        target: ``{"latency": r}``, ``{"macs": r}`` or ``{"params": r}``: dense / pruned >= r.
        engine: latency engine, ``pytorch`` or ``onnxruntime``.
        threads, batch_size: latency settings (defaults: 1 thread, batch 1).
        max_ratio: the largest global ratio tried (every layer keeps some channels).
        steps: bisection steps.
        warmup, repeats: latency timing runs per candidate (medians).
        ignored_layers: layers left alone (typically the classifier).
        before_step: called as ``before_step(net)`` on every candidate copy and on ``model`` before
            its pruner is built, for an importance that reads state ``copy.deepcopy`` drops:
            Torch-Pruning's ``TaylorImportance`` reads ``weight.grad``, which a deep copy does
            not keep, so the hook puts the gradients back.
        **metapruner_kwargs: other ``MetaPruner`` arguments (``global_pruning``, ``round_to``, ...).

    Returns:
        ``{"target", "reached", "ratio", "trials"}``: the requested and reached dense / pruned
        ratios, the global ratio used, and every ``[ratio, reached]`` tried.

    Raises:
        TargetError: malformed or unreachable target (naming the best ratio reached).
    """
    for key in _REFUSED:
        if key in metapruner_kwargs:
            raise TypeError(f"prune_to_target chooses {key!r} itself; pass a target instead")
    timing = Timing(engine, threads, batch_size, warmup, repeats)
    modules_of(model, model, ignored_layers)  # every ignored layer must belong to the model

    def prune_copy(candidate: nn.Module, ratio: float) -> nn.Module:
        return _pruned(candidate, example_inputs, importance, ratio, modules_of(candidate, model, ignored_layers),
                       metapruner_kwargs, before_step)

    hi = usable_ratio(model, example_inputs, list(ignored_layers or ()), max_ratio, metapruner_kwargs)
    result = meet_target(model, example_inputs, target, prune_copy, 0.0, hi, steps=steps,
                         knob_name="global pruning ratio", timing=timing)
    dense = copy.deepcopy(model) if result.target.kind == "latency" else None
    _pruned(model, example_inputs, importance, result.knob, list(ignored_layers or ()), metapruner_kwargs, before_step)
    info = result.report()
    info["ratio"] = info.pop("knob")
    if dense is not None:  # the budget says what the final model does, measured afresh
        info["reached"] = ratio_meter("latency", dense, example_inputs, engine, threads, batch_size, warmup,
                                      repeats)(model)
    return info


RATIO_RANGE = (0.01, 0.95)  # the per-layer ratios a method's target search tries


def ratio_for_target(owner: str, model: nn.Module, example_inputs: Any, target: Any, timing: Any,
                     ratio: Optional[float], ignored_layers: Optional[List[nn.Module]],
                     metapruner_kwargs: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The search report of the least uniform ratio meeting ``target`` (``None`` without a target).

    Copies are pruned by ``tp.pruner.MetaPruner`` with L1 norm (``MagnitudeImportance(p=1)``) at
    each candidate ratio: a method that removes the same number of channels per layer, whichever
    they are, gets the same structure and so the same cost (SPP chooses its ratio so, before it
    trains). ``model`` is only copied.

    Raises:
        TargetError: a malformed or unreachable target, or a target with ``ratio`` or a
            ``pruning_ratio_dict`` (naming both).

    Example:
        >>> import torch
        >>> from pfgdf_plugin.models import build_model
        >>> net = build_model("lenet5")
        >>> info = ratio_for_target("SPPPruner", net, torch.randn(1, 3, 32, 32), {"params": 2.0}, None, None,
        ...                         [net.fc3], {})
        >>> info["reached"] >= 2.0 and 0 < info["knob"] < 1
        True
    """
    goal = target_or_none(owner, target, pruning_ratio=ratio,
                          pruning_ratio_dict=metapruner_kwargs.get("pruning_ratio_dict"))
    if goal is None:
        return None
    modules_of(model, model, ignored_layers)  # every ignored layer must belong to the model
    kwargs = {k: v for k, v in metapruner_kwargs.items() if k != "pruning_ratio_dict"}
    importance = tp.importance.MagnitudeImportance(p=1)

    def prune_copy(candidate: nn.Module, r: float) -> nn.Module:
        return _pruned(candidate, example_inputs, importance, r, modules_of(candidate, model, ignored_layers),
                       kwargs)

    lo, hi = RATIO_RANGE
    hi = usable_ratio(model, example_inputs, list(ignored_layers or ()), hi, kwargs)
    return meet_target(model, example_inputs, goal, prune_copy, lo, hi, knob_name="pruning_ratio",
                       timing=timing).report()
