"""The method registry: what a method is, how its ``prune.params`` are validated, and :func:`prune`.

Each method's ``prune.params`` is one frozen dataclass (the method's ``Params`` from
:mod:`pfgdf_plugin.methods`, or a subclass adding recipe-only knobs such as ``max_epochs``):
values are converted with :func:`pfgdf_plugin.config.from_dict` and then checked by the
dataclass, and every problem is reported at once, with its key path.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Type

import torch
import torch.nn as nn

from ..config import from_dict
from ..errors import ConfigError, PluginError
from ..methods.params import Params
from ..registry import Registry

FRAMEWORKS = ("torch_pruning", "nni")


@dataclass
class PruneResult:
    """What a pruning stage hands back: the pruned model and what the report needs.

    Every method sets ``extra["train_epochs"]`` (a float): the epochs of the training data over
    which the pruning stage itself updated the weights, so that a comparison can give every entry
    the same total training after the dense model (fine-tune epochs = total - ``train_epochs``).
    It counts optimiser steps / batches per epoch: SPP's probabilistic-mask training, MPD's masked
    training, slim's sparsity phase. Passes that only compute gradients or features (Taylor's
    gradient batches, DBP's linear probes on a frozen backbone) update no weight of the model and
    count 0; so do the data-free methods (PFGDF, l1, l2, fpgm, random, lamp).

    Attributes:
        model: the pruned model.
        layers: per root layer: ``channels``, ``pruned``, ``ratio`` (and method-specific entries).
        method: the registered method's name.
        framework: ``torch_pruning`` or ``nni``.
        extra: method-specific, JSON-like results that the method's report hook reads.
        fused_calibration: the quantizer's calibration when pruning shared its training loop
            with a quantizer (``quantize.fused``), else ``None``.
    """

    model: nn.Module
    layers: Dict[str, dict] = field(default_factory=dict)
    method: str = ""
    framework: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)
    fused_calibration: Optional[Dict[str, Any]] = None


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
    target: Optional[Dict[str, float]] = None  # prune.target: {"latency" | "macs" | "params": ratio}
    timing: Optional[Dict[str, Any]] = None  # prune.timing: how a latency target is timed
    # the training the dense stage left to a method that trains from initialisation (Method.from_scratch):
    # the recipe's (or the bench's) train section, and its resumable checkpoint
    initial_train: Any = None
    initial_checkpoint: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class NoParams(Params):
    """The parameter set of a method that takes none (the built-in criteria)."""


ReportHook = Callable[[PruneResult, Optional[str]], Tuple[Dict[str, Any], List[str]]]
RankChecks = Callable[[PruneResult], Dict[str, Iterable[torch.Tensor]]]


def no_report(result: PruneResult, plot_dir: Optional[str]) -> Tuple[Dict[str, Any], List[str]]:
    """The report hook of a method with nothing of its own to report."""
    return {}, []


def no_rank_checks(result: PruneResult) -> Dict[str, Iterable[torch.Tensor]]:
    """The rank-agreement hook of a method whose state is all in the model's weights."""
    return {}


def from_dense(params: Params) -> bool:
    """The ``from_scratch`` hook of a method that prunes a trained dense model (every method but
    MPD with ``start: scratch``)."""
    return False


@dataclass
class Method:
    """A registered pruning method.

    Attributes:
        name: the recipe's ``prune.method``.
        summary: one line for ``pfgdf-plugin methods``.
        params: the dataclass ``prune.params`` is validated into (defaults live there only).
        run: framework name -> ``f(model, example_inputs, params, ratio, ignored_layers, ctx)``
            returning a :class:`PruneResult`; ``params`` is an instance of ``params``.
        needs_ratio: ``prune.ratio`` is required.
        fusable: frameworks whose pruner can share its training loop with a quantizer.
        framework_only: parameter -> the frameworks that use it; giving it for another one is
            an error.
        report: ``report(result, plot_dir) -> (metrics, plot paths)``: the method's own
            entries of ``metrics.json`` and its plots (none when ``plot_dir`` is ``None``).
        rank_checks: ``rank_checks(result) -> {metrics key: tensors}``: state beyond the
            weights that every rank of a distributed run must agree on.
        target_knobs: the ``prune.params`` a ``prune.target`` replaces (giving both is an
            error; ``prune.ratio`` always is); ``None``: the method's run functions take no
            target from ``ctx.target``. A method whose params have a field named after a target's
            kind (DBP's ``macs``, ``latency``) gets the target as that field instead.
    """

    name: str
    summary: str
    params: Type[Params]
    run: Dict[str, Callable[..., PruneResult]]
    needs_ratio: bool = False
    fusable: tuple = ()
    framework_only: Dict[str, tuple] = field(default_factory=dict)
    report: ReportHook = no_report
    rank_checks: RankChecks = no_rank_checks
    target_knobs: Optional[tuple] = None
    from_scratch: Callable[[Params], bool] = from_dense

    def __post_init__(self) -> None:
        own = self.report

        def report(result: PruneResult, plot_dir: Optional[str]) -> Tuple[Dict[str, Any], List[str]]:
            metrics, plots = own(result, plot_dir)
            if result.extra.get("target"):  # requested vs reached, for metrics.json and report.md
                metrics = {**metrics, "target": result.extra["target"]}
            if "train_epochs" in result.extra:  # what the pruning stage trained, beside the fine-tuning
                metrics = {**metrics, "prune_train_epochs": result.extra["train_epochs"]}
            return metrics, plots

        self.report = report


METHODS: Registry = Registry("method")


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` under its name."""
    return METHODS.register(method.name)(method)


def _keyed(prefix: str, problem: str, fields: Iterable[str]) -> str:
    """``k must be > 0`` -> ``prune.params.k must be > 0``; a problem naming no field keeps a colon."""
    first = problem.split(" ", 1)[0]
    return f"{prefix}.{problem}" if first in fields else f"{prefix}: {problem}"


def parse_params(method: Method, params: Dict[str, Any],
                 prefix: str = "prune.params") -> Tuple[Optional[Params], List[str]]:
    """``(method.params instance, [])``, or ``(None, every problem)`` for ``params``.

    Example:
        >>> p, errors = parse_params(METHODS.get("pfgdf"), {"k": -1, "mode": "wide"})
        >>> for e in errors:
        ...     print(e)
        prune.params.k must be > 0, got -1.0
        prune.params.mode must be one of band, tail; got 'wide'
    """
    cls = method.params
    fields = [f.name for f in dataclasses.fields(cls)]
    errors = [f"unknown key '{prefix}.{key}' for method {method.name!r} (known: {', '.join(fields) or 'none'})"
              for key in params if key not in fields]
    known = {k: v for k, v in params.items() if k in fields}
    try:
        obj = from_dict(cls, known, prefix, errors)
    except PluginError as e:
        problems = getattr(e, "problems", None) or [str(e)]
        return None, errors + [_keyed(prefix, p, fields) for p in problems]
    return (obj, []) if not errors else (None, errors)


def validate_params(method: Method, params: Dict[str, Any], ratio: Optional[float], framework: str,
                    prefix: str = "prune", target: Any = None, timing: Any = None) -> List[str]:
    """Every problem with ``prune.params`` / ``ratio`` / ``framework`` / ``target`` / ``timing`` for ``method``."""
    from .budget import target_problems, with_own_target

    errors: List[str] = target_problems(method, params, ratio, target, timing, prefix)
    if framework not in method.run:
        errors.append(f"{prefix}.method {method.name!r} is not available for framework {framework!r} "
                      f"(available: {', '.join(method.run)})")
    for key, frameworks in method.framework_only.items():
        if key in params and framework not in frameworks:
            errors.append(f"{prefix}.params.{key} is used only via {', '.join(frameworks)}, not {framework!r}; "
                          "remove it")
    if method.needs_ratio and ratio is None and target is None:
        errors.append(f"{prefix}.ratio is required for method {method.name!r}")
    elif ratio is not None and not 0.0 < ratio < 1.0:
        errors.append(f"{prefix}.ratio must be in (0, 1), got {ratio!r}")
    return errors + parse_params(method, with_own_target(method, params, target), f"{prefix}.params")[1]


def trains_from_scratch(method: str, params: Optional[Dict[str, Any]] = None) -> bool:
    """Whether ``method`` with ``params`` (a recipe's ``prune.params``) trains from initialisation,
    so that a dense stage must not train first (:attr:`Method.from_scratch`). Params that do not
    validate give ``False`` (validation reports them).

    Example:
        >>> trains_from_scratch("mpd", {"start": "scratch"}), trains_from_scratch("mpd", {}), trains_from_scratch("l1")
        (True, False, False)
    """
    m = METHODS.get(method)
    parsed, errors = parse_params(m, dict(params or {}))
    return bool(parsed is not None and not errors and m.from_scratch(parsed))


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


def prune(model: nn.Module, example_inputs: torch.Tensor, method: str, framework: str = "torch_pruning",
          params: Optional[Dict[str, Any]] = None, ratio: Optional[float] = None,
          ignored_layers: Optional[List[str]] = None, inplace: bool = False,
          ctx: Optional[PruneContext] = None, target: Optional[Dict[str, float]] = None,
          timing: Optional[Dict[str, Any]] = None) -> PruneResult:
    """Prune ``model`` (a copy unless ``inplace``) with a registered method.

    With ``target`` (``{"latency": r}``, ``{"macs": r}`` or ``{"params": r}``, dense / pruned
    >= r; latency timed as ``timing`` says), the method chooses its own knob to meet it, and
    ``result.extra["target"]`` is ``{"requested", "reached", ...}``.

    Raises:
        ConfigError: listing every problem with ``params``, ``ratio``, ``framework``, ``target``
            and ``timing``.
        TargetError: a target the method cannot reach (naming the best reached).

    Example:
        >>> import torch
        >>> from pfgdf_plugin.models import build_model
        >>> res = prune(build_model("lenet5"), torch.randn(1, 3, 32, 32), "pfgdf")
        >>> sum(v["pruned"] for v in res.layers.values()) > 0
        True
        >>> res = prune(build_model("lenet5"), torch.randn(1, 3, 32, 32), "l1", target={"macs": 1.5})
        >>> res.extra["target"]["requested"], res.extra["target"]["reached"] >= 1.5
        ({'macs': 1.5}, True)
    """
    from .budget import attach_target, route_target

    m = METHODS.get(method)
    if framework not in FRAMEWORKS:
        raise ConfigError([f"prune.framework must be one of {', '.join(FRAMEWORKS)}; got {framework!r}"],
                          f"method {method!r}")
    params = dict(params or {})
    errors = validate_params(m, params, ratio, framework, target=target, timing=timing)
    if errors:
        raise ConfigError(errors, f"method {method!r}")
    params, ctx = route_target(m, params, ctx or PruneContext(), target, timing)
    parsed, _ = parse_params(m, params)
    pruned = model if inplace else copy.deepcopy(model)
    ignored = resolve_layers(pruned, ignored_layers)
    pruned.eval()
    dense = copy.deepcopy(pruned) if target is not None else None
    result = m.run[framework](pruned, example_inputs, parsed, ratio, ignored, ctx)
    result.method, result.framework = method, framework
    result.model.eval()
    if target is not None:
        attach_target(result, dense, example_inputs, target)
    return result
