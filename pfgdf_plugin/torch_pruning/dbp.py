"""DBP inside Torch-Pruning: :class:`DBPPruner` (depth) and :class:`DiscriminationImportance` (width).

The method lives in :mod:`pfgdf_plugin.methods.dbp`; this module only supplies the project's
MACs counter (:func:`pfgdf_plugin.measure.count_macs`) and latency timer
(:func:`pfgdf_plugin.measure.paired_latency`) to it and turns dependency groups into per-channel scores.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch_pruning as tp

from .. import measure
from .. import models as _models  # noqa: F401  (registers the residual block types DBP can remove)
from ..methods import dbp
from ._group import _NORM_TYPES, reduce_to_root

_D = dbp.DBPParams()

_SCORED = (nn.modules.conv._ConvNd, nn.Linear) + _NORM_TYPES
REDUCTIONS = ("mean", "max", "first")


class DBPPruner:
    """Remove whole blocks chosen by the discrimination of their outputs (DBP, depth pruning).

    The candidates (units whose input and output shapes match) are found when the pruner is
    built; :meth:`step` trains one linear probe per candidate output on ``data`` (backbone
    frozen), ranks the blocks by their gain in probe accuracy over the previous candidate, and
    replaces the least useful ones with ``nn.Identity`` until ``target`` is met. The model keeps
    its other module names, so its ``state_dict``, ``torch.fx`` tracing, ONNX export and any later
    Torch-Pruning width pruner work as before.

    It is a plain class, not a ``tp.pruner.BasePruner``: a base pruner builds a dependency graph
    and yields channel groups to prune, while DBP swaps modules, which would invalidate that graph.
    Build a width pruner (e.g. ``tp.pruner.MetaPruner``) on the model *after* :meth:`step`.

    Args:
        model: the network (pruned in place by :meth:`step`).
        example_inputs: a batch for the shape pass and MACs counting; a ``[B, C, H, W]`` tensor
            for latency targets (timed at batch 1 on the CPU).
        data: ``(inputs, labels)`` batches of held-out training data, e.g. a ``DataLoader``.
        target: ``{"blocks": n}``, ``{"macs": ratio}`` (dense / pruned MACs, Torch-Pruning's
            counter), ``{"latency": ratio}`` (measured batch-1 CPU latency), an int (blocks) or a
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
        latency_warmup, latency_repeats, latency_threads: how a latency target is timed
            (:func:`pfgdf_plugin.measure.paired_latency`: dense and pruned copies interleaved, medians).
        progress: show a progress bar while collecting features.
        latency_fn: ``(dense, pruned) -> (dense_ms, pruned_ms)`` to time a latency target with
            instead (e.g. another device's timer); the ``latency_*`` settings are then unused.

    Raises:
        DBPError: (a ``ValueError``) no removable block, a named candidate that changes the shape,
            and, from :meth:`step`, bad labels, an unreachable target or NaN/Inf weights (naming the
            layer); the model is unchanged then.

    After :meth:`step`: ``removed`` lists the removed block names (least useful first);
    ``report`` maps every candidate's name to ``{members, kind, position, macs, discrimination,
    probe_loss, reference, gain, loss_gain, rank, removed}``; ``result`` is the full
    :class:`~pfgdf_plugin.methods.dbp.DBPResult` (``result.plan.macs_ratio``,
    ``result.plan.latency_ratio``, ``result.plan.measurements``, ``result.info["baseline"]``).

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
                 latency_warmup: int = 5, latency_repeats: int = 30, latency_threads: Optional[int] = None,
                 progress: bool = False,
                 latency_fn: Optional[Callable[[nn.Module, nn.Module], Tuple[float, float]]] = None) -> None:
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
        self.model = model
        self.example_inputs = example_inputs
        self.data = data
        if self.target.kind == "latency" and latency_fn is None:
            latency_fn = measure.paired_latency(dbp.latency_input_shape(example_inputs), latency_warmup,
                                                latency_repeats, latency_threads)
        self.blocks: List[dbp.Block] = dbp.find_blocks(model, example_inputs, candidates, macs_fn=self._macs)
        self._options = dict(num_batches=num_batches, num_classes=num_classes, holdout=float(holdout),
                             seed=int(seed), weight_decay=float(weight_decay), max_iter=int(max_iter),
                             reference=reference, latency_fn=latency_fn, progress=progress)
        self.result: Optional[dbp.DBPResult] = None
        self.report: Dict[str, Dict[str, Any]] = {}
        self.removed: List[str] = []

    def _macs(self, model: nn.Module) -> float:
        return float(measure.count_macs(model, self.example_inputs))

    def step(self) -> None:
        """Score the candidates and replace the chosen blocks with ``nn.Identity`` (once)."""
        if self.result is not None:
            raise RuntimeError(f"DBPPruner.step() already removed {len(self.removed)} block(s); build a new "
                               "DBPPruner on the pruned model to remove more")
        self.result = dbp.prune_(self.model, self.example_inputs, self.data, self.target, blocks=self.blocks,
                                 macs_fn=self._macs, **self._options)
        self.report = self.result.report()
        self.removed = list(self.result.removed)


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
