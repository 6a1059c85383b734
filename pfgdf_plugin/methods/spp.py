"""SPP: structured probabilistic pruning: one layer's probabilities (:class:`SPPState`) and the
per-iteration schedule over all layers (:class:`SPPSchedule`), framework-free (tensors in and out).
The adapters (:mod:`pfgdf_plugin.torch_pruning.spp`, :mod:`pfgdf_plugin.nni.spp`) supply the norms
and apply the masks.

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
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Union

import torch

from ..errors import SPPError
from .channels import expand, group_mean
from .params import Params, is_int, one_of

ROUNDINGS = ("ceil", "floor", "round")
_EPS = 1e-9


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def param_problems(ratio: Any = 0.5, interval: Any = 10, A: Any = 0.05, u: Any = 0.25) -> List[str]:
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


def check_params(ratio: float = 0.5, interval: int = 10, A: float = 0.05, u: float = 0.25) -> None:
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


def checked_params(ratio: Any = None, more: Sequence[str] = (), **knobs: Any) -> SPPParams:
    """:class:`SPPParams` of ``knobs`` (missing ones take its defaults), checked with a budget ``ratio``
    in (0, 1) (unless ``None``) and the caller's own problems ``more``: one :class:`SPPError` lists them all.

    Example:
        >>> checked_params(1.5, interval=0)
        Traceback (most recent call last):
        ...
        pfgdf_plugin.errors.SPPError: ratio must be in (0, 1), got 1.5; interval must be an integer >= 1, got 0
    """
    found = [] if ratio is None else [p for p in param_problems(ratio=ratio) if p.startswith("ratio ")]
    params = None
    try:
        params = SPPParams(**knobs)
    except SPPError as err:
        found += list(getattr(err, "problems", [str(err)]))
    found += list(more)
    if found:
        err = SPPError("; ".join(found))
        err.problems = found
        raise err
    return params


Norms = Union[Mapping[str, torch.Tensor], Callable[[List[str]], Mapping[str, torch.Tensor]]]


@dataclass
class SPPStep:
    """What one :meth:`SPPSchedule.step` did: ``updated`` the probabilities; per group that ``finished``
    at this step, each position's keep probability ``1 - p`` just before (0 for removed ones: the
    factors the official code scales its survivors by); ``stopped`` the schedule."""

    updated: bool = False
    finished: Dict[str, torch.Tensor] = field(default_factory=dict)
    stopped: bool = False


class SPPSchedule:
    """SPP's per-iteration schedule over named groups: when to rank, what to draw, when to stop.

    Each group (an SPP "layer") has one :class:`SPPState`; a group whose channels come in
    ``copies`` interleaved copies is ranked on the mean norm over the copies and pruned at the
    same positions in every copy. :meth:`step`, once per training iteration, ranks the open groups
    and updates their probabilities every ``params.interval`` calls while a group is unfinished
    (checking every norm before any state changes); then, with a budget ``max_steps``, it stops
    once every group is finished (:attr:`finished`, the stop rule) or the budget is spent;
    otherwise every group draws its next keep-mask from :attr:`generator`, in the order added.

    Args:
        params: SPP's knobs; default :class:`SPPParams` (``interval=10``, ``A=0.05``, ``u=0.25``,
            ``seed=0``, ``rounding="ceil"``).
        max_steps: stop after this many steps; ``None``: only :meth:`stop` stops.

    Attributes:
        generator: the CPU generator of every keep-mask, seeded with ``params.seed``.
        steps: :meth:`step` calls so far; stopped: ``True`` once :meth:`stop` ran.

    Example:
        >>> s = SPPSchedule(SPPParams(interval=2, A=1.0))
        >>> _ = s.add("conv", channels=4, ratio=0.5)
        >>> norms = {"conv": torch.tensor([1.0, 4.0, 2.0, 3.0])}
        >>> [s.step(norms).updated for _ in range(4)]
        [False, True, False, True]
        >>> s.finished, s.summary()["conv"], s.removal_plan()["conv"].tolist()
        (True, {'channels': 4, 'target': 2, 'removed': 2, 'finished_at': 2}, [0, 2])
    """

    def __init__(self, params: Optional[SPPParams] = None, max_steps: Optional[int] = None) -> None:
        self.params = params if params is not None else SPPParams()
        if max_steps is not None and (not is_int(max_steps) or max_steps < 1):
            raise SPPError(f"max_steps must be an integer >= 1 or None, got {max_steps!r}")
        self.max_steps = max_steps
        self.generator = torch.Generator().manual_seed(int(self.params.seed))
        self.steps, self.stopped = 0, False
        self._states: Dict[str, SPPState] = {}
        self._copies: Dict[str, int] = {}

    def add(self, name: str, channels: int, ratio: float, copies: int = 1, target: Optional[int] = None) -> SPPState:
        """Track group ``name`` of ``channels`` channels (all ``copies`` together) with target ratio
        ``ratio`` in [0, 1), or ``target`` positions to remove; returns its :class:`SPPState`."""
        if name in self._states:
            raise SPPError(f"group {name!r} is already tracked; give every group its own name")
        if not is_int(copies) or copies < 1 or not is_int(channels) or channels < 1 or channels % copies:
            raise SPPError(f"group {name!r}: {channels!r} channels do not split into {copies!r} equal copies")
        try:
            state = SPPState(channels // copies, ratio=ratio, A=self.params.A, u=self.params.u,
                             rounding=self.params.rounding, target=target)
        except ValueError as err:
            raise SPPError(f"group {name!r}: {err}") from None
        self._states[name], self._copies[name] = state, copies
        return state

    @property
    def names(self) -> List[str]:
        """The groups, in the order they were added (the order of every draw)."""
        return list(self._states)

    @property
    def finished(self) -> bool:
        """The stop rule: every group has its target count of positions at ``p = 1``."""
        return all(s.finished for s in self._states.values())

    @property
    def n_finished(self) -> int:
        return sum(s.finished for s in self._states.values())

    def step(self, norms: Norms) -> SPPStep:
        """One training iteration: count it, rank and update when due, then stop or draw.

        Args:
            norms: L1 norms per channel (all copies) or per position of each group: a mapping
                ``name -> tensor``, or a callable given the names to rank returning one (called
                only when an update is due).

        Raises:
            SPPError: a group's norms are missing, of the wrong length or NaN/Inf (naming the
                group); no probability has changed then.
        """
        if self.stopped:
            return SPPStep()
        self.steps += 1
        due = self.steps % self.params.interval == 0 and not self.finished
        result = self._update(norms) if due else SPPStep()
        if self.max_steps is not None and (self.finished or self.steps >= self.max_steps):
            self.stop()
            result.stopped = True
        else:
            for s in self._states.values():
                s.sample_keep_mask(self.generator)
        return result

    def _checked_norms(self, name: str, given: Mapping[str, torch.Tensor]) -> torch.Tensor:
        state, copies = self._states[name], self._copies[name]
        if name not in given:
            raise SPPError(f"group {name!r}: no norms given; give a norm vector for every group still open")
        vec = torch.as_tensor(given[name]).detach().reshape(-1).to("cpu", torch.float64)
        if copies > 1 and vec.numel() == state.n_groups * copies:
            vec = group_mean(vec, copies)
        if vec.numel() != state.n_groups:
            raise SPPError(f"group {name!r}: expected {state.n_groups * copies} norms (or {state.n_groups}, "
                           f"one per position), got {vec.numel()}")
        if not torch.isfinite(vec[~state.removed]).all():
            raise SPPError(f"group {name!r}: norms hold NaN/Inf values; SPP cannot rank its channels "
                           "(check the training run: the weights diverged)")
        return vec

    def _update(self, norms: Norms) -> SPPStep:
        names = [n for n, s in self._states.items() if not s.closed]
        with torch.no_grad():
            given = norms(list(names)) if callable(norms) else norms
            checked = {name: self._checked_norms(name, given) for name in names}
        result = SPPStep(updated=True)
        for name in names:
            change = self._states[name].update(checked[name])
            if change.finished:
                result.finished[name] = change.survivor_keep
        return result

    def stop(self) -> None:
        """End the probabilistic phase: every open group keeps its survivors for good (``p = 0``,
        unscaled) and its keep-mask becomes exactly them; :meth:`step` does nothing afterwards."""
        for s in self._states.values():
            if not s.closed:
                s.finish()
            s.sample_keep_mask()
        self.stopped = True

    def masks(self, alive_only: bool = False, channels: bool = False) -> Dict[str, torch.Tensor]:
        """Per group, the last keep-mask (or, ``alive_only``, the positions not removed), bool per
        position or, with ``channels``, per channel of every copy."""
        out = {}
        for name, s in self._states.items():
            vec = ~s.removed if alive_only else s.keep.clone()
            out[name] = vec.repeat(self._copies[name]) if channels else vec
        return out

    def removal_plan(self) -> Dict[str, torch.Tensor]:
        """The finishing step: per group with removed positions, its channels to remove (every copy, sorted)."""
        out = {}
        for name, s in self._states.items():
            dead = s.removed.nonzero().flatten()
            if dead.numel():
                out[name] = expand(dead, self._copies[name], s.n_groups).sort().values
        return out

    def probabilities(self) -> Dict[str, torch.Tensor]:
        """``{group: pruning probability per position}`` (float64 copies)."""
        return {name: s.probabilities.clone() for name, s in self._states.items()}

    def summary(self, unit: str = "channels") -> Dict[str, dict]:
        """Per group: ``unit`` (its channels), ``target``, ``removed`` (channels, every copy), ``finished_at``."""
        return {name: {unit: s.n_groups * c, "target": s.target * c, "removed": s.n_removed * c,
                       "finished_at": s.finished_at}
                for (name, s), c in zip(self._states.items(), self._copies.values())}

    def state_dict(self) -> Dict[str, Any]:
        """The step counter, the stopped flag, the generator state, the knobs and every group's state."""
        return {"steps": self.steps, "stopped": self.stopped, "generator": self.generator.get_state(),
                "config": {**self.params.to_dict(), "max_steps": self.max_steps},
                "groups": {name: s.state_dict() for name, s in self._states.items()}}

    def load_state_dict(self, state: Mapping[str, Any], owner: str = "SPPSchedule") -> None:
        """Restore :meth:`state_dict`'s output (every group checked first; ``owner`` names the caller
        in errors): the next steps draw and update as the saved run would have.

        Raises:
            SPPError: the saved groups differ (names listed), or a group's size does.
        """
        saved = state["groups"]
        if set(saved) != set(self._states):
            missing, extra = sorted(set(self._states) - set(saved)), sorted(set(saved) - set(self._states))
            raise SPPError(f"{owner} state does not match this pruner's groups (missing: {missing}, "
                           f"unexpected: {extra})")
        for name, s in self._states.items():
            if int(saved[name]["n_groups"]) != s.n_groups:
                raise SPPError(f"{owner} state, group {name!r}: it holds {saved[name]['n_groups']} positions, "
                               f"this group has {s.n_groups}")
        for name, s in self._states.items():
            s.load_state_dict(saved[name])
        self.steps, self.stopped = int(state["steps"]), bool(state.get("stopped", False))
        self.generator.set_state(state["generator"])
