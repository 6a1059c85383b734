"""SPP: structured probabilistic pruning, one layer's pruning probabilities at a time.

Framework-free: every function here takes and returns tensors. The Torch-Pruning adapter
(:mod:`pfgdf_plugin.torch_pruning.spp`) turns dependency groups into norm vectors, applies the
masks to a network and removes the pruned channels.

Paper: Wang et al., "Structured Probabilistic Pruning for Convolutional Neural Network
Acceleration", BMVC 2018, arXiv 1709.06994. The rule below is the paper's and its official
Caffe code's:

* every group ``g`` of a layer has a pruning probability ``p_g``, starting at 0;
* every ``interval`` training iterations the groups not yet removed are ranked by L1 norm,
  ascending (rank ``r = 0`` is the weakest), and ``p_g <- clip(p_g + delta(r), 0, 1)`` with
  ``delta(r) = A * exp(-alpha * r)`` for ``r <= N_c`` and
  ``delta(r) = 2 * u * A - A * exp(-alpha * (2 * N_c - r))`` for ``r > N_c``, where
  ``alpha = ln(2 / u) / N_left``, ``N_c = -ln(u) / alpha`` and ``N_left`` is the number of
  groups still to be removed (the target count minus the groups already at ``p = 1``,
  recomputed at every update as the official code does). Defaults ``A = 0.05``, ``u = 0.25``,
  natural logarithms. ``delta`` is positive below rank ``N_left``, zero at ``N_left`` and
  negative above it, and point-symmetric about ``(N_c, u * A)``;
* every training iteration a keep-mask is drawn, keeping group ``g`` with probability
  ``1 - p_g``; a group whose ``p`` reaches 1 is removed for good;
* the target count is ``ceil(R * N_g)`` (the official code's "a little bit higher goal";
  ``rounding="floor"`` / ``"round"`` are options); once it is reached the layer stops, its
  surviving groups are kept for good (``p = 0``) and, in the official code, their weights are
  scaled by the keep probability they had (:meth:`SPPState.finish` returns it).

This project's reading: the official code's group is an im2col column of one convolution; here
a group is whatever the caller ranks, and the Torch-Pruning adapter uses the channel groups of
the dependency graph (channels coupled by residual additions or concatenations share one
probability). A layer whose target count is 0 (``R * N_g`` rounds to 0, or a single-channel
layer, since at least ``min_keep`` groups always stay) is finished from the start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Union

import torch

from ..errors import SPPError
from .params import Params, is_int, one_of

ROUNDINGS = ("ceil", "floor", "round")
_EPS = 1e-9


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def param_problems(ratio: Any = 0.5, interval: Any = 1, A: Any = 0.05, u: Any = 0.25) -> List[str]:
    """Every problem with SPP's parameters, each naming the parameter and the value."""
    found = []
    if not _is_number(ratio) or not math.isfinite(ratio) or not 0.0 < ratio < 1.0:
        found.append(f"ratio must be in (0, 1), got {ratio!r}")
    if not is_int(interval) or interval < 1:
        found.append(f"interval must be an integer >= 1, got {interval!r}")
    if not _is_number(A) or not math.isfinite(A) or A <= 0:
        found.append(f"A must be > 0, got {A!r}")
    if not _is_number(u) or not math.isfinite(u) or not 0.0 < u < 1.0:
        found.append(f"u must be in (0, 1), got {u!r}")
    return found


def check_params(ratio: float = 0.5, interval: int = 1, A: float = 0.05, u: float = 0.25) -> None:
    """Validate SPP's parameters; raise ``ValueError`` naming the first bad one.

    Example:
        >>> check_params(0.5, 1, 0.05, 0.25)
        >>> check_params(ratio=1.5)
        Traceback (most recent call last):
        ...
        ValueError: ratio must be in (0, 1), got 1.5
    """
    found = param_problems(ratio, interval, A, u)
    if found:
        raise ValueError(found[0])


@dataclass(frozen=True)
class SPPParams(Params):
    """SPP's knobs, with the one set of defaults the pruners and the recipes share.

    The pruning ratio is not here: it is the budget, given beside these (``pruning_ratio`` /
    ``prune.ratio`` or a target).

    Attributes:
        interval: optimiser steps between two probability updates (the paper's t is 180, the
            official code's default 1; 10 suits the short schedules of the recipes).
        A: the largest probability step per update (> 0).
        u: the share of A at the centre of the rank curve (0 < u < 1).
        seed: seed of the keep-mask generator.
        rounding: how ``R * N_g`` becomes a count, ``ceil`` (official code) | ``floor`` | ``round``.
        rescale_survivors: scale the kept groups as the official code does when pruning finishes.
    """

    error: ClassVar[type] = SPPError
    interval: int = 10
    A: float = 0.05
    u: float = 0.25
    seed: int = 0
    rounding: str = "ceil"
    rescale_survivors: bool = True

    def problems(self) -> List[str]:
        found = param_problems(0.5, self.interval, self.A, self.u)
        if not is_int(self.seed):
            found.append(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.rescale_survivors, bool):
            found.append(f"rescale_survivors must be true or false, got {self.rescale_survivors!r}")
        return found + one_of("rounding", self.rounding, ROUNDINGS)


def _check_layer_ratio(ratio: float) -> None:
    if not _is_number(ratio) or not math.isfinite(ratio) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"a layer's ratio must be in [0, 1), got {ratio!r}")


def target_count(n_groups: int, ratio: float, rounding: str = "ceil", min_keep: int = 1) -> int:
    """How many of ``n_groups`` groups SPP removes: ``R * N_g`` rounded, leaving ``min_keep``.

    Example:
        >>> target_count(10, 0.3), target_count(5, 0.5), target_count(5, 0.5, "floor")
        (3, 3, 2)
        >>> target_count(1, 0.5)   # a single group always stays
        0
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}; got {rounding!r}")
    _check_layer_ratio(ratio)
    x = ratio * n_groups
    if rounding == "ceil":
        t = math.ceil(x - _EPS)  # 0.3 * 10 is 3.0000000000000004
    elif rounding == "floor":
        t = math.floor(x + _EPS)
    else:
        t = int(math.floor(x + 0.5))
    return max(0, min(int(t), n_groups - max(0, int(min_keep))))


def alpha_nc(n_left: int, u: float = 0.25) -> tuple:
    """``(alpha, N_c)`` of the schedule: ``alpha = ln(2/u) / N_left``, ``N_c = -ln(u) / alpha``."""
    if not n_left > 0:
        raise ValueError(f"n_left must be > 0, got {n_left!r} (a layer with nothing left to "
                         "remove is finished and is not updated)")
    alpha = math.log(2.0 / u) / float(n_left)
    return alpha, -math.log(u) / alpha


def delta(r: Union[torch.Tensor, int, float], n_left: int, A: float = 0.05, u: float = 0.25) -> torch.Tensor:
    """SPP's probability increment for rank ``r`` (0 = weakest) when ``n_left`` groups remain to go.

    ``A * exp(-alpha r)`` for ``r <= N_c``, ``2uA - A * exp(-alpha (2 N_c - r))`` above; both
    branches give ``uA`` at ``N_c``, and the increment crosses zero at ``r = N_left``.

    Args:
        r: rank or tensor of ranks (any shape).
        n_left: groups still to be removed (> 0).
        A: the increment of the weakest group (> 0).
        u: ``delta(N_c) = u * A`` (in (0, 1)).

    Returns:
        float64 tensor shaped like ``r``.

    Example:
        >>> delta(torch.arange(4), n_left=2, A=1.0, u=0.25).round(decimals=4)
        tensor([ 1.0000,  0.3536,  0.0000, -0.9142], dtype=torch.float64)
    """
    alpha, n_c = alpha_nc(n_left, u)
    r = torch.as_tensor(r, dtype=torch.float64)
    low = A * torch.exp(-alpha * r)
    high = 2.0 * u * A - A * torch.exp(-alpha * (2.0 * n_c - r))
    return torch.where(r <= n_c, low, high)


@dataclass
class SPPUpdate:
    """What one :meth:`SPPState.update` changed.

    Attributes:
        removed: indices of the groups that reached ``p = 1`` in this update.
        finished: ``True`` when this update reached the layer's target.
        survivor_keep: when ``finished``, each group's keep probability ``1 - p`` just before
            the survivors were set to ``p = 0`` (0 for removed groups); else ``None``.
    """

    removed: torch.Tensor
    finished: bool = False
    survivor_keep: Optional[torch.Tensor] = None


class SPPState:
    """Pruning probabilities of one layer's groups, updated by SPP's rank rule.

    Args:
        n_groups: number of groups in the layer (channels of a dependency group, in the
            Torch-Pruning adapter).
        ratio: the layer's target ratio ``R`` in ``[0, 1)``.
        A, u: the schedule's parameters (see :func:`delta`).
        rounding: how ``R * N_g`` becomes a count: ``"ceil"`` (official code), ``"floor"``,
            ``"round"``.
        target: the count to remove, overriding ``ratio`` and ``rounding`` (callers with
            their own rounding rules, such as Torch-Pruning's ``round_to``).
        min_keep: groups that always stay (at least 1 keeps the layer connected).
        seed: when given, the state owns a ``torch.Generator`` seeded with it, used by
            :meth:`sample_keep_mask` and saved by :meth:`state_dict`.

    Attributes:
        probabilities: float64 ``p`` per group.
        removed: bool per group, ``True`` once ``p`` reached 1.
        keep: the last keep-mask drawn (all ``True`` before the first draw).
        target: groups to remove.
        updates: probability updates applied so far.
        finished_at: the update that reached the target (0 when the target is 0), else ``None``.
        closed: ``True`` once :meth:`finish` ran: no further updates, no random drops.

    Example:
        >>> s = SPPState(4, ratio=0.5, A=0.5)
        >>> while not s.finished:
        ...     _ = s.update(torch.tensor([1.0, 4.0, 2.0, 3.0]))
        >>> s.removed.tolist(), s.probabilities.tolist()
        ([True, False, True, False], [1.0, 0.0, 1.0, 0.0])
    """

    def __init__(self, n_groups: int, ratio: float = 0.5, A: float = 0.05, u: float = 0.25,
                 rounding: str = "ceil", target: Optional[int] = None, min_keep: int = 1,
                 seed: Optional[int] = None) -> None:
        if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 1:
            raise ValueError(f"n_groups must be an integer >= 1, got {n_groups!r}")
        check_params(0.5, 1, A, u)
        self.n_groups = n_groups
        self.ratio = float(ratio)
        self.A, self.u = float(A), float(u)
        if target is None:
            self.target = target_count(n_groups, ratio, rounding, min_keep)
        else:
            _check_layer_ratio(ratio)
            if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < n_groups:
                raise ValueError(f"target must be an integer in [0, {n_groups - 1}], got {target!r}")
            self.target = target
        self.probabilities = torch.zeros(n_groups, dtype=torch.float64)
        self.removed = torch.zeros(n_groups, dtype=torch.bool)
        self.keep = torch.ones(n_groups, dtype=torch.bool)
        self.updates = 0
        self.finished_at: Optional[int] = 0 if self.target == 0 else None
        self.closed = self.target == 0
        self.generator: Optional[torch.Generator] = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(int(seed))

    # ------------------------------------------------------------------ queries
    @property
    def n_removed(self) -> int:
        return int(self.removed.sum())

    @property
    def n_left(self) -> int:
        """Groups still to be removed to reach the target (``N_left``)."""
        return max(0, self.target - self.n_removed)

    @property
    def finished(self) -> bool:
        """``True`` when the target count of groups is at ``p = 1``."""
        return self.n_removed >= self.target

    def __repr__(self) -> str:
        return (f"SPPState(n_groups={self.n_groups}, target={self.target}, removed={self.n_removed}, "
                f"updates={self.updates}, finished={self.finished})")

    # ------------------------------------------------------------------ the rule
    def update(self, norms: torch.Tensor) -> SPPUpdate:
        """One probability update from the groups' L1 norms.

        The groups not yet removed are ranked by ``norms`` ascending (ties by index), each gets
        ``delta(rank)``, probabilities are clipped to ``[0, 1]`` and groups at 1 are removed.
        ``delta(N_left)`` is 0 in exact arithmetic; its rounding noise is clipped so that only
        the ``N_left`` weakest groups can grow, and one update never overshoots the target.
        Reaching the target calls :meth:`finish`. A finished or closed state is left unchanged.

        Args:
            norms: ``[n_groups]`` L1 norms (entries of removed groups are ignored).
        """
        empty = torch.zeros(0, dtype=torch.long)
        if self.closed or self.finished:
            return SPPUpdate(empty)
        norms = torch.as_tensor(norms).detach().reshape(-1).to("cpu", torch.float64)
        if norms.numel() != self.n_groups:
            raise ValueError(f"expected {self.n_groups} norms, got {norms.numel()}")
        alive = (~self.removed).nonzero().flatten()
        if not torch.isfinite(norms[alive]).all():
            raise ValueError("norms hold NaN/Inf values; SPP cannot rank the groups (check the "
                             "training run: the weights diverged)")
        n_left = self.n_left
        order = alive[torch.argsort(norms[alive], stable=True)]
        ranks = torch.arange(order.numel(), dtype=torch.float64)
        d = delta(ranks, n_left, self.A, self.u)
        d = torch.where(ranks >= n_left, d.clamp(max=0.0), d)
        p = (self.probabilities[order] + d).clamp(0.0, 1.0)
        self.probabilities[order] = p
        newly = order[p >= 1.0]
        self.probabilities[newly] = 1.0
        self.removed[newly] = True
        self.updates += 1
        result = SPPUpdate(newly.sort().values)
        if self.finished:
            self.finished_at = self.updates
            result.finished = True
            result.survivor_keep = self.finish()
        return result

    def finish(self) -> torch.Tensor:
        """End the probabilistic phase: survivors get ``p = 0`` (kept for good).

        Called by :meth:`update` when the target is reached, or by hand to stop early.

        Returns:
            float64 keep probability ``1 - p`` of every group just before (0 for removed
            groups): the official code scales each surviving group's weights by it.
        """
        keep_prob = torch.where(self.removed, torch.zeros_like(self.probabilities), 1.0 - self.probabilities)
        self.probabilities[~self.removed] = 0.0
        self.keep = ~self.removed
        self.closed = True
        return keep_prob

    def sample_keep_mask(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw the next keep-mask: group ``g`` kept with probability ``1 - p_g``.

        Removed groups are never kept. A closed state draws nothing and keeps every survivor.
        The mask is also stored as :attr:`keep`.

        Args:
            generator: a CPU ``torch.Generator``; default the state's own (``seed=``), else
                torch's global one.

        Returns:
            bool ``[n_groups]``.
        """
        if self.closed:
            self.keep = ~self.removed
            return self.keep.clone()
        gen = generator if generator is not None else self.generator
        draw = torch.rand(self.n_groups, dtype=torch.float64, generator=gen)
        self.keep = (draw >= self.probabilities) & ~self.removed
        return self.keep.clone()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Probabilities, flags, counters, the last mask and (if owned) the generator state."""
        out: Dict[str, Any] = {
            "n_groups": self.n_groups, "target": self.target, "ratio": self.ratio, "A": self.A, "u": self.u,
            "probabilities": self.probabilities.clone(), "removed": self.removed.clone(),
            "keep": self.keep.clone(), "updates": self.updates, "finished_at": self.finished_at,
            "closed": self.closed,
        }
        if self.generator is not None:
            out["generator"] = self.generator.get_state()
        return out

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the group count must match."""
        if int(state["n_groups"]) != self.n_groups:
            raise ValueError(f"state holds {state['n_groups']} groups, this layer has {self.n_groups}")
        self.target = int(state["target"])
        self.ratio, self.A, self.u = float(state["ratio"]), float(state["A"]), float(state["u"])
        self.probabilities = state["probabilities"].detach().to("cpu", torch.float64).clone()
        self.removed = state["removed"].detach().to("cpu", torch.bool).clone()
        self.keep = state["keep"].detach().to("cpu", torch.bool).clone()
        self.updates = int(state["updates"])
        self.finished_at = None if state["finished_at"] is None else int(state["finished_at"])
        self.closed = bool(state["closed"])
        if "generator" in state:
            if self.generator is None:
                self.generator = torch.Generator()
            self.generator.set_state(state["generator"])


def load_states(states: Dict[str, "SPPState"], saved: Dict[str, Dict[str, Any]], owner: str = "SPPPruner") -> None:
    """Load ``saved`` (name -> :meth:`SPPState.state_dict`) into ``states``; names must match."""
    if set(saved) != set(states):
        missing, extra = sorted(set(states) - set(saved)), sorted(set(saved) - set(states))
        raise ValueError(f"{owner} state does not match this pruner's groups (missing: {missing}, "
                         f"unexpected: {extra})")
    for name, state in states.items():
        state.load_state_dict(saved[name])
