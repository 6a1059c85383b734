"""Depth then width: how a ratio target is split between removing blocks and pruning channels.

A ratio target ``r`` (dense / pruned MACs, parameters or latency) is met in two steps. Depth is
asked for ``r ** depth_share`` (:func:`depth_target`; ``depth_share = 1``, the default, asks depth
for all of it); blocks are removed, least useful first, until that part is reached, or all of
them when even that falls short. Width pruning then delivers what is left,
``r / depth_reached`` measured on the depth-pruned model (:func:`width_target`), because
``dense / final = (dense / depth-pruned) * (depth-pruned / final)``. Whether and how width is
pruned is the adapters' (``DBPPruner``); this module only says how much.

Example:
    >>> from pfgdf_plugin.methods.dbp import Target
    >>> depth_target(Target("macs", 4.0), 0.5)
    Target(kind='macs', value=2.0)
    >>> round(width_target(Target("macs", 4.0), depth_reached=2.5).value, 6)
    1.6
    >>> width_target(Target("macs", 4.0), depth_reached=4.2) is None
    True
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from .. import target as budget
from .plan import DBPResult, Target

__all__ = ["depth_target", "target_report", "width_target"]

_SLACK = 1e-9  # relative: floating-point room so that depth * width >= target holds after rounding


def depth_target(target: Target, depth_share: float = 1.0) -> Target:
    """The part of ``target`` removing blocks should deliver: ``value ** depth_share``.

    ``blocks`` targets, and ``depth_share = 1``, return ``target`` itself.

    Example:
        >>> depth_target(Target("latency", 9.0), 0.5).value
        3.0
        >>> depth_target(Target("blocks", 3), 0.5)
        Target(kind='blocks', value=3)
    """
    if target.kind == "blocks" or depth_share >= 1:
        return target
    return Target(target.kind, float(target.value ** depth_share))


def width_target(target: Target, depth_reached: Optional[float]) -> Optional[budget.Target]:
    """What width pruning must still deliver on the depth-pruned model, or ``None`` when depth met ``target``.

    Args:
        target: the whole ratio target (against the dense model).
        depth_reached: dense / depth-pruned, in the target's quantity.
    """
    if target.kind == "blocks" or depth_reached is None or depth_reached >= target.value:
        return None
    return budget.Target(target.kind, max(1.0, target.value / depth_reached * (1 + _SLACK)))


def target_report(result: DBPResult, reached: Any, width: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What DBP did against its target: ``{"target", "reached", "met", "depth", "width"}``.

    ``reached`` is measured against the dense model (a block count for ``blocks`` targets);
    ``depth`` says how many blocks went and what they reached; ``width`` is ``None`` without a
    width step, else what the adapter reports about it (its target, global ratio, importance).
    """
    t = result.target
    part = result.depth_target or t
    met = reached >= t.value if reached is not None else None
    return {"target": {t.kind: t.value}, "reached": reached, "met": met,
            "depth": {"target": {part.kind: part.value}, "blocks": len(result.removed),
                      "removed": list(result.removed), "met": result.plan.met,
                      "reached": len(result.removed) if t.kind == "blocks" else result.plan.ratio(t.kind)},
            "width": width}
