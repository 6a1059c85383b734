"""SPP's recipe entry: ``prune.params`` is :class:`SPPRecipeParams` (SPP's knobs plus ``max_epochs``)."""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from ..measure import filters_per_layer
from ..methods.params import is_number
from ..methods.spp import SPPParams
from ..train import Checkpointing, read_checkpoint
from .budget import nni_search
from .common import channel_report, epochs_of, needs_data, nni_config, nni_finish, nni_l1_copy, nni_train, train_config
from .registry import Method, PruneResult, register

MAX_SNAPSHOTS = 200  # probability snapshots kept for the report's heat map


@dataclasses.dataclass(frozen=True)
class SPPRecipeParams(SPPParams):
    """SPP's knobs plus the recipe's budget for the pruning phase.

    Attributes:
        max_epochs: the longest the pruning phase may train (> 0), with the ``finetune``
            section's optimiser settings.
    """

    max_epochs: float = 2.0

    def problems(self) -> List[str]:
        found = super().problems()
        if not is_number(self.max_epochs) or self.max_epochs <= 0:
            found.append(f"max_epochs must be > 0, got {self.max_epochs!r}")
        return found


def _snapshot(probabilities: Dict[str, torch.Tensor], history: Dict[str, list], every: int, step: int) -> None:
    if step % every == 0:
        for name, p in probabilities.items():
            history.setdefault(name, []).append(p.detach().float().cpu().tolist())


def _extra(history: Dict[str, list], every: int, steps: int, finished: bool, ctx) -> Dict[str, Any]:
    return {"spp_history": history, "spp_history_every": every, "spp_steps": steps, "spp_finished": finished,
            "train_epochs": epochs_of(steps, ctx)}


def _tp_train(model, pruner, p: SPPRecipeParams, ctx, history: Dict[str, list], every: int) -> int:
    """Train with SPP's masks until it finishes (resumable through ``ctx.checkpoint``); return the steps."""
    from ..train import train

    def on_step(step: int, loss: float) -> bool:
        pruner.update()
        _snapshot(pruner.probabilities(), history, every, step)
        return pruner.finished

    ckpt, saved = None, None
    if ctx.checkpoint:  # resumable: the model, optimiser and SPP's probabilities, masks and generator
        saved = read_checkpoint(ctx.checkpoint)
        if saved is not None:
            pruner.load_state_dict(saved["extra"]["spp"])
            history.update(saved["extra"]["history"])
        ckpt = Checkpointing(ctx.checkpoint, ctx.checkpoint_every,
                             lambda: {"spp": pruner.state_dict(), "history": history})
    if saved is not None and pruner.finished:  # it was saved at the very step SPP finished
        model.load_state_dict(saved["model"])
        return saved["step"]
    stats = train(model, ctx.train_loader, train_config(ctx, p.max_epochs), device=ctx.device, desc="spp (pruning)",
                  progress=ctx.progress, on_step=on_step, checkpoint=ckpt)
    return stats["steps"]


def _tp_spp(model, example_inputs, p: SPPRecipeParams, ratio, ignored, ctx) -> PruneResult:
    """SPP through Torch-Pruning: train with probabilistic masks until every group reaches its
    target (or ``max_epochs`` runs out), then remove the zeroed channels."""
    from ..torch_pruning import SPPPruner

    needs_data(ctx, "spp", "prunes while training")
    before = filters_per_layer(model)
    pruner = SPPPruner(model, example_inputs, pruning_ratio=ratio, interval=p.interval, A=p.A, u=p.u, seed=p.seed,
                       rounding=p.rounding, rescale_survivors=p.rescale_survivors, ignored_layers=ignored,
                       target=ctx.target, timing=ctx.timing)
    every = max(1, int(p.max_epochs * len(ctx.train_loader)) // MAX_SNAPSHOTS)
    history: Dict[str, list] = {}
    steps = _tp_train(model, pruner, p, ctx, history, every)
    finished = pruner.finished
    if not finished:
        warnings.warn(f"SPP did not reach its targets within prune.params.max_epochs={p.max_epochs}: "
                      "only channels at p = 1 are removed (raise max_epochs or A, or lower interval)", stacklevel=2)
    model.cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.step()
    extra = _extra(history, every, steps, finished, ctx)
    if pruner.target_report is not None:
        extra["target_search"] = pruner.target_report
    return PruneResult(model, channel_report(before, model), extra=extra)


def _nni_spp(model, example_inputs, p: SPPRecipeParams, ratio, ignored, ctx) -> PruneResult:
    """SPP through NNI: a training-aware pruner driven by a TorchEvaluator over the recipe's data;
    with ``ctx.quantize.fused`` a quantizer runs in the same training loop."""
    from ..nni import SPPPruner
    from ..quantize import torch_evaluator

    needs_data(ctx, "spp", "prunes while training")
    search = None
    if ctx.target is not None:  # the ratio is chosen before training, on L1-pruned copies
        search = nni_search(model, example_inputs, ctx, ignored, nni_l1_copy(example_inputs), knob_name="pruning ratio")
        ratio = search["knob"]
    before = filters_per_layer(model)
    cfg = train_config(ctx, p.max_epochs)
    steps = max(1, int(round(cfg.epochs * len(ctx.train_loader))))
    every = max(1, steps // MAX_SNAPSHOTS)
    history: Dict[str, list] = {}
    holder: Dict[str, Any] = {}

    def on_step(step: int, loss: float) -> bool:
        _snapshot(holder["pruner"].probabilities(), history, every, step)
        return holder["pruner"].stopped

    evaluator = torch_evaluator(model, ctx.train_loader, cfg, ctx.device, ctx.progress, "spp (pruning, NNI)", on_step)
    config = nni_config(model, example_inputs, ignored, ratio)
    pruner = SPPPruner(model, config, evaluator, training_steps=steps, interval=p.interval, A=p.A, u=p.u, seed=p.seed)
    holder["pruner"] = pruner
    masks, calibration = nni_train(pruner, evaluator, ctx, steps)
    finished = pruner.finished
    result = nni_finish(model.cpu(), masks, example_inputs, config, before)
    result.fused_calibration = calibration
    result.extra.update(_extra(history, every, pruner.steps, finished, ctx))
    if search is not None:
        result.extra["target_search"] = search
    return result


def report(result: PruneResult, plot_dir: Optional[str]) -> Tuple[Dict[str, Any], List[str]]:
    """SPP's metrics (steps trained, whether every group reached its target) and probability heat map."""
    x = result.extra
    metrics = {"spp": {"steps": x["spp_steps"], "finished": x["spp_finished"]}}
    if plot_dir is None or not x.get("spp_history"):
        return metrics, []
    from ..report import plot_probabilities

    return metrics, [plot_probabilities(x["spp_history"], x["spp_history_every"],
                                        os.path.join(plot_dir, "spp_probabilities.png"))]


def rank_checks(result: PruneResult) -> Dict[str, Iterable[torch.Tensor]]:
    """Every rank must end with the same channel probabilities."""
    history = result.extra.get("spp_history") or {}
    if not history:
        return {}
    return {"spp_probabilities_identical": [torch.tensor(v[-1]) for v in history.values()]}


METHOD = register(Method(
    "spp", "structured probabilistic pruning: channel probabilities rise or fall with their rank during training",
    params=SPPRecipeParams, run={"torch_pruning": _tp_spp, "nni": _nni_spp}, needs_ratio=True, fusable=("nni",),
    framework_only={"rounding": ("torch_pruning",), "rescale_survivors": ("torch_pruning",)},
    report=report, rank_checks=rank_checks, target_knobs=()))
