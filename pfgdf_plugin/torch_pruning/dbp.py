"""DBP inside Torch-Pruning: :class:`DBPPruner` (depth, then width) and :class:`DiscriminationImportance` (width).

The method lives in :mod:`pfgdf_plugin.methods.dbp`; this module supplies the project's MACs and
parameter counters (:func:`pfgdf_plugin.measure.count_macs`, ``count_params``) and latency timer
(:func:`pfgdf_plugin.meter.paired_timer`) to it, prunes width with
:func:`pfgdf_plugin.torch_pruning.target.prune_to_target` where blocks alone fall short of a target,
and turns dependency groups into per-channel scores.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch_pruning as tp

from .. import measure
from .. import models as _models  # noqa: F401  (registers the residual block types DBP can remove)
from ..errors import DBPTargetError, TargetError
from ..meter import Timing, modules_of, paired_timer
from ..methods import dbp
from ._group import _NORM_TYPES, reduce_to_root
from .target import prune_to_target

_D = dbp.DBPParams()

_SCORED = (nn.modules.conv._ConvNd, nn.Linear) + _NORM_TYPES
REDUCTIONS = ("mean", "max", "first")


def _classifier(model: nn.Module) -> List[nn.Module]:
    """The last ``nn.Linear`` (the classifier width pruning leaves alone), if any."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


class DBPPruner:
    """Remove whole blocks chosen by the discrimination of their outputs (DBP), then width if blocks fall short.

    The candidates (units whose input and output shapes match) are found when the pruner is
    built; :meth:`step` trains one linear probe per candidate output on ``data`` (backbone
    frozen), ranks the blocks by their gain in probe accuracy over the previous candidate, and
    replaces the least useful ones with ``nn.Identity`` until ``target`` (or its depth part,
    ``ratio ** depth_share``) is met. When removing every candidate does not reach it, all of
    them go and the channels of the depth-pruned model are pruned with
    :func:`~pfgdf_plugin.torch_pruning.target.prune_to_target` (``width_importance``) for what is
    left; the ratio reached is measured against the dense model. The model keeps its other module
    names, so its ``state_dict``, ``torch.fx`` tracing and ONNX export work as before.

    It is a plain class, not a ``tp.pruner.BasePruner``: a base pruner builds a dependency graph
    and yields channel groups to prune, while DBP swaps modules, which would invalidate that graph.

    Args:
        model: the network (pruned in place by :meth:`step`).
        example_inputs: a batch for the shape pass and MACs counting; a ``[B, C, H, W]`` tensor
            for latency targets.
        data: ``(inputs, labels)`` batches of held-out training data, e.g. a ``DataLoader``.
        target: ``{"blocks": n}``, ``{"macs": r}`` (dense / pruned MACs, Torch-Pruning's
            counter), ``{"params": r}``, ``{"latency": r}`` (measured), an int (blocks) or a
            :class:`~pfgdf_plugin.methods.dbp.Target`.
        candidates: module names (or sequences of names forming one block) to consider instead of
            the automatic discovery.
        num_batches: batches of ``data`` the probes use (``None``: all).
        num_classes: classes the probes expect (default: the model's output size).
        seed: seeds the probes' train/held-out split.
        holdout: share of the samples that scores the probes.
        reference: ``"previous"`` (gain over the previous candidate) or ``"input"`` (over the
            block's own input).
        weight_decay, max_iter: the probes' L2 penalty and L-BFGS iterations.
        progress: show a progress bar while collecting features.
        latency_fn: ``(dense, pruned) -> (dense_ms, pruned_ms)`` to time the blocks' latency
            with instead of ``timing`` (e.g. another device's timer, a stand-in in tests).
        depth_share: the share of a ratio target's log-ratio depth delivers (see
            :class:`~pfgdf_plugin.methods.dbp.DBPParams`; 1: depth as far as it goes).
        width_importance: ``"l1"`` (one ratio for every layer), ``"lamp"`` (Torch-Pruning's
            ``LAMPImportance`` ranked globally), ``"discrimination"`` (:class:`DiscriminationImportance`
            on ``data``) or ``"none"`` (depth only).
        timing: how latency is timed (:class:`pfgdf_plugin.meter.Timing` or its fields: engine
            ``pytorch`` | ``onnxruntime``, threads, batch size, warm-up, repeats; defaults
            PyTorch, 1 thread, batch 1).
        ignored_layers: layers width pruning leaves alone, besides the classifier (the last
            ``nn.Linear``), which it always leaves alone.
        max_width_ratio: the largest global channel ratio the width step tries.

    Raises:
        DBPError: (a ``ValueError``) no removable block, a named candidate that changes the shape,
            bad parameters, and, from :meth:`step`, bad labels or NaN/Inf weights (naming the
            layer); an unreachable target is a :class:`~pfgdf_plugin.errors.DBPTargetError`
            (both a ``DBPError`` and a ``TargetError``) naming the best reached. The model is
            unchanged then.
        TargetError: a malformed target or timing.

    After :meth:`step`: ``removed`` lists the removed block names (least useful first);
    ``report`` maps every candidate's name to ``{members, kind, position, macs, discrimination,
    probe_loss, reference, gain, loss_gain, rank, removed}``; ``result`` is the
    :class:`~pfgdf_plugin.methods.dbp.DBPResult` of the depth step; ``width_ratio`` is the global
    channel ratio of the width step (0.0 without one); ``target_report`` is ``{"target",
    "reached", "met", "depth", "width"}`` (:func:`pfgdf_plugin.methods.dbp.target_report`).

    Example:
        >>> import torch
        >>> from pfgdf_plugin.models import build_model
        >>> model = build_model("resnet20", width=0.25)
        >>> data = [(torch.randn(20, 3, 32, 32), torch.arange(20) % 10)]
        >>> pruner = DBPPruner(model, torch.randn(1, 3, 32, 32), data=data, target={"blocks": 3})
        >>> len(pruner.blocks)
        7
        >>> pruner.step()
        >>> len(pruner.removed), model(torch.randn(2, 3, 32, 32)).shape
        (3, torch.Size([2, 10]))
    """

    def __init__(self, model: nn.Module, example_inputs: Any, data: Iterable, target: Any,
                 candidates: Optional[Sequence] = None, num_batches: Optional[int] = _D.num_batches,
                 num_classes: Optional[int] = None, seed: int = _D.seed, holdout: float = _D.holdout,
                 reference: str = _D.reference, weight_decay: float = 1e-3, max_iter: int = 100,
                 progress: bool = False,
                 latency_fn: Optional[Callable[[nn.Module, nn.Module], Tuple[float, float]]] = None, *,
                 depth_share: float = _D.depth_share, width_importance: str = _D.width_importance,
                 timing: Optional[Union[Timing, Mapping[str, Any]]] = None,
                 ignored_layers: Optional[List[nn.Module]] = None, max_width_ratio: float = 0.95) -> None:
        if data is None:
            raise TypeError("DBPPruner needs data=...: an iterable of (inputs, labels) batches for the probes")
        self.target = dbp.Target.parse(target)
        if reference not in dbp.REFERENCES:
            raise ValueError(f"reference must be one of {', '.join(dbp.REFERENCES)}; got {reference!r}")
        if not isinstance(holdout, (int, float)) or isinstance(holdout, bool) or not 0.0 < holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {holdout!r}")
        if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                        or num_batches < 1):
            raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
        dbp.DBPParams(depth_share=depth_share, width_importance=width_importance)  # names a bad value
        if isinstance(max_width_ratio, bool) or not isinstance(max_width_ratio, float) \
                or not 0.0 < max_width_ratio < 1.0:
            raise ValueError(f"max_width_ratio must be a float in (0, 1), got {max_width_ratio!r}")
        self.model = model
        self.example_inputs = example_inputs
        self.data = data
        self.timing = Timing.parse(timing)
        self.width_importance = width_importance
        self.depth_share = float(depth_share) if self._width_on() else 1.0
        self.max_width_ratio = max_width_ratio
        head = _classifier(model)
        self.ignored_layers = head + [m for m in ignored_layers or () if not any(m is h for h in head)]
        modules_of(model, model, self.ignored_layers)  # each must belong to the model
        if self.target.kind == "latency" and latency_fn is None:
            dbp.latency_input_shape(example_inputs)  # DBPError for anything but one image batch
            latency_fn = paired_timer(example_inputs, self.timing)
        self.latency_fn = latency_fn
        self.blocks: List[dbp.Block] = dbp.find_blocks(model, example_inputs, candidates, macs_fn=self._macs)
        self._options = dict(num_batches=num_batches, num_classes=num_classes, holdout=float(holdout),
                             seed=int(seed), weight_decay=float(weight_decay), max_iter=int(max_iter),
                             reference=reference, latency_fn=latency_fn, progress=progress)
        self.result: Optional[dbp.DBPResult] = None
        self.report: Dict[str, Dict[str, Any]] = {}
        self.removed: List[str] = []
        self.width_ratio = 0.0
        self.target_report: Dict[str, Any] = {}

    def _macs(self, model: nn.Module) -> float:
        return float(measure.count_macs(model, self.example_inputs))

    def _width_on(self) -> bool:
        return self.width_importance != "none" and self.target.kind != "blocks"

    def _reached(self, dense: nn.Module, pruned: nn.Module) -> float:
        """dense / pruned in the target's quantity."""
        kind = self.target.kind
        if kind == "latency":
            d, p = (float(t) for t in self.latency_fn(dense, pruned))
            return d / p if p > 0 else float("inf")
        count = self._macs if kind == "macs" else measure.count_params
        return float(count(dense)) / max(1.0, float(count(pruned)))

    def _importance(self):
        if self.width_importance == "discrimination":
            return DiscriminationImportance(self.data, num_batches=self._options["num_batches"],
                                            num_classes=self._options["num_classes"])
        if self.width_importance == "lamp":
            return tp.importance.LAMPImportance()
        return tp.importance.MagnitudeImportance(p=1)

    def _global_width(self) -> bool:
        """LAMP ranks every layer's channels together; the other criteria prune one ratio per layer."""
        return self.width_importance == "lamp"

    def _prune_width(self, model: nn.Module, importance, ratio: float) -> None:
        tp.pruner.MetaPruner(model, self.example_inputs, importance=importance, pruning_ratio=ratio,
                             ignored_layers=modules_of(model, self.model, self.ignored_layers),
                             global_pruning=self._global_width()).step()

    def _width(self, result: dbp.DBPResult, width) -> Dict[str, Any]:
        """Width on a depth-pruned copy (searched), then depth and width on the model; untouched on failure."""
        work = copy.deepcopy(self.model)
        dbp.remove_blocks_(work, result.removed_blocks())
        importance = self._importance()
        t = self.timing
        try:
            info = prune_to_target(work, self.example_inputs, importance, {width.kind: width.value},
                                   engine=t.engine, threads=t.threads, batch_size=t.batch_size, warmup=t.warmup,
                                   repeats=t.repeats, max_ratio=self.max_width_ratio,
                                   ignored_layers=modules_of(work, self.model, self.ignored_layers),
                                   global_pruning=self._global_width())
        except TargetError as err:
            self._prune_width(work, importance, self.max_width_ratio)
            best = self._reached(self.model, work)
            raise DBPTargetError(
                f"target {self.target.describe()} cannot be reached: removing {len(result.removed)} of "
                f"{len(self.blocks)} block(s) gives {result.plan.ratio(self.target.kind):.3f}, and width pruning "
                f"at the largest global ratio {self.max_width_ratio:g} gives {best:.3f} against the dense model "
                f"(the best reached); ask for less or raise max_width_ratio ({err})", best=best) from None
        dbp.remove_blocks_(self.model, result.removed_blocks())
        self._prune_width(self.model, importance, info["ratio"])
        return {"target": {width.kind: width.value}, "ratio": info["ratio"], "importance": self.width_importance,
                "reached": info["reached"], "trials": info["trials"]}

    def step(self) -> None:
        """Score the candidates, remove the chosen blocks, and prune width if they fall short (once)."""
        if self.result is not None:
            raise RuntimeError(f"DBPPruner.step() already removed {len(self.removed)} block(s); build a new "
                               "DBPPruner on the pruned model to remove more")
        kind = self.target.kind
        result = dbp.decide(self.model, self.example_inputs, self.data, self.target, blocks=self.blocks,
                            macs_fn=self._macs, params_fn=measure.count_params, depth_share=self.depth_share,
                            short_ok=self._width_on(), **self._options)
        width = dbp.width_target(self.target, result.plan.ratio(kind)) if self._width_on() else None
        width_info = None
        if width is None:
            dbp.remove_blocks_(self.model, result.removed_blocks())
            reached: Any = len(result.removed) if kind == "blocks" else result.plan.ratio(kind)
        else:
            dense = copy.deepcopy(self.model)
            width_info = self._width(result, width)
            self.width_ratio = float(width_info["ratio"])
            reached = self._reached(dense, self.model)
        self.result = result
        self.report = result.report()
        self.removed = list(result.removed)
        self.target_report = dbp.target_report(result, reached, width_info)


def _state_key(model: nn.Module) -> Tuple:
    """Changes whenever a parameter or buffer is replaced, reshaped or updated in place."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return (id(model),) + tuple((n, id(t), tuple(t.shape), t._version) for n, t in tensors)


class DiscriminationImportance(tp.importance.Importance):
    """DBP's per-channel discrimination as a Torch-Pruning importance (higher = keep).

    A channel's score is the Fisher ratio (between-class over within-class variance,
    :func:`pfgdf_plugin.methods.dbp.fisher_ratio`) of its globally average-pooled response at the
    output of each layer of the group that produces it (convolutions and linears whose output
    channels are coupled, and their normalisation layers), combined across coupled layers with
    ``group_reduction``. This is this project's per-channel reading of DBP's block measure.

    All layers' responses come from one pass of forward hooks over ``data``, cached until the
    model's parameters or buffers change (a new pruning step, fine-tuning). A group without a
    producing layer that ran once per forward pass scores ``None`` (Torch-Pruning skips it).
    NaN/Inf weights or responses raise :class:`~pfgdf_plugin.methods.dbp.DBPError` naming the layer.

    Args:
        data: ``(inputs, labels)`` batches, e.g. a ``DataLoader``.
        num_batches: batches of ``data`` to use (``None``: all).
        num_classes: classes (default: the model's output size, else the labels' maximum + 1).
        group_reduction: ``"mean"`` | ``"max"`` | ``"first"`` across coupled layers.
        progress: show a progress bar while collecting responses.

    Example:
        >>> import torch, torch_pruning as tp
        >>> from pfgdf_plugin.models import build_model
        >>> model = build_model("resnet20", width=0.5)
        >>> data = [(torch.randn(20, 3, 32, 32), torch.arange(20) % 10)]
        >>> tp.pruner.MetaPruner(model, torch.randn(1, 3, 32, 32), pruning_ratio=0.5,
        ...                      importance=DiscriminationImportance(data), ignored_layers=[model.fc]).step()
        >>> model.conv1.out_channels
        4
    """

    def __init__(self, data: Iterable, num_batches: Optional[int] = 4, num_classes: Optional[int] = None,
                 group_reduction: str = "mean", progress: bool = False) -> None:
        if data is None:
            raise TypeError("DiscriminationImportance needs data=...: (inputs, labels) batches")
        if group_reduction not in REDUCTIONS:
            raise ValueError(f"group_reduction must be one of {', '.join(REDUCTIONS)}; got {group_reduction!r}")
        if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                        or num_batches < 1):
            raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
        self.data = data
        self.num_batches = num_batches
        self.num_classes = num_classes
        self.group_reduction = group_reduction
        self.progress = progress
        self._key: Optional[Tuple] = None
        self._scores: Dict[nn.Module, torch.Tensor] = {}
        self.passes = 0  # feature passes run so far (one per model state)

    def _refresh(self, model: nn.Module) -> None:
        key = _state_key(model)
        if key == self._key:
            return
        dbp.check_finite_model(model)
        layers = {name: m for name, m in model.named_modules() if isinstance(m, _SCORED)}
        points = {name: (m, "out") for name, m in layers.items()}
        feats, labels, out_dim = dbp.collect_features(model, points, self.data, self.num_batches, self.progress,
                                                      desc="DBP channel responses", strict=False)
        dbp.check_finite_features({f"out:{n}": f for n, f in feats.items()}, [f"out:{n}" for n in feats])
        k = dbp.check_labels(labels, self.num_classes, out_dim)
        self._scores = {}
        for name, f in feats.items():
            self._scores[layers[name]] = dbp.fisher_ratio(f, labels, k)
        self._key = _state_key(model)
        self.passes += 1

    @torch.no_grad()
    def __call__(self, group) -> Optional[torch.Tensor]:
        DG = getattr(group, "_DG", None)
        if DG is None or getattr(DG, "model", None) is None:
            raise RuntimeError("DiscriminationImportance needs a group from a Torch-Pruning DependencyGraph "
                               "(DG.get_pruning_group / DG.get_all_groups)")
        self._refresh(DG.model)
        n = len(group[0].idxs)
        pos_of = {int(r): p for p, r in enumerate(group[0].root_idxs)}
        per_item = []
        for item in group:
            layer = item.dep.target.module
            if not isinstance(layer, _SCORED) or not DG.is_out_channel_pruning_fn(item.dep.handler):
                continue
            scores = self._scores.get(layer)
            if scores is None:
                continue
            keep = [(int(i), pos_of[int(r)]) for i, r in zip(item.idxs, item.root_idxs)
                    if r is not None and int(r) in pos_of and int(i) < scores.numel()]
            if not keep:
                continue
            idx = torch.tensor([a for a, _ in keep], dtype=torch.long)
            pos = torch.tensor([b for _, b in keep], dtype=torch.long)
            per_item.append((pos, scores[idx]))
        if not per_item:
            return None
        out = reduce_to_root(group, per_item, self.group_reduction)
        if out.numel() != n:  # the contract Torch-Pruning does not check
            raise RuntimeError(f"importance has {out.numel()} scores for a group of {n} channels")
        return out
