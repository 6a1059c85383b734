"""PFGDF inside Torch-Pruning: :class:`GaussianImportance` and :class:`PFGDFPruner`.

The rule itself lives in :mod:`pfgdf_plugin.methods.pfgdf` (``layer_statistics`` scores a
layer, ``decide_group`` decides a group); this module only turns a dependency group into score
tensors and the decision back into a pruning group.
"""

from __future__ import annotations

import warnings
import copy
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch_pruning as tp

from ..meter import meet_target, modules_of, target_or_none
from ..errors import PFGDFError
from ..methods import pfgdf
from ..methods.pfgdf import PFGDFParams
from ._group import (IN, NORM, OUT, check_pruner_inputs, graph_building, group_tensors, layer_name, reduce_to_root,
                     skip_misread_group)

_L1 = tp.importance.MagnitudeImportance(p=1)  # the filters ``select="l1"`` removes first


def _knob(name: str, doc: str) -> property:
    """A read-only view of ``self.params.<name>``: the knobs live in one place."""
    return property(lambda self: getattr(self.params, name), doc=doc)


class GaussianImportance(tp.importance.Importance):
    """PFGDF's Gaussian-distribution score as a Torch-Pruning importance.

    Each layer of a group is scored against a Gaussian fitted to *that layer's* filters, so the
    score is ``|s_i - mu| / sigma`` (``mode="band"``) or the share of the filter's weights in
    the layer's Gaussian tails (``mode="tail"``): higher = keep. Coupled layers (residual
    additions, concatenations) are combined with ``group_reduction``. Filters (out-channel
    items of convolutions and linears, depthwise and grouped included) are scored first; a
    group without any is scored on its normalisation layers' scales, then on input slices.

    Args:
        k: band half-width in standard deviations (used by ``mode="tail"``; ``PFGDFPruner``
            uses it for the automatic ratio).
        statistic: ``"mean"`` | ``"abs_mean"`` | ``"l2"``, the per-filter statistic.
        mode: ``"band"`` (default) or ``"tail"``.
        group_reduction: ``"mean"`` | ``"max"`` | ``"first"`` across coupled layers.

    Example:
        >>> import torch, torch_pruning as tp, torchvision
        >>> from pfgdf_plugin import GaussianImportance
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> pruner = tp.pruner.MetaPruner(model, torch.randn(1, 3, 32, 32),
        ...     importance=GaussianImportance(), pruning_ratio=0.5, ignored_layers=[model.fc])
        >>> pruner.step()
    """

    k = _knob("k", "band half-width in standard deviations")
    statistic = _knob("statistic", "per-filter statistic (``mode='band'``)")
    mode = _knob("mode", "``band`` or ``tail``")
    group_reduction = _knob("group_reduction", "how coupled layers' scores combine")

    def __init__(self, k: float = PFGDFParams.k, statistic: str = PFGDFParams.statistic,
                 mode: str = PFGDFParams.mode, group_reduction: str = PFGDFParams.group_reduction) -> None:
        self.params = pfgdf.make_params(k=k, statistic=statistic, mode=mode, group_reduction=group_reduction)
        self.layer_names: Dict[nn.Module, str] = {}
        self._warned_flat: set = set()

    def _name(self, module: nn.Module, group) -> str:
        return self.layer_names.get(module) or layer_name(group, module)  # MetaPruner: the graph's names

    @torch.no_grad()
    def __call__(self, group) -> Optional[torch.Tensor]:
        if skip_misread_group(group):
            return None
        items = list(group_tensors(group))
        tiers = {OUT: [], NORM: [], IN: []}
        for it in items:
            tiers[it.kind].append(it)
        chosen = tiers[OUT] or tiers[NORM] or tiers[IN]
        if not chosen:
            return None
        per_item = []
        for it in chosen:
            name = self._name(it.module, group)
            full = pfgdf.layer_statistics(it.slices, self.params, layer=name).scores.float()
            if pfgdf.is_degenerate(full) and it.slices.shape[0] > 1 and name not in self._warned_flat:
                self._warned_flat.add(name)
                warnings.warn(f"layer {name!r}: its filter statistic has zero variance; every filter "
                              "scores 0 (PFGDFPruner prunes none of them)", stacklevel=2)
            per_item.append((it.positions, full[it.idxs]))
        return reduce_to_root(group, per_item, self.group_reduction)


class PFGDFPruner(tp.pruner.BasePruner):
    """Prune every layer's Gaussian-insignificant filters; the ratios come from the band.

    A filter is removed when its importance from :class:`GaussianImportance` is inside the
    band (``<= k`` for ``mode="band"``, ``<= tail_threshold`` for ``mode="tail"``). No pruning
    ratio is given: each layer loses the share of its filters that the rule calls insignificant,
    keeping at least ``min_channels`` and at most ``1 - max_pruning_ratio`` of them.

    Args:
        model: the network (pruned in place by :meth:`step`).
        example_inputs: a batch for tracing.
        k, statistic, mode: see :class:`GaussianImportance`.
        min_channels: filters every layer keeps (>= 1).
        tail_threshold: ``mode="tail"`` cut-off (default ``erfc(k / sqrt 2)``).
        ignored_layers: layers left alone (typically the classifier).
        select: which filters go once the band has set each layer's count: ``band`` (the
            insignificant ones) or ``l1`` (as many, smallest by Torch-Pruning's group L1,
            ``MagnitudeImportance(p=1)``).
        target: a budget, ``{"latency": r}``, ``{"macs": r}`` or ``{"params": r}`` (dense / pruned
            >= r): ``k`` is then searched (bisection over ``K_RANGE`` on copies of the model; a
            wider band prunes more) and must not be given. The per-layer ratios stay PFGDF's.
        timing: how a latency target is timed (:class:`pfgdf_plugin.meter.Timing` or its fields;
            default PyTorch, 1 thread, batch 1).
        **kwargs: other :class:`torch_pruning.pruner.BasePruner` arguments (``max_pruning_ratio``,
            ``round_to``, ``root_module_types``, ``customized_pruners``, ...). ``pruning_ratio``
            is refused: PFGDF chooses the ratios.

    Raises:
        TargetError: a malformed or unreachable target (naming the best ratio reached), or a
            target together with ``k``; the model is then untouched.

    ``pruner.target_report`` is ``{"target", "reached", "knob" (k), "trials"}`` with a target,
    else ``None``.

    After :meth:`step`, ``pruner.report`` maps each group's root layer name to a dict with
    ``channels``, ``pruned``, ``ratio``, ``mu``, ``sigma``, ``statistic`` (the per-filter
    values) and ``pruned_idxs``.

    Example:
        >>> import torch
        >>> from pfgdf_plugin import PFGDFPruner
        >>> from pfgdf_plugin.models import build_model
        >>> model = build_model("vgg16_bn", width=0.25)
        >>> pruner = PFGDFPruner(model, torch.randn(1, 3, 32, 32), k=1.0,
        ...                      ignored_layers=[model.classifier])
        >>> pruner.step()
        >>> budget = PFGDFPruner(model, torch.randn(1, 3, 32, 32), target={"params": 1.5},
        ...                      ignored_layers=[model.classifier])
        >>> budget.target_report["reached"] >= 1.5
        True
    """

    K_RANGE = (0.01, 8.0)  # the band widths a target search tries

    k = _knob("k", "band half-width in standard deviations")
    statistic = _knob("statistic", "per-filter statistic (``mode='band'``)")
    mode = _knob("mode", "``band`` or ``tail``")
    min_channels = _knob("min_channels", "filters every layer keeps")
    tail_threshold = _knob("tail_threshold", "``mode='tail'`` cut-off (``None``: the Gaussian's own)")
    select = _knob("select", "which filters go once the band has set how many: ``band`` or ``l1``")

    def __init__(self, model: nn.Module, example_inputs, k: Optional[float] = None,
                 statistic: str = PFGDFParams.statistic, mode: str = PFGDFParams.mode,
                 min_channels: int = PFGDFParams.min_channels,
                 tail_threshold: Optional[float] = PFGDFParams.tail_threshold,
                 ignored_layers: Optional[List[nn.Module]] = None,
                 group_reduction: str = PFGDFParams.group_reduction, target: Any = None,
                 timing: Any = None, select: str = PFGDFParams.select, **kwargs) -> None:
        for key in ("pruning_ratio", "pruning_ratio_dict", "importance", "global_pruning"):
            if key in kwargs:
                raise TypeError(f"PFGDFPruner chooses per-layer ratios itself; {key!r} is not accepted "
                                "(use tp.pruner.MetaPruner(importance=GaussianImportance(), ...) for a fixed ratio)")
        goal = target_or_none("PFGDFPruner", target, k=k)
        check_pruner_inputs(model, example_inputs, ignored_layers, PFGDFError, "PFGDFPruner")
        knobs = dict(statistic=statistic, mode=mode, min_channels=min_channels, tail_threshold=tail_threshold,
                     group_reduction=group_reduction, select=select)
        k = PFGDFParams.k if k is None else k
        pfgdf.make_params(kwargs.get("max_pruning_ratio", 1.0), "max_pruning_ratio", k=k, **knobs)  # errors first
        self.target_report: Optional[Dict[str, Any]] = None
        if goal is not None:
            self.target_report = _search_k(model, example_inputs, goal, timing, ignored_layers, knobs, kwargs)
            k = self.target_report["knob"]
        self.params = pfgdf.make_params(kwargs.get("max_pruning_ratio", 1.0), "max_pruning_ratio", k=k, **knobs)
        # Torch-Pruning's BasePruner mutates these dict defaults: always hand it fresh ones.
        for key in ("in_channel_groups", "out_channel_groups", "num_heads"):
            kwargs[key] = dict(kwargs.get(key) or {})
        importance = GaussianImportance(k=k, statistic=statistic, mode=mode, group_reduction=group_reduction)
        with graph_building(model, PFGDFError, "PFGDFPruner"):
            super().__init__(model, example_inputs, importance=importance, pruning_ratio=0.0,
                             ignored_layers=ignored_layers, **kwargs)
        importance.layer_names = {m: n for m, n in self.DG._module2name.items()}
        self.report: Dict[str, dict] = {}

    def _prune(self):
        self.report = {}
        groups = list(self.DG.get_all_groups(ignored_layers=self.ignored_layers,
                                             root_module_types=self.root_module_types))
        plan = []
        for group in groups:  # decide everything first: pruning one group changes its neighbours
            idxs = self._decide(group)
            if idxs:
                plan.append((group[0].dep.target.module, group[0].dep.handler, idxs))
        for root, fn, idxs in plan:
            pruning_group = self.DG.get_pruning_group(root, fn, idxs)
            if self.DG.check_pruning_group(pruning_group):
                yield pruning_group

    def _decide(self, group) -> Optional[List[int]]:
        """The root channels to remove from ``group`` (``None`` if unscored); fills ``self.report``."""
        root, fn = group[0].dep.target.module, group[0].dep.handler
        name = self.DG._module2name.get(root, type(root).__name__)
        imp = self.estimate_importance(group)
        if imp is None:
            return None
        norms = _L1(group) if self.params.select == "l1" else None  # Torch-Pruning's own group L1
        decision = pfgdf.decide_group(imp, self.params, self._get_channel_groups(group),
                                      self.max_pruning_ratio, self.round_to, norms)
        idxs = decision.prune.tolist()
        entry = {"channels": int(imp.numel()), "pruned": len(idxs),
                 "ratio": len(idxs) / max(1, imp.numel()), "pruned_idxs": idxs}
        if isinstance(root, (nn.modules.conv._ConvNd, nn.Linear)) and self.DG.is_out_channel_pruning_fn(fn):
            stats = pfgdf.layer_statistics(root.weight, self.params, name)
            entry.update(mu=stats.mu, sigma=stats.sigma, statistic=stats.statistic.float().tolist())
        self.report[name] = entry
        return idxs


def _search_k(model: nn.Module, example_inputs, goal, timing, ignored_layers, knobs: Dict[str, Any],
              kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The least band width ``k`` whose pruned copy meets ``goal`` (the search report)."""

    def prune_copy(candidate: nn.Module, k: float) -> nn.Module:
        fresh = {key: (dict(v) if isinstance(v, dict) else v) for key, v in kwargs.items()}
        PFGDFPruner(candidate, example_inputs, k=k, ignored_layers=modules_of(candidate, model, ignored_layers),
                    **knobs, **fresh).step()
        return candidate

    modules_of(model, model, ignored_layers)  # every ignored layer must belong to the model
    lo, hi = PFGDFPruner.K_RANGE
    return meet_target(model, example_inputs, goal, prune_copy, lo, hi, knob_name="k", timing=timing).report()


def auto_k_prune(model: nn.Module, example_inputs, finetune: Callable[[nn.Module], None],
                 evaluate: Callable[[nn.Module], float], baseline: Optional[float] = None,
                 tolerance: float = 0.003, k_values=(0.5, 0.75, 1.0, 1.25, 1.5, 2.0),
                 ignored_layers: Optional[List[nn.Module]] = None, **pruner_kwargs):
    """PFGDF's automatic loop: widen ``k`` while the pruned, fine-tuned model recovers.

    For each ``k`` (increasing), a copy of ``model`` is pruned with :class:`PFGDFPruner`,
    passed to ``finetune`` (which trains it in place) and scored by ``evaluate`` (higher is
    better, e.g. accuracy). The loop stops at the first ``k`` whose score falls below
    ``baseline - tolerance`` (``baseline`` defaults to ``evaluate(model)``). ``model`` itself is
    never modified. The loop is :func:`pfgdf_plugin.methods.pfgdf.auto_k`.

    Returns:
        ``(best_model, best_k, history)``: the pruned, fine-tuned copy of the widest accepted
        ``k`` (``None`` if none was accepted) and one :class:`~pfgdf_plugin.methods.pfgdf.AutoKStep`
        per tried ``k`` (``info`` holds the number of parameters).

    Example:
        >>> import torch
        >>> from pfgdf_plugin.models import build_model
        >>> m = build_model("lenet5")
        >>> best, k, hist = auto_k_prune(m, torch.randn(1, 3, 32, 32), finetune=lambda net: None,
        ...                              evaluate=lambda net: 1.0, k_values=(0.5, 1.0))
        >>> k
        1.0
    """
    names = {m: n for n, m in model.named_modules()}
    ignored_names = None if ignored_layers is None else [names[m] for m in ignored_layers]
    if baseline is None:
        baseline = float(evaluate(model))
    candidates: Dict[float, nn.Module] = {}

    def trial(k: float):
        candidate = copy.deepcopy(model)
        mods = dict(candidate.named_modules())
        ignored = _last_layer(candidate) if ignored_names is None else [mods[n] for n in ignored_names]
        PFGDFPruner(candidate, example_inputs, k=k, ignored_layers=ignored, **pruner_kwargs).step()
        finetune(candidate)
        candidates[k] = candidate
        return float(evaluate(candidate)), {"params": sum(p.numel() for p in candidate.parameters())}

    best_k, history = pfgdf.auto_k(trial, baseline, tolerance, k_values)
    return candidates.get(best_k), best_k, history


def _last_layer(model: nn.Module) -> List[nn.Module]:
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    return last[-1:]
