"""The recipe schema: one typed dataclass per section, validated when loaded.

Every key, its type, default and meaning is documented in ``docs/recipes.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .config import ConfigError, from_dict, load_yaml, range_problem, set_by_path, to_dict
from .quantize import QuantizeConfig
from .train import TrainConfig

DEVICES = ("cpu", "cuda")
MAX_WIDTH = 64.0  # channel multiplier; above it a model's layers would not fit in memory


@dataclass
class ModelSection:
    name: str = "vgg16_bn"
    width: float = 1.0
    checkpoint: Optional[str] = None
    weights: Optional[str] = None  # torchvision weights name (DEFAULT, ...) or a state_dict file


@dataclass
class DataSection:
    name: str = "fashion_mnist"
    root: Optional[str] = None
    image_size: int = 32
    in_channels: Optional[int] = None
    batch_size: int = 128
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None
    workers: int = 0


@dataclass
class PruneSection:
    framework: str = "torch_pruning"
    method: str = "pfgdf"
    ratio: Optional[float] = None
    params: Dict[str, Any] = field(default_factory=dict)
    ignored_layers: Optional[List[str]] = None
    target: Optional[Dict[str, float]] = None  # {latency | macs | params: r}, dense / pruned >= r
    timing: Optional[Dict[str, Any]] = None  # how a latency target is timed: engine, threads, batch_size


@dataclass
class ExportSection:
    onnx: bool = True


@dataclass
class ReportSection:
    latency: bool = True
    batch_sizes: List[int] = field(default_factory=lambda: [1, 32])
    warmup: int = 5
    repeats: int = 30
    threads: Optional[int] = None
    plots: bool = True


@dataclass
class Recipe:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    device: str = "cpu"
    progress: bool = True
    checkpoint_every: int = 0  # optimiser steps between resumable checkpoints; 0: every epoch end
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=0.0))
    prune: PruneSection = field(default_factory=PruneSection)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1.0, lr=0.01))
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    export: ExportSection = field(default_factory=ExportSection)
    report: ReportSection = field(default_factory=ReportSection)

    def to_dict(self) -> Dict[str, Any]:
        return to_dict(self)


def _semantic_errors(r: Recipe) -> List[str]:
    from .data import DATASETS
    from .models import MODELS, input_size_problem, torchvision_model_names
    from .pruning import FRAMEWORKS, METHODS, validate_params
    from .timm_models import is_timm_name, timm_name_problem

    errors: List[str] = []
    if not r.name or any(c in r.name for c in "/\\") or r.name.startswith("."):
        errors.append(f"name must be a plain folder name, got {r.name!r}")
    if not 0 <= r.seed < 2**32:
        errors.append(f"seed must be in [0, 2**32), got {r.seed!r}")
    if r.checkpoint_every < 0:
        errors.append(f"checkpoint_every must be >= 0, got {r.checkpoint_every!r}")
    if r.device not in DEVICES:
        errors.append(f"device must be one of {', '.join(DEVICES)}; got {r.device!r}")
    m = r.model
    bare = m.name[3:] if m.name.startswith("tv:") else m.name
    if is_timm_name(m.name):
        problem = timm_name_problem(m.name)
        if problem is not None:
            errors.append(problem if problem.startswith("model.name") else f"model.name: {problem}")
        elif m.width != 1.0:
            errors.append(f"model.width must be 1.0 for timm model {m.name!r}, got {m.width!r}")
    elif m.name not in MODELS and bare not in torchvision_model_names():
        errors.append(f"model.name {m.name!r} is unknown; known: {', '.join(MODELS.names())}, "
                      "any torchvision classification model, or timm/NAME for a timm model")
    errors += _weights_errors(m, bare)
    if m.width <= 0:
        errors.append(f"model.width must be > 0, got {m.width!r}")
    elif m.width > MAX_WIDTH:
        errors.append(f"model.width must be <= {MAX_WIDTH:g}, got {m.width!r}")
    d = r.data
    if d.name not in DATASETS:
        errors.append(f"data.name {d.name!r} is unknown; known: {', '.join(DATASETS.names())}")
    for key in ("image_size", "batch_size"):
        if getattr(d, key) < 1:
            errors.append(f"data.{key} must be >= 1, got {getattr(d, key)!r}")
    for key in ("limit_train", "limit_test"):
        v = getattr(d, key)
        if v is not None and v < 1:
            errors.append(f"data.{key} must be >= 1 or null, got {v!r}")
    if m.name in MODELS and d.image_size >= 1:
        problem = input_size_problem(m.name, d.image_size)
        if problem is not None:
            errors.append(f"data.image_size: {problem}")
    if d.in_channels is not None and d.in_channels not in (1, 3):
        errors.append(f"data.in_channels must be 1, 3 or null, got {d.in_channels!r}")
    if d.workers < 0:
        errors.append(f"data.workers must be >= 0, got {d.workers!r}")
    errors += r.train.validate("train")
    errors += r.finetune.validate("finetune")
    p = r.prune
    if p.framework not in FRAMEWORKS:
        errors.append(f"prune.framework must be one of {', '.join(FRAMEWORKS)}; got {p.framework!r}")
    if p.method not in METHODS:
        errors.append(f"prune.method {p.method!r} is unknown; known: {', '.join(METHODS.names())}")
    elif p.framework in FRAMEWORKS:
        errors += validate_params(METHODS.get(p.method), p.params, p.ratio, p.framework, target=p.target,
                                  timing=p.timing)
    errors += r.quantize.validate("quantize")
    if r.quantize.fused and p.method in METHODS:
        fusable = METHODS.get(p.method).fusable
        if p.framework not in fusable:
            where = f"prune.framework {', '.join(fusable)}" if fusable else "a training-aware NNI method"
            errors.append(f"quantize.fused: method {p.method!r} via {p.framework!r} has no training loop to share; "
                          f"it needs {where}")
    return errors + _report_errors(r.report)


def _weights_errors(m: ModelSection, bare: str) -> List[str]:
    """``model.weights``: a weights name of the torchvision model (checked here), or a file path (read
    when the model is built, where a missing file says where to put it)."""
    from .models import MODELS, torchvision_model_names
    from .weights import is_weights_name, resolve_weights

    if m.weights is None:
        return []
    if m.checkpoint is not None:
        return [f"model.weights {m.weights!r} and model.checkpoint {m.checkpoint!r}: set one of them "
                "(the checkpoint replaces every weight)"]
    if not m.weights or not is_weights_name(m.weights):
        return [] if m.weights else ["model.weights must be a weights name or a file path, got ''"]
    if m.name.startswith("timm/"):  # the file itself is looked for when the model is built
        return [] if m.weights == "DEFAULT" else [
            f"model.weights {m.weights!r}: timm models take DEFAULT (choose the weights with a tag in the name, "
            "e.g. timm/resnet18.a1_in1k) or a path to a state_dict file"]
    if m.name in MODELS or bare not in torchvision_model_names():
        return [f"model.weights {m.weights!r}: weights names are for torchvision models, not {m.name!r}; "
                "give a path to a state_dict file"]
    try:
        resolve_weights(bare, m.weights)
    except ConfigError as e:
        return list(e.errors)
    return []


def _report_errors(rep: ReportSection) -> List[str]:
    errors = [p for i, b in enumerate(rep.batch_sizes)
              if (p := range_problem(f"report.batch_sizes[{i}]", b, 1, integer=True))]
    if not rep.batch_sizes:
        errors.append("report.batch_sizes must list at least one batch size, got []")
    for key, low in (("repeats", 1), ("warmup", 0)):
        problem = range_problem(f"report.{key}", getattr(rep, key), low, integer=True)
        if problem:
            errors.append(problem)
    if rep.threads is not None and rep.threads < 1:
        errors.append(f"report.threads must be >= 1 or null, got {rep.threads!r}")
    return errors


def recipe_from_dict(data: Dict[str, Any], source: str = "recipe") -> Recipe:
    """Build and validate a :class:`Recipe`; raise :class:`ConfigError` listing every problem."""
    errors: List[str] = []
    recipe = from_dict(Recipe, data, "", errors)
    errors += _semantic_errors(recipe)  # keys with a wrong type fell back to defaults
    if errors:
        raise ConfigError(errors, source)
    return recipe


def load_recipe(path: str, overrides: Optional[List[str]] = None) -> Recipe:
    """Load ``path`` (safe YAML), apply ``--set key=value`` overrides, validate.

    Example:
        >>> r = load_recipe("recipes/pfgdf_vgg16.yaml", ["prune.params.k=1.5"])  # doctest: +SKIP
        >>> r.prune.params["k"]  # doctest: +SKIP
        1.5
    """
    data = load_yaml(path)
    for item in overrides or []:
        set_by_path(data, item)
    return recipe_from_dict(data, path)
