"""Glue every method's recipe entry shares: the per-layer report, NNI config lists and the
training-aware NNI loop."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn

from ..errors import ConfigError
from ..measure import filters_per_layer
from .registry import PruneContext, PruneResult


def module_names(model: nn.Module) -> Dict[nn.Module, str]:
    """Module -> its qualified name in ``model``."""
    return {m: n for n, m in model.named_modules()}


def channel_report(before: Dict[str, int], after: nn.Module) -> Dict[str, dict]:
    """Per layer of ``before`` (filters per layer of the dense model): channels, pruned and ratio."""
    now = filters_per_layer(after)
    return {n: {"channels": c, "pruned": c - now.get(n, c), "ratio": (c - now.get(n, c)) / c}
            for n, c in before.items()}


def train_config(ctx: PruneContext, epochs: Optional[float] = None):
    """The pruning phase's :class:`~pfgdf_plugin.train.TrainConfig` (``ctx.train_cfg``, else lr 0.01),
    with ``epochs`` when given."""
    from ..train import TrainConfig

    cfg = ctx.train_cfg or TrainConfig(lr=0.01)
    return cfg if epochs is None else dataclasses.replace(cfg, epochs=epochs)


def epochs_of(steps: Optional[float], ctx: PruneContext) -> float:
    """Optimiser steps as epochs of ``ctx.train_loader`` (``extra["train_epochs"]``); ``None`` steps: 0."""
    return 0.0 if steps is None else float(steps) / max(1, len(ctx.train_loader))


def needs_data(ctx: PruneContext, method: str, why: str) -> None:
    """Raise :class:`~pfgdf_plugin.errors.ConfigError` when a method that trains or probes got no training data.

    Example:
        >>> needs_data(PruneContext(), "taylor", "scores channels by loss gradients")
        Traceback (most recent call last):
        ...
        pfgdf_plugin.errors.ConfigError: method 'taylor': it scores channels by loss gradients: it needs training \
data (PruneContext.train_loader; a recipe passes its data section's)
    """
    if ctx.train_loader is None:
        raise ConfigError([f"it {why}: it needs training data (PruneContext.train_loader; a recipe passes its "
                           "data section's)"], f"method {method!r}")


def nni_config(model: nn.Module, example_inputs, ignored: List[nn.Module], ratio: Optional[float]) -> List[dict]:
    """Conv layers (Linear ones in a model without convs) minus the ignored ones, with NNI dependency
    groups for coupled layers."""
    from ..nni import dependency_config_list

    names = module_names(model)
    kind = nn.Conv2d if any(isinstance(m, nn.Conv2d) for m in model.modules()) else nn.Linear  # MLPs: neurons
    entry: Dict[str, Any] = {"op_types": [kind.__name__]}
    excl = [names[m] for m in ignored if isinstance(m, kind)]
    if excl:
        entry["exclude_op_names"] = excl
    if ratio is not None:
        entry["sparse_ratio"] = float(ratio)
    return dependency_config_list(model, example_inputs, [entry])


def nni_l1_copy(example_inputs):
    """``compress(net, ignored, ratio)`` for :func:`~.budget.nni_search`: NNI's L1 pruning of a copy at
    one ratio per layer, which gives any per-layer criterion's structure (and so its cost) at that ratio."""
    def compress(net, net_ignored, r):
        import nni.compression.pruning as nni_pruning

        config = nni_config(net, example_inputs, net_ignored, r)
        pruner = nni_pruning.L1NormPruner(net, config)
        _, masks = pruner.compress()
        pruner.unwrap_model()
        return masks, config

    return compress


def nni_finish(model: nn.Module, masks, example_inputs, config: List[dict], before: Dict[str, int]) -> PruneResult:
    """Apply NNI's masks with :func:`pfgdf_plugin.nni.speedup`; report the channels removed."""
    from ..nni import speedup

    model = speedup(model, masks, example_inputs, config_list=config)
    return PruneResult(model, channel_report(before, model))


def nni_train(pruner, evaluator, ctx: PruneContext, steps: Optional[int]) -> Tuple[Any, Optional[Dict[str, Any]]]:
    """Run a training-aware NNI pruner for ``steps`` (inside a quantizer's loop with
    ``ctx.quantize.fused``) and unwrap the model; return ``(masks, fused calibration or None)``."""
    from ..quantize import fuse

    if evaluator is not None and ctx.quantize is not None and ctx.quantize.fused:
        quantizer = fuse(pruner, ctx.quantize, evaluator)
        quantizer.compress(max_steps=steps, max_epochs=None)
        calibration = quantizer.get_calibration_config()
        masks = pruner.get_masks()
        quantizer.unwrap_model()  # the last compressor holds the wrappers after fusion
        return masks, calibration
    _, masks = pruner.compress(max_steps=steps, max_epochs=None)
    pruner.unwrap_model()
    return masks, None
