"""Budgets: how much faster or smaller a pruned model must be, and the one search that meets a budget.

A target is one ratio, dense / pruned, of one quantity: ``{"latency": 2.0}`` (measured inference
time), ``{"macs": 3.0}`` or ``{"params": 4.0}``. Every pruner that takes ``target=`` turns its own
monotone knob into a structure (PFGDF's band width k, SPP's or a built-in's pruning ratio, MPD's
block count) and lets :func:`search` find the least pruning whose measured ratio meets the target.
The measurement is passed in as a callable, so this module knows no framework and no clock.

Example:
    >>> t = Target.parse({"macs": 3})
    >>> res = search(lambda knob: 1 + 4 * knob, t, lo=0.0, hi=1.0)   # ratio 1 + 4 * knob
    >>> round(res.knob, 2), res.reached >= 3.0
    (0.5, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, Optional

from ..errors import TargetError

KINDS = ("latency", "macs", "params")
USAGE = "{'latency': r}, {'macs': r} or {'params': r} with r >= 1 (dense / pruned)"


@dataclass(frozen=True)
class Target:
    """One budget: ``kind`` in ``latency`` | ``macs`` | ``params``, ``value`` = dense / pruned >= 1."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TargetError(f"target: unknown kind {self.kind!r}; give one of {USAGE}")
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 1:
            raise TargetError(f"target: {self.kind} must be a finite ratio >= 1 (dense / pruned), got {v!r}")
        object.__setattr__(self, "value", float(v))

    @classmethod
    def parse(cls, spec: Any) -> "Target":
        """A :class:`Target` from a ``Target`` or a one-key dict such as ``{"latency": 2.0}``.

        Example:
            >>> Target.parse({"latency": 2})
            Target(kind='latency', value=2.0)
            >>> Target.parse({"latency": 2, "macs": 3})  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            pfgdf_plugin.errors.TargetError: target: give one target at a time, got latency and macs; ...
        """
        if isinstance(spec, Target):
            return spec
        if not isinstance(spec, Mapping):
            raise TargetError(f"target must be a dict such as {USAGE}; got {spec!r}")
        if len(spec) != 1:
            keys = " and ".join(str(k) for k in spec) or "none"
            raise TargetError(f"target: give one target at a time, got {keys}; use one of {USAGE}")
        ((kind, value),) = spec.items()
        return cls(str(kind), value)

    def describe(self) -> str:
        return f"{self.kind} {self.value:g}x"


@dataclass
class Trial:
    """One measured point of a search: the knob and the ratio (dense / pruned) it reached."""

    knob: float
    reached: float


@dataclass
class SearchResult:
    """The least pruning that met the target: its ``knob``, the ratio it ``reached``, and every trial."""

    knob: float
    reached: float
    target: Target
    trials: List[Trial] = field(default_factory=list)

    def report(self) -> dict:
        return {"target": {self.target.kind: self.target.value}, "reached": self.reached, "knob": self.knob,
                "trials": [[t.knob, t.reached] for t in self.trials]}


def search(measure: Callable[[float], float], target: Target, lo: float, hi: float, integer: bool = False,
           steps: int = 12, knob_name: str = "knob") -> SearchResult:
    """The smallest knob in ``[lo, hi]`` whose measured ratio meets ``target`` (bisection).

    ``measure(knob)`` builds and measures a *copy* pruned with that knob and returns dense / pruned; the
    ratio is assumed to grow with the knob. ``integer=True`` searches whole numbers (block counts).

    Raises:
        TargetError: even ``hi`` falls short; the message names the target and the best ratio reached.

    Example:
        >>> search(lambda c: float(c), Target("params", 4.0), lo=1, hi=16, integer=True).knob
        4
        >>> search(lambda c: float(c), Target("params", 40.0), lo=1, hi=16, integer=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pfgdf_plugin.errors.TargetError: target params 40x cannot be reached: the most pruning tried (knob = 16) ...
    """
    if not hi > lo:
        raise TargetError(f"search range is empty: lo={lo!r}, hi={hi!r}")
    trials: List[Trial] = []

    def run(knob: float) -> float:
        reached = float(measure(knob))
        trials.append(Trial(knob, reached))
        return reached

    best_hi = run(hi)
    if not best_hi >= target.value:
        raise TargetError(f"target {target.describe()} cannot be reached: the most pruning tried "
                          f"({knob_name} = {hi:g}) gives {best_hi:.2f}x; ask for less, or allow more pruning",
                          best=best_hi)
    best: Optional[Trial] = trials[-1]
    if run(lo) >= target.value:
        return SearchResult(lo, trials[-1].reached, target, trials)
    for _ in range(steps):
        if integer and hi - lo <= 1:
            break
        mid = (lo + hi) // 2 if integer else (lo + hi) / 2
        if run(mid) >= target.value:
            hi, best = mid, trials[-1]
        else:
            lo = mid
    return SearchResult(best.knob, best.reached, target, trials)
