"""PFGDF as an NNI 3.0 pruner: :class:`PFGDFPruner`.

The rule itself lives in :mod:`pfgdf_plugin.methods.pfgdf` (``layer_statistics`` scores a
layer, ``decide_group`` decides a layer or dependency group); this module only moves NNI's
target spaces (one per configured weight) into those functions and the resulting keep/prune
decisions back into NNI masks. It follows the structure of NNI's own ``_NormPruner``
(``nni/compression/pruning/basic_pruner.py``): ``_collect_data`` -> ``_calculate_metrics`` ->
``_generate_sparsity``, generated once by :meth:`PFGDFPruner.compress` or on a schedule when
fused with a training evaluator.

Two ways to choose how many filters a layer loses, per ``config_list`` entry:

* **PFGDF band** (entry has neither ``sparse_ratio`` nor ``sparse_threshold``): the layer loses
  the filters the Gaussian rule calls insignificant (``|s_i - mu| <= k*sigma`` by default),
  keeping at least ``min_channels`` and removing at most ``max_sparse_ratio`` of them. NNI's
  config schema accepts such an entry (every setting is optional), e.g.
  ``{"op_types": ["Conv2d"]}`` or ``{"op_types": ["Conv2d"], "max_sparse_ratio": 0.8}``.
* **NNI ratio / threshold** (entry has ``sparse_ratio`` or ``sparse_threshold``, optionally with
  ``dependency_group_id`` or ``global_group_id``): NNI's ``generate_sparsity`` masks the
  lowest-scoring filters, ranked by the PFGDF importance.

Entries sharing a ``dependency_group_id`` without a ratio (what
:func:`pfgdf_plugin.nni.dependency_config_list` adds for residual additions) get one band
decision on the group's mean importance (NNI fuses dependency metrics the same way), so coupled
layers lose the same channels and :func:`pfgdf_plugin.nni.speedup` can remove them.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from functools import reduce
from typing import Any, Dict, List, Literal, Optional, Tuple

import torch
from nni.compression.base.compressor import Compressor, Pruner
from nni.compression.base.target_space import PruningTargetSpace, TargetType
from nni.compression.base.wrapper import ModuleWrapper
from nni.compression.pruning.tools import active_sparse_targets_filter, generate_sparsity
from nni.compression.pruning.tools.sparse_gen import _expand_masks
from nni.compression.utils.evaluator import Evaluator

from ..meter import target_or_none
from ..methods import pfgdf
from ..methods.pfgdf import PFGDFParams
from ._common import copy_config, follow_aligned
from .budget import search_on_copies

_DATA = Dict[str, Dict[str, torch.Tensor]]

# PFGDF's own knobs: NNI's config schema rejects unknown keys, so they are constructor arguments.
_KNOBS = ("k", "statistic", "mode", "min_channels", "tail_threshold", "select")


def _knob(name: str, doc: str) -> property:
    """A read-only view of ``self.params.<name>``: the knobs live in one place."""
    return property(lambda self: getattr(self.params, name), doc=doc)


def _float_ratios(config_list: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """A deep copy of ``config_list`` with int ratios cast to float; PFGDF knobs refused."""
    return copy_config(config_list, _KNOBS, "PFGDFPruner(model, config_list, k=1.0, statistic='mean')")


def _is_ratio_target(ts: PruningTargetSpace) -> bool:
    return ts.sparse_ratio is not None or ts.sparse_threshold is not None


def _is_band_target(ts: PruningTargetSpace) -> bool:
    """A weight-like target the PFGDF band decides: a tensor, no ratio, not aligned to another."""
    return (ts.type is TargetType.PARAMETER and ts.target is not None and ts.align is None
            and not _is_ratio_target(ts))


class PFGDFPruner(Pruner):
    """Mask the filters PFGDF finds insignificant in their layer's Gaussian (NNI 3.0 pruner).

    For every configured weight (by default the output filters of ``Conv2d``/``Linear``), the
    importance of filter ``i`` is :func:`pfgdf_plugin.methods.pfgdf.importance`: with
    ``mode="band"`` the distance ``|s_i - mu| / sigma`` of its statistic ``s_i`` (mean weight by
    default) from the Gaussian fitted to the layer's filters; with ``mode="tail"`` the share of its
    weights outside the layer's ``mu +- k*sigma``. Smaller means pruned first, as NNI expects.

    How many filters go is decided per ``config_list`` entry:

    * no ``sparse_ratio`` / ``sparse_threshold`` (e.g. ``{"op_types": ["Conv2d"]}``): the PFGDF
      band. A layer loses what ``pfgdf.decide_group(scores, params, blocks, max_ratio)``
      chooses: the filters whose score is at most the band's threshold (``k``, or
      ``tail_threshold`` for ``mode="tail"``), keeping ``min_channels``; ``max_ratio`` is the
      entry's ``max_sparse_ratio`` (default 1.0) and ``blocks`` its ``internal_metric_block``.
      A layer whose filters all score 0 (zero variance) loses none. ``min_sparse_ratio`` is
      ignored here (the band sets the ratio). Entries sharing a ``dependency_group_id`` are
      decided together on their mean importance.
    * ``sparse_ratio`` / ``sparse_threshold`` (with ``dependency_group_id``, ``global_group_id``,
      ``min/max_sparse_ratio`` as NNI defines them): NNI's ``generate_sparsity`` on the PFGDF
      importance, i.e. a fixed ratio ranked by the Gaussian score.

    Biases (and any target with ``align``) follow their weight's mask as in NNI.

    Args:
        model: the model to prune; NNI wraps its configured modules until :meth:`unwrap_model`.
        config_list: NNI 3.0 config list. Int ratios are cast to float. PFGDF's knobs are not
            config keys (NNI's schema rejects unknown keys): pass them to the constructor.
        evaluator: optional NNI evaluator; with one, ``compress(max_steps, max_epochs)`` trains
            and regenerates masks every ``interval_steps`` optimizer steps (``-1``: never), up to
            ``total_times`` times, like NNI's norm pruners.
        existed_wrappers: used by :meth:`from_compressor`.
        k: band half-width in standard deviations (> 0).
        statistic: per-filter statistic for ``mode="band"``: ``"mean"``, ``"abs_mean"``, ``"l2"``.
        mode: ``"band"`` (reading A) or ``"tail"`` (reading B).
        min_channels: filters every band-decided layer keeps (>= 1).
        tail_threshold: ``mode="tail"`` cut-off (default ``erfc(k / sqrt 2)``).
        select: which filters a band-decided layer loses: ``"band"`` (the insignificant ones) or
            ``"l1"`` (as many, smallest L1 norm first, as NNI's ``L1NormPruner`` measures it).
        target: a budget instead of ``k``: ``{"latency": r}``, ``{"macs": r}`` or ``{"params": r}``
            (dense / pruned >= r). ``k`` is searched in ``[0.01, 8]`` on copies compressed by this
            pruner, sped up and measured (:func:`pfgdf_plugin.nni.budget.search_on_copies`);
            ``pruner.target_report`` holds the search (``None`` without a target).
        timing: how a latency target is timed (:class:`pfgdf_plugin.meter.Timing` or its fields).
        example_inputs: a batch, needed with a target (to speed up and measure copies).

    Raises:
        TargetError: a malformed or unreachable target, a target with ``k``, or a target without
            ``example_inputs`` (the model is then untouched).
        ValueError: a bad PFGDF parameter (``k must be > 0, got 0``), a PFGDF knob inside
            ``config_list``, a non-filter ``granularity``, an input/output target, a
            ``global_group_id`` without ``sparse_ratio``, or a dependency group mixing band and
            ratio entries.

    After :meth:`compress` (or :meth:`generate_masks`), ``pruner.decisions`` maps each scored
    layer name to ``dict(channels, pruned, ratio, mu, sigma, pruned_idxs, rule)`` where ``rule``
    is ``"band"`` or ``"nni"`` and ``mu``/``sigma`` are the fitted Gaussian (of the filter
    statistic for ``band`` mode, of all the layer's weights for ``tail`` mode).

    Example:
        >>> import torch
        >>> from pfgdf_plugin.models import build_model
        >>> from pfgdf_plugin.nni import PFGDFPruner, speedup
        >>> model = build_model("vgg16_bn", width=0.25)
        >>> pruner = PFGDFPruner(model, [{"op_types": ["Conv2d"]}], k=1.0)
        >>> _, masks = pruner.compress()
        >>> pruner.unwrap_model()
        >>> small = speedup(model, masks, torch.randn(2, 3, 32, 32))
        >>> sum(p.numel() for p in small.parameters()) < sum(
        ...     p.numel() for p in build_model("vgg16_bn", width=0.25).parameters())
        True
    """

    k = _knob("k", "band half-width in standard deviations")
    statistic = _knob("statistic", "per-filter statistic (``mode='band'``)")
    # not ``mode``: NNI's Compressor.mode is the compressor kind ('pruning')
    pfgdf_mode = _knob("mode", "PFGDF's ``band`` or ``tail``")
    min_channels = _knob("min_channels", "filters every band-decided layer keeps")
    tail_threshold = _knob("tail_threshold", "``mode='tail'`` cut-off (``None``: the Gaussian's own)")
    select = _knob("select", "which filters go once the band has set how many: ``band`` or ``l1``")

    def __init__(self, model: torch.nn.Module, config_list: List[Dict], evaluator: Evaluator | None = None,
                 existed_wrappers: Dict[str, ModuleWrapper] | None = None, *, k: Optional[float] = None,
                 statistic: str = PFGDFParams.statistic, mode: str = PFGDFParams.mode,
                 min_channels: int = PFGDFParams.min_channels,
                 tail_threshold: Optional[float] = PFGDFParams.tail_threshold, target: Any = None,
                 timing: Any = None, example_inputs: Any = None, select: str = PFGDFParams.select):
        # validate before NNI wraps the model, so a bad argument leaves the model untouched
        goal = target_or_none("PFGDFPruner", target, k=k)
        knobs = dict(statistic=statistic, mode=mode, min_channels=min_channels, tail_threshold=tail_threshold,
                     select=select)
        self.params = pfgdf.make_params(k=PFGDFParams.k if k is None else k, **knobs)
        config_list = _float_ratios(config_list)
        self.target_report: Optional[Dict[str, Any]] = None
        if goal is not None:
            self.target_report = search_on_copies(
                "PFGDFPruner", model, config_list, example_inputs, goal, timing,
                lambda net, config, knob: PFGDFPruner(net, config, k=knob, **knobs), 0.01, 8.0, knob_name="k")
            self.params = pfgdf.make_params(k=self.target_report["knob"], **knobs)
        self.decisions: Dict[str, Dict[str, Any]] = {}
        self._fits: Dict[Tuple[str, str], Tuple[float, float]] = {}
        self._norms: Dict[Tuple[str, str], torch.Tensor] = {}
        super().__init__(model, config_list, evaluator, existed_wrappers)
        try:
            self._check_targets()
        except Exception:
            self.unwrap_model()
            raise
        # Read by NNI's scheduled pruners and by the fused-compression trigger (as in _NormPruner).
        self.interval_steps = -1
        self.total_times: int | Literal["unlimited"] = 1
        self.first_step_gen = False

    @classmethod
    def from_compressor(cls, compressor: Compressor, new_config_list: List[Dict],
                        evaluator: Evaluator | None = None, **kwargs):
        """Build on another compressor's wrappers; ``kwargs`` are PFGDF's knobs (``k=...``)."""
        return super().from_compressor(compressor, new_config_list, evaluator=evaluator, **kwargs)

    # ------------------------------------------------------------------ checks

    def _iter_targets(self):
        for module_name, ts in self._target_spaces.items():
            for target_name, target_space in ts.items():
                yield module_name, target_name, target_space

    def _check_targets(self) -> None:
        dep_kinds: Dict[Any, set] = defaultdict(set)
        warned_min = False
        for module_name, target_name, ts in self._iter_targets():
            if ts.type is not TargetType.PARAMETER:
                raise ValueError(f"{module_name}.{target_name}: PFGDF scores weights; input/output "
                                 "targets are not supported")
            if ts.target is None or ts.align is not None:
                continue
            scored = _is_ratio_target(ts) or _is_band_target(ts)
            if not scored:
                continue
            self._metric_shape(module_name, target_name, ts, ts.target)
            if ts.global_group_id is not None and ts.sparse_ratio is None:
                raise ValueError(f"{module_name}.{target_name}: 'global_group_id' needs 'sparse_ratio' "
                                 "(the PFGDF band decides each layer on its own)")
            if ts.dependency_group_id is not None:
                dep_kinds[ts.dependency_group_id].add("ratio" if _is_ratio_target(ts) else "band")
            if _is_band_target(ts) and ts.min_sparse_ratio and not warned_min:
                warned_min = True
                warnings.warn("'min_sparse_ratio' is ignored by the PFGDF band (it sets each layer's "
                              "ratio); give 'sparse_ratio' to use NNI's ratio rule", UserWarning, stacklevel=3)
        for gid, kinds in dep_kinds.items():
            if len(kinds) > 1:
                raise ValueError(f"dependency group {gid!r} mixes entries with and without 'sparse_ratio'; "
                                 "give all of them a ratio, or none (PFGDF band)")

    def _metric_shape(self, module_name: str, target_name: str, ts: PruningTargetSpace,
                      target: torch.Tensor) -> torch.Size:
        """The shrunk shape NNI expects for this target's metric; it must hold one value per filter."""
        scaler = ts._scaler
        shape = None if scaler is None else scaler.shrink(target.detach(), keepdim=True).shape
        if shape is None or shape.numel() != target.shape[0] or shape[0] != target.shape[0]:
            raise ValueError(f"{module_name}.{target_name}: PFGDF scores whole output filters; leave "
                             f"'granularity' at 'default' or 'out_channel' (got {ts.granularity!r})")
        return shape

    # ------------------------------------------------------------------ NNI hooks

    def _collect_data(self) -> _DATA:
        data = active_sparse_targets_filter(self._target_spaces)
        for module_name, target_name, ts in self._iter_targets():
            if _is_band_target(ts):
                data[module_name][target_name] = ts.target.clone().detach()
        return data

    def _calculate_metrics(self, data: _DATA) -> _DATA:
        metrics: _DATA = defaultdict(dict)
        self._fits, self._norms = {}, {}
        for module_name, module_data in data.items():
            for target_name, weight in module_data.items():
                ts = self._target_spaces[module_name][target_name]
                shape = self._metric_shape(module_name, target_name, ts, weight)
                stats = pfgdf.layer_statistics(weight, self.params, layer=module_name)
                metrics[module_name][target_name] = stats.scores.float().to(weight.device).reshape(shape)
                if self.params.select == "l1":  # the L1 norm of each output filter (NNI's L1NormPruner metric)
                    self._norms[(module_name, target_name)] = pfgdf.filter_l1(weight, module_name)
                self._fits[(module_name, target_name)] = (stats.mu, stats.sigma, stats.statistic.float().tolist())
        return metrics

    def _generate_sparsity(self, metrics: _DATA) -> _DATA:
        ratio_ts: Dict[str, Dict[str, PruningTargetSpace]] = defaultdict(dict)
        ratio_metrics: _DATA = defaultdict(dict)
        band_groups: Dict[Any, List[Tuple[str, str, PruningTargetSpace]]] = defaultdict(list)
        for module_name, module_metrics in metrics.items():
            for target_name in module_metrics:
                ts = self._target_spaces[module_name][target_name]
                if _is_ratio_target(ts):
                    ratio_ts[module_name][target_name] = ts
                    ratio_metrics[module_name][target_name] = module_metrics[target_name]
                else:
                    key = ts.dependency_group_id if ts.dependency_group_id is not None else (module_name, target_name)
                    band_groups[key].append((module_name, target_name, ts))

        masks: _DATA = defaultdict(dict)
        rules: Dict[Tuple[str, str], str] = {}
        if ratio_ts:
            for module_name, module_masks in generate_sparsity(ratio_metrics, ratio_ts).items():
                for target_name, mask in module_masks.items():
                    masks[module_name][target_name] = mask
                    rules[(module_name, target_name)] = "nni"
        for group in band_groups.values():
            shrunk = self._band_mask(metrics, group)
            for module_name, target_name, ts in group:
                expanded = _expand_masks({module_name: {target_name: shrunk.clone()}},
                                         {module_name: {target_name: ts}})
                masks[module_name][target_name] = expanded[module_name][target_name]
                rules[(module_name, target_name)] = "band"

        follow_aligned(masks, self._target_spaces)  # biases follow their weights, as in NNI

        self._record(masks, rules)
        return masks

    def _band_mask(self, metrics: _DATA, group: List[Tuple[str, str, PruningTargetSpace]]) -> torch.Tensor:
        """One keep (1) / prune (0) vector in the metric's shape for a layer or dependency group."""
        first = metrics[group[0][0]][group[0][1]]
        flats = [metrics[m][t].reshape(-1) for m, t, _ in group]
        if any(f.numel() != flats[0].numel() for f in flats):
            names = ", ".join(f"{m}.{t}" for m, t, _ in group)
            raise ValueError(f"dependency group of {names} has layers of different widths")
        scores = reduce(torch.add, flats) / len(flats) if len(flats) > 1 else flats[0]
        blocks = reduce(math.lcm, [int(ts.internal_metric_block or 1) for _, _, ts in group], 1)
        max_ratio = min(float(ts.max_sparse_ratio) if ts.max_sparse_ratio else 1.0 for _, _, ts in group)
        # grouped convolutions: one decision shared by every block of channels (as Torch-Pruning does)
        norms = None
        if self.params.select == "l1":
            norms = reduce(torch.add, [self._norms[(m, t)].cpu() for m, t, _ in group]) / len(group)
        decision = pfgdf.decide_group(scores.cpu(), self.params, blocks, max_ratio, norms=norms)
        return decision.keep().to(dtype=first.dtype, device=first.device).reshape(first.shape)

    def _record(self, masks: _DATA, rules: Dict[Tuple[str, str], str]) -> None:
        self.decisions = {}
        order = {name: i for i, (name, _) in enumerate(self.bound_model.named_modules())}
        for (module_name, target_name), rule in sorted(rules.items(), key=lambda kv: (order.get(kv[0][0], -1), kv[0])):
            mask = masks[module_name][target_name]
            n = mask.shape[0]
            pruned = (mask.reshape(n, -1).abs().sum(1) == 0).nonzero().flatten().tolist()
            mu, sigma, stat = self._fits.get((module_name, target_name), (float("nan"), float("nan"), []))
            key = module_name if target_name == "weight" else f"{module_name}.{target_name}"
            self.decisions[key] = {"channels": n, "pruned": len(pruned), "ratio": len(pruned) / n if n else 0.0,
                                   "mu": mu, "sigma": sigma, "pruned_idxs": pruned, "rule": rule,
                                   "statistic": stat}

    # ------------------------------------------------------------------ compression loop (as _NormPruner)

    def _register_trigger(self, evaluator: Evaluator) -> None:
        self._current_step = 0
        self._is_first_step = True
        self._remaining_times = self.total_times

        def optimizer_task():
            self._current_step += 1
            if (self._is_first_step and self.first_step_gen) or self._current_step == self.interval_steps:
                self.update_masks(self.generate_masks())
                if isinstance(self._remaining_times, int):
                    self._remaining_times -= 1
            if self._current_step == self.interval_steps and \
                    (self._remaining_times == "unlimited" or self._remaining_times > 0):  # type: ignore[operator]
                self._current_step = 0
            if self._is_first_step:
                self._is_first_step = False

        evaluator.patch_optimizer_step(before_step_tasks=[], after_step_tasks=[optimizer_task])

    def _single_compress(self, max_steps: int | None, max_epochs: int | None) -> None:
        if max_steps is not None or max_epochs is not None:
            raise ValueError(f"{type(self).__name__} is data-free: without fused compressors, call "
                             "compress() with no max_steps/max_epochs")
        self.update_masks(self.generate_masks())

    def _fuse_preprocess(self, evaluator: Evaluator) -> None:
        self._register_trigger(evaluator)

    def _fuse_postprocess(self, evaluator: Evaluator) -> None:
        pass

    def compress(self, max_steps: int | None = None, max_epochs: int | None = None):
        """Generate the masks; returns ``(model, masks)`` with masks ``{module: {target: tensor}}``.

        The model stays wrapped (masks applied on the fly); call :meth:`unwrap_model` before
        :func:`pfgdf_plugin.nni.speedup`.
        """
        return super().compress(max_steps, max_epochs)
