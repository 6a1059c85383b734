"""Turn NNI masks into a smaller model on torch 2.x, and helpers around it.

NNI 3.0's ``ModelSpeedup`` fails on torch >= 2.2 with its default tracer (``concrete_trace``);
it works when handed a ``torch.fx.symbolic_trace`` graph. Facts this module accounts for:

* ``ModelSpeedup`` runs a forward pass (``ShapeProp``) in the model's *current* mode: a model in
  training mode gets its BatchNorm running statistics updated by the dummy input. :func:`speedup`
  therefore puts the model in eval mode first, and returns it in eval mode (NNI's replaced modules
  come back in training mode).
* Coupled layers (convolutions feeding one residual addition) must carry the same channel mask.
  If they do not, NNI keeps the union of their channels with their original weights, so the
  result is neither the masked model nor as small as hoped. Build the pruner's config with
  :func:`dependency_config_list` (NNI's ``auto_set_denpendency_group_ids``) so coupled layers are
  decided together; :func:`speedup` warns when masks of coupled layers disagree.
* NNI treats a channel that is constant over the batch as prunable. The BatchNorm after a masked
  filter outputs a constant (its shift) for that channel, and speedup drops it. The sped-up model
  therefore equals the masked model *with that BatchNorm channel's weight and bias zeroed too*:
  ``apply_masks(model, masks, batchnorm=True)``.
* ``ModelSpeedup`` holds, besides the model, a mask and a gradient for every parameter, a copy
  of the state dict it reloads at the end, and the replacement layers it builds: its memory
  grows by several times the model's size (:data:`SPEEDUP_MEMORY_FACTOR`, measured). :func:`speedup`
  refuses up front, with a :class:`~pfgdf_plugin.errors.MemoryBudgetError`, a model that would
  not fit in what the process can still allocate, instead of running out of memory minutes in.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections import defaultdict
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import MemoryBudgetError
from ..measure import available_memory, model_bytes

_MASKS = Dict[str, Dict[str, Optional[torch.Tensor]]]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FILTER_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# what speedup() checks for before it starts: ModelSpeedup's peak growth of the process's address space
# is at most SPEEDUP_MEMORY_FACTOR x the model's parameter and buffer bytes + SPEEDUP_MEMORY_BASE
# (measured after NNI's PFGDFPruner at batch 4: torchvision resnet50 0.52 GB for 0.09 GB of parameters,
# regnet_y_3_2gf 0.40 / 0.07, regnet_y_16gf 1.21 / 0.30, vgg16 1.62 / 0.50, regnet_y_128gf 7.6 / 2.38)
SPEEDUP_MEMORY_FACTOR = 4.0
SPEEDUP_MEMORY_BASE = 2 ** 28
_GB = 2 ** 30


def _check_memory(model: nn.Module, available: Optional[int]) -> None:
    size = model_bytes(model)
    need = SPEEDUP_MEMORY_FACTOR * size + SPEEDUP_MEMORY_BASE
    if available is not None and need > available:
        raise MemoryBudgetError(
            f"NNI's ModelSpeedup needs about {need / _GB:.1f} GB for {type(model).__name__} "
            f"({SPEEDUP_MEMORY_FACTOR:g} x its {size / _GB:.2f} GB of parameters and buffers, "
            f"+ {SPEEDUP_MEMORY_BASE / _GB:.2f} GB), and this process can allocate {available / _GB:.1f} GB more; "
            "the model is untouched. Free memory or raise the limit, or prune it with the Torch-Pruning adapter "
            "(pfgdf_plugin.torch_pruning), whose surgery works in place")


def _check_unwrapped(model: nn.Module) -> None:
    wrapped = [name for name, module in model.named_modules() if hasattr(module, "_nni_wrapper")]
    if wrapped:
        raise RuntimeError(f"{type(model).__name__} is still wrapped by an NNI compressor "
                           f"({wrapped[0]!r}, ...): call pruner.unwrap_model() first")


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as exc:  # torch.fx raises TraceError, TypeError, NotImplementedError, ...
        raise RuntimeError(f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
                           "NNI's speedup needs a torch.fx.symbolic_trace graph on torch 2.x: keep the "
                           "forward free of data-dependent Python control flow, or wrap such parts in "
                           "leaf modules") from exc


def _as_args(dummy_input: Any) -> Optional[tuple]:
    if isinstance(dummy_input, torch.Tensor):
        return (dummy_input,)
    if isinstance(dummy_input, (tuple, list)):
        return tuple(dummy_input)
    return None  # dict inputs: ShapeProp takes positional arguments only


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)


def _traced_with_shapes(model: nn.Module, dummy_input: Any) -> torch.fx.GraphModule:
    gm = _trace(model)
    args = _as_args(dummy_input)
    if args is not None:
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    return gm


def _check_single_features(gm: torch.fx.GraphModule) -> None:
    """Refuse graphs NNI's ``ModelSpeedup`` cannot handle: a tensor of one value per sample.

    NNI 3.0's mask propagation loses the mask of a tensor whose non-batch dimensions are all 1
    (``[batch, 1]`` from a one-class ``Linear`` or a one-channel layer pooled and flattened;
    ``[batch, 1, 1, 1]`` from a one-channel convolution at 1x1 resolution): it then fails deep
    inside NNI (``TypeError: unsupported operand type(s) for *: 'NoneType' and 'Tensor'``,
    ``OutputTypeError``, ``'NoneType' object has no attribute 'data'``, an ``AssertionError`` in
    ``replace_linear``). Needs ``ShapeProp`` metadata.
    """
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        if shape is not None and len(shape) >= 2 and all(int(d) == 1 for d in shape[1:]):
            where = f"layer {node.target!r}" if node.op == "call_module" else f"node {node.name!r} ({node.op})"
            raise ValueError(f"{where} outputs a single feature per sample (shape {tuple(shape)}); NNI 3.0's "
                             "ModelSpeedup cannot propagate masks through such tensors and fails inside NNI. Widen the "
                             "layer, or keep the masked model (pfgdf_plugin.nni.apply_masks) instead of speeding it up")


@contextlib.contextmanager
def _misread_convs_not_depthwise(model: nn.Module):
    """Keep NNI from reading a one-output or a narrowing grouped convolution as a depthwise one.

    NNI 3.0's ``build_channel_dependency`` calls every convolution with ``groups == out_channels``
    depthwise, so a plain ``Conv2d(n, 1)`` (``groups == out_channels == 1``) or a grouped
    ``Conv2d(4, 2, groups=2)`` (each output reads two inputs) is coupled with its producer: two
    layers of different widths land in one dependency group and the pruner fails
    ("layers of different widths", or a shape error in NNI's ``generate_sparsity``), and
    ``ModelSpeedup``'s mask-conflict fix fails its ``len(set(num_channels_list)) == 1`` assertion.
    The analysis reads ``out_channels`` only to test for depthwise layers (``groups == out_channels``;
    ``groups != out_channels`` for group counts, which then become the true ``groups``); it is
    hidden for the duration.
    """
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))
             and m.groups == m.out_channels and (m.groups == 1 or m.in_channels != m.out_channels)]
    saved = [m.out_channels for m in convs]
    try:
        for m in convs:
            m.out_channels = 0
        yield
    finally:
        for m, out_channels in zip(convs, saved):
            m.out_channels = out_channels


def _dependency_ids(gm: torch.fx.GraphModule, config_list: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    from nni.compression.speedup import auto_set_denpendency_group_ids

    with _misread_convs_not_depthwise(gm):
        return auto_set_denpendency_group_ids(gm, _copy_config(config_list))


def _copy_config(config_list: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return copy.deepcopy(list(config_list))


def dependency_config_list(model: nn.Module, dummy_input: Any,
                           config_list: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """``config_list`` with NNI's ``dependency_group_id`` set on coupled layers (one entry per layer).

    Runs ``torch.fx.symbolic_trace``, ``ShapeProp`` (in eval mode, so BatchNorm statistics are not
    touched) and ``nni.compression.speedup.auto_set_denpendency_group_ids``. Give the result to
    the pruner so layers feeding one residual addition lose the same channels.

    Example:
        >>> import torch
        >>> from pfgdf_plugin.models import build_model
        >>> from pfgdf_plugin.nni import PFGDFPruner, dependency_config_list
        >>> model = build_model("resnet20", width=0.5)
        >>> cfg = dependency_config_list(model, torch.randn(1, 3, 32, 32), [{"op_types": ["Conv2d"]}])
        >>> _, masks = PFGDFPruner(model, cfg, k=1.0).compress()
    """
    with _eval_mode(model):
        gm = _traced_with_shapes(model, dummy_input)
        return _dependency_ids(gm, config_list)


def _filter_keep(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape[0], -1).abs().sum(1) != 0


def _check_coupled(gm: torch.fx.GraphModule, masks: _MASKS, config_list: List[Dict[str, Any]]) -> None:
    groups: Dict[Any, List[str]] = defaultdict(list)
    for entry in _dependency_ids(gm, config_list):
        gid = entry.get("dependency_group_id")
        if gid is None:
            gid = (entry.get("target_settings") or {}).get("weight", {}).get("dependency_group_id")
        if gid is not None:
            groups[gid].extend(entry.get("op_names", []))
    for names in groups.values():
        keeps = {n: _filter_keep(masks[n]["weight"]) for n in names
                 if masks.get(n, {}).get("weight") is not None}
        if len(keeps) < 2:
            continue
        ref_name, ref = next(iter(keeps.items()))
        differ = [n for n, k in keeps.items() if k.shape != ref.shape or not torch.equal(k, ref)]
        if differ:
            warnings.warn(f"layers {sorted(keeps)} are coupled (their outputs meet, e.g. in a residual "
                          f"addition) but their masks keep different channels ({ref_name!r} vs "
                          f"{differ[0]!r}); NNI's speedup keeps the union with the "
                          "original weights, so the result will differ from the masked model. Build the "
                          "pruner's config with pfgdf_plugin.nni.dependency_config_list(...)",
                          RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def _quiet(verbose: bool):
    """Silence NNI's INFO/WARNING logging and a stray ``print`` in its mask-conflict code."""
    if verbose:
        yield None
        return
    loggers = [logging.getLogger(name) for name in ("nni", "nni.compression", "nni.compression.speedup")]
    loggers += [lg for name, lg in logging.root.manager.loggerDict.items()
                if name.startswith("nni.compression.speedup") and isinstance(lg, logging.Logger)]
    levels = [lg.level for lg in loggers]
    quiet = logging.getLogger("pfgdf_plugin.nni.speedup")
    loggers.append(quiet)
    levels.append(quiet.level)
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()):
            yield quiet
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def speedup(model: nn.Module, masks: _MASKS, dummy_input: Any, config_list: Optional[List[Dict[str, Any]]] = None,
            *, verbose: bool = False, check_memory: bool = True) -> nn.Module:
    """Physically remove the masked channels with NNI's ``ModelSpeedup``; returns ``model`` (eval mode).

    Call ``pruner.unwrap_model()`` first (NNI's order: compress, unwrap, speedup). Steps:
    ``model.eval()``, ``torch.fx.symbolic_trace``, ``ShapeProp``, a check with
    ``auto_set_denpendency_group_ids`` that coupled layers carry equal masks (a ``RuntimeWarning``
    if not), then ``ModelSpeedup(model, dummy_input, masks, graph_module=gm).speedup_model()``.

    Args:
        model: the unwrapped model; modified in place.
        masks: ``{module_name: {"weight": mask, "bias": mask}}`` as returned by ``compress()``.
        dummy_input: a batch (tensor or tuple of tensors) for tracing and mask propagation; a
            batch of several samples is safer (NNI detects constant channels over the batch).
        config_list: the config used for pruning, for the coupled-layer check; by default one
            entry naming every masked module.
        verbose: keep NNI's INFO/WARNING log and its prints (silenced by default).
        check_memory: refuse a model whose speedup would need more memory than the process can
            still allocate (:data:`SPEEDUP_MEMORY_FACTOR` x its parameter and buffer bytes, plus
            :data:`SPEEDUP_MEMORY_BASE`).

    Raises:
        MemoryBudgetError: (``check_memory``) the model would not fit; nothing was changed.
        RuntimeError: the model is still wrapped, or torch.fx cannot trace it.
        ValueError: a layer outputs a single value per sample (``[batch, 1]`` from a one-class
            classifier, ``[batch, 1, 1, 1]``): NNI 3.0's ``ModelSpeedup`` cannot handle one; the
            message names the layer.

    Example:
        >>> import torch
        >>> from pfgdf_plugin.models import build_model
        >>> from pfgdf_plugin.nni import PFGDFPruner, speedup
        >>> model = build_model("vgg16_bn", width=0.25)
        >>> pruner = PFGDFPruner(model, [{"op_types": ["Conv2d"]}])
        >>> _, masks = pruner.compress()
        >>> pruner.unwrap_model()
        >>> model = speedup(model, masks, torch.randn(4, 3, 32, 32))
    """
    from nni.compression.speedup import ModelSpeedup

    _check_unwrapped(model)
    if check_memory:
        _check_memory(model, available_memory())
    masks = {name: {t: m for t, m in targets.items() if m is not None} for name, targets in masks.items()}
    masks = {name: targets for name, targets in masks.items() if targets}
    model.eval()
    gm = _traced_with_shapes(model, dummy_input)
    _check_single_features(gm)
    if config_list is None:
        names = sorted(n for n, t in masks.items() if t.get("weight") is not None)
        config_list = [{"op_names": names}] if names else []
    if config_list and _as_args(dummy_input) is not None:
        _check_coupled(gm, masks, config_list)
    with _quiet(verbose) as logger:
        engine = ModelSpeedup(model, dummy_input, masks, graph_module=gm, logger=logger)
        fix_mask_conflict = engine.fix_mask_conflict

        def fix_without_misread_convs():  # NNI's conflict fix runs the same channel-dependency analysis
            with _misread_convs_not_depthwise(model):
                fix_mask_conflict()

        engine.fix_mask_conflict = fix_without_misread_convs
        engine.speedup_model()
    return model.eval()


@torch.no_grad()
def apply_masks(model: nn.Module, masks: _MASKS, *, batchnorm: bool = False) -> nn.Module:
    """Multiply the masked parameters in place: the masked model, for comparison with the pruned one.

    Args:
        model: an unwrapped model (e.g. a deep copy of the one given to the pruner).
        masks: ``{module_name: {target_name: mask}}``; ``None`` masks are skipped.
        batchnorm: also zero the weight and bias of BatchNorm channels fed directly by a masked
            filter (found with ``torch.fx``). NNI's speedup removes those channels entirely,
            including the constant shift a BatchNorm adds to a zeroed channel, so this is the
            masked model that :func:`speedup` reproduces.

    Returns:
        ``model``.
    """
    _check_unwrapped(model)
    modules = dict(model.named_modules())
    for name, targets in masks.items():
        if name not in modules:
            raise ValueError(f"mask for {name!r}, which is not a module of {type(model).__name__}")
        for target_name, mask in targets.items():
            param = getattr(modules[name], target_name, None)
            if mask is None or param is None:
                continue
            param.mul_(mask.to(device=param.device, dtype=param.dtype))
    if batchnorm:
        gm = _trace(model)
        for node in gm.graph.nodes:
            if node.op != "call_module" or not isinstance(modules.get(node.target), _BATCHNORMS) or not node.args:
                continue
            src = node.args[0]
            if not isinstance(src, torch.fx.Node) or src.op != "call_module":
                continue
            if not isinstance(modules.get(src.target), _FILTER_LAYERS):
                continue
            mask = masks.get(src.target, {}).get("weight")
            bn = modules[node.target]
            if mask is None or not bn.affine:
                continue
            keep = _filter_keep(mask).to(device=bn.weight.device, dtype=bn.weight.dtype)
            bn.weight.mul_(keep)
            bn.bias.mul_(keep)
    return model
