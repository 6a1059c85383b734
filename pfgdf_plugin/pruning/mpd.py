"""MPDCompress's recipe entry: ``prune.params`` is :class:`MPDRecipeParams` (MPD's knobs plus
the training schedule: ``start``, ``block_init``, ``max_epochs``)."""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn

from ..errors import ConfigError, MPDError
from ..methods.mpd import MPDParams, check_start
from ..methods.params import is_number
from ..train import Checkpointing
from .common import epochs_of, module_names, needs_data, nni_train, train_config
from .registry import Method, PruneResult, register, resolve_layers


@dataclasses.dataclass(frozen=True)
class MPDRecipeParams(MPDParams):
    """MPD's knobs plus the recipe's masked-training schedule.

    Attributes:
        start: when the masks go on. ``dense`` (the default): the run's dense stage trains the
            model (the ``train`` section), the masks are chosen on the trained weights, then
            ``max_epochs`` of masked training. ``scratch``: the masks go on the freshly
            initialised model and the ``train`` section's training runs masked instead of dense
            (the dense stage does not train; the pruning stage runs it, resumably), then
            ``max_epochs`` more. Either way a run trains ``train.epochs + max_epochs +
            finetune.epochs`` epochs.
        block_init: with ``start: scratch``, rescale every masked row of the initial weights by
            ``sqrt(fan-in / kept fan-in)`` (:func:`~pfgdf_plugin.methods.mpd.block_init_`), the
            initialisation of a layer of the block's size.
        max_epochs: masked training before conversion (>= 0; 0 converts right away), with the
            ``finetune`` section's optimiser settings.

    Example:
        >>> MPDRecipeParams(start="scratch", max_epochs=0).start
        'scratch'
        >>> MPDRecipeParams(block_init=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pfgdf_plugin.errors.MPDError: block_init rescales an initialisation: it needs start: scratch, got start: dense
    """

    start: str = "dense"
    block_init: bool = False
    max_epochs: float = 1.0

    def problems(self) -> List[str]:
        found = super().problems()
        if not is_number(self.max_epochs) or self.max_epochs < 0:
            found.append(f"max_epochs must be >= 0, got {self.max_epochs!r}")
        try:
            check_start(self.start)
        except MPDError as e:
            return found + [str(e)]
        if not isinstance(self.block_init, bool):
            found.append(f"block_init must be true or false, got {self.block_init!r}")
        elif self.block_init and self.start != "scratch":
            found.append(f"block_init rescales an initialisation: it needs start: scratch, got start: {self.start}")
        if self.start == "scratch" and self.permutation == "magnitude":
            found.append("permutation magnitude chooses blocks from trained weights; with start: scratch the masks "
                         "go on the initial weights: use permutation random, or start: dense")
        return found

    def sizes(self) -> Dict[str, Any]:
        """``{"blocks": n}`` or ``{"compression": x}``, whichever is set."""
        return {"blocks": self.blocks} if self.blocks is not None else {"compression": self.compression}


def _snapshot(model: nn.Module, plans: Dict[str, Any]) -> Dict[str, Any]:
    """The first masked layer's weight (|W| summed over the kernel) and its block labels, for the report."""
    if not plans:
        return {}
    name, plan = next(iter(plans.items()))
    w = dict(model.named_modules())[name].weight.detach().float().abs()
    w = w.reshape(w.shape[0], w.shape[1], -1).sum(-1) if w.dim() > 2 else w
    return {"layer": name, "weight": w.tolist(), "out_labels": plan.out_labels.tolist(),
            "in_labels": plan.in_labels.tolist(), "blocks": plan.blocks}


def _result(model: nn.Module, report: Dict[str, Any], snapshot: Dict[str, Any], p: MPDRecipeParams,
            epochs: float) -> PruneResult:
    layers = {n: {k: v for k, v in e.items() if k in ("blocks", "dense", "kept", "stored", "compression")}
              for n, e in report["layers"].items()}
    return PruneResult(model, layers, extra={"train_epochs": float(epochs), "mpd_snapshot": snapshot,
                                             "mpd_compression": report["compression"],
                                             "mpd_folded": report.get("folded", []),
                                             "mpd_kernels": report.get("kernels", {}),
                                             "mpd_start": p.start, "mpd_block_init": p.block_init})


def _scratch_phase(ctx, p: MPDRecipeParams):
    """The training ``start: scratch`` runs masked before ``max_epochs``: the dense stage's
    (``ctx.initial_train``), or none."""
    cfg = ctx.initial_train if p.start == "scratch" else None
    return cfg if cfg is not None and cfg.epochs > 0 else None


def _tp_mpd(model, example_inputs, p: MPDRecipeParams, ratio, ignored, ctx) -> PruneResult:
    """MPDCompress through Torch-Pruning's graph: masked training (from the trained dense model, or
    from initialisation), then block-diagonal layers."""
    from ..torch_pruning.mpd import MPDPruner
    from ..train import train

    sizes = p.sizes() if ctx.target is None else {"target": ctx.target, "timing": ctx.timing}
    pruner = MPDPruner(model, example_inputs, permutation=p.permutation, ignored_layers=ignored, seed=p.seed,
                       round_to=p.round_to, fold=p.fold, dense_output=p.dense_output, kernel=p.kernel, **sizes)
    epochs = 0.0
    if p.block_init:
        pruner.init_blocks()
    scratch = _scratch_phase(ctx, p)
    if scratch is not None:
        needs_data(ctx, "mpd", "trains from scratch with its masks (prune.params.start: scratch)")
        ckpt = Checkpointing(ctx.initial_checkpoint, ctx.checkpoint_every) if ctx.initial_checkpoint else None
        stats = train(model, ctx.train_loader, scratch, device=ctx.device, desc="mpd (masked training from scratch)",
                      progress=ctx.progress, on_step=lambda step, loss: pruner.update(), checkpoint=ckpt)
        epochs += epochs_of(stats["steps"], ctx)
        model.cpu().eval()
    if p.max_epochs > 0:
        needs_data(ctx, "mpd", "trains with its masks for prune.params.max_epochs")
        # the plans are a function of the dense weights and the seed: a resumed run rebuilds them
        ckpt = Checkpointing(ctx.checkpoint, ctx.checkpoint_every) if ctx.checkpoint else None
        stats = train(model, ctx.train_loader, train_config(ctx, p.max_epochs), device=ctx.device,
              desc="mpd (masked training)", progress=ctx.progress, on_step=lambda step, loss: pruner.update(),
              checkpoint=ckpt)
        epochs += epochs_of(stats["steps"], ctx)
        model.cpu().eval()
    snapshot = _snapshot(model, pruner.plans)
    result = _result(model, pruner.step(), snapshot, p, epochs)
    if pruner.target_report is not None:
        result.extra["target_search"] = pruner.target_report
    return result


def _nni_mpd(model, example_inputs, p: MPDRecipeParams, ratio, ignored, ctx) -> PruneResult:
    """MPDCompress through NNI: fine-grained masks trained under a TorchEvaluator (optionally fused
    with a quantizer), then converted to block-diagonal layers. With ``start: scratch`` the
    evaluator trains one phase: the ``train`` section's (``max_epochs`` must then be 0)."""
    from ..nni.mpd import MPDPruner, convert
    from ..quantize import torch_evaluator

    scratch = _scratch_phase(ctx, p)
    if scratch is not None and p.max_epochs > 0:
        raise ConfigError([f"prune.params.max_epochs must be 0 with start: scratch via nni (got {p.max_epochs:g}): "
                           "NNI's evaluator trains one masked phase, here the train section's; or use "
                           "prune.framework: torch_pruning, which trains both"], "method 'mpd'")

    names = module_names(model)
    entry: Dict[str, Any] = {"op_types": ["Linear", "Conv2d"]}
    excl = [names[m] for m in ignored]
    if p.dense_output:
        excl += [n for n in (names[m] for m in resolve_layers(model, None)) if n not in excl]
    if excl:
        entry["exclude_op_names"] = excl
    cfg = scratch if scratch is not None else train_config(ctx, p.max_epochs)
    evaluator = None
    if cfg.epochs > 0:
        needs_data(ctx, "mpd", "trains with its masks for prune.params.max_epochs" if scratch is None
                   else "trains from scratch with its masks (prune.params.start: scratch)")
        evaluator = torch_evaluator(model, ctx.train_loader, cfg, ctx.device, ctx.progress,
                                    "mpd (masked training, NNI)" if scratch is None
                                    else "mpd (masked training from scratch, NNI)")
    sizes, search = p.sizes(), None
    if ctx.target is not None:  # the block count that meets the target, on converted copies
        from ..torch_pruning.mpd import MPDPruner as Search

        search = Search(copy.deepcopy(model), example_inputs, permutation=p.permutation, ignored_layers=excl,
                        seed=p.seed, round_to=p.round_to, fold=p.fold, dense_output=p.dense_output,
                        target=ctx.target, timing=ctx.timing).target_report
        sizes = {"blocks": search["knob"]}
    pruner = MPDPruner(model, [entry], evaluator, permutation=p.permutation, seed=p.seed, round_to=p.round_to,
                       **sizes)
    if p.block_init:
        pruner.init_blocks()
    steps = max(1, int(round(cfg.epochs * len(ctx.train_loader)))) if evaluator is not None else None
    _, calibration = nni_train(pruner, evaluator, ctx, steps)
    model.cpu().eval()
    snapshot = _snapshot(model, dict(pruner.plans))
    epochs = epochs_of(steps, ctx)
    result = _result(model, convert(model, pruner, example_inputs, fold=p.fold, kernel=p.kernel), snapshot, p,
                     epochs)
    result.fused_calibration = calibration
    if search is not None:
        result.extra["target_search"] = search
    return result


def report(result: PruneResult, plot_dir: Optional[str]) -> Tuple[Dict[str, Any], List[str]]:
    """MPD's metrics (compression reached, folded permutations) and its block-structure plot."""
    x = result.extra
    metrics = {"mpd": {"compression": x["mpd_compression"], "folded": x["mpd_folded"],
                       "kernels": x.get("mpd_kernels", {})}}
    if "mpd_start" in x:  # how the masked training began (a saved result of an older run may not say)
        metrics["mpd"].update(start=x["mpd_start"], block_init=x.get("mpd_block_init", False))
    if plot_dir is None or not x.get("mpd_snapshot"):
        return metrics, []
    from ..report import plot_mpd_blocks

    return metrics, [plot_mpd_blocks(x["mpd_snapshot"], result.layers, os.path.join(plot_dir, "mpd_blocks.png"))]


METHOD = register(Method(
    "mpd", "MPDCompress: permuted block-diagonal masks in training, then block-diagonal / grouped layers",
    params=MPDRecipeParams, run={"torch_pruning": _tp_mpd, "nni": _nni_mpd}, fusable=("nni",), report=report,
    target_knobs=("compression", "blocks"), from_scratch=lambda p: p.start == "scratch"))
