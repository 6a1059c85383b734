"""Conversion of masked layers to block-diagonal ones, folding, the report, describe/restore."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Tuple

import torch
import torch.nn as nn

from ...errors import MPDError
from ...modules import BlockDiagonalLinear, PermutedGroupConv2d, module_from_description
from .blocks import BlockPlan
from .checks import check_layer

DESCRIPTION_FORMAT = "pfgdf_plugin.mpd/1"
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _layout(labels: torch.Tensor, blocks: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """``(position, gather, width)``: the raw slot of each channel, the channel of each raw
    slot (``n`` for padding), and the padded block size."""
    n = labels.numel()
    sizes = torch.bincount(labels, minlength=blocks)
    width = int(sizes.max())
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.empty(n, dtype=torch.long)
    slot[order] = torch.arange(n) - starts[labels[order]]
    position = labels * width + slot
    gather = torch.full((blocks * width,), n, dtype=torch.long)
    gather[position] = torch.arange(n)
    return position, gather, width


def check_block_diagonal(plan: BlockPlan, weight: torch.Tensor) -> None:
    """``MPDError`` naming the layer if ``weight`` is non-zero where ``plan`` masks it."""
    if tuple(weight.shape) != plan.weight_shape:
        raise MPDError(f"{plan.name}: weight shape {tuple(weight.shape)} does not match the plan's "
                       f"{plan.weight_shape}")
    outside = weight.detach() * (1 - plan.mask(weight.dtype, weight.device))
    bad = int((outside != 0).sum())
    if bad:
        raise MPDError(f"{plan.name}: {bad} weights outside the block-diagonal mask are non-zero, so the layer is "
                       "not block-diagonal after permutation (apply the masks, e.g. MPDPruner.apply_masks(), or "
                       "train with the pruner's hooks)")


def _blocks_of(plan: BlockPlan, weight: torch.Tensor):
    """The padded block weights ``[c, O, I, *kernel]`` and the layouts of both sides."""
    out_pos, out_gather, o_w = _layout(plan.out_labels, plan.blocks)
    _, in_gather, i_w = _layout(plan.in_labels, plan.blocks)
    w = weight.detach()
    padded = torch.zeros((w.shape[0] + 1, w.shape[1] + 1) + tuple(w.shape[2:]), dtype=w.dtype, device=w.device)
    padded[:-1, :-1] = w
    rows = out_gather.to(w.device).view(plan.blocks, o_w, 1)
    cols = in_gather.to(w.device).view(plan.blocks, 1, i_w)
    return padded[rows, cols], out_pos, in_gather, o_w, i_w


def convert_layer(plan: BlockPlan, module: nn.Module, strict: bool = True) -> nn.Module:
    """The block-diagonal replacement of ``module`` (a Linear or a Conv2d) under ``plan``.

    Args:
        plan: the layer's plan (its shape must match).
        module: the masked layer.
        strict: refuse (``MPDError``) a weight that is non-zero outside the mask; with
            ``False`` the weight is multiplied by the mask first (NNI's masked-model view).

    Returns:
        A :class:`~pfgdf_plugin.modules.BlockDiagonalLinear` or
        :class:`~pfgdf_plugin.modules.PermutedGroupConv2d` computing what the masked layer
        computes, on the same device and dtype.

    Example:
        >>> from pfgdf_plugin.methods.mpd import make_plan
        >>> lin = nn.Linear(6, 4)
        >>> plan = make_plan("lin", lin.weight, blocks=2)
        >>> with torch.no_grad():
        ...     _ = lin.weight.mul_(plan.mask())
        >>> x = torch.randn(3, 6)
        >>> torch.allclose(convert_layer(plan, lin)(x), lin(x), atol=1e-6)
        True
    """
    out_n, in_n, kernel = check_layer(plan.name, module)
    if (out_n, in_n) + kernel != plan.weight_shape:
        raise MPDError(f"{plan.name}: the layer's weight shape {(out_n, in_n) + kernel} does not match the plan's "
                       f"{plan.weight_shape}")
    weight = module.weight
    if strict:
        check_block_diagonal(plan, weight)
    else:
        weight = weight.detach() * plan.mask(weight.dtype, weight.device)
    blocks_w, out_pos, in_gather, o_w, i_w = _blocks_of(plan, weight)
    out_sizes, in_sizes = plan.out_sizes().tolist(), plan.in_sizes().tolist()
    bias = module.bias.detach() if module.bias is not None else None
    raw_bias = None
    if bias is not None:
        raw_bias = torch.cat([bias, bias.new_zeros(1)])[_layout(plan.out_labels, plan.blocks)[1].to(bias.device)]
    if isinstance(module, nn.Linear):
        new: nn.Module = BlockDiagonalLinear(in_n, out_sizes, in_sizes, bias=bias is not None)
        new.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            new.weight.copy_(blocks_w)
            if raw_bias is not None:
                new.bias.copy_(raw_bias.view(plan.blocks, o_w))
            new.in_index.copy_(in_gather)
            new.out_index.copy_(out_pos)
        return new.train(module.training)
    conv: nn.Conv2d = module
    new = PermutedGroupConv2d(in_n, out_sizes, in_sizes, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                              dilation=conv.dilation, bias=bias is not None, padding_mode=conv.padding_mode)
    new.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.conv.weight.copy_(blocks_w.reshape((plan.blocks * o_w, i_w) + tuple(blocks_w.shape[3:])))
        if raw_bias is not None:
            new.conv.bias.copy_(raw_bias)
        new.permute_in.index.copy_(in_gather)
        new.permute_out.index.copy_(out_pos)
    return new.train(module.training)


@dataclass
class FoldLink:
    """Layer ``producer`` feeds layer ``consumer`` through channel-wise operations only.

    ``norms`` names the BatchNorm layers on the way (their parameters get permuted); anything
    else on the way must be channel-agnostic and parameter-free (activations, pooling). The
    adapters find links with Torch-Pruning's dependency graph
    (:func:`pfgdf_plugin.graph.find_fold_links`).
    """

    producer: str
    consumer: str
    norms: List[str] = field(default_factory=list)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


@torch.no_grad()
def _permute_norm(norm: nn.Module, gather: torch.Tensor) -> None:
    for key in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(norm, key, None)
        if isinstance(t, torch.Tensor):
            t.copy_(t[gather.to(t.device)])


def fold(model: nn.Module, link: FoldLink) -> bool:
    """Fold ``link.producer``'s output permutation into ``link.consumer``'s input gather, in place.

    Both must already be converted layers of the same kind. The producer then emits its raw
    block layout, the BatchNorms in ``link.norms`` are permuted to that layout, and the
    consumer's gather reads the raw layout directly. Returns ``False`` (and changes nothing)
    when it cannot fold: a BatchNorm on the way and a padded producer (the BatchNorm would need
    the padded width), or a producer that is already folded.
    """
    prod, cons = model.get_submodule(link.producer), model.get_submodule(link.consumer)
    kinds = (BlockDiagonalLinear, PermutedGroupConv2d)
    if not any(isinstance(prod, k) and isinstance(cons, k) for k in kinds) or not prod.scatter:
        return False
    if isinstance(prod, BlockDiagonalLinear):
        out_pos, raw = prod.out_index, prod.raw_features
        cons_n, cons_index = cons.in_features, cons.in_index
    else:
        out_pos, raw = prod.permute_out.index, prod.raw_channels
        cons_n, cons_index = cons.in_channels, cons.permute_in.index
    out_n = out_pos.numel()
    if cons_n != out_n or (link.norms and raw != out_n):
        return False
    norms = [model.get_submodule(n) for n in link.norms]
    if any(not isinstance(n, _NORMS) or n.num_features != out_n for n in norms):
        return False
    raw_gather = torch.full((raw,), 0, dtype=torch.long, device=out_pos.device)
    raw_gather[out_pos] = torch.arange(out_n, device=out_pos.device)
    for norm in norms:
        _permute_norm(norm, raw_gather)
    lookup = torch.cat([out_pos, out_pos.new_tensor([raw])])
    new_index = lookup[cons_index]
    if isinstance(prod, BlockDiagonalLinear):
        prod.out_index = None
        prod.scatter = False
        cons.in_index = new_index
        cons.in_features = raw
    else:
        prod.permute_out = nn.Identity()
        prod.scatter = False
        cons.permute_in.index = new_index
        cons.permute_in.in_channels = raw
        cons.in_channels = raw
    return True


def convert_model(model: nn.Module, plans: Mapping[str, BlockPlan], links: Iterable[FoldLink] = (),
                  strict: bool = True) -> Dict[str, Any]:
    """Replace every planned layer of ``model`` by its block-diagonal form, in place.

    Args:
        model: the masked model.
        plans: ``{layer name: plan}``; a plan with one block leaves its layer dense.
        links: fold opportunities (:class:`FoldLink`); links whose ends are not both converted
            are skipped.
        strict: see :func:`convert_layer`. Every layer is checked before any is replaced, so
            an error leaves the model as it was.

    Returns:
        :func:`summarize` of the converted model, plus ``"folded"``: the links folded.
    """
    todo = {name: plan for name, plan in plans.items() if plan.blocks > 1}
    modules = dict(model.named_modules())
    for name, plan in todo.items():
        if name not in modules:
            raise MPDError(f"{name}: no such layer in the model")
        check_layer(name, modules[name])
        if strict:
            check_block_diagonal(plan, modules[name].weight)
    for name, plan in todo.items():
        _set_module(model, name, convert_layer(plan, modules[name], strict=strict))
    folded = []
    for link in links:
        if link.producer in todo and link.consumer in todo and fold(model, link):
            folded.append(f"{link.producer} -> {link.consumer}")
    report = summarize(model)
    report["folded"] = folded
    return report


def summarize(model: nn.Module) -> Dict[str, Any]:
    """Per converted layer and in total: blocks, dense / kept (effective) / stored weights.

    ``dense`` is the weight count of the original layer, ``kept`` the weights that are not
    padding, ``stored`` what the converted layer holds in memory (padding included);
    ``compression = dense / kept``. Biases and BatchNorms are not counted.

    Returns:
        ``{"layers": {name: {...}}, "dense", "kept", "stored", "compression"}``.
    """
    layers: Dict[str, Dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, (BlockDiagonalLinear, PermutedGroupConv2d)):
            k = 1 if isinstance(m, BlockDiagonalLinear) else m.conv.weight.shape[2] * m.conv.weight.shape[3]
            dense = sum(m.out_sizes) * sum(m.in_sizes) * k
            kept = m.effective_weights()
            layers[name] = {"kind": type(m).__name__, "blocks": m.blocks, "dense": dense, "kept": kept,
                            "stored": m.stored_weights(), "compression": dense / kept}
    dense = sum(v["dense"] for v in layers.values())
    kept = sum(v["kept"] for v in layers.values())
    stored = sum(v["stored"] for v in layers.values())
    return {"layers": layers, "dense": dense, "kept": kept, "stored": stored,
            "compression": dense / kept if kept else 1.0}


def describe_model(model: nn.Module) -> Dict[str, Any]:
    """A JSON-safe description of the converted layers of ``model``.

    With :func:`restore_model` it rebuilds a converted model's structure from a freshly built
    dense one, so an ordinary ``state_dict`` (``torch.load(..., weights_only=True)``) loads into
    it. Permuted BatchNorms keep their shapes and need no entry.

    Example:
        >>> import json
        >>> from pfgdf_plugin.methods.mpd import make_plan
        >>> net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
        >>> plans = {"0": make_plan("0", net[0].weight, 2), "2": make_plan("2", net[2].weight, 2)}
        >>> for name, plan in plans.items():
        ...     _ = net.get_submodule(name).weight.data.mul_(plan.mask())
        >>> _ = convert_model(net, plans, [FoldLink("0", "2")])
        >>> desc = json.loads(json.dumps(describe_model(net)))
        >>> twin = restore_model(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)), desc)
        >>> _ = twin.load_state_dict(net.state_dict())
        >>> x = torch.randn(2, 8)
        >>> torch.equal(twin(x), net(x))
        True
    """
    return {"format": DESCRIPTION_FORMAT,
            "modules": {name: m.describe() for name, m in model.named_modules()
                        if isinstance(m, (BlockDiagonalLinear, PermutedGroupConv2d))}}


def restore_model(model: nn.Module, description: Mapping[str, Any]) -> nn.Module:
    """Replace the layers named in ``description`` (from :func:`describe_model`) by skeletons, in place.

    Load the converted model's ``state_dict`` afterwards to fill weights and indices.
    """
    if description.get("format") != DESCRIPTION_FORMAT:
        raise MPDError(f"description format must be {DESCRIPTION_FORMAT!r}, got {description.get('format')!r}")
    names = dict(model.named_modules())
    for name, d in description["modules"].items():
        if name not in names:
            raise MPDError(f"{name}: the description names a layer the model does not have")
        old = names[name]
        new = module_from_description(d)
        p = next(old.parameters(), None)
        if p is not None:
            new.to(device=p.device, dtype=p.dtype)
        _set_module(model, name, new.train(old.training))
    return model
