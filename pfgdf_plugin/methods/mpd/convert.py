"""Conversion of masked layers to block-diagonal ones (with a kernel per layer), the report,
describe/restore. Folding is in :mod:`~pfgdf_plugin.methods.mpd.fold`, the kernel choice in
:mod:`~pfgdf_plugin.methods.mpd.kernels`."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ...errors import MPDError
from ...modules import (BlockDiagonalLinear, MaskedDenseConv2d, MaskedDenseLinear, PermutedGroupConv2d,
                        module_from_description)
from .blocks import BlockPlan
from .checks import check_layer
from .fold import CONVERTED, FoldLink, drop_identities, fold, fuse_activations, set_module
from .kernels import (LAYER_KERNELS, KernelSpec, Timer, batches_ok, check_kernel, choose_kernel, describe_choice,
                      layer_kind, requested_kernel, sample_input)

DESCRIPTION_FORMAT = "pfgdf_plugin.mpd/1"


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


def _dense_layer(plan: BlockPlan, module: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 out_sizes, in_sizes) -> nn.Module:
    """The ``"dense"`` kernel: the masked weight in the original order, with its block labels."""
    out_n, in_n = plan.out_channels, plan.in_channels
    if isinstance(module, nn.Linear):
        new: nn.Module = MaskedDenseLinear(in_n, out_n, out_sizes, in_sizes, bias=bias is not None)
        w, b = new.linear.weight, new.linear.bias
    else:
        c = module
        new = MaskedDenseConv2d(in_n, out_n, out_sizes, in_sizes, c.kernel_size, stride=c.stride, padding=c.padding,
                                dilation=c.dilation, bias=bias is not None, padding_mode=c.padding_mode)
        w, b = new.conv.weight, new.conv.bias
    new.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        w.copy_(weight.detach())
        if bias is not None:
            b.copy_(bias)
        new.row_labels.copy_(plan.out_labels)
        new.col_labels.copy_(plan.in_labels)
    return new.train(module.training)


def convert_layer(plan: BlockPlan, module: nn.Module, strict: bool = True, kernel: str = "block") -> nn.Module:
    """The block-diagonal replacement of ``module`` (a Linear or a Conv2d) under ``plan``.

    Args:
        plan: the layer's plan (its shape must match).
        module: the masked layer.
        strict: refuse (``MPDError``) a weight that is non-zero outside the mask; with
            ``False`` the weight is multiplied by the mask first (NNI's masked-model view).
        kernel: ``"block"`` (``bmm`` for a Linear, ``grouped`` for a Conv2d), ``"bmm"``,
            ``"grouped"`` or ``"dense"`` (see :mod:`~pfgdf_plugin.methods.mpd.kernels`).

    Returns:
        A :class:`~pfgdf_plugin.modules.BlockDiagonalLinear`,
        :class:`~pfgdf_plugin.modules.PermutedGroupConv2d`,
        :class:`~pfgdf_plugin.modules.MaskedDenseLinear` or
        :class:`~pfgdf_plugin.modules.MaskedDenseConv2d` computing what the masked layer
        computes, on the same device and dtype.

    Example:
        >>> from pfgdf_plugin.methods.mpd import make_plan
        >>> lin = nn.Linear(6, 4)
        >>> plan = make_plan("lin", lin.weight, blocks=2)
        >>> with torch.no_grad():
        ...     _ = lin.weight.mul_(plan.mask())
        >>> x = torch.randn(3, 6)
        >>> all(torch.allclose(convert_layer(plan, lin, kernel=k)(x), lin(x), atol=1e-6)
        ...     for k in ("bmm", "grouped", "dense"))
        True
    """
    out_n, in_n, kernel_size = check_layer(plan.name, module)
    if (out_n, in_n) + kernel_size != plan.weight_shape:
        raise MPDError(f"{plan.name}: the layer's weight shape {(out_n, in_n) + kernel_size} does not match the "
                       f"plan's {plan.weight_shape}")
    kernel = requested_kernel(plan.name, module, check_kernel(kernel))
    if kernel == "auto":
        kinds = ", ".join(LAYER_KERNELS[layer_kind(module)])
        raise MPDError(f"{plan.name}: convert_layer takes a concrete kernel ({kinds}); kernel='auto' is chosen by "
                       "convert_model")
    weight = module.weight
    if strict:
        check_block_diagonal(plan, weight)
    else:
        weight = weight.detach() * plan.mask(weight.dtype, weight.device)
    out_sizes, in_sizes = plan.out_sizes().tolist(), plan.in_sizes().tolist()
    bias = module.bias.detach() if module.bias is not None else None
    if kernel == "dense":
        return _dense_layer(plan, module, weight, bias, out_sizes, in_sizes)
    blocks_w, out_pos, in_gather, o_w, i_w = _blocks_of(plan, weight)
    raw_bias = None
    if bias is not None:
        raw_bias = torch.cat([bias, bias.new_zeros(1)])[_layout(plan.out_labels, plan.blocks)[1].to(bias.device)]
    if isinstance(module, nn.Linear):
        new: nn.Module = BlockDiagonalLinear(in_n, out_sizes, in_sizes, bias=bias is not None, kernel=kernel)
        new.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            new.block_weight().copy_(blocks_w)
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


def _conv_spatial(model: nn.Module, names: Sequence[str], example_inputs: Any) -> Dict[str, Tuple[int, int]]:
    """``{conv name: (H, W)}`` of each named layer's input, from one eval-mode pass of ``example_inputs``."""
    if example_inputs is None or not names:
        return {}
    seen: Dict[str, Tuple[int, int]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            seen.setdefault(name, tuple(args[0].shape[-2:]))
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            model(*example_inputs) if isinstance(example_inputs, (tuple, list)) else model(example_inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return seen


def _choose(name: str, plan: BlockPlan, module: nn.Module, asked: str, strict: bool, timer: Optional[Timer],
            batches: Tuple[int, ...], spatial: Tuple[int, int], given: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """The converted layer and its report entry (timed when ``asked`` is ``auto``)."""
    if asked != "auto":
        return convert_layer(plan, module, strict, asked), describe_choice(asked, given)
    candidates = {k: convert_layer(plan, module, strict, k).eval() for k in LAYER_KERNELS[layer_kind(module)]}
    inputs = {b: sample_input(module, b, spatial) for b in batches}
    choice = choose_kernel(name, candidates, inputs, timer)
    if isinstance(module, nn.Conv2d):
        choice["input"] = list(spatial)
    return candidates[choice["kernel"]].train(module.training), choice


def convert_model(model: nn.Module, plans: Mapping[str, BlockPlan], links: Iterable[FoldLink] = (),
                  strict: bool = True, kernel: KernelSpec = "block", timer: Optional[Timer] = None,
                  batches: Sequence[int] = (1, 32), example_inputs: Any = None) -> Dict[str, Any]:
    """Replace every planned layer of ``model`` by its block-diagonal form, in place.

    Args:
        model: the masked model.
        plans: ``{layer name: plan}``; a plan with one block leaves its layer dense.
        links: fold opportunities (:class:`FoldLink`); a link may end at an unplanned ``Linear``
            or ``Conv2d`` (e.g. the classifier), whose weights then absorb the permutation.
        strict: see :func:`convert_layer`. Every layer is checked before any is replaced, so
            an error leaves the model as it was.
        kernel: ``"block"`` (default: ``bmm`` for a Linear, ``grouped`` for a Conv2d, the layout
            of earlier versions), ``"auto"`` (timed per layer), ``"dense"``, ``"bmm"``,
            ``"grouped"``, or ``{layer name: kernel}`` (unnamed layers: ``block``). ``"block"``
            keeps the layout of earlier versions exactly (the same ``state_dict``); any other
            value also folds a padded layout across a BatchNorm (widening it) and drops the
            gathers and scatters that are the identity.
        timer: ``timer(module, inputs) -> seconds`` for ``auto``
            (:func:`~pfgdf_plugin.methods.mpd.kernels.median_time` by default).
        batches: the batch sizes ``auto`` times.
        example_inputs: a batch, to time convolutions at their real input size (16x16 without).

    Returns:
        :func:`summarize` of the converted model (each layer with its ``kernel``), plus
        ``"folded"`` (the links folded), ``"identity"`` (identity gathers dropped), ``"fused"``
        (ReLUs a ``bmm`` layer now applies itself: :func:`~pfgdf_plugin.methods.mpd.fold.fuse_activations`;
        not with ``"block"``) and
        ``"kernels"`` (per layer: ``kernel``, ``reason``, ``times`` ``{kernel: {batch: s}}``,
        ``threads``, ``engine``).
    """
    spec, batches = check_kernel(kernel), batches_ok(batches)
    todo = {name: plan for name, plan in plans.items() if plan.blocks > 1}
    modules = dict(model.named_modules())
    if isinstance(spec, Mapping) and set(spec) - set(todo):
        raise MPDError(f"kernel names layers that are not converted: {sorted(set(spec) - set(todo))}; converted: "
                       f"{sorted(todo)}")
    asked = {}
    for name, plan in todo.items():
        if name not in modules:
            raise MPDError(f"{name}: no such layer in the model")
        check_layer(name, modules[name])
        if strict:
            check_block_diagonal(plan, modules[name].weight)
        asked[name] = requested_kernel(name, modules[name], spec)
    timed_convs = [n for n, k in asked.items() if k == "auto" and isinstance(modules[n], nn.Conv2d)]
    spatial = _conv_spatial(model, timed_convs, example_inputs)
    new_layers, choices = {}, {}
    for name, plan in todo.items():
        given = spec.get(name, "block") if isinstance(spec, Mapping) else spec
        new_layers[name], choices[name] = _choose(name, plan, modules[name], asked[name], strict, timer, batches,
                                                  spatial.get(name, (16, 16)), given)
    for name, new in new_layers.items():
        set_module(model, name, new)
    legacy = isinstance(spec, str) and spec == "block"
    folded = []
    for link in links:  # the earlier layout folds only between two converted layers
        ends = (link.producer in todo) + (link.consumer in todo)
        if ends >= (2 if legacy else 1) and fold(model, link, widen_norms=not legacy):
            folded.append(f"{link.producer} -> {link.consumer}")
    report = summarize(model)
    report["folded"] = folded
    report["identity"] = [] if legacy else drop_identities(model, list(todo))
    report["fused"] = [] if legacy else fuse_activations(model, list(todo))
    report["kernels"] = choices
    return report


def prepack(model: nn.Module, on: bool = True) -> List[str]:
    """Freeze the converted ``bmm`` layers of ``model`` for inference: their C batch products read
    weights laid out for their tiles once instead of on every call
    (:meth:`~pfgdf_plugin.modules.BlockDiagonalLinear.prepack`; the same values). Returns the
    names of the layers switched; ``on=False`` switches them back and drops the copies.

    Example:
        >>> from pfgdf_plugin.modules import BlockDiagonalLinear
        >>> net = nn.Sequential(BlockDiagonalLinear(8, [4, 4], [4, 4]), nn.ReLU())
        >>> prepack(net), net[0].prepacked
        (['0'], True)
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, BlockDiagonalLinear) and module.kernel == "bmm":
            module.prepack(on)
            names.append(name)
    return names


def summarize(model: nn.Module) -> Dict[str, Any]:
    """Per converted layer and in total: blocks, kernel, dense / kept (effective) / stored weights.

    ``dense`` is the weight count of the original layer, ``kept`` the weights that are not
    padding, ``stored`` what the converted layer holds in memory (padding included; the whole
    matrix for a ``dense`` kernel); ``compression = dense / kept``. Biases and BatchNorms are not
    counted.

    Returns:
        ``{"layers": {name: {...}}, "dense", "kept", "stored", "compression"}``.
    """
    layers: Dict[str, Dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, CONVERTED):
            w = m.conv.weight if isinstance(m, (PermutedGroupConv2d, MaskedDenseConv2d)) else None
            k = 1 if w is None else w.shape[2] * w.shape[3]
            dense = sum(m.out_sizes) * sum(m.in_sizes) * k
            kept = m.effective_weights()
            layers[name] = {"kind": type(m).__name__, "blocks": m.blocks, "kernel": m.kernel, "dense": dense,
                            "kept": kept, "stored": m.stored_weights(), "compression": dense / kept}
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
            "modules": {name: m.describe() for name, m in model.named_modules() if isinstance(m, CONVERTED)}}


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
        set_module(model, name, new.train(old.training))
    return model
