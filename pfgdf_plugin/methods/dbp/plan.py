"""DBP's decision: which blocks to remove to meet a :class:`Target`, and the whole method, :func:`prune_`.

The planner counts and measures nothing itself: the caller passes ``macs_fn`` (``model -> MACs``),
``params_fn`` (``model -> parameters``) and, for latency targets, ``latency_fn`` (``(dense, pruned) ->
(dense_ms, pruned_ms)``). The Torch-Pruning and NNI adapters pass the project's counters and timer.
:func:`decide` chooses without touching the model (the adapters then add width where depth falls
short, see :mod:`.split`); :func:`prune_` chooses and removes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ...errors import DBPError, DBPTargetError, TargetError
from .. import target as budget
from .blocks import Block, blocks_removed, call_model, find_blocks, modes, remove_blocks_, restore, shape_of
from .params import DBPParams
from .score import BlockScore, quota_selection, removal_order, score_blocks

__all__ = ["DBPResult", "Plan", "TARGET_KINDS", "Target", "decide", "latency_input_shape", "plan_removal", "prune_"]

TARGET_KINDS = ("blocks",) + budget.KINDS
_D = DBPParams()

MacsFn = Callable[[nn.Module], float]  # also the type of params_fn
LatencyFn = Callable[[nn.Module, nn.Module], Tuple[float, float]]


@dataclass(frozen=True)
class Target(budget.Target):
    """How much to remove: a :class:`pfgdf_plugin.methods.target.Target`, or DBP's own ``blocks`` kind.

    * ``blocks``: remove exactly this many blocks (an int >= 0).
    * ``macs`` / ``params``: dense / pruned MACs or parameters >= value (>= 1).
    * ``latency``: dense / pruned measured latency >= value (>= 1); blocks are removed one at a
      time and the caller's ``latency_fn`` times dense against pruned after each removal.

    The ratio kinds are validated by :class:`pfgdf_plugin.methods.target.Target` (a
    :class:`~pfgdf_plugin.errors.TargetError`, a ``ValueError``, for a bad one). Build one with
    :meth:`parse`, which also takes ``{"blocks": 3}``, ``{"macs": 1.5}``, ``{"params": 2}``,
    ``{"latency": 1.3}`` or a bare int (blocks).

    Example:
        >>> Target.parse({"macs": 2})
        Target(kind='macs', value=2.0)
        >>> Target.parse(3)
        Target(kind='blocks', value=3)
        >>> Target.parse({"flops": 2})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pfgdf_plugin.errors.TargetError: target: unknown kind 'flops'; give one of {'blocks': n} ...
    """

    def __post_init__(self) -> None:
        if self.kind == "blocks":
            v = self.value
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise TargetError(f"target: 'blocks' must be an int >= 0, got {v!r}")
            return
        if self.kind not in budget.KINDS:
            raise TargetError(f"target: unknown kind {self.kind!r}; give one of {_TARGET_USAGE}")
        super().__post_init__()

    @classmethod
    def parse(cls, spec: Any) -> "Target":
        """A :class:`Target` from a ``Target`` (DBP's or the shared one), an int (blocks) or a one-key dict."""
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, budget.Target):
            return cls(spec.kind, spec.value)
        if isinstance(spec, int) and not isinstance(spec, bool):
            return cls("blocks", spec)
        if isinstance(spec, Mapping) and len(spec) == 1:
            ((kind, value),) = spec.items()
            return cls(str(kind), value)
        if not isinstance(spec, Mapping):
            raise TargetError(f"target must be a dict such as {_TARGET_USAGE}, an int (blocks) or a Target; "
                              f"got {spec!r}")
        shared = budget.Target.parse(spec)  # names the problem (no key, two keys)
        return cls(shared.kind, shared.value)

    def shared(self) -> budget.Target:
        """The same ratio target as a :class:`pfgdf_plugin.methods.target.Target` (not for ``blocks``)."""
        return budget.Target(self.kind, self.value)

    def describe(self) -> str:
        """``"3 block(s)"`` or ``"macs ratio 1.5"``, for messages."""
        if self.kind == "blocks":
            return f"{self.value} block(s)"
        return f"{self.kind} ratio {self.value:g}"


_TARGET_USAGE = "{'blocks': n} (n >= 0 blocks), " + budget.USAGE


# --------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """Which blocks to remove, and what that achieves.

    Attributes:
        removed: block names in removal order.
        macs_ratio: dense / pruned MACs (per the ``macs_fn`` used; ``None`` without one).
        latency_ratio: measured dense / pruned latency (``None`` unless the target is latency).
        measurements: for latency targets, one dict per removal:
            ``{"removed": n, "dense_ms", "pruned_ms", "ratio"}``.
        params_ratio: dense / pruned parameters (per the ``params_fn`` used; ``None`` without one).
        met: the target was reached by removing blocks; ``False`` only when the planner was
            allowed to fall short (``short_ok``) and removing every candidate was not enough.
    """

    removed: List[str]
    macs_ratio: Optional[float]
    latency_ratio: Optional[float] = None
    measurements: List[Dict[str, float]] = field(default_factory=list)
    params_ratio: Optional[float] = None
    met: bool = True

    def ratio(self, kind: str) -> Optional[float]:
        """The ratio reached for ``kind`` (``macs``, ``params`` or ``latency``); ``None`` if not known."""
        return {"macs": self.macs_ratio, "params": self.params_ratio, "latency": self.latency_ratio}.get(kind)


def latency_input_shape(example_inputs: Any) -> Tuple[int, ...]:
    """``(C, H, W)`` of the one image batch a latency target is timed on (at batch 1).

    Example:
        >>> latency_input_shape(torch.randn(2, 3, 32, 32))
        (3, 32, 32)
        >>> latency_input_shape({"x": torch.randn(2, 3)})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pfgdf_plugin.errors.DBPError: a latency target needs example_inputs to be one image batch tensor ...
    """
    ex = example_inputs
    if isinstance(ex, (tuple, list)) and len(ex) == 1:
        ex = ex[0]
    if not isinstance(ex, torch.Tensor) or ex.dim() != 4:
        raise DBPError("a latency target needs example_inputs to be one image batch tensor [B, C, H, W], "
                       f"got {type(example_inputs).__name__}")
    return tuple(ex.shape[1:])


def _measure(latency_fn: LatencyFn, dense: nn.Module, pruned: nn.Module) -> Dict[str, float]:
    d, p = (float(t) for t in latency_fn(dense, pruned))
    return {"dense_ms": d, "pruned_ms": p, "ratio": d / p if p > 0 else float("inf")}


def _output_shape(model: nn.Module, example_inputs: Any) -> Any:
    saved = modes(model)
    model.eval()
    try:
        with torch.no_grad():
            out = call_model(model, example_inputs)
    finally:
        restore(saved)
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return tuple(shape_of(o) for o in out)
    return type(out).__name__


def _without(model: nn.Module, blocks: Iterable[Block]) -> nn.Module:
    """A copy of ``model`` with ``blocks`` removed."""
    work = copy.deepcopy(model)
    remove_blocks_(work, blocks)
    return work


_LABEL = {"macs": "MACs", "params": "params"}


def _plan_ratio(model: nn.Module, by_name: Mapping[str, Block], order: Sequence[str], target: Target,
                ratio_of: Callable[[nn.Module], float], short_ok: bool) -> Tuple[List[str], bool]:
    """The fewest blocks, in ``order``, whose removal reaches a MACs or params ratio (all, if none does).

    Counted on ``model`` itself with the blocks swapped out, and put back (no copy of the model).
    """
    with blocks_removed(model, [by_name[x] for x in order]):
        best = ratio_of(model)
    if best < target.value:
        if short_ok:
            return list(order), False
        raise DBPTargetError(f"target {target.describe()} cannot be met: removing all {len(order)} candidate "
                       f"block(s) reaches a {_LABEL[target.kind]} ratio of {best:.3f}", best=best)
    chosen: List[str] = []
    ratio = 1.0
    for name in order:
        if ratio >= target.value:
            break
        chosen.append(name)
        with blocks_removed(model, [by_name[x] for x in chosen]):
            ratio = ratio_of(model)
    return chosen, True


def _plan_latency(model: nn.Module, by_name: Mapping[str, Block], order: Sequence[str], target: Target,
                  latency_fn: LatencyFn, short_ok: bool) -> Tuple[List[str], float, List[Dict[str, float]], bool]:
    """Remove blocks in ``order`` from a copy, timing dense against it after each, until the ratio is reached."""
    removed: List[str] = []
    measurements: List[Dict[str, float]] = []
    ratio = 1.0
    if target.value <= 1.0:
        return removed, ratio, measurements, True
    best = _measure(latency_fn, model, _without(model, [by_name[x] for x in order]))
    if best["ratio"] < target.value:
        if short_ok:
            return list(order), best["ratio"], [{"removed": len(order), **best}], False
        raise DBPTargetError(f"target {target.describe()} cannot be met: removing all {len(order)} candidate "
                       f"block(s) measured a latency ratio of {best['ratio']:.3f} "
                       f"({best['dense_ms']:.3f} ms -> {best['pruned_ms']:.3f} ms at batch 1)", best=best["ratio"])
    work = copy.deepcopy(model)
    for name in order:
        remove_blocks_(work, [by_name[name]])
        removed.append(name)
        m = _measure(latency_fn, model, work)
        measurements.append({"removed": len(removed), **m})
        ratio = m["ratio"]
        if ratio >= target.value:
            break
    if ratio < target.value:
        raise DBPTargetError(f"target {target.describe()} was not met: with all {len(order)} block(s) removed the "
                             f"latency ratio measured {ratio:.3f} (the machine may be too noisy; retry or lower it)",
                             best=ratio)
    return removed, ratio, measurements, True


def _ratio_fn(count: Optional[MacsFn], model: nn.Module) -> Callable[[nn.Module], Optional[float]]:
    """``candidate -> dense / candidate`` by ``count`` (``None`` without a counter)."""
    if count is None:
        return lambda m: None
    dense = float(count(model))

    def ratio(m: nn.Module) -> float:
        pruned = float(count(m))
        return dense / pruned if pruned > 0 else float("inf")

    return ratio


def _check_meters(target: Target, macs_fn: Optional[MacsFn], params_fn: Optional[MacsFn],
                  latency_fn: Optional[LatencyFn], where: str = "plan_removal") -> None:
    if target.kind == "macs" and macs_fn is None:
        raise TypeError(f"{where}: a 'macs' target needs macs_fn=..., a callable model -> MACs "
                        "(e.g. lambda m: pfgdf_plugin.measure.count_macs(m, example_inputs))")
    if target.kind == "params" and params_fn is None:
        raise TypeError(f"{where}: a 'params' target needs params_fn=..., a callable model -> parameters "
                        "(e.g. pfgdf_plugin.measure.count_params)")
    if target.kind == "latency" and latency_fn is None:
        raise TypeError(f"{where}: a 'latency' target needs latency_fn=..., a callable (dense, pruned) -> "
                        "(dense_ms, pruned_ms) (e.g. pfgdf_plugin.meter.paired_timer(example_inputs))")


def plan_removal(model: nn.Module, blocks: Sequence[Block], order: Sequence[str], target: Any,
                 example_inputs: Any, macs_fn: Optional[MacsFn] = None,
                 latency_fn: Optional[LatencyFn] = None, params_fn: Optional[MacsFn] = None,
                 short_ok: bool = False) -> Plan:
    """Decide which blocks to remove (in ``order``) to meet ``target``; ``model`` is left as it was.

    MACs, parameters and the output shape are counted on ``model`` itself with the blocks swapped
    out and put back after (a latency target times a copy against it). The output shape is
    checked after the removals.

    Args:
        model: the dense network.
        blocks: candidates (from :func:`find_blocks`).
        order: candidate names, least useful first (:func:`removal_order`); only these are removed.
        target: a :class:`Target` or anything :meth:`Target.parse` takes.
        example_inputs: a batch for the output-shape check.
        macs_fn: ``model -> MACs`` (needed by a ``macs`` target; without it ``macs_ratio`` is ``None``).
        latency_fn: ``(dense, pruned) -> (dense_ms, pruned_ms)``, needed by a ``latency`` target:
            called once with every block of ``order`` removed, then after each removal.
        params_fn: ``model -> parameters`` (needed by a ``params`` target).
        short_ok: when removing every block of ``order`` does not reach a ratio target, plan
            that (``plan.met = False``) instead of raising; the caller adds width pruning.

    Raises:
        DBPError: the target cannot be met even by removing every block in ``order`` (unless
            ``short_ok``), or a removal changes the model's output shape.
        TypeError: a ratio target without the callable that measures it.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1))
        >>> blocks = find_blocks(net, torch.randn(1, 2, 4, 4))
        >>> fake = lambda dense, pruned: (3.0, float(sum(isinstance(m, nn.Conv2d) for m in pruned.modules())))
        >>> plan = plan_removal(net, blocks, ["2", "0", "1"], {"latency": 1.4}, torch.randn(1, 2, 4, 4),
        ...                     latency_fn=fake)
        >>> plan.removed, plan.latency_ratio
        (['2'], 1.5)
    """
    target = Target.parse(target)
    by_name = {b.name: b for b in blocks}
    unknown = [n for n in order if n not in by_name]
    if unknown:
        raise DBPError(f"order names unknown blocks: {', '.join(unknown)}")
    _check_meters(target, macs_fn, params_fn, latency_fn)
    macs_ratio, params_ratio = _ratio_fn(macs_fn, model), _ratio_fn(params_fn, model)
    dense_shape = _output_shape(model, example_inputs)
    latency, measurements, met = None, [], True
    if target.kind == "blocks":
        if int(target.value) > len(order):
            raise DBPTargetError(f"target {target.describe()} cannot be met: only {len(order)} removable block(s) "
                           f"({', '.join(order)})")
        chosen, met = list(order[:int(target.value)]), True
    elif target.kind == "latency":
        chosen, latency, measurements, met = _plan_latency(model, by_name, order, target, latency_fn, short_ok)
    else:
        chosen, met = _plan_ratio(model, by_name, order, target, macs_ratio if target.kind == "macs" else params_ratio,
                                  short_ok)
    with blocks_removed(model, [by_name[x] for x in chosen]):  # the model itself, put back after
        shape = _output_shape(model, example_inputs)
        reached_macs, reached_params = macs_ratio(model), params_ratio(model)
    if shape != dense_shape:
        raise DBPError(f"removing blocks {', '.join(chosen)} changes the model's output shape from "
                       f"{dense_shape} to {shape}")
    return Plan(chosen, reached_macs, latency, measurements, reached_params, met)


# --------------------------------------------------------------------------- the whole method


@dataclass
class DBPResult:
    """What :func:`decide` chose (and :func:`prune_` did).

    Attributes:
        blocks: the candidates (:class:`Block`), in network order.
        scores: their :class:`BlockScore`, same order.
        removed: names of the removed blocks, in removal order (least useful first).
        target: the :class:`Target`.
        plan: the :class:`Plan` (achieved MACs / params / latency ratios, ``met``).
        info: ``baseline`` (``D_0``), ``baseline_loss``, ``samples``, ``classes``.
        depth_target: the part of ``target`` the blocks were asked for
            (:func:`~pfgdf_plugin.methods.dbp.depth_target`); ``target`` itself by default.
    """

    blocks: List[Block]
    scores: List[BlockScore]
    removed: List[str]
    target: Target
    plan: Plan
    info: Dict[str, Any]
    depth_target: Optional[Target] = None

    def report(self) -> Dict[str, Dict[str, Any]]:
        """``{block name: {members, kind, position, macs, discrimination, probe_loss, reference,
        gain, loss_gain, rank, removed}}`` in network order; ``rank`` 0 is the least useful."""
        order = removal_order(self.scores)
        rank = {n: i for i, n in enumerate(order)}
        removed = set(self.removed)
        out: Dict[str, Dict[str, Any]] = {}
        for b, s in zip(self.blocks, self.scores):
            out[b.name] = {"members": list(b.members), "kind": b.kind, "position": b.position, "macs": b.macs,
                           "discrimination": s.discrimination, "probe_loss": s.probe_loss,
                           "reference": s.reference, "gain": s.gain, "loss_gain": s.loss_gain,
                           "rank": rank[b.name], "removed": b.name in removed}
        return out

    def removed_blocks(self) -> List[Block]:
        """The removed :class:`Block` objects, in removal order."""
        by_name = {b.name: b for b in self.blocks}
        return [by_name[n] for n in self.removed]


def _check_groups(blocks: Sequence[Block], target: Target, groups: Sequence[Tuple[Sequence[str], int]]) -> None:
    """The quotas add up to a blocks target and name known blocks only."""
    if target.kind != "blocks" or target.value != sum(c for _, c in groups):
        raise ValueError("with groups, target must be {'blocks': total of the group counts}")
    known = {b.name for b in blocks}
    for names, _count in groups:
        missing = [n for n in names if n not in known]
        if missing:
            raise DBPError(f"groups name unknown blocks: {', '.join(missing)}")


def decide(model: nn.Module, example_inputs: Any, data: Iterable, target: Any,
           candidates: Optional[Sequence] = None, blocks: Optional[Sequence[Block]] = None,
           groups: Optional[Sequence[Tuple[Sequence[str], int]]] = None,
           num_batches: Optional[int] = _D.num_batches, num_classes: Optional[int] = None,
           holdout: float = _D.holdout, seed: int = _D.seed, weight_decay: float = 1e-3, max_iter: int = 100,
           reference: str = _D.reference, macs_fn: Optional[MacsFn] = None,
           latency_fn: Optional[LatencyFn] = None, progress: bool = False, params_fn: Optional[MacsFn] = None,
           depth_share: float = _D.depth_share, short_ok: bool = False) -> DBPResult:
    """DBP's choice without touching ``model``: find blocks, score them, plan the removal.

    Arguments as in :func:`prune_`; ``depth_share`` and ``short_ok`` as in :func:`.split.depth_target`
    and :func:`plan_removal`. Everything that can fail (bad target, bad data, unreachable target)
    fails here.
    """
    from .split import depth_target

    target = Target.parse(target)
    part = depth_target(target, depth_share)
    if blocks is None:
        blocks = find_blocks(model, example_inputs, candidates, macs_fn)
    blocks = list(blocks)
    if not blocks:
        raise DBPError(f"{type(model).__name__} has no removable block")
    if target.kind == "blocks" and target.value > len(blocks):
        raise DBPTargetError(f"target {target.describe()} cannot be met: only {len(blocks)} removable block(s) "
                       f"({', '.join(b.name for b in blocks)})")
    _check_meters(part, macs_fn, params_fn, latency_fn, "prune_")
    if groups is not None:
        _check_groups(blocks, target, groups)
    elif part.kind in ("macs", "params") and not short_ok:  # fail before the probes if removing all is not enough
        plan_removal(model, blocks, [b.name for b in blocks], part, example_inputs, macs_fn, params_fn=params_fn)
    scores, info = score_blocks(model, blocks, data, num_batches, num_classes, holdout, seed, weight_decay,
                                max_iter, reference, progress)
    order = removal_order(scores)
    if groups is not None:
        order = quota_selection(order, groups)
    plan = plan_removal(model, blocks, order, part, example_inputs, macs_fn, latency_fn, params_fn, short_ok)
    return DBPResult(blocks, scores, list(plan.removed), target, plan, info, part)


def prune_(model: nn.Module, example_inputs: Any, data: Iterable, target: Any,
           candidates: Optional[Sequence] = None, blocks: Optional[Sequence[Block]] = None,
           groups: Optional[Sequence[Tuple[Sequence[str], int]]] = None,
           num_batches: Optional[int] = _D.num_batches, num_classes: Optional[int] = None,
           holdout: float = _D.holdout, seed: int = _D.seed, weight_decay: float = 1e-3, max_iter: int = 100,
           reference: str = _D.reference, macs_fn: Optional[MacsFn] = None,
           latency_fn: Optional[LatencyFn] = None, progress: bool = False,
           params_fn: Optional[MacsFn] = None) -> DBPResult:
    """DBP by depth, end to end: find blocks, score them, plan, then replace the chosen ones with ``nn.Identity``.

    Everything that can fail (bad target, bad data, unreachable target) fails before ``model``
    is changed. Depth then width is the adapters' (``DBPPruner``), on top of :func:`decide`.

    Args:
        model: pruned in place.
        example_inputs: a batch for the shape pass.
        data: ``(inputs, labels)`` batches for the probes.
        target: a :class:`Target` or ``{"blocks": n}`` / ``{"macs": r}`` / ``{"params": r}`` /
            ``{"latency": r}``.
        candidates: module names to consider instead of the automatic discovery.
        blocks: already discovered blocks (skips :func:`find_blocks`).
        groups: optional quotas ``[(block names, count), ...]`` (NNI-style per-entry ratios);
            with them ``target`` must be blocks-kind and equal to the total count.
        macs_fn: ``model -> MACs``: the MACs ratios, and the blocks' ``macs`` when they are
            discovered here; needed by a ``macs`` target.
        latency_fn: ``(dense, pruned) -> (dense_ms, pruned_ms)``; needed by a ``latency`` target.
        params_fn: ``model -> parameters``; needed by a ``params`` target.
        other arguments: see :func:`score_blocks` and :func:`plan_removal`.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *[nn.Conv2d(8, 8, 3, padding=1) for _ in range(4)],
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        >>> data = [(torch.randn(40, 3, 8, 8), torch.arange(40) % 4)]
        >>> result = prune_(net, torch.randn(1, 3, 8, 8), data, {"blocks": 2})
        >>> len(result.removed), len(result.blocks), sum(isinstance(m, nn.Identity) for m in net)
        (2, 4, 2)
    """
    result = decide(model, example_inputs, data, target, candidates, blocks, groups, num_batches, num_classes,
                    holdout, seed, weight_decay, max_iter, reference, macs_fn, latency_fn, progress, params_fn)
    remove_blocks_(model, result.removed_blocks())
    return result
