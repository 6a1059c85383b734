"""MPDCompress as an NNI 3.0 pruner: :class:`MPDPruner`, and :func:`convert` to block-diagonal layers.

The plans, masks and conversion live in :mod:`pfgdf_plugin.methods.mpd`; this module writes a
plan's mask into NNI's wrapper of each configured weight, keeps the stored masked weights at
zero while the evaluator trains, and hands the final masks to the same conversion the
Torch-Pruning adapter uses.

How the masks act, in NNI's terms: NNI's ``ModuleWrapper`` hands the module ``weight * mask``
on every forward pass (``apply_method='mul'``, the only one accepted), so a masked weight is
zero in the forward pass and its stored value gets a zero gradient. The pruner also multiplies
the stored weights by their masks after every optimizer step of a training run it drives, so
momentum or weight decay cannot move them: ``unwrap_model()`` then restores weights that are
already block-diagonal.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from nni.compression.base.compressor import Compressor, Pruner
from nni.compression.base.target_space import PruningTargetSpace
from nni.compression.base.wrapper import ModuleWrapper
from nni.compression.utils.evaluator import Evaluator

from ..errors import TargetError
from ..graph import find_fold_links
from ..meter import meet_target, target_or_none
from ..methods import mpd
from ..methods.mpd import BlockPlan, MPDError
from ._common import copy_config, settings, weight_targets

_DATA = Dict[str, Dict[str, torch.Tensor]]
_KNOBS = ("blocks", "compression", "permutation", "seed", "round_to")
_USAGE = "MPDPruner(model, config_list, evaluator, blocks=4) or MPDPruner(..., compression=10.0)"


def blocks_for_ratio(sparse_ratio: float) -> int:
    """Blocks whose mask keeps ``1 - sparse_ratio`` of a layer: ``round(1 / (1 - sparse_ratio))``.

    Example:
        >>> blocks_for_ratio(0.9), blocks_for_ratio(0.75), blocks_for_ratio(0.7)
        (10, 4, 3)
    """
    if isinstance(sparse_ratio, bool) or not isinstance(sparse_ratio, (int, float)) \
            or not 0.0 <= sparse_ratio < 1.0:
        raise MPDError(f"sparse_ratio must be in [0, 1), got {sparse_ratio!r}")
    return max(1, int(round(1.0 / (1.0 - float(sparse_ratio)))))


def _checked_config(config_list: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    out = copy_config(config_list, _KNOBS, _USAGE)
    for i, entry in enumerate(out):
        for key in ("sparse_threshold", "global_group_id", "dependency_group_id", "internal_metric_block"):
            if any(key in s for s in settings(entry)):
                raise MPDError(f"config_list[{i}] has {key!r}: MPD sets each layer's blocks itself; give "
                               "'sparse_ratio' (blocks = round(1 / (1 - sparse_ratio))) or blocks=/compression=")
    return out


class MPDPruner(Pruner):
    """MPDCompress's permuted block-diagonal masks as an NNI 3.0 pruner.

    Every configured ``Linear``/``Conv2d`` weight gets a :class:`~pfgdf_plugin.methods.mpd.BlockPlan`
    and the weight-shaped (fine-grained) mask ``M = P . blockdiag(ones) . Q``. A layer's block
    count ``c`` is, in this order (:func:`~pfgdf_plugin.methods.mpd.choose_layers`, the layer
    choice the Torch-Pruning adapter uses too): ``blocks`` (an int for every configured layer,
    or ``{module name: c}``), or chosen by ``compression`` over the configured layers
    (:func:`~pfgdf_plugin.methods.mpd.choose_blocks`), or the entry's ``sparse_ratio`` as
    ``c = round(1 / (1 - sparse_ratio))`` (0.9 -> 10 blocks, density 1/c). With neither
    ``blocks`` nor ``compression``, the layers whose entry has no ``sparse_ratio`` share
    :class:`~pfgdf_plugin.methods.mpd.MPDParams`'s default ``compression`` (10.0); with a
    ``blocks`` mapping, a configured layer it does not name needs a ``sparse_ratio``.

    ``compress()`` without a training budget writes the masks (one shot). With an evaluator and
    ``compress(max_steps, max_epochs)`` it trains through the evaluator with the masks on, and
    re-zeroes the stored masked weights after every optimizer step. Fused with other
    compressors (``QATQuantizer.from_compressor(pruner, ...)``) the fused compressor drives the
    training and this pruner keeps its masks applied in that loop.

    Scheduled pruning: like NNI's norm pruners the pruner has ``interval_steps`` and
    ``total_times``, so ``LinearPruner``/``AGPPruner`` can drive it. The schedule moves each
    entry's ``sparse_ratio`` from 0 to its goal; the pruner then masks the same share of the
    layer's off-block weights (in a fixed, seeded random order, so each mask contains the
    next), and at the goal the mask is exactly the block-diagonal one. Entries without a
    ``sparse_ratio`` are masked fully from the start. ``c`` never changes during a schedule.

    Args:
        model: the model; NNI wraps its configured modules until :meth:`unwrap_model`.
        config_list: NNI 3.0 config list selecting ``Linear``/``Conv2d`` layers (``op_types``,
            ``op_names``, ``exclude_*``), optionally with ``sparse_ratio`` (cast to float).
            ``sparse_threshold``, ``global_group_id``, ``dependency_group_id`` and
            ``internal_metric_block`` are refused, and so are ``apply_method`` other than
            ``'mul'`` and a ``granularity`` other than ``'default'``.
        evaluator: an NNI evaluator, needed only to train (or fuse).
        existed_wrappers: used by :meth:`from_compressor`.
        blocks, compression: see above (at most one of them).
        permutation: ``"random"`` (the paper) or ``"magnitude"`` (from the current weights).
        seed: seeds every layer's permutations (with the module name).
        round_to: block sizes in units of this many channels.

    Raises:
        MPDError: bad knobs (every problem at once, as :class:`~pfgdf_plugin.methods.mpd.MPDParams`
            lists them), a layer without a block count, ``c`` above a layer's ``min(out, in)``,
            a grouped/depthwise convolution, a refused config key.

    Example:
        >>> from pfgdf_plugin.models import build_model
        >>> model = build_model("lenet300", in_channels=1, image_size=32)
        >>> pruner = MPDPruner(model, [{"op_names": ["fc1", "fc2"], "sparse_ratio": 0.9}])
        >>> _, masks = pruner.compress()
        >>> round(float(masks["fc1"]["weight"].mean()), 3), round(float(masks["fc2"]["weight"].mean()), 3)
        (0.1, 0.1)
        >>> pruner.unwrap_model()
        >>> report = convert(model, pruner, torch.randn(2, 1, 32, 32))
        >>> type(model.fc1).__name__, report["folded"]
        ('BlockDiagonalLinear', ['fc1 -> fc2'])
    """

    def __init__(self, model: nn.Module, config_list: List[Dict], evaluator: Optional[Evaluator] = None,
                 existed_wrappers: Optional[Dict[str, ModuleWrapper]] = None, *,
                 blocks: Union[int, Mapping[str, int], None] = None, compression: Optional[float] = None,
                 permutation: str = "random", seed: int = 0, round_to: Optional[int] = None, target: Any = None,
                 timing: Any = None, example_inputs: Any = None) -> None:
        # validate before NNI wraps the model, so a bad argument leaves the model untouched
        goal = target_or_none("MPDPruner", target, compression=compression, blocks=blocks)
        self.target_report: Optional[Dict[str, Any]] = None
        if goal is not None:
            self.target_report = _search_blocks(model, config_list, example_inputs, goal, timing,
                                                dict(permutation=permutation, seed=seed, round_to=round_to))
            blocks = self.target_report["knob"]
        params, layer_blocks = mpd.pruner_params(compression, blocks, permutation=permutation, seed=seed,
                                                 round_to=round_to)
        self.round_to = mpd.check_round_to(round_to)
        config_list = _checked_config(config_list)
        self.blocks = params.blocks if layer_blocks is None else layer_blocks
        self.compression, self.permutation, self.seed = compression, permutation, int(seed)
        self.plans: Dict[str, BlockPlan] = {}
        self._goals: Dict[str, Optional[float]] = {}
        self._priority: Dict[str, torch.Tensor] = {}
        super().__init__(model, config_list, evaluator, existed_wrappers)
        # read by NNI's scheduled pruners (LinearPruner, AGPPruner), as for its norm pruners
        self.interval_steps: int = -1
        self.total_times: Union[int, str] = 1
        try:
            self._build_plans()
        except Exception:
            self.unwrap_model()
            raise

    @classmethod
    def from_compressor(cls, compressor: Compressor, new_config_list: List[Dict], evaluator: Optional[Evaluator] = None,
                        *, blocks: Union[int, Mapping[str, int], None] = None, compression: Optional[float] = None,
                        permutation: str = "random", seed: int = 0, round_to: Optional[int] = None):
        """Build on another compressor's wrappers and evaluator (NNI's fusion)."""
        return super().from_compressor(compressor, new_config_list, evaluator=evaluator, blocks=blocks,
                                       compression=compression, permutation=permutation, seed=seed, round_to=round_to)

    def _set_default_sparse_granularity(self, target_space: PruningTargetSpace):
        return None  # fine-grained: a mask has the weight's shape

    # ------------------------------------------------------------------ set-up
    def _weight_targets(self):
        for module_name, target_name, target_space in weight_targets(self, "MPD", MPDError):
            if target_name != "weight":
                raise MPDError(f"{module_name}.{target_name}: MPD masks the 'weight' of Linear/Conv2d layers; "
                               f"drop {target_name!r} from target_names")
            if target_space.apply_method != "mul":
                raise MPDError(f"{module_name}.weight: MPD needs apply_method 'mul', got "
                               f"{target_space.apply_method!r}")
            if target_space.granularity not in (None, "default"):
                raise MPDError(f"{module_name}.weight: MPD masks are fine-grained; leave 'granularity' at "
                               f"'default', got {target_space.granularity!r}")
            yield module_name, target_space

    def _build_plans(self) -> None:
        """A plan per configured layer, in the model's order, with its block count from
        :func:`~pfgdf_plugin.methods.mpd.choose_layers` (the entries' ``sparse_ratio`` as the
        fallback); each layer is planned before the next one's count is checked."""
        targets = dict(self._weight_targets())
        modules = {name: self._module_wrappers[name].module for name in targets}
        self._goals = {name: None if ts.sparse_ratio is None else float(ts.sparse_ratio)
                       for name, ts in targets.items()}
        ratios_used = self.compression is None and (self.blocks is None or isinstance(self.blocks, Mapping))
        fallback = {name: blocks_for_ratio(goal) for name, goal in self._goals.items()
                    if goal is not None and ratios_used}
        counts = mpd.iter_layers(modules, self.compression, self.blocks, round_to=self.round_to, model_wide=False,
                                 fallback=fallback)
        for name, c in counts:
            plan = mpd.make_plan(name, targets[name].target.detach(), c, self.permutation, self.seed, self.round_to)
            self.plans[name] = plan
            gen = mpd.layer_generator(name, self.seed + 1)
            self._priority[name] = torch.rand(plan.weight_shape, generator=gen, dtype=torch.float64)
        missing = [name for name in targets if name not in self.plans]
        if missing:
            raise MPDError(f"{missing[0]}: no block count; give the config entry a 'sparse_ratio' or the pruner "
                           f"blocks= for it ({_USAGE})")

    # ------------------------------------------------------------------ NNI hooks
    def _collect_data(self) -> _DATA:
        return {name: {"weight": self._target_spaces[name]["weight"].target.detach()} for name in self.plans}

    def _calculate_metrics(self, data: _DATA) -> _DATA:
        """Weight-shaped: ``inf`` inside the blocks (never masked), a fixed random order outside."""
        metrics: _DATA = defaultdict(dict)
        for name in data:
            plan = self.plans[name]
            keep = plan.mask(torch.bool)
            metrics[name]["weight"] = torch.where(keep, torch.full_like(self._priority[name], math.inf),
                                                  self._priority[name])
        return metrics

    def progress(self, name: str) -> float:
        """Share of the off-block weights masked now: ``sparse_ratio / goal`` under a schedule, else 1."""
        goal = self._goals.get(name)
        ratio = self._target_spaces[name]["weight"].sparse_ratio
        if not goal or ratio is None:
            return 1.0
        return min(max(float(ratio) / goal, 0.0), 1.0)

    def _generate_sparsity(self, metrics: _DATA) -> _DATA:
        masks: _DATA = defaultdict(dict)
        for name, targets in metrics.items():
            metric = targets["weight"]
            n_off = int(torch.isfinite(metric).sum())
            k = int(round(self.progress(name) * n_off))
            weight = self._target_spaces[name]["weight"].target
            mask = torch.ones(metric.numel(), dtype=weight.dtype)
            if k:
                mask[torch.argsort(metric.reshape(-1), stable=True)[:k]] = 0
            masks[name]["weight"] = mask.reshape(metric.shape).to(weight.device)
            bias_ts = self._target_spaces[name].get("bias")
            if bias_ts is not None and bias_ts.target is not None:
                masks[name]["bias"] = torch.ones_like(bias_ts.target.detach())
        return masks

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Multiply the stored (wrapped) weights by their current masks, in place."""
        for name in self.plans:
            ts = self._target_spaces[name]["weight"]
            if ts.mask is not None:
                ts.target.mul_(ts.mask.to(ts.target))

    @torch.no_grad()
    def init_blocks(self) -> Dict[str, torch.Tensor]:
        """Rescale every configured layer's stored weight for its blocks' fan-in, in place (row ``o``
        times ``sqrt(fan-in / kept fan-in)`` of its block-diagonal mask,
        :func:`~pfgdf_plugin.methods.mpd.block_init_`); for masked training from a fresh
        initialisation. Returns ``{module name: per-row scale}``.

        Example:
            >>> from pfgdf_plugin.models import build_model
            >>> pruner = MPDPruner(build_model("lenet300", in_channels=1, image_size=28), [{"op_names": ["fc1"]}],
            ...                    blocks=4)
            >>> round(float(pruner.init_blocks()["fc1"].mean()), 2)
            2.0
            >>> pruner.unwrap_model()
        """
        scales = {}
        for name, plan in self.plans.items():
            target = self._target_spaces[name]["weight"].target
            scales[name] = mpd.block_init_(target, plan.mask(target.dtype, target.device))
        return scales

    def _refresh(self) -> None:
        self.update_masks(self.generate_masks())
        self.apply_masks()

    def _register_trigger(self, evaluator: Evaluator) -> None:
        self._current_step = 0
        self._remaining_times = self.total_times

        def optimizer_task():
            self._current_step += 1
            if self._current_step == self.interval_steps:
                self.update_masks(self.generate_masks())
                if isinstance(self._remaining_times, int):
                    self._remaining_times -= 1
                if self._remaining_times == "unlimited" or self._remaining_times > 0:
                    self._current_step = 0
            self.apply_masks()

        evaluator.patch_optimizer_step(before_step_tasks=[], after_step_tasks=[optimizer_task])

    def _single_compress(self, max_steps: Optional[int], max_epochs: Optional[int]) -> None:
        if max_steps is None and max_epochs is None:
            self._refresh()
            return
        if self.evaluator is None:
            raise MPDError("MPDPruner.compress(max_steps, max_epochs) trains through an evaluator: build the pruner "
                           "with one, e.g. TorchEvaluator(training_func, nni.trace(torch.optim.SGD)(...), "
                           "training_step), or call compress() for the masks alone")
        self._fusion_compress(max_steps, max_epochs)

    def _fuse_preprocess(self, evaluator: Evaluator) -> None:
        self._refresh()
        self._register_trigger(evaluator)

    def _fuse_postprocess(self, evaluator: Evaluator) -> None:
        self.apply_masks()

    def compress(self, max_steps: Optional[int] = None, max_epochs: Optional[int] = None):
        """Write the masks (and train through the evaluator when given a budget); returns ``(model, masks)``."""
        return super().compress(max_steps, max_epochs)

    # ------------------------------------------------------------------ queries
    def summary(self) -> Dict[str, Any]:
        """Per masked layer ``blocks``, ``dense``, ``kept``, ``compression``, and the total ``compression``
        (:func:`~pfgdf_plugin.methods.mpd.plan_summary`)."""
        return mpd.plan_summary(self.plans)


def _search_blocks(model: nn.Module, config_list: List[Dict], example_inputs: Any, goal, timing: Any,
                   options: Dict[str, Any]) -> Dict[str, Any]:
    """The least block count (one for every configured layer) whose converted copy meets ``goal``."""
    import copy

    if example_inputs is None:
        raise TargetError("MPDPruner: a target needs example_inputs (a batch to convert and measure copies)")
    probe = MPDPruner(copy.deepcopy(model), [dict(e) for e in config_list], blocks=1, **options)
    round_to = mpd.check_round_to(options["round_to"])
    caps = {n: mpd.max_blocks(p.weight_shape[0], p.weight_shape[1], round_to) for n, p in probe.plans.items()}
    if not caps or min(caps.values()) < 2:
        thin = min(caps, key=caps.get) if caps else "none"
        raise TargetError(f"target {goal.describe()} cannot be reached: layer {thin!r} takes one block at most; "
                          "exclude it from config_list")

    def prune_copy(candidate: nn.Module, c: float) -> nn.Module:
        pruner = MPDPruner(candidate, [dict(e) for e in config_list], blocks=int(c), **options)
        pruner.compress()
        pruner.unwrap_model()
        convert(candidate, pruner, example_inputs)
        return candidate

    return meet_target(model, example_inputs, goal, prune_copy, 1, min(caps.values()), integer=True,
                       knob_name="blocks", timing=timing).report()


def convert(model: nn.Module, masks_or_pruner: Union[Pruner, Mapping[str, Mapping[str, torch.Tensor]]],
            example_inputs: Any = None, fold: bool = True, kernel: str = "block") -> Dict[str, Any]:
    """Turn an (unwrapped) MPD-masked model into block-diagonal layers, in place.

    Each ``weight`` mask that is not all ones must be a permuted block-diagonal mask (its plan
    is recovered with :func:`~pfgdf_plugin.methods.mpd.plan_from_mask`); the layer's weight is
    multiplied by the mask (NNI's masked model) and converted with
    :func:`~pfgdf_plugin.methods.mpd.convert_model`, the conversion the Torch-Pruning adapter
    uses. A ``bias`` mask, if any, is applied to the bias first.

    Args:
        model: the model after ``pruner.unwrap_model()`` (or the fused quantizer's).
        masks_or_pruner: NNI masks ``{module name: {target name: mask}}``, or a pruner whose
            ``get_masks()`` to use.
        example_inputs: an input batch, needed when ``fold`` (for Torch-Pruning's dependency
            graph).
        fold: fold adjacent permutations (see :func:`pfgdf_plugin.graph.find_fold_links`).
        kernel: how each converted layer runs (see :func:`~pfgdf_plugin.methods.mpd.convert_model`).

    Returns:
        The conversion report (:func:`~pfgdf_plugin.methods.mpd.summarize` plus ``folded``).

    Raises:
        MPDError: a mask that is not block-diagonal after permutation (naming the layer), a
            mask on a layer other than ``Linear``/``Conv2d``.
        RuntimeError: the model is still wrapped by NNI.
    """
    if any(hasattr(m, "_nni_wrapper") for m in model.modules()):
        raise RuntimeError("the model is still wrapped by NNI: call pruner.unwrap_model() (after fusion, the last "
                           "compressor's unwrap_model()) before convert()")
    masks = masks_or_pruner.get_masks() if isinstance(masks_or_pruner, Pruner) else masks_or_pruner
    plans: Dict[str, BlockPlan] = {}
    bias_masks: List[Tuple[nn.Module, torch.Tensor]] = []
    for name, targets in masks.items():
        mask = (targets or {}).get("weight")
        if mask is None:
            continue
        module = model.get_submodule(name)
        mpd.check_layer(name, module)
        if bool((mask != 0).all()):
            continue
        plans[name] = mpd.plan_from_mask(name, mask)
        bias_mask = targets.get("bias")
        if bias_mask is not None and module.bias is not None and not bool((bias_mask != 0).all()):
            bias_masks.append((module, bias_mask))
    links = []
    if fold and plans:
        if example_inputs is None:
            raise ValueError("convert(..., fold=True) needs example_inputs to build the dependency graph; pass an "
                             "input batch or fold=False")
        links = find_fold_links(model, example_inputs)
    with torch.no_grad():
        for module, bias_mask in bias_masks:
            module.bias.mul_(bias_mask.to(module.bias))
    return mpd.convert_model(model, plans, links, strict=False, kernel=kernel)


__all__ = ["MPDPruner", "blocks_for_ratio", "convert"]
