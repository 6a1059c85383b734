"""DBP's recipe entry: ``prune.params`` is :class:`DBPRecipeParams` (DBP's knobs plus one target)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn

from ..measure import filters_per_layer
from ..methods.dbp import DBPParams
from ..methods.params import is_int, is_number
from .common import channel_report, needs_data, train_config
from .registry import Method, PruneContext, PruneResult, register

TARGETS = ("blocks", "macs", "params", "latency")


@dataclasses.dataclass(frozen=True)
class DBPRecipeParams(DBPParams):
    """DBP's knobs plus its target, given as exactly one of four keys.

    Attributes:
        blocks: remove this many blocks (>= 1).
        macs: remove blocks (then channels, if blocks fall short) until dense MACs / pruned MACs
            reaches this ratio (>= 1).
        params: the same for parameters.
        latency: the same for the measured latency (PyTorch, 1 thread, batch 1).
    """

    blocks: Optional[int] = None
    macs: Optional[float] = None
    params: Optional[float] = None
    latency: Optional[float] = None

    def target(self) -> Dict[str, Any]:
        """The one target given, e.g. ``{"blocks": 3}``."""
        return {k: getattr(self, k) for k in TARGETS if getattr(self, k) is not None}

    def problems(self) -> List[str]:
        found = super().problems()
        given = self.target()
        if len(given) != 1:
            found.append("set exactly one target of blocks, macs, params, latency; got "
                         + (", ".join(f"{k}={v!r}" for k, v in given.items()) or "none"))
        if self.blocks is not None and (not is_int(self.blocks) or self.blocks < 1):
            found.append(f"blocks must be >= 1, got {self.blocks!r}")
        for key in ("macs", "params", "latency"):
            value = getattr(self, key)
            if value is not None and (not is_number(value) or value < 1):
                found.append(f"{key} must be a ratio >= 1 (dense / pruned), got {value!r}")
        return found


def _candidates(model: nn.Module, example_inputs, p: DBPRecipeParams, ignored: List[nn.Module]):
    """The recipe's candidates, or every removable block that holds no ignored layer, as
    ``(name, members)`` pairs."""
    if p.candidates is not None:
        return [(c, [c]) if isinstance(c, str) else (c[0], list(c)) for c in p.candidates]
    from ..methods import dbp

    skip = {n for n, m in model.named_modules() if any(m is i for i in ignored)}
    return [(b.name, list(b.members)) for b in dbp.find_blocks(model, example_inputs)
            if not any(mem == s or s.startswith(mem + ".") for mem in b.members for s in skip)]


def _result(model: nn.Module, before: Dict[str, int], pruner) -> PruneResult:
    layers = channel_report(before, model)
    now = filters_per_layer(model)
    for name, d in layers.items():
        if name not in now:  # inside a removed block
            d.update(pruned=d["channels"], ratio=1.0)
    plan = pruner.result.plan
    result = PruneResult(model, layers, extra={
        "train_epochs": 0.0,  # the probes train on frozen features: the model's weights do not change
        "dbp_blocks": {n: {k: v for k, v in e.items() if k != "members"} for n, e in pruner.report.items()},
        "dbp_removed": list(pruner.removed), "dbp_macs_ratio": plan.macs_ratio,
        "dbp_latency_ratio": plan.latency_ratio, "dbp_baseline": pruner.result.info.get("baseline"),
        "dbp_target": pruner.target_report})
    reached = (pruner.target_report or {}).get("reached")
    if reached is not None:  # depth and width together, measured against the dense model
        result.extra["target_search"] = {"reached": reached}
    return result


def _kwargs(p: DBPRecipeParams, ctx: PruneContext) -> Dict[str, Any]:
    return {"target": p.target(), "num_batches": p.num_batches, "holdout": p.holdout, "reference": p.reference,
            "seed": p.seed, "progress": ctx.progress}


def _tp_dbp(model, example_inputs, p: DBPRecipeParams, ratio, ignored, ctx) -> PruneResult:
    from ..torch_pruning.dbp import DBPPruner

    needs_data(ctx, "dbp", "trains linear probes")
    before = filters_per_layer(model)
    candidates = [members for _, members in _candidates(model, example_inputs, p, ignored)]
    pruner = DBPPruner(model, example_inputs, data=ctx.train_loader, candidates=candidates,
                       ignored_layers=list(ignored), depth_share=p.depth_share,
                       width_importance=p.width_importance, **_kwargs(p, ctx))
    pruner.step()
    return _result(model, before, pruner)


def _nni_dbp(model, example_inputs, p: DBPRecipeParams, ratio, ignored, ctx) -> PruneResult:
    """DBP through NNI (depth only): config_list selects the candidate blocks, the evaluator supplies the
    batches."""
    from ..nni.dbp import DBPPruner
    from ..quantize import torch_evaluator

    needs_data(ctx, "dbp", "trains linear probes")
    before = filters_per_layer(model)
    blocks = _candidates(model, example_inputs, p, ignored)
    config = [{"op_names": [name for name, _ in blocks]}]
    evaluator = torch_evaluator(model, ctx.train_loader, train_config(ctx), ctx.device)
    pruner = DBPPruner(model, config, evaluator, example_inputs=example_inputs, **_kwargs(p, ctx))
    pruner.compress()
    return _result(model, before, pruner)


def report(result: PruneResult, plot_dir: Optional[str]) -> Tuple[Dict[str, Any], List[str]]:
    """DBP's metrics (blocks removed, MACs and latency ratios, every block's scores, requested vs reached
    with the depth and width steps) and its block chart."""
    x = result.extra
    metrics = {"dbp": {"removed": x["dbp_removed"], "macs_ratio": x["dbp_macs_ratio"],
                       "latency_ratio": x["dbp_latency_ratio"], "blocks": x["dbp_blocks"]}}
    if x.get("dbp_target") is not None:
        metrics["dbp"]["target"] = x["dbp_target"]
    if plot_dir is None or not x.get("dbp_blocks"):
        return metrics, []
    from ..report import plot_dbp_blocks

    return metrics, [plot_dbp_blocks(x["dbp_blocks"], os.path.join(plot_dir, "dbp_blocks.png"))]


METHOD = register(Method(
    "dbp", "depth pruning: remove the blocks whose features add the least class discrimination (linear probes)",
    params=DBPRecipeParams, run={"torch_pruning": _tp_dbp, "nni": _nni_dbp}, report=report))
