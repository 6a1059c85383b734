"""Translate a Torch-Pruning dependency group into plain tensors.

Every criterion of this package scores channels from per-channel weight slices. This module
is the one place that knows how a group item maps onto a layer's weight: out-channel items of
convolutions and linears (filters), in-channel items (input slices, grouped and depthwise
convolutions included), and normalisation items (their affine scale). Items are classified by
the name of the pruning function Torch-Pruning attached (``prune_out_channels`` /
``prune_in_channels``) and by the layer type, never by function identity, so customised
pruners and depthwise convolutions are seen too.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Type

import torch
import torch.nn as nn

OUT, IN, NORM = "out", "in", "norm"
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_warned: set = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


@dataclass
class ItemTensor:
    """One group item as tensors.

    Attributes:
        module: the layer.
        kind: ``"out"`` (filters), ``"in"`` (input slices) or ``"norm"`` (affine scale).
        slices: ``[channels_of_layer, -1]``, one row per channel of the layer along the pruned
            dimension (all of them, so a statistic can be fitted to the whole layer).
        idxs: the item's channel indices into ``slices``.
        positions: for each of ``idxs``, its position in the group's root index list.
    """

    module: nn.Module
    kind: str
    slices: torch.Tensor
    idxs: torch.Tensor
    positions: torch.Tensor


def handler_direction(handler: Callable) -> Optional[str]:
    """``"out"`` / ``"in"`` from a Torch-Pruning pruning function, ``None`` if neither."""
    name = getattr(handler, "__name__", "")
    if name.endswith("out_channels"):
        return OUT
    if name.endswith("in_channels"):
        return IN
    return None


def _conv_in_slices(layer: nn.modules.conv._ConvNd) -> torch.Tensor:
    w = layer.weight.detach()
    if layer.transposed:  # [in, out/groups, ...]
        return w.reshape(w.shape[0], -1)
    groups = layer.groups
    out_c, in_per_g = w.shape[0], w.shape[1]
    out_per_g = out_c // groups
    rest = w.shape[2:]
    v = w.reshape(groups, out_per_g, in_per_g, *rest).transpose(1, 2)  # [g, in/g, out/g, ...]
    return v.reshape(groups * in_per_g, -1)


def _layer_slices(layer: nn.Module, kind: str) -> Optional[torch.Tensor]:
    if isinstance(layer, nn.modules.conv._ConvNd):
        w = layer.weight.detach()
        if kind == OUT:
            if layer.transposed:  # [in, out/groups, ...] -> out channels per group
                groups = layer.groups
                in_c, out_per_g = w.shape[0], w.shape[1]
                v = w.reshape(groups, in_c // groups, out_per_g, *w.shape[2:]).transpose(1, 2)
                return v.reshape(groups * out_per_g, -1)
            return w.reshape(w.shape[0], -1)
        return _conv_in_slices(layer)
    if isinstance(layer, nn.Linear):
        w = layer.weight.detach()
        return w if kind == OUT else w.t()
    if isinstance(layer, _NORM_TYPES):
        weight = getattr(layer, "weight", None)
        if weight is None:
            return None
        return weight.detach().reshape(-1, 1)
    return None


def layer_name(group, module: nn.Module) -> str:
    """``module``'s name in the group's dependency graph (``Conv2d@<id>`` if it has none)."""
    name = getattr(getattr(group, "_DG", None), "_module2name", {}).get(module)
    return name or f"{type(module).__name__}@{id(module):x}"


def misread_grouped_conv(group) -> Optional[nn.Module]:
    """A grouped convolution in ``group`` that Torch-Pruning 1.6 would corrupt, else ``None``.

    Torch-Pruning's ``ops.module2type`` calls a convolution depthwise when ``groups ==
    out_channels``, without looking at ``in_channels``. A grouped convolution with fewer outputs
    than inputs (``Conv2d(4, 2, groups=2)``: each output reads two inputs) is then pruned by its
    ``DepthwiseConvPruner``, which removes one input per output and lowers ``groups``: the layer
    no longer matches its producer (``expected input ... to have 2 channels, but got 3``). A group
    holding such a layer cannot be pruned correctly, so the plugin's criteria skip it.
    """
    for item in group:
        layer = item.dep.target.module
        if (isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed and layer.groups > 1
                and layer.groups == layer.out_channels and layer.in_channels != layer.out_channels):
            return layer
    return None


def skip_misread_group(group) -> bool:
    """``True`` (with a one-time warning naming the layer) if :func:`misread_grouped_conv` finds one."""
    layer = misread_grouped_conv(group)
    if layer is None:
        return False
    name = layer_name(group, layer)
    _warn_once(f"misread-{name}-{id(layer)}", f"layer {name!r} is a grouped convolution with groups == out_channels "
               "< in_channels, which Torch-Pruning 1.6 mistakes for a depthwise one and would corrupt; "
               "its dependency group is left unpruned")
    return True


def check_finite(group, items: List[ItemTensor], what: str) -> None:
    """Raise ``ValueError`` naming the first layer among ``items`` whose slices hold NaN/Inf."""
    for it in items:
        if not bool(torch.isfinite(it.slices[it.idxs]).all()):
            raise ValueError(f"layer {layer_name(group, it.module)!r}: weight holds NaN/Inf values; {what} "
                             "(check the checkpoint or the training run: the weights diverged)")


def group_tensors(group) -> Iterator[ItemTensor]:
    """Yield the scorable items of a Torch-Pruning group as :class:`ItemTensor`.

    Elementwise, reshape and other parameter-free items are skipped silently; parametrised
    layers of a type this module does not know are skipped with a one-time warning.
    """
    root_idxs = [int(i) for i in group[0].root_idxs]
    pos_of = {r: p for p, r in enumerate(root_idxs)}
    for item in group:
        dep, idxs = item.dep, item.idxs
        layer = dep.target.module
        direction = handler_direction(dep.handler)
        if direction is None or not isinstance(layer, nn.Module):
            continue
        kind = NORM if isinstance(layer, _NORM_TYPES) else direction
        slices = _layer_slices(layer, kind if kind != NORM else OUT)
        if slices is None:
            if any(True for _ in layer.parameters(recurse=False)) and not isinstance(layer, _NORM_TYPES):
                _warn_once(type(layer).__name__, f"{type(layer).__name__} layers are not scored by "
                           "pfgdf_plugin criteria; their channels follow the other layers of the group")
            continue
        rid = item.root_idxs
        if any(r is None for r in rid):
            continue
        keep = [(int(i), pos_of[int(r)]) for i, r in zip(idxs, rid) if int(r) in pos_of]
        if not keep:
            continue
        ii = torch.tensor([a for a, _ in keep], dtype=torch.long)
        if int(ii.max()) >= slices.shape[0]:
            _warn_once(f"range-{type(layer).__name__}", f"{type(layer).__name__}: channel index out of "
                       "range of its weight; the item is skipped")
            continue
        yield ItemTensor(layer, kind, slices, ii, torch.tensor([b for _, b in keep], dtype=torch.long))


def reduce_to_root(group, per_item: List[tuple], reduction: str = "mean") -> torch.Tensor:
    """Combine per-item channel scores into one score per root channel.

    Args:
        group: the Torch-Pruning group (its first item's ``idxs`` fix the output length).
        per_item: ``(positions, scores)`` pairs, scores aligned with positions.
        reduction: ``"mean"``, ``"max"`` or ``"first"``.
    """
    n = len(group[0].idxs)
    total = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    if reduction == "first":
        per_item = per_item[:1]
    if reduction == "max":
        best = torch.full((n,), float("-inf"), dtype=torch.float64)
        for pos, s in per_item:
            best.scatter_reduce_(0, pos, s.double(), reduce="amax")
            count.index_add_(0, pos, torch.ones_like(s, dtype=torch.float64))
        out = torch.where(count > 0, best, torch.zeros_like(best))
    else:
        for pos, s in per_item:
            total.index_add_(0, pos, s.double())
            count.index_add_(0, pos, torch.ones_like(s, dtype=torch.float64))
        out = total / count.clamp(min=1)
    if out.numel() != n:  # the contract Torch-Pruning does not check
        raise RuntimeError(f"importance has {out.numel()} scores for a group of {n} channels")
    return out.float()


def _describe_inputs(example_inputs: Any) -> str:
    if isinstance(example_inputs, torch.Tensor):
        return f"a {example_inputs.dtype} tensor of shape {tuple(example_inputs.shape)}"
    if isinstance(example_inputs, (tuple, list)):
        return f"a {type(example_inputs).__name__} of {len(example_inputs)} item(s)"
    return f"a {type(example_inputs).__name__}"


def check_pruner_inputs(model: nn.Module, example_inputs: Any, ignored_layers: Any = None,
                        error: Type[Exception] = ValueError, who: str = "pruner") -> None:
    """Check what a Torch-Pruning pruner is about to be built from; raise ``error`` naming the bad part.

    ``ignored_layers`` must be ``None`` or a list/tuple of modules of ``model``; ``example_inputs``
    must be a tensor (or a tuple/list/dict of arguments) that ``model`` runs on. The model is run
    once without gradients, and every module's train/eval mode and every weight and buffer are as
    they were afterwards, whatever happens.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
        >>> check_pruner_inputs(net, torch.zeros(1, 3, 8, 8), [net[0]])
        >>> check_pruner_inputs(net, torch.zeros(1, 3, 8, 8), ["0"])
        Traceback (most recent call last):
        ...
        ValueError: pruner: ignored_layers[0] must be a module of the model, got str ('0')
    """
    if ignored_layers is not None:
        if not isinstance(ignored_layers, (list, tuple)):
            raise error(f"{who}: ignored_layers must be a list of modules of the model, got "
                        f"{type(ignored_layers).__name__}")
        own = {id(m) for m in model.modules()}
        for i, layer in enumerate(ignored_layers):
            if not isinstance(layer, nn.Module):
                raise error(f"{who}: ignored_layers[{i}] must be a module of the model, got "
                            f"{type(layer).__name__} ({str(layer)[:40]!r})")
            if id(layer) not in own:
                raise error(f"{who}: ignored_layers[{i}] ({type(layer).__name__}) is not a module of the model; "
                            "pass the model's own layers, e.g. model.classifier")
    if not isinstance(example_inputs, (torch.Tensor, tuple, list, dict)):
        raise error(f"{who}: example_inputs must be a tensor (or a tuple/list/dict of the model's arguments), "
                    f"got {_describe_inputs(example_inputs)}")
    modes = {m: m.training for m in model.modules()}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        model.eval()  # as Torch-Pruning traces it (a batch of one passes BatchNorm); modes restored below
        with torch.no_grad():
            if isinstance(example_inputs, dict):
                model(**example_inputs)
            elif isinstance(example_inputs, (tuple, list)):
                model(*example_inputs)
            else:
                model(example_inputs)
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise error(f"{who}: the model cannot run on example_inputs ({_describe_inputs(example_inputs)}): "
                    f"{detail}; pass a batch shaped like the training data") from None
    finally:
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if k in state and v.shape == state[k].shape:
                    v.copy_(state[k])  # BatchNorm statistics of a training-mode run


def checked_pruner(pruner_cls: Callable, model: nn.Module, example_inputs: Any, *,
                   error: Type[Exception] = ValueError, **kwargs: Any):
    """``pruner_cls(model, example_inputs, **kwargs)`` after :func:`check_pruner_inputs`.

    Any failure of the construction itself (Torch-Pruning's tracing) is raised as ``error`` too,
    and every module's train/eval mode is restored whether it succeeds or not.

    Example:
        >>> import torch_pruning as tp
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
        >>> p = checked_pruner(tp.pruner.MetaPruner, net, torch.zeros(1, 3, 8, 8), pruning_ratio=0.5,
        ...                    importance=tp.importance.MagnitudeImportance(), ignored_layers=[net[2]])
        >>> type(p).__name__, net.training
        ('BasePruner', True)
    """
    who = getattr(pruner_cls, "__name__", "pruner")  # tp.pruner.MetaPruner is BasePruner
    check_pruner_inputs(model, example_inputs, kwargs.get("ignored_layers"), error, who)
    with graph_building(model, error, who):
        return pruner_cls(model, example_inputs, **kwargs)


@contextmanager
def graph_building(model: nn.Module, error: Type[Exception] = ValueError, who: str = "pruner") -> Iterator[None]:
    """Around the construction of a Torch-Pruning pruner: a failure of its tracing is raised as ``error``
    naming ``who``, and every module's train/eval mode is restored (Torch-Pruning leaves the model in
    eval mode), whether the construction succeeds or not.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> with graph_building(net):
        ...     net.eval()
        Sequential(...)
        >>> net.training
        True
    """
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    except error:
        raise
    except Exception as e:
        raise error(f"{who}: cannot build the dependency graph ({type(e).__name__}: {e})") from None
    finally:
        for m, mode in modes.items():
            m.training = mode
