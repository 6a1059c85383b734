"""timm models by name (``timm/NAME``), freshly initialised or with timm's pretrained weights, offline.

``build_model("timm/resnet10t", num_classes=10, in_channels=1)`` is
``timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1)``. ``NAME`` is a timm
architecture, optionally with a pretrained tag (``timm/resnet18.a1_in1k``). timm is an optional
dependency (``pip install 'pfgdf-plugin[timm]'``), imported only when such a model is built or
checked: importing :mod:`pfgdf_plugin` never imports it.

Pretrained weights (``model.weights: DEFAULT``) are read from the cache timm itself uses, and only
once the file is known to be there: nothing is ever downloaded. timm >= 0.9 reads
``pretrained=True`` weights from the Hugging Face hub cache,
``$HF_HUB_CACHE/models--timm--<model>.<tag>/snapshots/<commit>/model.safetensors`` (or
``pytorch_model.bin``), the commit of ``main`` written in ``.../refs/main``; ``HF_HUB_CACHE``
defaults to ``$HF_HOME/hub`` and ``HF_HOME`` to ``~/.cache/huggingface``. The cache folder is
worked out from the environment when the weights are loaded, and the file found with
``huggingface_hub.try_to_load_from_cache`` (which only reads the disk). Weights timm's older
releases cached under ``$TORCH_HOME/hub/checkpoints/<file of the url>`` are used when the hub
cache lacks them. The file found is handed to timm's own loader
(``create_model(..., pretrained=True, pretrained_cfg_overlay={"file": path})``: safetensors, or
``torch.load(..., weights_only=True)``), which also replaces a classifier head sized for another
number of classes and adapts the first convolution to another number of input channels.

DBP can remove timm's residual blocks (ResNet ``BasicBlock``/``Bottleneck`` without downsampling,
EfficientNet/MobileNet blocks with a skip connection): their types are registered here by name,
without importing timm.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .errors import ConfigError, DataNotFoundError, UnknownNameError
from .methods.dbp.blocks import register_block_type

__all__ = ["INSTALL_HINT", "PREFIX", "build_timm_model", "hub_cache_dir", "is_timm_name", "sync_widths_",
           "timm_name_problem", "timm_pretrained", "timm_weights_file"]

PREFIX = "timm/"
INSTALL_HINT = "pip install 'pfgdf-plugin[timm]'"
# create_model arguments that would fetch weights or files themselves: model.weights does that, offline
_REFUSED = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")


def is_timm_name(name: object) -> bool:
    """Whether ``name`` asks for a timm model (``timm/NAME``).

    Example:
        >>> is_timm_name("timm/resnet10t"), is_timm_name("resnet18")
        (True, False)
    """
    return isinstance(name, str) and name.startswith(PREFIX)


def _import_timm(name: str) -> Any:
    try:
        import timm
    except ImportError:
        raise UnknownNameError(f"model {name!r} needs timm, which is not installed: {INSTALL_HINT}") from None
    return timm


def timm_name_problem(name: str) -> Optional[str]:
    """Why ``timm/NAME`` cannot be built (timm missing, an unknown architecture or tag), or ``None``.

    Example:
        >>> timm_name_problem("timm/resnet10t") is None
        True
        >>> timm_name_problem("timm/resnet10x")
        "unknown timm model 'resnet10x'; similar: resnet101, ...resnet10t, ..."
    """
    bare = name[len(PREFIX):]
    if not bare or ":" in bare or "/" in bare or "@" in bare:
        return (f"model.name {name!r}: give a timm architecture, optionally with a pretrained tag "
                "(timm/resnet18 or timm/resnet18.a1_in1k); hub and local-folder models are not loaded")
    try:
        timm = _import_timm(name)
    except UnknownNameError as e:
        return str(e)
    arch, _, tag = bare.partition(".")
    if not timm.is_model(arch):
        similar = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"similar: {', '.join(sorted(similar))}, ..." if similar else "see timm.list_models()"
        return f"unknown timm model {arch!r}; {hint}"
    if tag:
        tags = sorted(t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*"))
        if tag not in tags:
            return f"timm model {arch!r} has no pretrained tag {tag!r}; known: {', '.join(tags) or 'none'}"
    return None


def _checked(name: str) -> Any:
    problem = timm_name_problem(name)
    if problem is not None:
        raise UnknownNameError(problem)
    return _import_timm(name)


def _create(timm: Any, name: str, num_classes: int, in_channels: int, width: float, kwargs: dict,
            **extra: Any) -> nn.Module:
    if width != 1.0:
        raise ValueError(f"width must be 1.0 for timm model {name!r}, got {width!r}")
    kwargs = dict(kwargs)
    kwargs.pop("image_size", None)  # timm's convolutional models take any size their layers allow
    refused = sorted(set(kwargs) & set(_REFUSED))
    if refused:
        raise TypeError(f"timm model {name!r}: {', '.join(refused)} not accepted; starting weights come from "
                        "model.weights (weights=DEFAULT or a state_dict file), read offline")
    return timm.create_model(name[len(PREFIX):], num_classes=num_classes, in_chans=in_channels, **extra, **kwargs)


def build_timm_model(name: str, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                     **kwargs: Any) -> nn.Module:
    """``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=...)`` for ``timm/NAME``.

    Args:
        name: ``timm/`` and a timm architecture, optionally with a pretrained tag.
        num_classes, in_channels: sized for the data.
        width: must be 1.0 (timm's architectures have their own widths).
        **kwargs: ``image_size`` (ignored); anything else goes to ``timm.create_model`` (e.g.
            ``drop_rate``), except the arguments that fetch weights.

    Raises:
        UnknownNameError: timm is not installed (the message says ``pip install 'pfgdf-plugin[timm]'``),
            or the name or tag is unknown (similar names listed).
        ValueError: ``width`` other than 1.0.

    Example:
        >>> build_timm_model("timm/resnet10t", num_classes=10, in_channels=1)(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """
    timm = _checked(name)
    return _create(timm, name, num_classes, in_channels, width, kwargs, pretrained=False)


# --------------------------------------------------------------------------- pretrained weights, offline


def hub_cache_dir(environ: Optional[Mapping[str, str]] = None) -> str:
    """The Hugging Face hub cache timm reads, from the environment as it is now (not as it was when
    ``huggingface_hub`` was imported): ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``.

    Example:
        >>> hub_cache_dir({"HF_HOME": "/data/hf"}), hub_cache_dir({"HF_HUB_CACHE": "/x", "HF_HOME": "/y"})
        ('/data/hf/hub', '/x')
    """
    env = os.environ if environ is None else environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"),
                                              "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(cache))


def _hub_filenames(cfg: Any) -> List[str]:
    """The files ``load_state_dict_from_hf`` would fetch, in its order (the safetensors alternative first)."""
    from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives

    filename = cfg.hf_hub_filename or HF_WEIGHTS_NAME
    if filename.endswith(".safetensors"):
        return [filename]
    return [*_get_safe_alternatives(filename), filename]


def timm_weights_file(name: str, cache_dir: Optional[str] = None) -> str:
    """The cached file holding the pretrained weights of ``timm/NAME``; nothing is downloaded.

    Args:
        name: ``timm/NAME``.
        cache_dir: the hub cache (default :func:`hub_cache_dir`).

    Raises:
        UnknownNameError: as :func:`build_timm_model`.
        ConfigError: the model has no pretrained weights, or only weights timm loads with its own
            code (``.npz`` files).
        DataNotFoundError: the file is in neither cache; the one-line message names the file and
            the folder it goes into.

    Example:
        >>> try:
        ...     timm_weights_file("timm/resnet10t", cache_dir="/nowhere")
        ... except DataNotFoundError as e:
        ...     print(str(e).split(" into ")[0]); print(str(e).split(" into ")[1].split(" with ")[0])
        model.weights DEFAULT of timm/resnet10t: put model.safetensors (or pytorch_model.bin)
        /nowhere/models--timm--resnet10t.c3_in1k/snapshots/<commit>/
    """
    timm = _checked(name)
    from huggingface_hub import try_to_load_from_cache
    from timm.models._hub import hf_split

    cfg = timm.models.get_pretrained_cfg(name[len(PREFIX):])
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    url = getattr(cfg, "url", None) if cfg is not None else None
    if not hub_id and not url:
        raise ConfigError([f"model.weights DEFAULT: timm model {name!r} has no pretrained weights; give a path "
                           "to a state_dict file"], "model")
    cache = hub_cache_dir() if cache_dir is None else cache_dir
    files: List[str] = []
    if hub_id:
        repo, revision = hf_split(hub_id)
        files = _hub_filenames(cfg)
        if not files[-1].endswith((".safetensors", ".bin", ".pth")):
            raise ConfigError([f"model.weights DEFAULT: timm model {name!r} keeps its weights in {files[-1]}, which "
                               "needs timm's own download code; give a path to a state_dict file"], "model")
        for filename in files:
            found = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision)
            if isinstance(found, str):
                return found
    old = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url)) if url else None
    if old and not old.endswith(".npz") and os.path.isfile(old):
        return old  # timm's pre-0.9 cache (TIMM_USE_OLD_CACHE)
    if not hub_id:
        raise DataNotFoundError(f"model.weights DEFAULT of {name}: put {os.path.basename(old)} into "
                                f"{os.path.dirname(old)}{os.sep} (TORCH_HOME; nothing is downloaded: fetch it from "
                                f"{url} elsewhere)")
    what = files[0] + (f" (or {files[1]})" if len(files) > 1 else "")
    folder = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snapshot = os.path.join(folder, "snapshots", revision or "<commit>") + os.sep
    where = snapshot if revision else f"{snapshot} with the commit id in {os.path.join(folder, 'refs', 'main')}"
    raise DataNotFoundError(f"model.weights DEFAULT of {name}: put {what} into {where} (HF_HOME / HF_HUB_CACHE; "
                            f"nothing is downloaded: on a machine with network `hf download {repo}` fills that "
                            "layout under its HF_HOME, copy it here)")


def timm_pretrained(name: str, weights: str, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                    **kwargs: Any) -> Tuple[nn.Module, List[str]]:
    """``timm/NAME`` with timm's pretrained weights ``weights`` (``DEFAULT``) from the local cache.

    The file :func:`timm_weights_file` finds is loaded by timm's own code, which keeps every
    tensor, replaces a classifier head for another number of classes than ``num_classes`` and
    adapts the first convolution to ``in_channels``; both are noted.

    Args:
        name: ``timm/NAME`` (``NAME`` may carry a pretrained tag: ``timm/resnet18.a1_in1k``).
        weights: ``DEFAULT``: the tag in the name, or timm's default tag for the architecture.
        num_classes, in_channels, width, **kwargs: as in :func:`build_timm_model`.

    Returns:
        The model and the notes for the log.

    Raises:
        ConfigError: another weights name, a model without pretrained weights, or a file that does
            not load into the model (the file and the first problem named).
        DataNotFoundError: the file is not cached (see :func:`timm_weights_file`).
        UnknownNameError: as :func:`build_timm_model`.
    """
    if weights != "DEFAULT":
        raise ConfigError([f"model.weights {weights!r}: timm models take DEFAULT (choose the weights with a tag in "
                           f"the name, e.g. timm/resnet18.a1_in1k) or a path to a state_dict file"], "model")
    timm = _checked(name)
    if width != 1.0:  # before loading, so that it is not taken for a problem of the file
        raise ValueError(f"width must be 1.0 for timm model {name!r}, got {width!r}")
    path = timm_weights_file(name)
    cfg = timm.models.get_pretrained_cfg(name[len(PREFIX):])
    source = f"model.weights DEFAULT ({path})"
    heads = (cfg.classifier,) if isinstance(cfg.classifier, str) else tuple(cfg.classifier or ())
    try:
        with _load_report() as report:
            model = _create(timm, name, num_classes, in_channels, width, kwargs, pretrained=True,
                            pretrained_cfg_overlay={"file": path})
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        lines = str(e).strip().splitlines()
        detail = lines[0] if lines else type(e).__name__
        raise ConfigError([f"{source} cannot be loaded into timm model {name!r} ({type(e).__name__}: "
                           f"{detail[:300]}); replace the file"], "model") from None
    # With another class count timm loads non-strictly and only logs what it missed: check that here.
    replaced = tuple(f"{h}.{p}" for h in heads for p in ("weight", "bias")) if num_classes != cfg.num_classes else ()
    missing = [k for k in report["missing"] if k not in replaced]
    if missing or report["unexpected"]:
        parts = [f"{what}: {', '.join(keys[:5])}{f' (+{len(keys) - 5} more)' if len(keys) > 5 else ''}"
                 for what, keys in (("missing keys", missing), ("unexpected keys", report["unexpected"])) if keys]
        raise ConfigError([f"{source} does not fit timm model {name!r}: {'; '.join(parts)}; is it a file for "
                           "another architecture? replace the file"], "model")
    notes = []
    if num_classes != cfg.num_classes and heads:
        heads = ", ".join(heads)
        notes.append(f"{source}: classifier head {heads} replaced ({cfg.num_classes} classes in the file, "
                     f"{num_classes} for the data), the rest loaded")
    file_channels = (cfg.input_size or (3,))[0]
    if in_channels != file_channels and cfg.first_conv:
        convs = cfg.first_conv if isinstance(cfg.first_conv, str) else ", ".join(cfg.first_conv)
        notes.append(f"{source}: first convolution {convs} adapted by timm from {file_channels} to {in_channels} "
                     "input channel(s)")
    return model, notes


_KEYS = re.compile(r"^(Missing|Unexpected) keys \((.*?)\) (?:discovered|found) while loading pretrained weights")


@contextmanager
def _load_report() -> Iterator[Dict[str, List[str]]]:
    """The keys timm's ``load_pretrained`` reports missing or unexpected (it logs them and loads non-strictly
    when the class count differs)."""
    report: Dict[str, List[str]] = {"missing": [], "unexpected": []}

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            match = _KEYS.match(record.getMessage())
            if match:
                keys = [k.strip() for k in match.group(2).split(",") if k.strip()]
                report["missing" if match.group(1) == "Missing" else "unexpected"].extend(keys)

    log = logging.getLogger("timm.models._builder")
    handler, level = Collect(logging.INFO), log.level
    log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    try:
        yield report
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


# --------------------------------------------------------------------------- after pruning


def sync_widths_(model: nn.Module) -> List[str]:
    """Set a pruned timm model's ``num_features`` / ``head_hidden_size`` to the width its classifier now reads.

    Pruning changes the layers, not the widths timm keeps as plain attributes, so after pruning
    ``model.reset_classifier(n)`` would build a head for the unpruned width. Models with a
    pre-logits layer (``head_hidden_size != num_features``) get only ``head_hidden_size`` set.
    Anything that is not a timm model with a ``Linear`` classifier is left alone.

    Returns:
        ``"attr: old -> new"`` for each attribute changed.

    Example:
        >>> import torch, torch_pruning as tp
        >>> from pfgdf_plugin import GaussianImportance
        >>> m = build_timm_model("timm/resnet10t", num_classes=10).eval()
        >>> tp.pruner.MetaPruner(m, torch.randn(1, 3, 32, 32), importance=GaussianImportance(),
        ...                      pruning_ratio=0.5, ignored_layers=[m.fc]).step()
        >>> sync_widths_(m)
        ['num_features: 512 -> 256', 'head_hidden_size: 512 -> 256']
        >>> m.reset_classifier(5); m.eval()(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 5])
    """
    head = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
    if not isinstance(head, nn.Linear):
        return []
    width = head.in_features
    features, hidden = getattr(model, "num_features", None), getattr(model, "head_hidden_size", None)
    attrs = ["head_hidden_size"] if isinstance(hidden, int) and hidden != features else \
        ["num_features", "head_hidden_size"]
    changed = []
    for attr in attrs:
        old = getattr(model, attr, None)
        if isinstance(old, int) and old != width:
            setattr(model, attr, width)
            changed.append(f"{attr}: {old} -> {width}")
    return changed


# --------------------------------------------------------------------------- DBP's removable blocks


def _resnet_block_removable(m: nn.Module) -> bool:
    """timm's ``BasicBlock``/``Bottleneck`` without downsampling keeps its input shape."""
    return getattr(m, "downsample", None) is None and getattr(m, "stride", 1) == 1


def _skip_block_removable(m: nn.Module) -> bool:
    """timm's EfficientNet/MobileNet blocks add their input back (``has_skip``) exactly when shapes match."""
    return bool(getattr(m, "has_skip", False))


register_block_type("timm.models.resnet:BasicBlock", _resnet_block_removable)
register_block_type("timm.models.resnet:Bottleneck", _resnet_block_removable)
for _block in ("ConvBnAct", "DepthwiseSeparableConv", "InvertedResidual", "UniversalInvertedResidual",
               "EdgeResidual"):
    register_block_type(f"timm.models._efficientnet_blocks:{_block}", _skip_block_removable)
