"""SPP inside Torch-Pruning: :class:`SPPImportance` and :class:`SPPPruner`.

The probability rule and the per-iteration schedule live in :mod:`pfgdf_plugin.methods.spp`
(:class:`~pfgdf_plugin.methods.spp.SPPSchedule`); this module turns the dependency graph's
channel groups into norm vectors, applies the schedule's keep-masks to the network while it
trains, and removes the pruned channels at the end.

One SPP group here is one channel of a Torch-Pruning dependency group: channels coupled by
residual additions or concatenations share one pruning probability, and a dependency group is
SPP's "layer" (it has its own target count and schedule). The official code prunes im2col
columns of single convolutions instead; this is this project's reading for channel pruning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch_pruning as tp

from ..errors import SPPError
from ..methods import spp
from .target import ratio_for_target
from ._group import (_NORM_TYPES, IN, NORM, OUT, check_finite, check_pruner_inputs, graph_building, group_tensors,
                     reduce_to_root, skip_misread_group)

_LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def group_l1(group) -> Optional[torch.Tensor]:
    """L1 norm per root channel of a dependency group, or ``None`` if nothing can be scored.

    Each channel's score is the mean, over the group's coupled producers, of the L1 norm of
    its filter (out-channel slices of convolutions and linears). A group without filters is
    scored on its normalisation layers' scales, then on its input slices.

    Example:
        >>> import torch, torch.nn as nn, torch_pruning as tp
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.Conv2d(2, 1, 1))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([1., -3.]).view(2, 1, 1, 1))
        >>> DG = tp.DependencyGraph().build_dependency(net, example_inputs=torch.randn(1, 1, 4, 4))
        >>> group_l1(DG.get_pruning_group(net[0], tp.prune_conv_out_channels, [0, 1]))
        tensor([1., 3.])
    """
    tiers: Dict[str, list] = {OUT: [], NORM: [], IN: []}
    for it in group_tensors(group):
        tiers[it.kind].append(it)
    chosen = tiers[OUT] or tiers[NORM] or tiers[IN]
    if not chosen:
        return None
    check_finite(group, chosen, "SPP cannot rank its channels by L1 norm")
    per_item = [(it.positions, it.slices.abs().sum(1)[it.idxs].double()) for it in chosen]
    return reduce_to_root(group, per_item, "mean")


def _normalised_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Ranks of ``scores`` scaled to ``[0, 1]`` (0 = smallest; ties broken by position)."""
    n = scores.numel()
    if n <= 1:
        return torch.ones(n)
    ranks = torch.empty(n)
    ranks[torch.argsort(scores, stable=True)] = torch.arange(n, dtype=torch.float32)
    return ranks / (n - 1)


class SPPImportance(tp.importance.Importance):
    """SPP's survival probability as a Torch-Pruning importance (higher = keep).

    Attached to an :class:`SPPPruner` (it is the pruner's own ``importance``), a group the
    pruner tracks scores ``1 - p`` per root channel: 1 for channels SPP keeps for good, 0 for
    removed ones. Channels with equal probabilities tie. Before it is attached, after the
    pruner has removed its channels, and for groups the pruner does not track, the score is
    the channel's normalised L1 rank (``rank / (n - 1)``, from :func:`group_l1`), also in
    ``[0, 1]``.

    Args:
        pruner: the :class:`SPPPruner` whose probabilities to report, or ``None``.

    Example:
        >>> import torch, torch_pruning as tp
        >>> from pfgdf_plugin.models import build_model
        >>> model = build_model("resnet20")
        >>> tp.pruner.MetaPruner(model, torch.randn(1, 3, 32, 32), importance=SPPImportance(),
        ...                      pruning_ratio=0.5, ignored_layers=[model.fc]).step()
        >>> model.conv1.out_channels
        8
    """

    def __init__(self, pruner: Optional["SPPPruner"] = None) -> None:
        self.pruner = pruner

    @torch.no_grad()
    def __call__(self, group) -> Optional[torch.Tensor]:
        n = len(group[0].idxs)
        if skip_misread_group(group):
            return None
        pruner = self.pruner
        if pruner is not None and not pruner.pruned:
            tracked = pruner._tracked_for(group)
            if tracked is not None:
                idxs = torch.tensor([int(i) for i in group[0].idxs], dtype=torch.long)
                scores = (1.0 - tracked.state.probabilities[idxs % tracked.size]).float()
                return _check_length(scores, n)
        norms = group_l1(group)
        if norms is None:
            return None
        return _check_length(_normalised_ranks(norms), n)


def _check_length(scores: torch.Tensor, n: int) -> torch.Tensor:
    if scores.numel() != n:  # the contract Torch-Pruning does not check
        raise RuntimeError(f"importance has {scores.numel()} scores for a group of {n} channels")
    return scores


@dataclass
class _Tracked:
    """One dependency group under SPP."""

    name: str
    root: nn.Module
    handler: Callable
    group: Any
    ch_groups: int
    size: int  # SPP groups: channels // ch_groups
    state: spp.SPPState  # owned by the pruner's schedule
    # (module, channel indices of the module, SPP group of each) for maskable out-channel items
    items: List[Tuple[nn.Module, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    scaled: List[nn.Module] = field(default_factory=list)  # outputs rescaled on finishing


def _out_dim(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return output.dim() - len(module.kernel_size) - 1
    if isinstance(module, (nn.Linear, nn.LayerNorm)):
        return -1
    return 1


def _param_dims(module: nn.Module) -> List[Tuple[str, int]]:
    """``(parameter name, out-channel dim)`` of a layer's own parameters."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed and module.groups != 1:
            return [("bias", 0)]
        return [("weight", 1 if module.transposed else 0), ("bias", 0)]
    if isinstance(module, nn.Linear):
        return [("weight", 0), ("bias", 0)]
    return [("weight", -1), ("bias", -1)]


def _along(vec: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * like.dim()
    shape[dim] = -1
    return vec.to(like.device, like.dtype).view(shape)


_DEFAULTS = spp.SPPParams()


def _share_generator_state(generator: torch.Generator) -> None:
    """Under torch.distributed, every rank takes rank 0's generator state: one mask everywhere,
    even if the ranks were given different seeds."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        state = [generator.get_state()]
        dist.broadcast_object_list(state, src=0)
        generator.set_state(state[0])


class SPPPruner(tp.pruner.BasePruner):
    """Structured probabilistic pruning during training, then structural removal.

    Every dependency group (channels coupled through residual additions and concatenations)
    is one group of the pruner's :class:`~pfgdf_plugin.methods.spp.SPPSchedule` (:attr:`schedule`):
    a pruning probability per channel and a target count ``ceil(R * channels)`` (at least one
    channel stays). In the training loop, call :meth:`update` once per iteration after
    ``optimizer.step()``: the schedule ranks each group's surviving channels by L1 norm
    (:func:`group_l1`: the mean over the group's coupled filters) and updates the probabilities
    every ``interval`` calls, and draws the next keep-masks every call. A channel at ``p = 1`` is
    zeroed for good (its filters, biases and normalisation scales). When every group has
    reached its target (:attr:`finished`), :meth:`step` removes the zeroed channels through the
    dependency graph; build a new optimizer and retrain.

    Masks act on outputs: forward hooks multiply the last output of each channel (the
    normalisation layer after a convolution, else the convolution or linear itself) by the
    mask, so a dropped channel is exactly 0 downstream, and its producers get zero gradients;
    gradient hooks on the group's own parameters zero them as well. Random drops happen in
    training mode only; in eval mode only the removed channels are masked.

    When a group reaches its target, its survivors are kept for good; with
    ``rescale_survivors`` their outputs are scaled by the keep probability ``1 - p`` they had,
    as the official code scales its surviving weights (most survivors have ``p = 0``).

    The hooks live until :meth:`step`: until then, pickling the whole model fails, and a
    ``copy.deepcopy`` of it carries inert hooks (no random drops; channels at ``p = 1`` are
    zero through their weights only). Under DistributedDataParallel,
    give the pruner the wrapped module itself (``ddp.module``) and call :meth:`update` on every
    rank. Tuple keys of ``pruning_ratio_dict`` give each layer the ratio; SPP never ranks
    across groups.

    Args:
        model: the network (pruned in place by :meth:`step`).
        example_inputs: a batch for tracing.
        pruning_ratio: the target ratio ``R`` of every group, in (0, 1) (default 0.5).
        target: a budget instead of ``pruning_ratio``: ``{"latency": r}``, ``{"macs": r}`` or
            ``{"params": r}`` (dense / pruned >= r). ``R`` is chosen before training, on copies
            pruned by L1 norm at that ratio (the structure, not which channels go, sets the
            cost); see :func:`pfgdf_plugin.torch_pruning.target.ratio_for_target`.
            ``pruner.target_report`` holds the search (``None`` without a target).
        timing: how a latency target is timed (:class:`pfgdf_plugin.meter.Timing` or its fields).
        interval: iterations between probability updates; default 10, the value of
            :class:`~pfgdf_plugin.methods.spp.SPPParams` and the recipes (it used to be 1, the
            official code's default; the paper uses 180).
        A: probability increment of the weakest channel per update (> 0).
        u: ``delta(N_c) = u * A``, in (0, 1).
        ignored_layers: layers left alone (typically the classifier).
        seed: seed of the generator that draws every mask. Use the same seed on every rank
            of a distributed run: probabilities and masks then agree everywhere.
        rounding: ``"ceil"`` | ``"floor"`` | ``"round"``, how ``R * channels`` becomes a count.
        rescale_survivors: scale surviving channels by their keep probability on finishing.
        **kwargs: other :class:`torch_pruning.pruner.BasePruner` arguments (``pruning_ratio_dict``
            for per-layer ratios keyed by a group's root layer, ``max_pruning_ratio``,
            ``round_to``, ``root_module_types``, ``customized_pruners``, ...).
            ``importance``, ``global_pruning``, ``isomorphic``, ``iterative_steps`` and
            ``prune_num_heads`` are refused: SPP ranks within each group, in one pass.

    Defaults are :class:`~pfgdf_plugin.methods.spp.SPPParams`'s. Bad values raise
    :class:`~pfgdf_plugin.errors.SPPError` (a ``ValueError``) listing every problem, before the
    model is traced.

    Attributes:
        schedule: the :class:`~pfgdf_plugin.methods.spp.SPPSchedule` of every tracked group.
        params: the validated :class:`~pfgdf_plugin.methods.spp.SPPParams`.
        steps: :meth:`update` calls so far.
        pruned: ``True`` after :meth:`step`.

    Example:
        >>> import torch
        >>> from pfgdf_plugin.models import build_model
        >>> model = build_model("lenet5")
        >>> x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        >>> pruner = SPPPruner(model, x[:1], pruning_ratio=0.5, interval=1, A=0.5, ignored_layers=[model.fc3])
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.01)
        >>> _ = model.train()
        >>> while not pruner.finished:
        ...     opt.zero_grad()
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
        ...     opt.step()
        ...     pruner.update()
        >>> pruner.step()                     # now build a new optimizer and retrain
        >>> model.conv2.out_channels, model.fc1.out_features
        (8, 60)
    """

    def __init__(self, model: nn.Module, example_inputs, pruning_ratio: Optional[float] = None,
                 interval: int = _DEFAULTS.interval, A: float = _DEFAULTS.A, u: float = _DEFAULTS.u,
                 ignored_layers: Optional[List[nn.Module]] = None, seed: int = _DEFAULTS.seed,
                 rounding: str = _DEFAULTS.rounding, rescale_survivors: bool = _DEFAULTS.rescale_survivors,
                 target: Any = None, timing: Any = None, **kwargs) -> None:
        for key in ("importance", "iterative_steps", "iterative_pruning_ratio_scheduler"):
            if key in kwargs:
                raise TypeError(f"SPPPruner does not accept {key!r}: SPP's probabilities decide what "
                                "is pruned, in one pass (use tp.pruner.MetaPruner(importance="
                                "SPPImportance(), ...) for Torch-Pruning's own schedule)")
        for key in ("global_pruning", "isomorphic", "prune_num_heads"):
            if kwargs.get(key):
                raise TypeError(f"SPPPruner does not support {key}=True: SPP ranks channels within "
                                "each dependency group")
        bad_ratios = [f"pruning_ratio_dict values must be in [0, 1), got {ratio!r} for {type(module).__name__}"
                      for module, ratio in (kwargs.get("pruning_ratio_dict") or {}).items()
                      if not spp._is_number(ratio) or not 0.0 <= ratio < 1.0]
        params = spp.checked_params(pruning_ratio, bad_ratios, interval=interval, A=A, u=u, seed=seed,
                                    rounding=rounding, rescale_survivors=rescale_survivors)
        check_pruner_inputs(model, example_inputs, ignored_layers, SPPError, "SPPPruner")
        self.target_report = ratio_for_target("SPPPruner", model, example_inputs, target, timing, pruning_ratio,
                                              ignored_layers, kwargs)
        pruning_ratio = (0.5 if pruning_ratio is None else pruning_ratio) if self.target_report is None \
            else self.target_report["knob"]
        # Torch-Pruning's BasePruner mutates these dict defaults: always hand it fresh ones.
        for key in ("in_channel_groups", "out_channel_groups", "num_heads"):
            kwargs[key] = dict(kwargs.get(key) or {})
        with graph_building(model, SPPError, "SPPPruner"):
            super().__init__(model, example_inputs, importance=SPPImportance(), pruning_ratio=float(pruning_ratio),
                             ignored_layers=ignored_layers, iterative_steps=1, **kwargs)
        self.params = params
        self.schedule = spp.SPPSchedule(params)
        _share_generator_state(self.schedule.generator)
        self.pruned = False
        self._tracked: List[_Tracked] = []
        self._by_root: Dict[nn.Module, _Tracked] = {}
        self._by_name: Dict[str, _Tracked] = {}
        self._handles: list = []
        self._train_masks: Dict[nn.Module, torch.Tensor] = {}
        self._alive_masks: Dict[nn.Module, torch.Tensor] = {}
        self._build()
        self.importance.pruner = self
        self._install_hooks()
        self._refresh_masks()

    # ------------------------------------------------------------------ set-up
    def _build(self) -> None:
        names = self.DG._module2name
        for group in self.DG.get_all_groups(ignored_layers=self.ignored_layers,
                                            root_module_types=self.root_module_types):
            root, handler = group[0].dep.target.module, group[0].dep.handler
            name = names.get(root, type(root).__name__)
            if self._is_atten_group(group)[0]:
                warnings.warn(f"{name}: attention heads are not handled by SPPPruner; group left as is",
                              stacklevel=3)
                continue
            if skip_misread_group(group):
                continue
            n = len(group[0].idxs)
            ch_groups = self._get_channel_groups(group)
            if n % ch_groups:
                continue
            size = n // ch_groups
            items = []
            for item in group:
                module = item.dep.target.module
                if not isinstance(module, _LAYER_TYPES + _NORM_TYPES):
                    continue
                if not (isinstance(module, _NORM_TYPES) or self.DG.is_out_channel_pruning_fn(item.dep.handler)):
                    continue
                if any(r is None for r in item.root_idxs):
                    continue
                idxs = torch.tensor([int(i) for i in item.idxs], dtype=torch.long)
                entries = torch.tensor([int(r) % size for r in item.root_idxs], dtype=torch.long)
                items.append((module, idxs, entries))
            if not items:
                warnings.warn(f"{name}: no layer of this group has an output SPP can mask; group left "
                              "as is", stacklevel=3)
                continue
            ratio = min(max(float(self.get_target_pruning_ratio(root, step=self.iterative_steps)), 0.0), 1.0 - 1e-12)
            target = spp.target_count(size, ratio, self.params.rounding)
            if self.round_to and target > 0:
                target = min(size - 1, self._round_to(target, size, self.round_to))
            state = self.schedule.add(name, n, ratio, copies=ch_groups, target=target)
            tracked = _Tracked(name, root, handler, group, ch_groups, size, state, items)
            norm_modules = {m for m, _, _ in items if isinstance(m, _NORM_TYPES)}
            for module, _, _ in items:
                if isinstance(module, _NORM_TYPES):
                    tracked.scaled.append(module)
                    continue
                consumers = [o.module for o in self.DG.module2node[module].outputs]
                if not any(c in norm_modules for c in consumers):
                    tracked.scaled.append(module)
            self._tracked.append(tracked)
            self._by_root[root] = tracked
            self._by_name[name] = tracked

    def _hooked(self) -> List[nn.Module]:
        """Layers whose outputs carry the masks: every normalisation layer, and convolutions /
        linears unless all they feed is a BatchNorm of the same group (masking before a
        BatchNorm would corrupt its running statistics)."""
        out: Dict[nn.Module, None] = {}
        for t in self._tracked:
            mods = {m for m, _, _ in t.items}
            for module, _, _ in t.items:
                if not isinstance(module, _NORM_TYPES):
                    consumers = [o.module for o in self.DG.module2node[module].outputs]
                    if consumers and all(isinstance(c, nn.modules.batchnorm._BatchNorm) and c in mods
                                         for c in consumers):
                        continue
                out[module] = None
        return list(out)

    def _install_hooks(self) -> None:
        train_masks, alive_masks = self._train_masks, self._alive_masks

        def forward_hook(module, inputs, output):
            mask = (train_masks if module.training else alive_masks).get(module)
            if mask is None or not isinstance(output, torch.Tensor):
                return None
            return output * _along(mask, output, _out_dim(module, output))

        for module in self._hooked():
            self._handles.append(module.register_forward_hook(forward_hook))
        seen: set = set()
        for t in self._tracked:
            for module, _, _ in t.items:
                if module in seen:
                    continue
                seen.add(module)
                for pname, dim in _param_dims(module):
                    param = getattr(module, pname, None)
                    if isinstance(param, nn.Parameter) and param.requires_grad:
                        self._handles.append(param.register_hook(self._grad_hook(module, dim)))

    def _grad_hook(self, module: nn.Module, dim: int) -> Callable:
        train_masks, alive_masks = self._train_masks, self._alive_masks

        def hook(grad):
            mask = (train_masks if module.training else alive_masks).get(module)
            if mask is None or mask.numel() != grad.shape[dim]:
                return None
            return grad * _along(mask, grad, dim)

        return hook

    # ------------------------------------------------------------------ masks
    def _module_masks(self, alive_only: bool) -> Dict[nn.Module, torch.Tensor]:
        masks: Dict[nn.Module, torch.Tensor] = {}
        vecs = self.schedule.masks(alive_only=alive_only)
        for t in self._tracked:
            vec = vecs[t.name]
            if bool(vec.all()):
                continue
            for module, idxs, entries in t.items:
                if module not in masks:
                    masks[module] = torch.ones(self.DG.get_out_channels(module), dtype=torch.bool)
                masks[module][idxs] &= vec[entries]
        out = {}
        for module, mask in masks.items():
            param = next(module.parameters(recurse=False), None)
            device = param.device if param is not None else torch.device("cpu")
            out[module] = mask.to(device=device, dtype=torch.float32)
        return out

    def _refresh_masks(self) -> None:
        self._train_masks.clear()
        self._train_masks.update(self._module_masks(alive_only=False))
        self._alive_masks.clear()
        self._alive_masks.update(self._module_masks(alive_only=True))

    @torch.no_grad()
    def _scale(self, t: _Tracked, factors: torch.Tensor, modules) -> None:
        """Multiply the channels of ``modules`` (in group ``t``) by per-SPP-group ``factors``."""
        for module, idxs, entries in t.items:
            if module not in modules:
                continue
            vec = torch.ones(self.DG.get_out_channels(module), dtype=torch.float64)
            vec[idxs] = factors[entries]
            if bool((vec == 1).all()):
                continue
            for pname, dim in _param_dims(module):
                param = getattr(module, pname, None)
                if isinstance(param, torch.Tensor) and param.shape[dim] == vec.numel():
                    param.mul_(_along(vec, param, dim))

    def _zero_removed(self) -> None:
        alive = self.schedule.masks(alive_only=True)
        for t in self._tracked:
            if not bool(alive[t.name].all()):
                self._scale(t, alive[t.name].double(), {m for m, _, _ in t.items})

    def _norms(self, names: List[str]) -> Dict[str, torch.Tensor]:
        """L1 norms of the named groups' channels (:func:`group_l1`; zeros, i.e. the ranking by
        index, for a group with nothing scorable); the schedule averages the channel copies."""
        out = {}
        for name in names:
            norms = group_l1(self._by_name[name].group)
            out[name] = torch.zeros(self._by_name[name].size, dtype=torch.float64) if norms is None else norms.double()
        return out

    def _tracked_for(self, group) -> Optional[_Tracked]:
        t = self._by_root.get(group[0].dep.target.module)
        if t is None or not self.DG.is_out_channel_pruning_fn(group[0].dep.handler):
            return None
        if any(int(i) >= t.size * t.ch_groups for i in group[0].idxs):
            return None
        return t

    # ------------------------------------------------------------------ training-loop API
    @property
    def finished(self) -> bool:
        """``True`` when every tracked group has its target count of channels at ``p = 1``."""
        return self.schedule.finished

    @property
    def steps(self) -> int:
        """:meth:`update` calls so far."""
        return self.schedule.steps

    @property
    def generator(self) -> torch.Generator:
        """The schedule's generator of every keep-mask."""
        return self.schedule.generator

    def update(self) -> None:
        """Advance one training iteration; call it after every ``optimizer.step()``.

        The schedule updates the probabilities of unfinished groups from the current L1 norms
        every ``interval`` calls; channels reaching ``p = 1`` are zeroed for good (and stay zero: the
        optimizer's momentum or weight decay cannot revive them). Then the next iteration's
        keep-masks are drawn.

        Raises:
            ValueError: a layer of an unfinished group holds NaN/Inf weights (the message names it);
                no probability is changed.
        """
        if self.pruned:
            raise RuntimeError("SPPPruner.update() was called after step(): the channels are already "
                               "removed; build a new SPPPruner to prune again")
        result = self.schedule.step(self._norms)  # every norm first: NaN weights raise before any change
        if self.params.rescale_survivors:
            for name, keep in result.finished.items():
                self._scale(self._by_name[name], keep, set(self._by_name[name].scaled))
        self._zero_removed()
        self._refresh_masks()

    def probabilities(self) -> Dict[str, torch.Tensor]:
        """``{root layer name: pruning probability per channel group}`` (float64 copies)."""
        return self.schedule.probabilities()

    def summary(self) -> Dict[str, dict]:
        """Per tracked group: ``channels``, ``target``, ``removed``, ``finished_at`` (update number)."""
        return self.schedule.summary("channels")

    # ------------------------------------------------------------------ pruning
    def step(self, interactive: bool = False):
        """Remove every channel at ``p = 1`` through the dependency graph and drop the hooks.

        Called before :attr:`finished`, it warns and removes only the channels already at
        ``p = 1``; the other channels stay, unscaled. The pruned model computes what the masked
        model computed in eval mode. Parameters are replaced by Torch-Pruning: build a new
        optimizer afterwards.
        """
        if self.pruned:
            warnings.warn("SPPPruner.step() was already called; nothing left to prune", stacklevel=2)
            return iter(()) if interactive else None
        if not self.finished:
            warnings.warn(f"SPPPruner.step() before every group reached its target ({self.schedule.n_finished} "
                          f"of {len(self.schedule.names)} groups done); pruning only the channels already at "
                          "p = 1 (keep calling update() after optimizer.step() until pruner.finished)",
                          stacklevel=2)
        return super().step(interactive=interactive)

    def _close(self) -> None:
        self.schedule.stop()  # an early stop keeps the survivors as they are
        self._zero_removed()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._train_masks.clear()
        self._alive_masks.clear()
        self.pruned = True

    def _prune(self):
        if self.pruned:
            return
        plan = [(self._by_name[name], idxs.tolist()) for name, idxs in self.schedule.removal_plan().items()]
        self._close()
        for t, idxs in plan:
            pruning_group = self.DG.get_pruning_group(t.root, t.handler, idxs)
            if self.DG.check_pruning_group(pruning_group):
                yield pruning_group
            else:
                warnings.warn(f"{t.name}: Torch-Pruning refuses to remove {len(idxs)} channels (a "
                              "coupled layer would be emptied); they stay, zeroed", stacklevel=2)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Probabilities, removed flags, current masks, counters and the generator state."""
        return {**self.schedule.state_dict(), "pruned": self.pruned}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next masks and updates are the ones the saved
        run would have produced (load the model's own ``state_dict`` as well)."""
        if self.pruned:
            raise RuntimeError("SPPPruner.load_state_dict() after step(): build a new SPPPruner")
        if state.get("pruned"):
            raise ValueError("this SPPPruner state was saved after step(): its channels are removed; "
                             "load the pruned model instead")
        self.schedule.load_state_dict(state, owner="SPPPruner")
        self._zero_removed()
        self._refresh_masks()
