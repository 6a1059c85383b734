"""Budgets for the NNI pruners: search a knob on copies compressed by NNI, sped up and measured.

Example:
    >>> import torch
    >>> from pfgdf_plugin.models import build_model
    >>> from pfgdf_plugin.nni import PFGDFPruner
    >>> net = build_model("lenet5")
    >>> pruner = PFGDFPruner(net, [{"op_types": ["Conv2d"]}], target={"params": 1.1},
    ...                      example_inputs=torch.randn(2, 3, 32, 32))
    >>> pruner.target_report["reached"] >= 1.1
    True
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import torch.nn as nn

from ..errors import TargetError
from ..meter import meet_target
from .speedup import speedup


def search_masks_on_copies(model: nn.Module, example_inputs: Any, target: Any, timing: Any,
                           compress: Callable[[nn.Module, float], Tuple[Any, List[Dict]]], lo: float, hi: float, *,
                           integer: bool = False, knob_name: str = "knob") -> Dict[str, Any]:
    """The search report of the least knob whose NNI-masked, sped-up copy meets ``target``.

    ``compress(copy, knob) -> (masks, config_list)`` prunes a copy with NNI and unwraps it; the copy
    is then sped up (:func:`pfgdf_plugin.nni.speedup`) and measured. ``model`` is only copied.
    """
    def prune_copy(candidate: nn.Module, knob: float) -> nn.Module:
        masks, config = compress(candidate, knob)
        return speedup(candidate, masks, example_inputs, config_list=config)

    return meet_target(model, example_inputs, target, prune_copy, lo, hi, integer=integer, knob_name=knob_name,
                       timing=timing).report()


def search_on_copies(owner: str, model: nn.Module, config_list: List[Dict], example_inputs: Any, target: Any,
                     timing: Any, make: Callable[[nn.Module, List[Dict], float], Any], lo: float, hi: float, *,
                     integer: bool = False, knob_name: str = "knob") -> Dict[str, Any]:
    """The search report of the least knob whose copy, pruned by the NNI pruner ``make`` builds, meets ``target``.

    ``make(copy, config_list, knob)`` builds an NNI pruner on the copy; it is compressed, unwrapped,
    sped up and measured (:func:`search_masks_on_copies`).

    Raises:
        TargetError: no ``example_inputs``, or a malformed or unreachable target.
    """
    if example_inputs is None:
        raise TargetError(f"{owner}: a target needs example_inputs (a batch to trace, speed up and measure)")

    def compress(candidate: nn.Module, knob: float) -> Tuple[Any, List[Dict]]:
        pruner = make(candidate, [dict(e) for e in config_list], knob)
        _, masks = pruner.compress()
        pruner.unwrap_model()
        return masks, config_list

    return search_masks_on_copies(model, example_inputs, target, timing, compress, lo, hi, integer=integer,
                                  knob_name=knob_name)
