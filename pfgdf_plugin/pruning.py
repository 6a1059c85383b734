"""The pruning stage of a recipe: one registry entry per method, one function per framework.

Each entry validates the method's ``prune.params`` and calls the method's adapter. Built-in
criteria of Torch-Pruning and NNI are registered too, so a recipe can compare against them
on the same model and budget.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .measure import filters_per_layer
from .methods import pfgdf as pfgdf_math
from .registry import Registry
from .train import Checkpointing, read_checkpoint

FRAMEWORKS = ("torch_pruning", "nni")


@dataclass
class PruneResult:
    """What a pruning stage hands back: the pruned model and what the report needs."""

    model: nn.Module
    layers: Dict[str, dict] = field(default_factory=dict)  # per root layer: channels, pruned, ...
    method: str = ""
    framework: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PruneContext:
    """What training-aware methods need beyond the model: data and optimiser settings."""

    train_loader: Any = None
    train_cfg: Any = None  # a pfgdf_plugin.train.TrainConfig for the pruning-phase training
    device: str = "cpu"
    progress: bool = False
    quantize: Any = None  # a pfgdf_plugin.quantize.QuantizeConfig; fused=True runs it inside the pruner's loop
    checkpoint: Optional[str] = None  # resumable checkpoint of a pruning phase that trains (Torch-Pruning SPP, MPD)
    checkpoint_every: int = 0


@dataclass
class Method:
    """A registered pruning method.

    ``params`` maps each accepted ``prune.params`` key to ``(type, default)``; ``check`` returns
    error strings for bad values; ``run`` maps a framework name to its function
    ``f(model, example_inputs, params, ratio, ignored_layers, ctx) -> PruneResult``.
    """

    name: str
    summary: str
    params: Dict[str, tuple]
    run: Dict[str, Callable[..., PruneResult]]
    needs_ratio: bool = False
    check: Optional[Callable[[Dict[str, Any]], List[str]]] = None
    fusable: tuple = ()  # frameworks whose pruner can share its training loop with a quantizer


METHODS: Registry = Registry("method")


def validate_params(method: Method, params: Dict[str, Any], ratio: Optional[float], framework: str,
                    prefix: str = "prune") -> List[str]:
    """Every problem with ``prune.params`` / ``prune.ratio`` / ``prune.framework`` for ``method``."""
    errors: List[str] = []
    if framework not in method.run:
        errors.append(f"{prefix}.method {method.name!r} is not available for framework {framework!r} "
                      f"(available: {', '.join(method.run)})")
    type_errors = False
    for key, value in params.items():
        if key not in method.params:
            errors.append(f"unknown key '{prefix}.params.{key}' for method {method.name!r} "
                          f"(known: {', '.join(method.params) or 'none'})")
            continue
        tp_, _ = method.params[key]
        ok = (value is None and _ is None) or (
            isinstance(value, tp_) and not (isinstance(value, bool) and tp_ is not bool))
        if tp_ is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            errors.append(f"{prefix}.params.{key} must be {tp_.__name__}, got {value!r}")
            type_errors = True
    if method.needs_ratio:
        if ratio is None:
            errors.append(f"{prefix}.ratio is required for method {method.name!r}")
        elif not 0.0 < ratio < 1.0:
            errors.append(f"{prefix}.ratio must be in (0, 1), got {ratio!r}")
    elif ratio is not None and not 0.0 < ratio < 1.0:
        errors.append(f"{prefix}.ratio must be in (0, 1), got {ratio!r}")
    if not type_errors and method.check is not None:
        known = {k: v for k, v in params.items() if k in method.params}
        errors.extend(f"{prefix}.params: {e}" for e in method.check(resolved_params(method, known)))
    return errors


def resolved_params(method: Method, params: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: d for k, (_, d) in method.params.items()}
    out.update(params)
    return out


def resolve_layers(model: nn.Module, names: Optional[List[str]]) -> List[nn.Module]:
    """Module names -> modules; ``None`` means the output layer (the last conv/linear)."""
    modules = dict(model.named_modules())
    if names is None:
        last = None
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                last = m
        return [last] if last is not None else []
    out = []
    for n in names:
        if n not in modules:
            close = difflib.get_close_matches(n, [k for k in modules if k], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"prune.ignored_layers: no layer named {n!r} in {type(model).__name__}{hint}")
        out.append(modules[n])
    return out


def _names(model: nn.Module) -> Dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


def _channel_report(before: Dict[str, int], after: nn.Module) -> Dict[str, dict]:
    now = filters_per_layer(after)
    return {n: {"channels": c, "pruned": c - now.get(n, c), "ratio": (c - now.get(n, c)) / c}
            for n, c in before.items()}



# ----------------------------------------------------------------------------- Torch-Pruning
def _tp_pfgdf(model, example_inputs, params, ratio, ignored, ctx):
    import torch_pruning as tp

    from .torch_pruning import GaussianImportance, PFGDFPruner

    before = filters_per_layer(model)
    p = dict(params)
    if ratio is not None:  # fixed ratio, ranked by the Gaussian score
        imp = GaussianImportance(k=p["k"], statistic=p["statistic"], mode=p["mode"],
                                 group_reduction=p["group_reduction"])
        tp.pruner.MetaPruner(model, example_inputs, importance=imp, pruning_ratio=ratio,
                             ignored_layers=ignored).step()
        return PruneResult(model, _channel_report(before, model))
    pruner = PFGDFPruner(model, example_inputs, ignored_layers=ignored, **p)
    pruner.step()
    layers = _channel_report(before, model)
    for name, entry in pruner.report.items():
        if name in layers:
            layers[name].update({k: v for k, v in entry.items() if k in ("mu", "sigma", "statistic")})
    return PruneResult(model, layers, extra={"k": p["k"], "mode": p["mode"], "statistic": p["statistic"],
                                             "pruning_history": pruner.pruning_history()})


def _tp_builtin(importance_factory):
    def run(model, example_inputs, params, ratio, ignored, ctx, ratio_dict=None):
        import torch_pruning as tp

        before = filters_per_layer(model)
        tp.pruner.MetaPruner(model, example_inputs, importance=importance_factory(), pruning_ratio=ratio or 0.0,
                             pruning_ratio_dict=ratio_dict, ignored_layers=ignored).step()
        return PruneResult(model, _channel_report(before, model))

    return run


def _spp_history(probabilities: Dict[str, torch.Tensor], history: Dict[str, list], every: int, step: int) -> None:
    if step % every == 0:
        for name, p in probabilities.items():
            history.setdefault(name, []).append(p.detach().float().cpu().tolist())


def _tp_spp(model, example_inputs, params, ratio, ignored, ctx):
    """SPP through Torch-Pruning: train with probabilistic masks until every group reaches its
    target (or ``max_epochs`` runs out), then remove the zeroed channels."""
    import dataclasses
    import warnings

    from .torch_pruning import SPPPruner
    from .train import TrainConfig, train

    if ctx.train_loader is None:
        raise ValueError("method 'spp' prunes while training: it needs training data")
    before = filters_per_layer(model)
    pruner = SPPPruner(model, example_inputs, pruning_ratio=ratio, interval=params["interval"], A=params["A"],
                       u=params["u"], seed=params["seed"], ignored_layers=ignored)
    budget = params["max_epochs"] * len(ctx.train_loader)
    every = max(1, int(budget) // 200)  # at most ~200 snapshots for the heat map
    history: Dict[str, list] = {}

    def on_step(step: int, loss: float) -> bool:
        pruner.update()
        _spp_history(pruner.probabilities(), history, every, step)
        return pruner.finished

    cfg = dataclasses.replace(ctx.train_cfg or TrainConfig(lr=0.01), epochs=params["max_epochs"])
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
        stats = {"steps": saved["step"]}
    else:
        stats = train(model, ctx.train_loader, cfg, device=ctx.device, desc="spp (pruning)",
                      progress=ctx.progress, on_step=on_step, checkpoint=ckpt)
    finished = pruner.finished
    if not finished:
        warnings.warn(f"SPP did not reach its targets within prune.params.max_epochs={params['max_epochs']}: "
                      "only channels at p = 1 are removed (raise max_epochs or A, or lower interval)", stacklevel=2)
    model.cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.step()
    return PruneResult(model, _channel_report(before, model),
                       extra={"spp_history": history, "spp_history_every": every, "spp_steps": stats["steps"],
                              "spp_finished": finished})


# ----------------------------------------------------------------------------- NNI
def _nni_config(model: nn.Module, example_inputs, ignored: List[nn.Module], ratio: Optional[float]) -> List[dict]:
    """Conv layers (Linear ones in a model without convs) minus the ignored ones, with NNI dependency
    groups for coupled layers."""
    from .nni import dependency_config_list

    names = _names(model)
    kind = nn.Conv2d if any(isinstance(m, nn.Conv2d) for m in model.modules()) else nn.Linear  # MLPs: neurons
    entry: Dict[str, Any] = {"op_types": [kind.__name__]}
    excl = [names[m] for m in ignored if isinstance(m, kind)]
    if excl:
        entry["exclude_op_names"] = excl
    if ratio is not None:
        entry["sparse_ratio"] = float(ratio)
    return dependency_config_list(model, example_inputs, [entry])


def _nni_finish(model, masks, example_inputs, config, before):
    from .nni import speedup

    model = speedup(model, masks, example_inputs, config_list=config)
    return PruneResult(model, _channel_report(before, model))


def _nni_pfgdf(model, example_inputs, params, ratio, ignored, ctx):
    from .nni import PFGDFPruner

    before = filters_per_layer(model)
    p = dict(params)
    p.pop("group_reduction", None)
    config = _nni_config(model, example_inputs, ignored, ratio)
    pruner = PFGDFPruner(model, config, **p)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    result = _nni_finish(model, masks, example_inputs, config, before)
    for name, entry in getattr(pruner, "decisions", {}).items():
        if name in result.layers:
            result.layers[name].update({k: v for k, v in entry.items() if k in ("mu", "sigma", "statistic")})
    result.extra.update({"k": p["k"], "mode": p["mode"], "statistic": p["statistic"]})
    return result


def _nni_train(pruner, evaluator, ctx: PruneContext, steps: Optional[int]):
    """Run a training-aware NNI pruner for ``steps`` (inside a quantizer's loop with
    ``ctx.quantize.fused``), unwrap the model; return ``(masks, extra)``."""
    from .quantize import fuse

    extra: Dict[str, Any] = {}
    if evaluator is not None and ctx.quantize is not None and ctx.quantize.fused:
        quantizer = fuse(pruner, ctx.quantize, evaluator)
        quantizer.compress(max_steps=steps, max_epochs=None)
        extra["fused_calibration"] = quantizer.get_calibration_config()
        masks = pruner.get_masks()
        quantizer.unwrap_model()  # the last compressor holds the wrappers after fusion
    else:
        _, masks = pruner.compress(max_steps=steps, max_epochs=None)
        pruner.unwrap_model()
    return masks, extra


def _nni_spp(model, example_inputs, params, ratio, ignored, ctx):
    """SPP through NNI: a training-aware pruner driven by a TorchEvaluator over the recipe's data;
    with ``ctx.quantize.fused`` a quantizer runs in the same training loop."""
    import dataclasses

    from .nni import SPPPruner
    from .quantize import torch_evaluator
    from .train import TrainConfig

    if ctx.train_loader is None:
        raise ValueError("method 'spp' prunes while training: it needs training data")
    before = filters_per_layer(model)
    cfg = dataclasses.replace(ctx.train_cfg or TrainConfig(lr=0.01), epochs=params["max_epochs"])
    steps = max(1, int(round(cfg.epochs * len(ctx.train_loader))))
    every = max(1, steps // 200)
    history: Dict[str, list] = {}
    holder: Dict[str, Any] = {}

    def on_step(step: int, loss: float) -> bool:
        _spp_history(holder["pruner"].probabilities(), history, every, step)
        return holder["pruner"].stopped

    evaluator = torch_evaluator(model, ctx.train_loader, cfg, ctx.device, ctx.progress, "spp (pruning, NNI)", on_step)
    config = _nni_config(model, example_inputs, ignored, ratio)
    pruner = SPPPruner(model, config, evaluator, training_steps=steps, interval=params["interval"], A=params["A"],
                       u=params["u"], seed=params["seed"])
    holder["pruner"] = pruner
    masks, extra = _nni_train(pruner, evaluator, ctx, steps)
    finished = pruner.finished
    result = _nni_finish(model.cpu(), masks, example_inputs, config, before)
    result.extra.update(extra)
    result.extra.update({"spp_history": history, "spp_history_every": every, "spp_steps": pruner.steps,
                         "spp_finished": finished})
    return result


def _nni_builtin(cls_name: str):
    def run(model, example_inputs, params, ratio, ignored, ctx, config=None):
        import nni.compression.pruning as nni_pruning

        before = filters_per_layer(model)
        config = config or _nni_config(model, example_inputs, ignored, ratio)
        pruner = getattr(nni_pruning, cls_name)(model, config)
        _, masks = pruner.compress()
        pruner.unwrap_model()
        return _nni_finish(model, masks, example_inputs, config, before)

    return run


def _check_pfgdf(p: Dict[str, Any]) -> List[str]:
    try:
        pfgdf_math.check_params(p["k"], p["statistic"], p["mode"], p["min_channels"], 1.0, p["tail_threshold"])
    except ValueError as e:
        return [str(e)]
    if p["group_reduction"] not in ("mean", "max", "first"):
        return [f"group_reduction must be one of mean, max, first; got {p['group_reduction']!r}"]
    return []


def _magnitude(p: int):
    def make():
        import torch_pruning as tp

        return tp.importance.MagnitudeImportance(p=p, group_reduction="first", normalizer=None)

    return make


def _random():
    import torch_pruning as tp

    return tp.importance.RandomImportance()


METHODS.register("pfgdf")(Method(
    "pfgdf", "Gaussian-distribution filter pruning; per-layer ratios from the k-sigma band",
    params={"k": (float, 1.0), "statistic": (str, "mean"), "mode": (str, "band"), "min_channels": (int, 1),
            "tail_threshold": (float, None), "group_reduction": (str, "mean")},
    run={"torch_pruning": _tp_pfgdf, "nni": _nni_pfgdf}, check=_check_pfgdf))
def _check_spp(p: Dict[str, Any]) -> List[str]:
    from .methods import spp

    errors = []
    try:
        spp.check_params(0.5, p["interval"], p["A"], p["u"])
    except ValueError as e:
        errors.append(str(e))
    if p["max_epochs"] <= 0:
        errors.append(f"max_epochs must be > 0, got {p['max_epochs']!r}")
    return errors


METHODS.register("spp")(Method(
    "spp", "structured probabilistic pruning: channel probabilities rise or fall with their rank during training",
    params={"interval": (int, 10), "A": (float, 0.05), "u": (float, 0.25), "seed": (int, 0),
            "max_epochs": (float, 2.0)},
    run={"torch_pruning": _tp_spp, "nni": _nni_spp}, needs_ratio=True, check=_check_spp, fusable=("nni",)))
METHODS.register("l1")(Method(
    "l1", "built-in L1-norm filter pruning (Torch-Pruning MagnitudeImportance(p=1) / NNI L1NormPruner)",
    params={}, run={"torch_pruning": _tp_builtin(_magnitude(1)), "nni": _nni_builtin("L1NormPruner")},
    needs_ratio=True))
METHODS.register("l2")(Method(
    "l2", "built-in L2-norm filter pruning (Torch-Pruning MagnitudeImportance(p=2) / NNI L2NormPruner)",
    params={}, run={"torch_pruning": _tp_builtin(_magnitude(2)), "nni": _nni_builtin("L2NormPruner")},
    needs_ratio=True))
METHODS.register("fpgm")(Method(
    "fpgm", "built-in geometric-median filter pruning (NNI FPGMPruner)",
    params={}, run={"nni": _nni_builtin("FPGMPruner")}, needs_ratio=True))
METHODS.register("random")(Method(
    "random", "built-in random filter pruning (Torch-Pruning RandomImportance), a floor to beat",
    params={}, run={"torch_pruning": _tp_builtin(_random)}, needs_ratio=True))


# ----------------------------------------------------------------------------- DBP (depth)
def _dbp_target(p: Dict[str, Any]) -> Dict[str, Any]:
    return {k: p[k] for k in ("blocks", "macs", "latency") if p[k] is not None}


def _dbp_candidates(model: nn.Module, example_inputs, params, ignored: List[nn.Module]):
    """The recipe's candidates, or every removable block that holds no ignored layer, as
    ``(name, members)`` pairs."""
    if params["candidates"] is not None:
        return [(c, [c]) if isinstance(c, str) else (c[0], list(c)) for c in params["candidates"]]
    from .methods import dbp

    skip = {n for n, m in model.named_modules() if any(m is i for i in ignored)}
    return [(b.name, list(b.members)) for b in dbp.find_blocks(model, example_inputs)
            if not any(mem == s or s.startswith(mem + ".") for mem in b.members for s in skip)]


def _dbp_result(model: nn.Module, before: Dict[str, int], pruner) -> PruneResult:
    layers = _channel_report(before, model)
    now = filters_per_layer(model)
    for name, d in layers.items():
        if name not in now:  # inside a removed block
            d.update(pruned=d["channels"], ratio=1.0)
    plan = pruner.result.plan
    return PruneResult(model, layers, extra={
        "dbp_blocks": {n: {k: v for k, v in e.items() if k != "members"} for n, e in pruner.report.items()},
        "dbp_removed": list(pruner.removed), "dbp_macs_ratio": plan.macs_ratio,
        "dbp_latency_ratio": plan.latency_ratio, "dbp_baseline": pruner.result.info.get("baseline")})


def _dbp_kwargs(params: Dict[str, Any], ctx: PruneContext) -> Dict[str, Any]:
    return {"target": _dbp_target(params), "num_batches": params["num_batches"], "holdout": params["holdout"],
            "reference": params["reference"], "seed": params["seed"], "progress": ctx.progress}


def _tp_dbp(model, example_inputs, params, ratio, ignored, ctx):
    from .torch_pruning.dbp import DBPPruner

    if ctx.train_loader is None:
        raise ValueError("method 'dbp' trains linear probes: it needs training data")
    before = filters_per_layer(model)
    candidates = [members for _, members in _dbp_candidates(model, example_inputs, params, ignored)]
    pruner = DBPPruner(model, example_inputs, data=ctx.train_loader, candidates=candidates, **_dbp_kwargs(params, ctx))
    pruner.step()
    return _dbp_result(model, before, pruner)


def _nni_dbp(model, example_inputs, params, ratio, ignored, ctx):
    """DBP through NNI: config_list selects the candidate blocks, the evaluator supplies the batches."""
    from .nni.dbp import DBPPruner
    from .quantize import torch_evaluator
    from .train import TrainConfig

    if ctx.train_loader is None:
        raise ValueError("method 'dbp' trains linear probes: it needs training data")
    before = filters_per_layer(model)
    blocks = _dbp_candidates(model, example_inputs, params, ignored)
    config = [{"op_names": [name for name, _ in blocks]}]
    evaluator = torch_evaluator(model, ctx.train_loader, ctx.train_cfg or TrainConfig(lr=0.01), ctx.device)
    pruner = DBPPruner(model, config, evaluator, example_inputs=example_inputs, **_dbp_kwargs(params, ctx))
    pruner.compress()
    return _dbp_result(model, before, pruner)


def _check_dbp(p: Dict[str, Any]) -> List[str]:
    errors = []
    given = _dbp_target(p)
    if len(given) != 1:
        errors.append("set exactly one target of blocks, macs, latency; got "
                      + (", ".join(f"{k}={v!r}" for k, v in given.items()) or "none"))
    if p["blocks"] is not None and p["blocks"] < 1:
        errors.append(f"blocks must be >= 1, got {p['blocks']!r}")
    for key in ("macs", "latency"):
        if p[key] is not None and p[key] < 1:
            errors.append(f"{key} must be a ratio >= 1 (dense / pruned), got {p[key]!r}")
    if p["num_batches"] < 1:
        errors.append(f"num_batches must be >= 1, got {p['num_batches']!r}")
    if not 0 < p["holdout"] < 1:
        errors.append(f"holdout must be in (0, 1), got {p['holdout']!r}")
    if p["reference"] not in ("previous", "input"):
        errors.append(f"reference must be previous or input, got {p['reference']!r}")
    return errors


METHODS.register("dbp")(Method(
    "dbp", "depth pruning: remove the blocks whose features add the least class discrimination (linear probes)",
    params={"blocks": (int, None), "macs": (float, None), "latency": (float, None), "num_batches": (int, 8),
            "holdout": (float, 0.25), "reference": (str, "previous"), "seed": (int, 0), "candidates": (list, None)},
    run={"torch_pruning": _tp_dbp, "nni": _nni_dbp}, check=_check_dbp))


# ----------------------------------------------------------------------------- MPDCompress
def _mpd_snapshot(model: nn.Module, plans: Dict[str, Any]) -> Dict[str, Any]:
    """The first masked layer's weight (|W| summed over the kernel) and its block labels, for the report."""
    if not plans:
        return {}
    name, plan = next(iter(plans.items()))
    w = dict(model.named_modules())[name].weight.detach().float().abs()
    w = w.reshape(w.shape[0], w.shape[1], -1).sum(-1) if w.dim() > 2 else w
    return {"layer": name, "weight": w.tolist(), "out_labels": plan.out_labels.tolist(),
            "in_labels": plan.in_labels.tolist(), "blocks": plan.blocks}


def _mpd_layers(report: Dict[str, Any]) -> Dict[str, dict]:
    return {n: {k: v for k, v in e.items() if k in ("blocks", "dense", "kept", "stored", "compression")}
            for n, e in report["layers"].items()}


def _mpd_sizes(params: Dict[str, Any]) -> Dict[str, Any]:
    if params["blocks"] is not None:
        return {"blocks": params["blocks"]}
    return {"compression": params["compression"]}


def _tp_mpd(model, example_inputs, params, ratio, ignored, ctx):
    """MPDCompress through Torch-Pruning's graph: masked training, then block-diagonal layers."""
    import dataclasses

    from .torch_pruning.mpd import MPDPruner
    from .train import TrainConfig, train

    pruner = MPDPruner(model, example_inputs, permutation=params["permutation"], ignored_layers=ignored,
                       seed=params["seed"], round_to=params["round_to"], fold=params["fold"],
                       dense_output=params["dense_output"], **_mpd_sizes(params))
    if params["max_epochs"] > 0:
        if ctx.train_loader is None:
            raise ValueError("method 'mpd' trains with its masks for prune.params.max_epochs: it needs training data")
        cfg = dataclasses.replace(ctx.train_cfg or TrainConfig(lr=0.01), epochs=params["max_epochs"])
        # the plans are a function of the dense weights and the seed: a resumed run rebuilds them
        ckpt = Checkpointing(ctx.checkpoint, ctx.checkpoint_every) if ctx.checkpoint else None
        train(model, ctx.train_loader, cfg, device=ctx.device, desc="mpd (masked training)", progress=ctx.progress,
              on_step=lambda step, loss: pruner.update(), checkpoint=ckpt)
        model.cpu().eval()
    snapshot = _mpd_snapshot(model, pruner.plans)
    report = pruner.step()
    return PruneResult(model, _mpd_layers(report), extra={"mpd_snapshot": snapshot,
                                                           "mpd_compression": report["compression"],
                                                           "mpd_folded": report.get("folded", [])})


def _nni_mpd(model, example_inputs, params, ratio, ignored, ctx):
    """MPDCompress through NNI: fine-grained masks trained under a TorchEvaluator (optionally fused
    with a quantizer), then converted to block-diagonal layers."""
    import dataclasses

    from .nni.mpd import MPDPruner, convert
    from .quantize import torch_evaluator
    from .train import TrainConfig

    names = _names(model)
    entry: Dict[str, Any] = {"op_types": ["Linear", "Conv2d"]}
    excl = [names[m] for m in ignored]
    if params["dense_output"]:
        excl += [n for n in (names[m] for m in resolve_layers(model, None)) if n not in excl]
    if excl:
        entry["exclude_op_names"] = excl
    cfg = dataclasses.replace(ctx.train_cfg or TrainConfig(lr=0.01), epochs=params["max_epochs"])
    evaluator = None
    if params["max_epochs"] > 0:
        if ctx.train_loader is None:
            raise ValueError("method 'mpd' trains with its masks for prune.params.max_epochs: it needs training data")
        evaluator = torch_evaluator(model, ctx.train_loader, cfg, ctx.device, ctx.progress,
                                    "mpd (masked training, NNI)")
    pruner = MPDPruner(model, [entry], evaluator, permutation=params["permutation"], seed=params["seed"],
                       round_to=params["round_to"], **_mpd_sizes(params))
    steps = max(1, int(round(cfg.epochs * len(ctx.train_loader)))) if evaluator is not None else None
    _, extra = _nni_train(pruner, evaluator, ctx, steps)
    model.cpu().eval()
    plans = dict(pruner.plans)
    extra["mpd_snapshot"] = _mpd_snapshot(model, plans)
    report = convert(model, pruner, example_inputs, fold=params["fold"])
    extra.update({"mpd_compression": report["compression"], "mpd_folded": report.get("folded", [])})
    return PruneResult(model, _mpd_layers(report), extra=extra)


def _check_mpd(p: Dict[str, Any]) -> List[str]:
    from .methods import mpd

    errors = []
    for check, value in ((mpd.check_permutation, p["permutation"]), (mpd.check_round_to, p["round_to"]),
                         (mpd.check_compression, p["compression"])):
        try:
            if value is not None or check is mpd.check_round_to:
                check(value)
        except mpd.MPDError as e:
            errors.append(str(e))
    if p["blocks"] is None and p["compression"] is None:
        errors.append("set compression (e.g. 10.0) or blocks")
    if p["blocks"] is not None and p["blocks"] < 1:
        errors.append(f"blocks must be >= 1, got {p['blocks']!r}")
    if p["max_epochs"] < 0:
        errors.append(f"max_epochs must be >= 0, got {p['max_epochs']!r}")
    return errors


METHODS.register("mpd")(Method(
    "mpd", "MPDCompress: permuted block-diagonal masks in training, then block-diagonal / grouped layers",
    params={"compression": (float, 10.0), "blocks": (int, None), "permutation": (str, "random"), "seed": (int, 0),
            "fold": (bool, True), "round_to": (int, None), "dense_output": (bool, True), "max_epochs": (float, 1.0)},
    run={"torch_pruning": _tp_mpd, "nni": _nni_mpd}, check=_check_mpd, fusable=("nni",)))


def prune_like(model: nn.Module, example_inputs: torch.Tensor, method: str, framework: str,
               layers: Dict[str, dict], ignored_layers: Optional[List[str]] = None) -> PruneResult:
    """Prune ``model`` in place with a built-in criterion, removing exactly ``layers[name]["pruned"]``
    of ``layers[name]["channels"]`` per layer (the counts another method chose), so criteria are
    compared at one structure."""
    if method not in ("l1", "l2", "fpgm", "random"):
        raise ValueError(f"prune_like compares built-in criteria; got method {method!r}")
    run = METHODS.get(method).run[framework]
    ignored = resolve_layers(model, ignored_layers)
    pruned = {n: d for n, d in layers.items() if d["pruned"] > 0}
    if framework == "torch_pruning":
        mods = dict(model.named_modules())
        # Torch-Pruning removes n - int(n * (1 - r)) channels: half a channel below the count hits it exactly
        ratio_dict = {mods[n]: (d["pruned"] - 0.5) / d["channels"] for n, d in pruned.items() if n in mods}
        return run(model, example_inputs, {}, None, ignored, PruneContext(), ratio_dict=ratio_dict)
    config = [{"op_names": [n], "sparse_ratio": float(d["pruned"] / d["channels"])} for n, d in pruned.items()]
    return run(model, example_inputs, {}, None, ignored, PruneContext(), config=config)


def prune_matching(model: nn.Module, example_inputs: torch.Tensor, method: str, framework: str, metric: str,
                   target: float, ignored_layers: Optional[List[str]] = None, steps: int = 12) -> PruneResult:
    """Prune a copy of ``model`` with a built-in criterion at the one global ratio whose result has
    ``metric`` (``macs`` or ``params``) closest to ``target``, so a method that sets no ratio (DBP's
    depth, MPD's blocks) is compared with width pruning at the same budget. Bisection over the ratio.
    """
    from .measure import count_macs, count_params

    if metric not in ("macs", "params"):
        raise ValueError(f"metric must be macs or params, got {metric!r}")
    measure = (lambda m: count_macs(m, example_inputs)) if metric == "macs" else count_params
    lo, hi, best = 0.0, 0.95, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        res = prune(model, example_inputs, method, framework, ratio=mid, ignored_layers=ignored_layers)
        value = measure(res.model)
        if best is None or abs(value - target) < abs(best[0] - target):
            best = (value, res, mid)
        lo, hi = (mid, hi) if value > target else (lo, mid)
    value, res, ratio = best
    res.extra.update({"matched_ratio": ratio, "matched_metric": metric, "matched_value": value})
    return res


def prune(model: nn.Module, example_inputs: torch.Tensor, method: str, framework: str = "torch_pruning",
          params: Optional[Dict[str, Any]] = None, ratio: Optional[float] = None,
          ignored_layers: Optional[List[str]] = None, inplace: bool = False,
          ctx: Optional[PruneContext] = None) -> PruneResult:
    """Prune ``model`` (a copy unless ``inplace``) with a registered method.

    Example:
        >>> import torch
        >>> from pfgdf_plugin.models import build_model
        >>> res = prune(build_model("lenet5"), torch.randn(1, 3, 32, 32), "pfgdf")
        >>> sum(v["pruned"] for v in res.layers.values()) > 0
        True
    """
    m = METHODS.get(method)
    if framework not in FRAMEWORKS:
        raise ValueError(f"prune.framework must be one of {', '.join(FRAMEWORKS)}; got {framework!r}")
    params = dict(params or {})
    errors = validate_params(m, params, ratio, framework)
    if errors:
        raise ValueError("; ".join(errors))
    target = model if inplace else copy.deepcopy(model)
    ignored = resolve_layers(target, ignored_layers)
    target.eval()
    result = m.run[framework](target, example_inputs, resolved_params(m, params), ratio, ignored,
                              ctx or PruneContext())
    result.method, result.framework = method, framework
    result.model.eval()
    return result
