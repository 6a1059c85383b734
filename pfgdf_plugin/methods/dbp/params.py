"""DBP's parameter set: the one source of defaults for the pruners of both frameworks and the recipes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, List, Optional

from ...errors import DBPError
from ..params import Params

__all__ = ["DBPParams", "REFERENCES", "WIDTH_IMPORTANCES"]

REFERENCES = ("previous", "input")
WIDTH_IMPORTANCES = ("l1", "lamp", "discrimination", "none")


@dataclass(frozen=True)
class DBPParams(Params):
    """DBP's knobs, with the one set of defaults the pruners and the recipes share.

    The budget (``blocks``, ``macs``, ``params`` or ``latency``) is given beside these as a
    :class:`~pfgdf_plugin.methods.dbp.Target`.

    Attributes:
        num_batches: training batches whose features train the linear probes (>= 1).
        holdout: share of those samples the probes are scored on (0 < holdout < 1).
        reference: what a block's gain is measured against, ``previous`` candidate | its ``input``.
        seed: seed of the train/hold-out split.
        candidates: block names (or lists of member names) to choose from; ``None``: every
            removable block found.
        depth_share: the share of a ratio target's log-ratio that removing blocks should deliver,
            in [0, 1]: blocks are removed until ``ratio ** depth_share`` is reached, and width
            pruning delivers the rest. 1 (default): depth alone, as far as it can go; width only
            when removing every candidate is not enough. ``blocks`` targets ignore it.
        width_importance: how the width step ranks channels: ``l1`` (filter L1 magnitude,
            default; one ratio for every layer), ``lamp`` (LAMP scores ranked globally, so the
            layers keep different shares), ``discrimination`` (DBP's per-channel Fisher ratio on the probe data) or
            ``none`` (depth only: a target that blocks alone cannot reach is an error).

    Example:
        >>> DBPParams().num_batches
        8
        >>> DBPParams(holdout=1.5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pfgdf_plugin.errors.DBPError: holdout must be in (0, 1), got 1.5
    """

    error: ClassVar[type] = DBPError
    num_batches: int = 8
    holdout: float = 0.25
    reference: str = "previous"
    seed: int = 0
    candidates: Optional[List[Any]] = None
    depth_share: float = 1.0
    width_importance: str = "l1"

    def problems(self) -> List[str]:
        found = []
        if isinstance(self.num_batches, bool) or not isinstance(self.num_batches, int) or self.num_batches < 1:
            found.append(f"num_batches must be >= 1, got {self.num_batches!r}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) \
                or not 0 < self.holdout < 1:
            found.append(f"holdout must be in (0, 1), got {self.holdout!r}")
        if self.reference not in REFERENCES:
            found.append(f"reference must be one of {', '.join(REFERENCES)}; got {self.reference!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            found.append(f"seed must be an integer, got {self.seed!r}")
        if self.candidates is not None and (isinstance(self.candidates, (str, bytes))
                                            or not isinstance(self.candidates, (list, tuple))):
            found.append(f"candidates must be a list of block names (or lists of member names), "
                         f"got {self.candidates!r}")
        if isinstance(self.depth_share, bool) or not isinstance(self.depth_share, (int, float)) \
                or not 0 <= self.depth_share <= 1:
            found.append(f"depth_share must be in [0, 1], got {self.depth_share!r}")
        if self.width_importance not in WIDTH_IMPORTANCES:
            found.append(f"width_importance must be one of {', '.join(WIDTH_IMPORTANCES)}; "
                         f"got {self.width_importance!r}")
        return found
