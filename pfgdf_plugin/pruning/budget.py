"""``prune.target`` for every registered method: validation, routing to the method, requested vs reached.

A method either takes the target through ``ctx.target`` (its :attr:`~.registry.Method.target_knobs`
are the ``prune.params`` the target replaces) or, like DBP, has ``prune.params`` fields named after
the target kinds, which the target then fills. After pruning, :func:`attach_target` records what
was asked and what the pruned model reached (MACs and parameters counted afresh on the dense and
pruned models; latency as the method's search measured it).

Example:
    >>> from pfgdf_plugin.pruning import METHODS
    >>> target_problems(METHODS.get("pfgdf"), {"k": 1.0}, None, {"macs": 2.0}, None, "prune")
    ['prune.target and prune.params.k: give one of them (the target chooses k)']
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn

from ..errors import TargetError
from ..meter import Timing, ratio_meter
from ..methods.target import KINDS, Target
from .registry import Method, PruneContext, PruneResult

OWN_KEYS = ("blocks",) + KINDS  # the target keys a method may carry in its own params (DBP)


def _fields(method: Method) -> List[str]:
    return [f.name for f in dataclasses.fields(method.params)]


def own_kinds(method: Method) -> List[str]:
    """The target kinds ``method`` takes as ``prune.params`` fields (DBP: ``macs``, ``latency``)."""
    return [k for k in KINDS if k in _fields(method)]


def target_problems(method: Method, params: Dict[str, Any], ratio: Optional[float], target: Any, timing: Any,
                    prefix: str = "prune") -> List[str]:
    """Every problem with ``prune.target`` / ``prune.timing`` for ``method`` (see the module example)."""
    if target is None:
        return [] if timing is None else [f"{prefix}.timing is used only with {prefix}.target; add a target "
                                          "or remove it"]
    errors: List[str] = []
    goal = None
    try:
        goal = Target.parse(target)
    except TargetError as e:
        errors.append(f"{prefix}.{e}" if str(e).startswith("target") else f"{prefix}.target: {e}")
    try:
        Timing.parse(timing)
    except TargetError as e:
        errors.append(f"{prefix}.timing: {e}")
    if ratio is not None:
        errors.append(f"{prefix}.target and {prefix}.ratio: give one of them (the target chooses the ratio)")
    own = own_kinds(method)
    if own:
        given = [k for k in OWN_KEYS if params.get(k) is not None]
        errors += [f"{prefix}.target and {prefix}.params.{k}: give one of them" for k in given]
        if goal is not None and goal.kind not in own:
            errors.append(f"{prefix}.target: method {method.name!r} takes a {' or '.join(own)} target, "
                          f"not {goal.kind}")
    elif method.target_knobs is None:
        errors.append(f"{prefix}.target: method {method.name!r} takes no target; give {prefix}.params instead")
    else:
        errors += [f"{prefix}.target and {prefix}.params.{k}: give one of them (the target chooses {k})"
                   for k in method.target_knobs if params.get(k) is not None]
    return errors


def with_own_target(method: Method, params: Dict[str, Any], target: Any) -> Dict[str, Any]:
    """``params`` with the target filled in, for a method that carries it as its own key (DBP)."""
    try:
        goal = None if target is None else Target.parse(target)
    except TargetError:
        return params
    if goal is None or goal.kind not in own_kinds(method) or any(params.get(k) is not None for k in OWN_KEYS):
        return params
    return {**params, goal.kind: goal.value}


def route_target(method: Method, params: Dict[str, Any], ctx: PruneContext, target: Any,
                 timing: Any) -> Tuple[Dict[str, Any], PruneContext]:
    """``(params, ctx)`` carrying ``target``: in the params for a method with its own target keys, else in ctx."""
    if target is None:
        return params, ctx
    goal = Target.parse(target)
    if own_kinds(method):
        return {**params, goal.kind: goal.value}, ctx
    return params, dataclasses.replace(ctx, target={goal.kind: goal.value}, timing=timing)


def attach_target(result: PruneResult, dense: nn.Module, example_inputs: Any, target: Any) -> None:
    """``result.extra["target"] = {"requested", "reached", "met"[, "knob", "trials"]}``.

    MACs and parameters are counted on ``dense`` and the pruned model; a latency ratio is the one
    the method measured on its final model (``result.extra["target_search"]["reached"]``).
    """
    goal = Target.parse(target)
    search = result.extra.pop("target_search", None) or {}
    if goal.kind == "latency":
        reached = search.get("reached")
    else:
        reached = ratio_meter(goal.kind, dense, example_inputs)(result.model)
    info: Dict[str, Any] = {"requested": {goal.kind: goal.value},
                            "reached": None if reached is None else float(reached),
                            "met": None if reached is None else bool(float(reached) >= goal.value)}
    if search:
        info.update(knob=search.get("knob"), trials=search.get("trials"))
    result.extra["target"] = info


def timing_of(ctx: PruneContext) -> Timing:
    """The :class:`~pfgdf_plugin.meter.Timing` of ``ctx.timing`` (defaults: PyTorch, 1 thread, batch 1)."""
    return Timing.parse(ctx.timing)


def nni_search(model: nn.Module, example_inputs: Any, ctx: PruneContext, ignored: List[nn.Module], compress,
               lo: float = 0.01, hi: float = 0.95, knob_name: str = "sparse_ratio") -> Dict[str, Any]:
    """The search report of the least ``knob`` meeting ``ctx.target`` with an NNI pruner, on copies.

    ``compress(copy, ignored_of_copy, knob) -> (masks, config_list)`` prunes a copy with NNI (and
    unwraps it); the copy is then sped up (:func:`pfgdf_plugin.nni.speedup`) and measured.
    """
    from ..meter import modules_of
    from ..nni.budget import search_masks_on_copies

    def compress_copy(candidate: nn.Module, knob: float):
        return compress(candidate, modules_of(candidate, model, ignored), knob)

    return search_masks_on_copies(model, example_inputs, ctx.target, ctx.timing, compress_copy, lo, hi,
                                  knob_name=knob_name)
