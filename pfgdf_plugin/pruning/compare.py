"""Comparisons at one structure or one budget: built-in criteria pruned like another method."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn

from .builtin import BUILTINS
from .registry import METHODS, NoParams, PruneContext, PruneResult, prune, resolve_layers


def prune_like(model: nn.Module, example_inputs: torch.Tensor, method: str, framework: str,
               layers: Dict[str, dict], ignored_layers: Optional[List[str]] = None) -> PruneResult:
    """Prune ``model`` in place with a built-in criterion, removing exactly ``layers[name]["pruned"]``
    of ``layers[name]["channels"]`` per layer (the counts another method chose), so criteria are
    compared at one structure."""
    if method not in BUILTINS:
        raise ValueError(f"prune_like compares built-in criteria ({', '.join(BUILTINS)}); got method {method!r}")
    run = METHODS.get(method).run[framework]
    ignored = resolve_layers(model, ignored_layers)
    pruned = {n: d for n, d in layers.items() if d["pruned"] > 0}
    if framework == "torch_pruning":
        mods = dict(model.named_modules())
        # Torch-Pruning removes n - int(n * (1 - r)) channels: half a channel below the count hits it exactly
        ratio_dict = {mods[n]: (d["pruned"] - 0.5) / d["channels"] for n, d in pruned.items() if n in mods}
        return run(model, example_inputs, NoParams(), None, ignored, PruneContext(), ratio_dict=ratio_dict)
    config = [{"op_names": [n], "sparse_ratio": float(d["pruned"] / d["channels"])} for n, d in pruned.items()]
    return run(model, example_inputs, NoParams(), None, ignored, PruneContext(), config=config)


def prune_matching(model: nn.Module, example_inputs: torch.Tensor, method: str, framework: str, metric: str,
                   target: float, ignored_layers: Optional[List[str]] = None, steps: int = 12) -> PruneResult:
    """Prune a copy of ``model`` with a built-in criterion at the one global ratio whose result has
    ``metric`` (``macs`` or ``params``) closest to ``target``, so a method that sets no ratio (DBP's
    depth, MPD's blocks) is compared with width pruning at the same budget. Bisection over the ratio.
    """
    from ..measure import count_macs, count_params

    if metric not in ("macs", "params"):
        raise ValueError(f"metric must be macs or params, got {metric!r}")
    measure = (lambda m: count_macs(m, example_inputs)) if metric == "macs" else count_params
    lo, hi, best = 0.0, 0.95, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        res = prune(model, example_inputs, method, framework, ratio=mid, ignored_layers=ignored_layers)
        value = measure(res.model)
        if best is None or abs(value - target) < abs(best[0] - target):
            best = (value, res, mid)
        lo, hi = (mid, hi) if value > target else (lo, mid)
    value, res, ratio = best
    res.extra.update({"matched_ratio": ratio, "matched_metric": metric, "matched_value": value})
    return res
