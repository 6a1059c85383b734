"""Stronger baselines than the plain built-ins, registered so a recipe or a bench can name them.

* ``taylor``: first-order Taylor importance (Molchanov et al., CVPR 2019). Data-aware: the
  cross-entropy gradients of ``prune.params.batches`` training batches are accumulated, without
  an optimiser step, and each channel is scored from ``weight * grad``. Torch-Pruning:
  ``tp.importance.TaylorImportance()`` (uniform ratio per layer, like ``l1``); NNI:
  ``nni.compression.pruning.TaylorPruner`` (``(weight * grad)^2`` summed over the batches).
* ``lamp``: layer-adaptive magnitude scores (Lee et al., ICLR 2021), Torch-Pruning's
  ``LAMPImportance`` with ``global_pruning=True``: ``prune.ratio`` is the share of all channels
  removed, and the layers' ratios follow from one global ranking.
* ``slim``: network slimming (Liu et al., ICCV 2017): a sparsity phase that trains with an L1
  penalty on the BatchNorm scales (``prune.params.reg`` for ``prune.params.sparsity_epochs``,
  Torch-Pruning's ``BNScalePruner.regularize`` after every ``loss.backward()``), then
  ``BNScaleImportance`` with global pruning.

With ``prune.target`` each searches its ratio (Torch-Pruning: :func:`pfgdf_plugin.prune_to_target`,
global for ``lamp`` and ``slim``; NNI ``taylor``: copies pruned by L1 norm at one ratio per layer,
whose structure, and so cost, is the Taylor-pruned model's, as for SPP).

Every :class:`~.registry.PruneResult` carries ``extra["train_epochs"]``: ``slim`` its sparsity
epochs; ``taylor`` and ``lamp`` 0 (Taylor's gradient passes update no weight: an optimiser with
learning rate 0 under NNI, none under Torch-Pruning, and BatchNorm statistics stay as they were).

Example:
    >>> import torch
    >>> from pfgdf_plugin.models import build_model
    >>> from pfgdf_plugin.pruning import prune
    >>> res = prune(build_model("vgg16_bn", width=0.25), torch.randn(1, 3, 32, 32), "lamp", ratio=0.3)
    >>> res.extra["train_epochs"], 0 < sum(v["pruned"] for v in res.layers.values())
    (0.0, True)
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BaselineError
from ..measure import filters_per_layer
from ..methods.params import Params, is_int, is_number, one_of
from .budget import nni_search, timing_of
from .common import channel_report, epochs_of, needs_data, nni_config, nni_finish, nni_l1_copy, train_config
from .registry import Method, NoParams, PruneContext, PruneResult, register

NORMALIZERS = ("mean", "none")


@dataclasses.dataclass(frozen=True)
class TaylorParams(Params):
    """``taylor``'s knobs.

    Attributes:
        batches: training batches whose loss gradients are accumulated before scoring (>= 1; the
            loader's length when it has fewer).
    """

    error: ClassVar[type] = BaselineError
    batches: int = 8

    def problems(self) -> List[str]:
        return [] if is_int(self.batches) and self.batches >= 1 else [f"batches must be >= 1, got {self.batches!r}"]


@dataclasses.dataclass(frozen=True)
class SlimParams(Params):
    """``slim``'s knobs (network slimming).

    Attributes:
        reg: the L1 penalty's weight on the BatchNorm scales during the sparsity phase (>= 0; the
            paper uses 1e-4 to 1e-5; Torch-Pruning's default is 1e-5).
        sparsity_epochs: epochs of sparsity training before pruning (>= 0), with the ``finetune``
            section's optimiser settings; 0 ranks the dense model's scales as they are.
        normalizer: ``mean`` (Torch-Pruning's default: each group's scales over their mean, then
            one global ranking) or ``none`` (the paper's single threshold on the raw |gamma|, which
            may take most of one layer).
    """

    error: ClassVar[type] = BaselineError
    reg: float = 1e-4
    sparsity_epochs: float = 1.0
    normalizer: str = "mean"

    def problems(self) -> List[str]:
        found = []
        if not is_number(self.reg) or self.reg < 0:
            found.append(f"reg must be >= 0, got {self.reg!r}")
        if not is_number(self.sparsity_epochs) or self.sparsity_epochs < 0:
            found.append(f"sparsity_epochs must be >= 0, got {self.sparsity_epochs!r}")
        return found + one_of("normalizer", self.normalizer, NORMALIZERS)


# ---------------------------------------------------------------- taylor


def _batches(ctx: PruneContext, n: int):
    return itertools.islice(iter(ctx.train_loader), n)


def taylor_gradients(model: nn.Module, ctx: PruneContext, batches: int,
                     ignored: List[nn.Module]) -> Dict[str, torch.Tensor]:
    """``{parameter name: gradient}`` of the cross-entropy summed over ``batches`` training batches.

    The model runs in eval mode (BatchNorm statistics stay as they are) and no weight changes; its
    ``.grad`` fields are left empty. A prunable layer (Conv/Linear, not ignored) whose gradient is
    zero or missing cannot be ranked by Taylor scores: :class:`~pfgdf_plugin.errors.BaselineError`
    names it.
    """
    was_training = model.training
    model.to(ctx.device).eval()
    model.zero_grad(set_to_none=True)
    seen = 0
    try:
        for x, y in _batches(ctx, batches):
            out = model(x.to(ctx.device))
            F.cross_entropy(out, y.to(ctx.device)).backward()
            seen += 1
        grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        model.zero_grad(set_to_none=True)
        model.cpu().train(was_training)
    if seen == 0:
        raise BaselineError("taylor: the training loader yielded no batch; it needs training data")
    skip = {id(m) for m in ignored}
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and id(m) not in skip:
            g = grads.get(f"{name}.weight")
            if g is None or not bool(g.abs().sum() > 0):
                raise BaselineError(
                    f"taylor: layer {name!r} has {'no' if g is None else 'an all-zero'} loss gradient over "
                    f"{seen} batch(es), so its channels have no Taylor score (a dead or unused layer, or a "
                    "saturated loss); add it to prune.ignored_layers, raise prune.params.batches, or use l1")
    return grads


def _grad_loader(grads: Dict[str, torch.Tensor]) -> Callable[[nn.Module], None]:
    """``net -> None`` that sets each parameter's ``.grad`` from ``grads`` (by name)."""
    def load(net: nn.Module) -> None:
        for name, p in net.named_parameters():
            p.grad = grads[name].clone() if name in grads else None

    return load


def _tp_taylor(model, example_inputs, p: TaylorParams, ratio, ignored, ctx) -> PruneResult:
    """Taylor importance through Torch-Pruning: gradients once on the dense model, put back on
    every copy the target search prunes (``copy.deepcopy`` drops ``.grad``)."""
    import torch_pruning as tp

    from ..torch_pruning import prune_to_target

    needs_data(ctx, "taylor", "scores channels by loss gradients")
    before = filters_per_layer(model)
    load = _grad_loader(taylor_gradients(model, ctx, p.batches, ignored))
    search = None
    try:
        if ctx.target is not None:
            t = timing_of(ctx)
            info = prune_to_target(model, example_inputs, tp.importance.TaylorImportance(), ctx.target,
                                   engine=t.engine, threads=t.threads, batch_size=t.batch_size, warmup=t.warmup,
                                   repeats=t.repeats, ignored_layers=ignored, before_step=load)
            search = {"reached": info["reached"], "knob": info["ratio"], "trials": info["trials"]}
        else:
            load(model)
            tp.pruner.MetaPruner(model, example_inputs, importance=tp.importance.TaylorImportance(),
                                 pruning_ratio=ratio, ignored_layers=ignored, **_fresh()).step()
    finally:
        model.zero_grad(set_to_none=True)
    result = PruneResult(model, channel_report(before, model), extra={"train_epochs": 0.0})
    if search is not None:
        result.extra["target_search"] = search
    return result


def _gradient_evaluator(model: nn.Module, ctx: PruneContext):
    """An NNI ``TorchEvaluator`` whose "training" only accumulates gradients: eval mode, and an
    SGD optimiser with learning rate, momentum and weight decay 0 (NNI's TaylorPruner hooks its steps)."""
    import nni
    from nni.compression.utils import TorchEvaluator

    def training_step(batch, net):
        x, y = batch
        return F.cross_entropy(net(x.to(ctx.device)), y.to(ctx.device))

    def training_func(net, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        net.to(ctx.device).eval()
        for batch in _batches(ctx, max_steps or len(ctx.train_loader)):
            optimizers.zero_grad()
            training_step(batch, net).backward()
            optimizers.step()
        net.cpu()

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.0, momentum=0.0, weight_decay=0.0)
    return TorchEvaluator(training_func, optimizer, training_step)


def _nni_taylor(model, example_inputs, p: TaylorParams, ratio, ignored, ctx) -> PruneResult:
    """NNI's TaylorPruner over ``batches`` gradient-only steps, then ``speedup``."""
    import nni.compression.pruning as nni_pruning

    needs_data(ctx, "taylor", "scores channels by loss gradients")
    taylor_gradients(model, ctx, p.batches, ignored)  # a layer without gradient is named before NNI runs
    steps = min(p.batches, len(ctx.train_loader))
    search = None
    if ctx.target is not None:  # one ratio per layer: the structure, not which channels go, sets the cost
        search = nni_search(model, example_inputs, ctx, ignored, nni_l1_copy(example_inputs))
        ratio = search["knob"]
    before = filters_per_layer(model)
    config = nni_config(model, example_inputs, ignored, ratio)
    pruner = nni_pruning.TaylorPruner(model, config, _gradient_evaluator(model, ctx), training_steps=steps)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    model.zero_grad(set_to_none=True)
    result = nni_finish(model.cpu().eval(), masks, example_inputs, config, before)
    result.extra["train_epochs"] = 0.0
    if search is not None:
        result.extra["target_search"] = search
    return result


# ---------------------------------------------------------------- lamp


def _fresh() -> Dict[str, Any]:
    """Fresh dicts for the pruner arguments Torch-Pruning's ``BasePruner`` mutates in place."""
    return {"in_channel_groups": {}, "out_channel_groups": {}, "num_heads": {}}


def _tp_global(model, example_inputs, importance, ratio, ignored, ctx) -> Dict[str, Any]:
    """Prune ``model`` in place with one global ranking at ``ratio`` or to ``ctx.target``; the target search report."""
    import torch_pruning as tp

    from ..torch_pruning import prune_to_target

    if ctx.target is not None:
        t = timing_of(ctx)
        info = prune_to_target(model, example_inputs, importance, ctx.target, engine=t.engine, threads=t.threads,
                               batch_size=t.batch_size, warmup=t.warmup, repeats=t.repeats, ignored_layers=ignored,
                               global_pruning=True)
        return {"reached": info["reached"], "knob": info["ratio"], "trials": info["trials"]}
    tp.pruner.MetaPruner(model, example_inputs, importance=importance, pruning_ratio=ratio, ignored_layers=ignored,
                         global_pruning=True, **_fresh()).step()
    return {}


def _result(model: nn.Module, before: Dict[str, int], search: Dict[str, Any], epochs: float) -> PruneResult:
    result = PruneResult(model, channel_report(before, model), extra={"train_epochs": float(epochs)})
    if search:
        result.extra["target_search"] = search
    return result


def _tp_lamp(model, example_inputs, p: NoParams, ratio, ignored, ctx) -> PruneResult:
    import torch_pruning as tp

    before = filters_per_layer(model)
    search = _tp_global(model, example_inputs, tp.importance.LAMPImportance(), ratio, ignored, ctx)
    return _result(model, before, search, 0.0)


# ---------------------------------------------------------------- slim


def _batchnorms(model: nn.Module, ignored: List[nn.Module]) -> List[nn.Module]:
    skip = {id(m) for m in ignored}
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
            and id(m) not in skip]


def mean_abs_gamma(model: nn.Module) -> float:
    """The mean |scale| over every affine BatchNorm of ``model`` (what slimming's penalty shrinks)."""
    gammas = [m.weight.detach().abs().flatten() for m in _batchnorms(model, [])]
    return float(torch.cat(gammas).mean()) if gammas else float("nan")


def _tp_slim(model, example_inputs, p: SlimParams, ratio, ignored, ctx) -> PruneResult:
    """Network slimming through Torch-Pruning: L1 on BatchNorm scales while training, then one global
    ranking of the (normalised) scales."""
    import torch_pruning as tp

    from ..train import Checkpointing, train

    if not _batchnorms(model, ignored):
        raise BaselineError(f"slim: {type(model).__name__} has no affine BatchNorm layer outside "
                            "prune.ignored_layers; network slimming ranks channels by BatchNorm scales (use l1 or "
                            "taylor)")
    before = filters_per_layer(model)
    importance = tp.importance.BNScaleImportance(normalizer=None if p.normalizer == "none" else p.normalizer)
    regularizer = tp.pruner.BNScalePruner(model, example_inputs, importance=importance, reg=p.reg,
                                          global_pruning=True, pruning_ratio=ratio or 0.0, ignored_layers=ignored,
                                          **_fresh())
    epochs, gamma_before = 0.0, mean_abs_gamma(model)
    if p.sparsity_epochs > 0:
        needs_data(ctx, "slim", "trains with an L1 penalty on BatchNorm scales for prune.params.sparsity_epochs")
        ckpt = Checkpointing(ctx.checkpoint, ctx.checkpoint_every) if ctx.checkpoint else None
        stats = train(model, ctx.train_loader, train_config(ctx, p.sparsity_epochs), device=ctx.device,
                      desc="slim (sparsity)", progress=ctx.progress, checkpoint=ckpt,
                      after_backward=lambda net: regularizer.regularize(net))
        epochs = epochs_of(stats["steps"], ctx)
        model.zero_grad(set_to_none=True)
        model.cpu().eval()
    gamma_after = mean_abs_gamma(model)  # the whole model, before any channel goes
    if ctx.target is None:
        regularizer.step()
        search: Dict[str, Any] = {}
    else:
        search = _tp_global(model, example_inputs, importance, None, ignored, ctx)
    result = _result(model, before, search, epochs)
    result.extra["slim_mean_abs_gamma"] = {"before": gamma_before, "after_sparsity": gamma_after}
    return result


def slim_report(result: PruneResult, plot_dir: Optional[str]) -> Tuple[Dict[str, Any], List[str]]:
    """slim's metrics: the mean |BatchNorm scale| before and after the sparsity phase."""
    gamma = result.extra.get("slim_mean_abs_gamma")
    return ({"slim": {"mean_abs_gamma": gamma}} if gamma else {}), []


register(Method(
    "taylor", "first-order Taylor filter pruning from a few batches' gradients (Torch-Pruning TaylorImportance / "
    "NNI TaylorPruner)",
    params=TaylorParams, run={"torch_pruning": _tp_taylor, "nni": _nni_taylor}, needs_ratio=True, target_knobs=()))
register(Method(
    "lamp", "LAMP scores with one global ranking (Torch-Pruning LAMPImportance, global_pruning=True)",
    params=NoParams, run={"torch_pruning": _tp_lamp}, needs_ratio=True, target_knobs=()))
register(Method(
    "slim", "network slimming: L1 on BatchNorm scales in a sparsity phase, then one global ranking of them "
    "(Torch-Pruning BNScalePruner)",
    params=SlimParams, run={"torch_pruning": _tp_slim}, needs_ratio=True, report=slim_report, target_knobs=()))
