"""MPDCompress with Torch-Pruning: :class:`MPDPruner`.

The layer choice, plans, masks and conversion live in :mod:`pfgdf_plugin.methods.mpd`. This
module holds the masks on a model while it trains (zeroed weights, masked gradients, re-applied
after every optimizer step), and uses Torch-Pruning's dependency graph
(:mod:`pfgdf_plugin.graph`, shared with the NNI adapter and re-exported here) for what the
graph knows: which permutations may be folded into a neighbour
(:func:`~pfgdf_plugin.graph.find_fold_links`) and which layers produce the model's output.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..graph import CHANNELWISE_OPS, build_graph, find_fold_links, output_layers
from ..errors import TargetError
from ..meter import meet_target, target_or_none
from ..methods import mpd
from ..methods.mpd import BlockPlan, FoldLink, MPDError
from ._group import check_pruner_inputs, graph_building


class MPDPruner:
    """MPDCompress on a model: block-diagonal masks while training, then block-diagonal layers.

    On construction the pruner picks each targeted layer's blocks (``blocks`` or
    ``compression``, see :func:`pfgdf_plugin.methods.mpd.choose_layers`) and permutations
    (:func:`pfgdf_plugin.methods.mpd.make_plan`), zeroes the masked weights in place and hooks
    every masked weight's gradient (``grad * mask``). With SGD (momentum, weight decay) and
    Adam/AdamW a masked weight then stays exactly zero; :meth:`update` (call it after
    ``optimizer.step()``, or :meth:`attach` the optimizer once) re-applies the masks anyway,
    which keeps them exact under any optimizer. :meth:`step` converts the model in place:
    ``Linear`` -> :class:`~pfgdf_plugin.modules.BlockDiagonalLinear`, ``Conv2d`` ->
    :class:`~pfgdf_plugin.modules.PermutedGroupConv2d`, with adjacent permutations folded
    (``fold=True``) where the dependency graph shows it is safe (:func:`find_fold_links`).

    Args:
        model: the network (modified in place).
        example_inputs: an input batch, for the dependency graph.
        compression: target ratio of dense to kept weights over the targeted layers (>= 1);
            with neither ``compression`` nor ``blocks``, 10.0
            (:class:`~pfgdf_plugin.methods.mpd.MPDParams`'s default).
        blocks: ``c`` for every targeted layer (int), or ``{layer name: c}`` (only those layers;
            a classifier may be named).
        permutation: ``"random"`` (the paper) or ``"magnitude"`` (blocks that keep the most
            ``|W|`` of the current, e.g. trained, weights).
        ignored_layers: modules or names to leave dense.
        seed: seeds every layer's permutations (with the layer's name).
        round_to: block sizes in units of this many channels (``None`` = 1).
        fold: fold adjacent permutations in :meth:`step`.
        dense_output: with ``compression`` or an int ``blocks``, leave the layers producing the
            model's output (the classifier) dense. In those two modes grouped/depthwise
            convolutions and the output projections of ``nn.MultiheadAttention`` are left
            dense too, with a warning.
        kernel: how :meth:`step` runs each converted layer (``block``, ``auto``, ``dense``,
            ``bmm``, ``grouped``; see :func:`pfgdf_plugin.methods.mpd.convert_model`).
        target: a budget instead of ``compression`` / ``blocks``: ``{"latency": r}``,
            ``{"macs": r}`` or ``{"params": r}`` (dense / pruned >= r). One block count for every
            masked layer is searched (bisection from 1 to the smallest :func:`~pfgdf_plugin.methods.mpd.max_blocks`
            of those layers), measuring converted copies; ``pruner.target_report`` holds the
            search (``None`` without a target). Ignore thin layers (a 3-channel stem) to allow
            more blocks.
        timing: how a latency target is timed (:class:`pfgdf_plugin.meter.Timing` or its fields).

    Raises:
        TargetError: a malformed or unreachable target, or a target together with ``compression``
            or ``blocks`` (the model is then untouched).
        MPDError: both targets, ``blocks < 1``, ``blocks`` above a layer's ``min(out, in)``, a
            grouped/depthwise convolution named in ``blocks``, an unknown layer name (in
            ``blocks`` or ``ignored_layers``), no layer to mask, a bad
            ``permutation``/``compression``/``round_to``/``seed``/``fold``/``dense_output``
            (every problem of the arguments at once, as :class:`~pfgdf_plugin.methods.mpd.MPDParams`
            lists them).

    Attributes:
        plans: ``{layer name: BlockPlan}`` of the masked layers.
        links: the fold links found (used by :meth:`step` when ``fold``).
        converted: ``True`` after :meth:`step`.
        report: :meth:`step`'s report (``None`` before).

    Example:
        >>> from pfgdf_plugin.models import build_model
        >>> model = build_model("lenet300", in_channels=1, image_size=32)
        >>> pruner = MPDPruner(model, torch.randn(1, 1, 32, 32), compression=10.0)
        >>> {n: s["blocks"] for n, s in pruner.summary()["layers"].items()}
        {'fc1': 10, 'fc2': 10}
        >>> report = pruner.step()
        >>> type(model.fc1).__name__, round(report["compression"], 1), report["folded"]
        ('BlockDiagonalLinear', 10.0, ['fc1 -> fc2'])
    """

    def __init__(self, model: nn.Module, example_inputs: Any, compression: Optional[float] = None,
                 blocks: Union[int, Mapping[str, int], None] = None, permutation: str = "random",
                 ignored_layers: Optional[Sequence[Union[nn.Module, str]]] = None, seed: int = 0,
                 round_to: Optional[int] = None, fold: bool = True, dense_output: bool = True,
                 kernel: str = "block", target: Any = None, timing: Any = None) -> None:
        goal = target_or_none("MPDPruner", target, compression=compression, blocks=blocks)
        options = dict(permutation=permutation, seed=seed, round_to=round_to, fold=fold, dense_output=dense_output,
                       kernel=kernel)
        self.params, layer_blocks = mpd.pruner_params(compression, blocks, **options)
        named = dict(model.named_modules())
        ignored: List[str] = []
        for item in ignored_layers or ():
            found = [item] if isinstance(item, str) else [n for n, m in named.items() if m is item]
            if not found:
                raise MPDError(f"ignored_layers holds a {type(item).__name__} that is not a module of the model")
            ignored += found
        check_pruner_inputs(model, example_inputs, None, MPDError, "MPDPruner")
        self.target_report: Optional[Dict[str, Any]] = None
        if goal is not None:
            self.target_report = _search_blocks(model, example_inputs, goal, timing, ignored, options)
            self.params, layer_blocks = mpd.pruner_params(None, self.target_report["knob"], **options)
        self.model, self.seed, self.permutation = model, int(seed), permutation
        self.round_to, self.fold, self.compression = mpd.check_round_to(round_to), fold, self.params.compression
        with graph_building(model, MPDError, "MPDPruner"):
            self.graph = build_graph(model, example_inputs)
        chosen = mpd.choose_layers(named, self.params.compression, self.params.blocks if layer_blocks is None
                                   else layer_blocks, ignored=ignored, output_layers=output_layers(model, self.graph),
                                   dense_output=dense_output, round_to=self.round_to)
        self.plans: Dict[str, BlockPlan] = {}
        self.dense_layers: List[str] = [n for n, c in chosen.items() if c == 1]
        for name, c in chosen.items():
            if c > 1:
                self.plans[name] = mpd.make_plan(name, named[name].weight, c, permutation, self.seed, self.round_to)
        self.links: List[FoldLink] = find_fold_links(model, names=None, graph=self.graph) \
            if self.fold else []
        self._masks: Dict[str, torch.Tensor] = {}
        self._handles: list = []
        self.converted = False
        self.report: Optional[Dict[str, Any]] = None
        self._install()

    # ------------------------------------------------------------------ set-up
    def _install(self) -> None:
        for name, plan in self.plans.items():
            weight = self.model.get_submodule(name).weight
            self._masks[name] = plan.mask(weight.dtype, weight.device)
            self._handles.append(weight.register_hook(self._grad_hook(name)))
        self.apply_masks()

    def _grad_hook(self, name: str):
        masks = self._masks

        def hook(grad):
            mask = masks[name]
            if mask.device != grad.device or mask.dtype != grad.dtype:
                mask = masks[name] = mask.to(grad)
            return grad * mask

        return hook

    # ------------------------------------------------------------------ training-loop API
    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every masked weight (in place)."""
        if self.converted:
            raise RuntimeError("MPDPruner.apply_masks() after step(): the model is already converted")
        for name in self.plans:
            weight = self.model.get_submodule(name).weight
            mask = self._masks[name]
            if mask.device != weight.device or mask.dtype != weight.dtype:
                mask = self._masks[name] = mask.to(weight)
            weight.mul_(mask)

    def update(self) -> None:
        """Re-apply the masks; call it after every ``optimizer.step()`` (or use :meth:`attach`)."""
        self.apply_masks()

    def attach(self, optimizer: torch.optim.Optimizer):
        """Re-apply the masks after every ``optimizer.step()``; returns the hook handle."""
        handle = optimizer.register_step_post_hook(lambda *args, **kwargs: self.update())
        self._handles.append(handle)
        return handle

    @torch.no_grad()
    def init_blocks(self) -> Dict[str, torch.Tensor]:
        """Rescale every masked layer's kept weights for its blocks' fan-in, in place: row ``o`` is
        multiplied by ``sqrt(fan-in / kept fan-in)`` (:func:`~pfgdf_plugin.methods.mpd.block_init_`).

        For masked training from scratch: call it on a freshly initialised model, before training,
        so each block starts at the scale the initialiser gives a layer of the block's size
        (without it, a layer with ``c`` blocks starts with pre-activations about ``sqrt(c)``
        times smaller than a dense layer's). Returns ``{layer name: per-row scale}``.

        Example:
            >>> from pfgdf_plugin.models import build_model
            >>> pruner = MPDPruner(build_model("lenet300", in_channels=1, image_size=28), torch.randn(1, 1, 28, 28),
            ...                    blocks=4)
            >>> sorted(round(float(s.mean()), 2) for s in pruner.init_blocks().values())
            [2.0, 2.0]
        """
        if self.converted:
            raise RuntimeError("MPDPruner.init_blocks() after step(): the model is already converted")
        self.apply_masks()
        return {name: mpd.block_init_(self.model.get_submodule(name).weight, self._masks[name])
                for name in self.plans}

    def masks(self) -> Dict[str, torch.Tensor]:
        """``{layer name: weight-shaped mask}`` (copies; 1 = kept)."""
        return {name: m.clone() for name, m in self._masks.items()}

    def summary(self) -> Dict[str, Any]:
        """The plan: per masked layer ``blocks``, ``dense``, ``kept``, ``compression``; totals over
        the masked layers (``compression``) and over every Linear/Conv2d of the model
        (``model_compression``, dense layers counted as kept); see
        :func:`~pfgdf_plugin.methods.mpd.plan_summary`."""
        return mpd.plan_summary(self.plans, self.model)

    # ------------------------------------------------------------------ conversion
    def step(self) -> Dict[str, Any]:
        """Convert the masked layers to block-diagonal form, in place, and drop the hooks.

        Every layer is checked first: a weight that is non-zero outside its mask raises
        :class:`~pfgdf_plugin.methods.mpd.MPDError` naming the layer, and the model is left as
        it was. Parameters are replaced: build a new optimizer to fine-tune.

        Returns:
            :func:`pfgdf_plugin.methods.mpd.summarize` of the converted layers (``dense``,
            ``kept`` effective weights, ``stored`` with padding, ``compression``) plus
            ``folded`` (the folds made) and ``dense_layers`` (targeted layers left dense).
        """
        if self.converted:
            warnings.warn("MPDPruner.step() was already called; nothing left to convert", stacklevel=2)
            return self.report
        report = mpd.convert_model(self.model, self.plans, self.links if self.fold else (), strict=True,
                                   kernel=self.params.kernel)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.converted = True
        report["dense_layers"] = list(self.dense_layers)
        self.report = report
        return report

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """The plans (JSON-safe), for resuming masked training with the same masks."""
        return {"plans": {n: p.to_dict() for n, p in self.plans.items()}, "converted": self.converted,
                "config": {"seed": self.seed, "permutation": self.permutation, "round_to": self.round_to}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s plans (the layers must match) and re-apply the masks."""
        if self.converted or state.get("converted"):
            raise RuntimeError("MPDPruner.load_state_dict(): the model or the saved state is already converted; "
                               "restore converted models with pfgdf_plugin.methods.mpd.restore_model")
        plans = {n: BlockPlan.from_dict(d) for n, d in state["plans"].items()}
        if set(plans) != set(self.plans):
            raise MPDError(f"the saved plans cover {sorted(plans)}, this pruner masks {sorted(self.plans)}")
        for name, plan in plans.items():
            if plan.weight_shape != self.plans[name].weight_shape:
                raise MPDError(f"{name}: saved plan shape {plan.weight_shape} does not match "
                               f"{self.plans[name].weight_shape}")
            weight = self.model.get_submodule(name).weight
            self._masks[name] = plan.mask(weight.dtype, weight.device)
        self.plans = plans
        self.apply_masks()


def _search_blocks(model: nn.Module, example_inputs: Any, goal, timing: Any, ignored: List[str],
                   options: Dict[str, Any]) -> Dict[str, Any]:
    """The least block count (one for every masked layer) whose converted copy meets ``goal``."""
    probe = copy.deepcopy(model)
    named = dict(probe.named_modules())
    round_to = mpd.check_round_to(options["round_to"])
    chosen = mpd.choose_layers(named, blocks=1, ignored=ignored, output_layers=output_layers(
        probe, build_graph(probe, example_inputs)), dense_output=options["dense_output"], round_to=round_to)
    hi = min(mpd.max_blocks(*mpd.layer_shape(n, named[n])[:2], round_to) for n in chosen)
    if hi < 2:
        thin = [n for n in chosen if mpd.max_blocks(*mpd.layer_shape(n, named[n])[:2], round_to) < 2]
        raise TargetError(f"target {goal.describe()} cannot be reached: layer {thin[0]!r} takes one block at "
                          "most; pass it in ignored_layers")

    def prune_copy(candidate: nn.Module, c: float) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the layers left dense were named once, by choose_layers above
            MPDPruner(candidate, example_inputs, blocks=int(c), ignored_layers=ignored, **options).step()
        return candidate

    return meet_target(model, example_inputs, goal, prune_copy, 1, hi, integer=True, knob_name="blocks",
                       timing=timing).report()


__all__ = ["CHANNELWISE_OPS", "MPDPruner", "build_graph", "find_fold_links", "output_layers"]
