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

from typing import Any, Callable, Dict, List

import torch.nn as nn

from ..errors import TargetError
from ..meter import meet_target
from .speedup import speedup


def search_on_copies(owner: str, model: nn.Module, config_list: List[Dict], example_inputs: Any, target: Any,
                     timing: Any, make: Callable[[nn.Module, List[Dict], float], Any], lo: float, hi: float, *,
                     integer: bool = False, knob_name: str = "knob") -> Dict[str, Any]:
    """The search report of the least knob whose NNI-pruned, sped-up copy meets ``target``.

    ``make(copy, config_list, knob)`` builds an NNI pruner on the copy; it is compressed, unwrapped
    and sped up (:func:`pfgdf_plugin.nni.speedup`) before it is measured. ``model`` is only copied.

    Raises:
        TargetError: no ``example_inputs``, or a malformed or unreachable target.
    """
    if example_inputs is None:
        raise TargetError(f"{owner}: a target needs example_inputs (a batch to trace, speed up and measure)")

    def prune_copy(candidate: nn.Module, knob: float) -> nn.Module:
        pruner = make(candidate, [dict(e) for e in config_list], knob)
        _, masks = pruner.compress()
        pruner.unwrap_model()
        return speedup(candidate, masks, example_inputs, config_list=config_list)

    return meet_target(model, example_inputs, target, prune_copy, lo, hi, integer=integer, knob_name=knob_name,
                       timing=timing).report()
