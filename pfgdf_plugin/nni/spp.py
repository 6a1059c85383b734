"""SPP as an NNI 3.0 pruner: :class:`SPPPruner`.

The probability rule and the per-iteration schedule live in :mod:`pfgdf_plugin.methods.spp`
(:class:`~pfgdf_plugin.methods.spp.SPPSchedule`); this module only turns NNI's target spaces (one
per configured weight) into the schedule's groups and norms, and its keep-masks back into NNI
masks. Like NNI's ``TaylorPruner`` it is training-aware: it hooks the evaluator's optimizer step,
and ``compress()`` trains for ``training_steps`` steps through the evaluator.

How the masks act, in NNI's terms. NNI's ``ModuleWrapper`` keeps each configured weight as a
parameter of the wrapper and, on every forward pass, hands the module ``weight * weight_mask``
(the target's ``apply_method`` is ``'mul'``, NNI's default, which SPP requires). So in the
iteration after a draw, a dropped filter's weight is exactly zero, and autograd gives its
stored weight the gradient ``grad * mask``, i.e. zero: the masked gradient SPP asks for comes
from the multiplication itself, with no extra hook. (``'bypass'`` would return the weight
unmasked and ``'add'`` would add -1000 to it; both are refused.) The optimizer can still move a
dropped filter through momentum or weight decay, as in the official code; a removed filter stays
masked for good, so its stored value never matters, and ``unwrap_model()`` restores the stored,
unmasked weights.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from functools import reduce
from typing import Any, Dict, List, Tuple

import torch
from nni.compression.base.compressor import Compressor, Pruner
from nni.compression.base.config import trans_legacy_config_list
from nni.compression.base.target_space import PruningTargetSpace
from nni.compression.base.wrapper import ModuleWrapper
from nni.compression.pruning.tools import active_sparse_targets_filter, norm_metrics
from nni.compression.pruning.tools.sparse_gen import _expand_masks
from nni.compression.utils.evaluator import Evaluator

from ..errors import SPPError
from ..meter import target_or_none
from ..methods import spp
from ..methods.params import is_int
from ._common import copy_config, follow_aligned, settings, weight_targets
from .budget import search_on_copies

_DATA = Dict[str, Dict[str, torch.Tensor]]

_KNOBS = ("interval", "A", "u", "seed", "training_steps")
_DEFAULTS = spp.SPPParams()


def _checked_config(config_list: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """A copy of ``config_list`` in NNI's current format, ratios cast to float and checked for SPP."""
    out = copy_config(config_list, _KNOBS,
                      "SPPPruner(model, config_list, evaluator, training_steps, interval=10, A=0.05)")
    excluded = {i for i, entry in enumerate(out) if entry.get("exclude")}
    if any("total_sparsity" in entry for entry in out):
        raise SPPError("config_list has 'total_sparsity': SPP prunes each layer (or dependency group) to its "
                       "own 'sparse_ratio'; give 'sparse_ratio' instead")
    out = trans_legacy_config_list(out)  # 'sparsity' -> 'sparse_ratio', 'exclude' entries folded in
    for i, entry in enumerate(out):
        if i in excluded:
            continue
        for key in ("sparse_threshold", "global_group_id"):
            if any(key in s for s in settings(entry)):
                raise SPPError(f"config_list[{i}] has {key!r}: SPP prunes each layer (or dependency group) "
                               "to its own 'sparse_ratio'; give 'sparse_ratio' instead")
        ratios = [entry["sparse_ratio"]] if "sparse_ratio" in entry else []
        ratios += [s["sparse_ratio"] for s in (entry.get("target_settings") or {}).values()
                   if isinstance(s, dict) and "sparse_ratio" in s]
        if not ratios:
            raise SPPError(f"config_list[{i}] needs 'sparse_ratio' (SPP's target ratio R of each selected "
                           "layer, in (0, 1)), e.g. {'op_types': ['Conv2d'], 'sparse_ratio': 0.5}")
        for ratio in ratios:
            if spp.param_problems(ratio=ratio):
                raise SPPError(f"config_list[{i}]: 'sparse_ratio' must be in (0, 1), got {ratio!r}")
    return out


@dataclass
class _Group:
    """One SPP layer: a target weight, or the weights of one NNI dependency group."""

    key: str  # member names joined by "+", stable across runs (NNI's group ids are random)
    members: List[Tuple[str, str]]  # (module name, target name)
    blocks: int  # internal metric blocks (grouped convolutions): one decision per block position
    size: int  # SPP groups: filters // blocks
    state: spp.SPPState  # owned by the pruner's schedule


def _display(module_name: str, target_name: str) -> str:
    return module_name if target_name == "weight" else f"{module_name}.{target_name}"


class SPPPruner(Pruner):
    """Structured probabilistic pruning of output filters while training (NNI 3.0 pruner).

    Every configured weight (by default the filters of ``Conv2d``/``Linear``), or every NNI
    dependency group of weights (coupled layers, from
    :func:`pfgdf_plugin.nni.dependency_config_list`), is one SPP layer, a group of the pruner's
    :class:`~pfgdf_plugin.methods.spp.SPPSchedule`: a pruning probability per filter and a target
    count ``ceil(R * filters)`` (one filter always stays), where ``R`` is the entry's
    ``sparse_ratio``. Coupled layers share the probabilities, ranked on the mean of their filters'
    L1 norms, and so get identical masks.

    After every optimizer step of the evaluator's training loop the schedule:

    1. every ``interval`` steps, ranks each unfinished layer's surviving filters by the L1 norm
       of their current weights and updates the probabilities
       (:meth:`~pfgdf_plugin.methods.spp.SPPState.update`);
    2. draws the next keep-mask (keep filter ``g`` with probability ``1 - p_g``; filters at
       ``p = 1`` are never kept again) and writes it into NNI's masks, which the wrapper applies
       to the next forward pass: a dropped filter's weight is zero there and its gradient is
       zero (see the module docstring for NNI's ``'mul'`` apply method);
    3. stops once every layer has reached its target, or after ``training_steps`` steps: the
       layers are finished and the masks from then on hold exactly the removed filters (no
       random drops). Stopping early (training shorter than it needs) warns and keeps only the
       filters already at ``p = 1`` as removed.

    ``compress()`` trains for ``training_steps`` steps (or ``compress(max_steps, max_epochs)``
    for longer: the steps after stopping fine-tune with the final masks) and returns
    ``(model, masks)`` with those final masks, ready for ``pruner.unwrap_model()`` and
    :func:`pfgdf_plugin.nni.speedup`. Fused with other compressors (e.g.
    ``QATQuantizer.from_compressor(pruner, ...)``), the fused compressor's ``compress`` drives the
    training and ``pruner.get_masks()`` gives the final masks afterwards.

    This project's reading, besides the channel groups (see :mod:`pfgdf_plugin.methods.spp`):
    only the configured weights are masked; a BatchNorm after a dropped filter still adds its
    shift in training mode, and its running statistics see the dropped channel (the
    Torch-Pruning :class:`pfgdf_plugin.SPPPruner` masks the BatchNorm outputs instead). Survivors
    are not rescaled by their last keep probability on finishing (the official code rescales
    its columns; NNI does not know which BatchNorm follows a layer). The masks of a draw stay in
    NNI's buffers until the next optimizer step, so an evaluation in the middle of SPP's phase
    sees that draw. NNI's scheduled pruners cannot drive this pruner (SPP has its own schedule).

    Args:
        model: the model; NNI wraps its configured modules until :meth:`unwrap_model`.
        config_list: NNI 3.0 config list; every entry needs ``sparse_ratio`` in (0, 1) (cast to
            float), and may use NNI's op selection (``op_types``, ``op_names``, ``exclude_*``),
            ``dependency_group_id`` (members must share one ratio and width) and
            ``internal_metric_block``. ``sparse_threshold`` and ``global_group_id`` are refused.
        evaluator: an NNI evaluator with a training loop, e.g. ``TorchEvaluator(training_func,
            nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01), training_step)``.
        training_steps: optimizer steps of SPP's probabilistic phase (>= 1).
        existed_wrappers: used by :meth:`from_compressor`.
        interval: optimizer steps between probability updates; default 10, the value of
            :class:`~pfgdf_plugin.methods.spp.SPPParams` and the recipes (it used to be 1, the
            official code's default; the paper uses 180).
        A: probability increment of the weakest filter per update (> 0).
        u: ``delta(N_c) = u * A``, in (0, 1).
        seed: seed of the generator that draws every keep-mask.

    Defaults are :class:`~pfgdf_plugin.methods.spp.SPPParams`'s.

    With ``target={"macs": r}`` (or ``latency`` / ``params``; ``timing=`` and ``example_inputs=``
    beside it), the entries carry no ``sparse_ratio``: one ratio for every entry is chosen before
    training, on copies pruned by NNI's ``L1NormPruner`` at candidate ratios, sped up and
    measured (the structure, not which filters go, sets the cost); ``pruner.target_report``
    holds the search (``None`` without a target).

    Raises:
        TargetError: a malformed or unreachable target, a target with an entry's
            ``sparse_ratio``, or a target without ``example_inputs`` (the model is then untouched).
        SPPError: (a ``ValueError``) bad SPP parameters, every one listed
            (``interval must be an integer >= 1, got 0``), before the model is wrapped.
        ValueError: no evaluator, an entry
            without a valid ``sparse_ratio``, SPP knobs inside ``config_list``, an input/output
            target, a non-filter ``granularity``, an ``apply_method`` other than ``'mul'``, or a
            dependency group mixing ratios or widths.

    Attributes:
        schedule: the :class:`~pfgdf_plugin.methods.spp.SPPSchedule` of every SPP layer.
        params: the validated :class:`~pfgdf_plugin.methods.spp.SPPParams`.
        steps: optimizer steps seen so far.
        stopped: ``True`` once the final masks are in place.

    Example:
        >>> import nni, torch
        >>> from nni.compression.utils import TorchEvaluator
        >>> from pfgdf_plugin.models import build_model
        >>> from pfgdf_plugin.nni import SPPPruner
        >>> _ = torch.manual_seed(0)
        >>> model = build_model("lenet5")
        >>> x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        >>> def training_step(batch, model):
        ...     return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
        >>> def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None,
        ...                   max_epochs=None):
        ...     model.train()
        ...     for _ in range(max_steps):
        ...         optimizers.zero_grad()
        ...         training_step((x, y), model).backward()
        ...         optimizers.step()
        >>> opt = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01)
        >>> evaluator = TorchEvaluator(training_func, opt, training_step)
        >>> pruner = SPPPruner(model, [{"op_names": ["conv1", "conv2"], "sparse_ratio": 0.5}],
        ...                    evaluator, training_steps=12, interval=1, A=0.5)
        >>> _, masks = pruner.compress()
        >>> pruner.finished, int(masks["conv2"]["weight"].sum(dim=(1, 2, 3)).gt(0).sum())
        (True, 8)
    """

    def __init__(self, model: torch.nn.Module, config_list: List[Dict], evaluator: Evaluator, training_steps: int,
                 existed_wrappers: Dict[str, ModuleWrapper] | None = None, *, interval: int = _DEFAULTS.interval,
                 A: float = _DEFAULTS.A, u: float = _DEFAULTS.u, seed: int = _DEFAULTS.seed, target: Any = None,
                 timing: Any = None, example_inputs: Any = None):
        # validate before NNI wraps the model, so a bad argument leaves the model untouched
        ratios = [e.get("sparse_ratio") for e in config_list if e.get("sparse_ratio") is not None]
        goal = target_or_none("SPPPruner", target, sparse_ratio=ratios[0] if ratios else None)
        self.target_report = None
        if goal is not None:
            config_list, self.target_report = _ratio_for_target(model, config_list, example_inputs, goal, timing)
        bad_steps = [] if is_int(training_steps) and training_steps >= 1 else [
            f"training_steps must be an integer >= 1, got {training_steps!r}"]
        params = spp.checked_params(None, bad_steps, interval=interval, A=A, u=u, seed=seed)
        if evaluator is None:
            raise ValueError("SPPPruner prunes while training: give it an NNI evaluator, e.g. "
                             "TorchEvaluator(training_func, nni.trace(torch.optim.SGD)(model.parameters(), "
                             "lr=0.01), training_step)")
        config_list = _checked_config(config_list)
        self.training_steps = training_steps
        self.params = params
        self.schedule = spp.SPPSchedule(params, max_steps=training_steps)
        self._groups: List[_Group] = []
        super().__init__(model, config_list, evaluator, existed_wrappers)
        self.evaluator: Evaluator
        try:
            self._build_groups()
        except Exception:
            self.unwrap_model()
            raise

    @classmethod
    def from_compressor(cls, compressor: Compressor, new_config_list: List[Dict], training_steps: int,
                        evaluator: Evaluator | None = None, *, interval: int = _DEFAULTS.interval,
                        A: float = _DEFAULTS.A, u: float = _DEFAULTS.u, seed: int = _DEFAULTS.seed):
        """Build on another compressor's wrappers and evaluator (NNI's fusion)."""
        return super().from_compressor(compressor, new_config_list, training_steps=training_steps, evaluator=evaluator,
                                       interval=interval, A=A, u=u, seed=seed)

    # ------------------------------------------------------------------ set-up

    def _spp_targets(self):
        for module_name, target_name, target_space in weight_targets(self, "SPP"):
            if target_space.sparse_ratio is not None:
                yield module_name, target_name, target_space

    @staticmethod
    def _filters(module_name: str, target_name: str, ts: PruningTargetSpace) -> int:
        """Output filters of a target; its metric must hold one value per filter."""
        target = ts.target
        scaler = ts._scaler
        shape = None if scaler is None else scaler.shrink(target.detach(), keepdim=True).shape
        if shape is None or shape.numel() != target.shape[0] or shape[0] != target.shape[0]:
            raise ValueError(f"{module_name}.{target_name}: SPP prunes whole output filters; leave "
                             f"'granularity' at 'default' or 'out_channel' (got {ts.granularity!r})")
        if ts.apply_method != "mul":
            raise ValueError(f"{module_name}.{target_name}: SPP needs apply_method 'mul' (the weight times "
                             f"its mask), got {ts.apply_method!r}")
        return int(target.shape[0])

    def _build_groups(self) -> None:
        """One schedule group per target or NNI dependency group, added in the model's module order
        (the order of every draw)."""
        grouped: Dict[Any, List[Tuple[str, str, PruningTargetSpace]]] = defaultdict(list)
        for module_name, target_name, ts in self._spp_targets():
            gid = ts.dependency_group_id
            grouped[("dep", gid) if gid is not None else ("one", module_name, target_name)].append(
                (module_name, target_name, ts))
        found = []
        for members in grouped.values():
            names = [_display(m, t) for m, t, _ in members]
            widths = {self._filters(m, t, ts) for m, t, ts in members}
            ratios = {float(ts.sparse_ratio) for _, _, ts in members}
            if len(widths) > 1:
                raise ValueError(f"dependency group of {', '.join(names)} has layers of different widths "
                                 f"{sorted(widths)}")
            if len(ratios) > 1:
                raise ValueError(f"dependency group of {', '.join(names)} mixes sparse_ratio values "
                                 f"{sorted(ratios)}; coupled layers share one ratio")
            n, ratio = widths.pop(), ratios.pop()
            blocks = reduce(math.lcm, [int(ts.internal_metric_block or 1) for _, _, ts in members], 1)
            if n % blocks:
                raise ValueError(f"{', '.join(names)}: {n} filters do not split into {blocks} metric blocks")
            found.append(("+".join(sorted(names)), [(m, t) for m, t, _ in members], blocks, n, ratio))
        order = {name: i for i, (name, _) in enumerate(self.bound_model.named_modules())}
        found.sort(key=lambda g: min(order.get(m, len(order)) for m, _ in g[1]))
        for key, members, blocks, n, ratio in found:
            state = self.schedule.add(key, n, ratio, copies=blocks)
            self._groups.append(_Group(key, members, blocks, n // blocks, state))

    # ------------------------------------------------------------------ NNI hooks

    def _collect_data(self) -> _DATA:
        """The current (unmasked) weights of the SPP targets."""
        return active_sparse_targets_filter(self._target_spaces)

    def _calculate_metrics(self, data: _DATA) -> _DATA:
        """L1 norm of every filter, in NNI's shrunk metric shape (e.g. ``[out, 1, 1, 1]``)."""
        return norm_metrics(p=1, data=data, target_spaces=self._target_spaces)

    def _generate_sparsity(self, metrics: _DATA) -> _DATA:
        """The masks of the current keep vectors (the last draw; the removed filters once stopped).

        The probabilities change only in the optimizer-step hook, so ``metrics`` is not used here.
        """
        masks: _DATA = defaultdict(dict)
        spaces: Dict[str, Dict[str, PruningTargetSpace]] = defaultdict(dict)
        keeps = self.schedule.masks(channels=True)
        for group in self._groups:
            keep = keeps[group.key]
            for module_name, target_name in group.members:
                ts = self._target_spaces[module_name][target_name]
                shape = ts._scaler.shrink(ts.target.detach(), keepdim=True).shape
                masks[module_name][target_name] = keep.to(torch.float32).reshape(shape)
                spaces[module_name][target_name] = ts
        masks = _expand_masks(masks, spaces)
        follow_aligned(masks, self._target_spaces)  # biases follow their weights, as in NNI
        return masks

    def _norms(self, names: List[str]) -> Dict[str, torch.Tensor]:
        """Per named SPP layer: the mean over its coupled layers of the filters' L1 norms (the
        schedule averages the metric blocks)."""
        metrics = self._calculate_metrics(self._collect_data())
        by_key = {g.key: g for g in self._groups}
        return {name: torch.stack([metrics[m][t].detach().reshape(-1).to("cpu", torch.float64)
                                   for m, t in by_key[name].members]).mean(0) for name in names}

    # ------------------------------------------------------------------ the SPP iteration

    def _spp_step(self) -> None:
        """One optimizer step of the schedule (rank and update when due, then draw or stop); write the masks."""
        if self.schedule.stopped:
            return
        if self.schedule.step(self._norms).stopped:
            self._warn_if_early()
        self.update_masks(self._generate_sparsity({}))

    def _warn_if_early(self) -> None:
        if not self.finished:
            warnings.warn(f"SPPPruner stopped after {self.steps} optimizer steps before every layer reached its "
                          f"target ({self.schedule.n_finished} of {len(self._groups)} done); the final masks remove "
                          "only the filters already at p = 1 (raise training_steps or A, or lower interval)",
                          RuntimeWarning, stacklevel=4)

    def _stop(self) -> None:
        """Finish every layer and write the final masks (exactly the removed filters)."""
        self.schedule.stop()
        self._warn_if_early()
        self.update_masks(self._generate_sparsity({}))

    def _register_trigger(self, evaluator: Evaluator) -> None:
        evaluator.patch_optimizer_step(before_step_tasks=[], after_step_tasks=[self._spp_step])

    def _single_compress(self, max_steps: int | None, max_epochs: int | None) -> None:
        self._fusion_compress(max_steps, max_epochs)

    def _fuse_preprocess(self, evaluator: Evaluator) -> None:
        self._register_trigger(evaluator)

    def _fuse_postprocess(self, evaluator: Evaluator) -> None:
        if not self.stopped:  # the training loop ended before training_steps
            self._stop()

    def compress(self, max_steps: int | None = None, max_epochs: int | None = None):
        """Train through the evaluator (``training_steps`` steps by default); returns ``(model, masks)``.

        The masks are the final ones, ``{module_name: {target_name: mask}}``. The model stays
        wrapped; call :meth:`unwrap_model` before :func:`pfgdf_plugin.nni.speedup`.
        """
        if max_steps is None and max_epochs is None:
            max_steps = self.training_steps
        return super().compress(max_steps, max_epochs)

    # ------------------------------------------------------------------ queries

    @property
    def finished(self) -> bool:
        """``True`` when every layer has its target count of filters at ``p = 1``."""
        return self.schedule.finished

    @property
    def steps(self) -> int:
        """Optimizer steps seen so far."""
        return self.schedule.steps

    @property
    def stopped(self) -> bool:
        """``True`` once the final masks are in place."""
        return self.schedule.stopped

    @property
    def generator(self) -> torch.Generator:
        """The schedule's generator of every keep-mask."""
        return self.schedule.generator

    def probabilities(self) -> Dict[str, torch.Tensor]:
        """``{layer name: pruning probability per filter}`` (float64 copies; coupled layers share one).

        With ``internal_metric_block`` the vector has one entry per block position.
        """
        probs = self.schedule.probabilities()
        return {_display(m, t): probs[g.key].clone() for g in self._groups for m, t in g.members}

    def summary(self) -> Dict[str, dict]:
        """Per SPP layer (members joined by ``+``): ``filters``, ``target``, ``removed``, ``finished_at``."""
        return self.schedule.summary("filters")

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> Dict[str, Any]:
        """Probabilities, removed flags, current keep vectors, counters and the generator state."""
        state = self.schedule.state_dict()
        state["config"]["training_steps"] = self.training_steps
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` and write the saved masks into NNI's wrappers.

        Load the model's weights as well; the next draws are the ones the saved run would have made.
        """
        self.schedule.load_state_dict(state, owner="SPPPruner")
        self.update_masks(self._generate_sparsity({}))


def _ratio_for_target(model, config_list: List[Dict], example_inputs: Any, goal, timing) -> Tuple[List[Dict], Dict]:
    """``(config_list with the chosen sparse_ratio, search report)``: the least ratio whose
    L1-pruned, sped-up copy meets ``goal``."""
    from nni.compression.pruning import L1NormPruner

    def make(net, config, r):
        return L1NormPruner(net, [{**e, "sparse_ratio": float(r)} for e in config])

    report = search_on_copies("SPPPruner", model, config_list, example_inputs, goal, timing, make, 0.01, 0.95,
                              knob_name="sparse_ratio")
    return [{**e, "sparse_ratio": float(report["knob"])} for e in config_list], report
