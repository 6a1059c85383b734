"""Starting weights for a model, offline-first: torchvision's pretrained weights from the local cache,
or any ``state_dict`` file.

``model.weights`` is either a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``, or the full
``ResNet18_Weights.IMAGENET1K_V1``) or a path to a file. A weights name is read through torchvision's
own mechanism (``get_model_weights(name)[...]``, ``weights.get_state_dict(...)``) from
``$TORCH_HOME/hub/checkpoints/<file>``, and only once the file is known to be there: nothing is ever
downloaded. Every file is read with ``torch.load(..., weights_only=True)``.

A state dict fits a model by :func:`fit_state_dict`: the classifier head (the last ``Linear`` or
``Conv2d``) is kept as built when its shape differs (another number of classes than the data), and
the first convolution likewise when the data has another number of channels; the rest must match
exactly, or the error names the first missing and unexpected keys and mismatching shapes.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlparse

import torch
import torch.nn as nn

from .errors import ConfigError, DataNotFoundError

__all__ = ["fit_state_dict", "is_weights_name", "load_weights", "read_state_dict", "resolve_weights",
           "weights_cache_file"]

_NAME = re.compile(r"^(?:\w+_Weights\.)?[A-Z][A-Z0-9_]*$")
_SHOWN = 5  # keys shown per kind in a mismatch message
# Auxiliary classifiers of pretrained GoogLeNet/Inception-v3, which the plugin builds without.
_AUX_PREFIXES = ("AuxLogits.", "aux1.", "aux2.")
# Settings torchvision's builders apply with pretrained weights, beyond the class count.
PRETRAINED_KWARGS = {"inception_v3": {"transform_input": True}, "googlenet": {"transform_input": True}}


def is_weights_name(value: str) -> bool:
    """Whether ``model.weights`` names torchvision weights (``DEFAULT``) rather than a file.

    Example:
        >>> is_weights_name("DEFAULT"), is_weights_name("ResNet18_Weights.IMAGENET1K_V1")
        (True, True)
        >>> is_weights_name("runs/dense.pt")
        False
    """
    return bool(_NAME.match(value))


def resolve_weights(model_name: str, value: str) -> Any:
    """The torchvision weights enum member ``value`` of torchvision model ``model_name``.

    Raises:
        ConfigError: the model has no pretrained weights, or ``value`` is not one of its weights;
            the message lists the known names.

    Example:
        >>> resolve_weights("resnet18", "DEFAULT").url
        'https://download.pytorch.org/models/resnet18-f37072fd.pth'
    """
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(model_name)
    except (ValueError, KeyError):
        raise ConfigError([f"model.weights {value!r}: torchvision model {model_name!r} has no pretrained "
                           "weights; give a state_dict file instead"], "model") from None
    member = value.split(".", 1)[1] if "." in value else value
    prefix = value.split(".", 1)[0] if "." in value else enum.__name__
    if prefix != enum.__name__ or member not in enum.__members__:
        known = ", ".join(enum.__members__)
        raise ConfigError([f"model.weights {value!r} is not a weights name of {model_name}; known: {known} "
                           f"(or {enum.__name__}.NAME, or a path to a state_dict file)"], "model")
    return enum[member]


def weights_cache_file(weights: Any) -> str:
    """Where torchvision's cache keeps ``weights``: ``$TORCH_HOME/hub/checkpoints/<file from the url>``.

    Example:
        >>> import os
        >>> os.path.basename(weights_cache_file(resolve_weights("resnet18", "DEFAULT")))
        'resnet18-f37072fd.pth'
    """
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))


def _cached_state_dict(weights: Any) -> Dict[str, torch.Tensor]:
    path = weights_cache_file(weights)
    if not os.path.isfile(path):
        folder = os.path.dirname(path)
        raise DataNotFoundError(f"model.weights {weights}: put {os.path.basename(path)} into {folder}{os.sep} "
                                f"(TORCH_HOME; nothing is downloaded: fetch it from {weights.url} elsewhere)")
    try:  # the file is in the cache, so torchvision reads it without downloading
        state = weights.get_state_dict(progress=False, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ConfigError([f"model.weights {weights}: {path} cannot be loaded safely "
                           f"({type(e).__name__}: {e}); replace the file"], "model") from None
    return _densenet_keys(state)


def _densenet_keys(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """torchvision's DenseNet files name keys ``norm.1``; its modules are ``norm1`` (as its builder renames)."""
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                         r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    out = {}
    for key, value in state.items():
        match = pattern.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def read_state_dict(path: str, key: str = "model.checkpoint") -> Dict[str, torch.Tensor]:
    """The state dict in ``path`` (a bare one, or a dict holding it under ``"state_dict"``), read with
    ``weights_only=True``.

    Raises:
        DataNotFoundError: no such file.
        ConfigError: the file cannot be loaded safely, or holds no state dict; names ``key`` and the file.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save({"state_dict": nn.Linear(2, 3).state_dict()}, path)
        >>> sorted(read_state_dict(path))
        ['bias', 'weight']
    """
    if not os.path.isfile(path):
        raise DataNotFoundError(f"{key}: no such file {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError([f"{key} {path}: cannot be loaded safely ({type(e).__name__}: {e})"], "model") from None
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError([f"{key} {path}: expected a state dict (names to tensors, or "
                           "{'state_dict': ...})"], "model")
    return dict(state)


def _last_layer(model: nn.Module) -> Optional[str]:
    last = None
    for path, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = path
    return last


def _first_conv(model: nn.Module) -> Optional[str]:
    return next((path for path, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def _owner(key: str) -> str:
    return key.rpartition(".")[0]


def _listed(keys: List[str]) -> str:
    more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _differences(model_state: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor]
                 ) -> Tuple[List[str], List[str], List[str]]:
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state and not k.startswith(_AUX_PREFIXES)]
    shapes = [k for k in model_state if k in state and tuple(state[k].shape) != tuple(model_state[k].shape)]
    return missing, unexpected, shapes


def fit_state_dict(model: nn.Module, state: Dict[str, torch.Tensor], source: str,
                   model_name: Optional[str] = None) -> List[str]:
    """Copy ``state`` into ``model`` (in place), keeping a differently sized head or first conv as built.

    The classifier head (the last ``Linear``/``Conv2d``) keeps its fresh initialisation when the
    file's has another shape (another number of classes), and so does the first convolution for
    another number of input channels; every other tensor must be there with the model's shape.
    ``model`` is untouched when anything else differs.

    Args:
        model: the built model.
        state: names to tensors.
        source: the key and file, for the messages (``"model.checkpoint runs/a/dense.pt"``).
        model_name: the model's name in the messages (default: its class name).

    Returns:
        One note per layer kept as built, for the log.

    Raises:
        ConfigError: other keys are missing or unexpected, or shapes differ (a file for another
            architecture); the message names the first of each.

    Example:
        >>> fit_state_dict(nn.Sequential(nn.Linear(4, 3)), nn.Sequential(nn.Linear(4, 5)).state_dict(), "w.pt")
        ['w.pt: classifier head 0 replaced (weight (5, 4) in the file, (3, 4) for the data), the rest loaded']
    """
    name = model_name or type(model).__name__
    model_state = model.state_dict()
    missing, unexpected, shapes = _differences(model_state, state)
    head, first = _last_layer(model), _first_conv(model)
    kept = {_owner(k) for k in shapes} & {head, first}
    shapes = [k for k in shapes if _owner(k) not in kept]
    missing = [k for k in missing if _owner(k) not in kept]
    if missing or unexpected or shapes:
        mismatches = [f"{k} {tuple(state[k].shape)} in the file vs {tuple(model_state[k].shape)} in the model"
                      for k in shapes]
        parts = [f"{what}: {_listed(keys)}" for what, keys in (("missing keys", missing),
                 ("unexpected keys", unexpected), ("shape mismatches", mismatches)) if keys]
        raise ConfigError([f"{source} does not fit model {name}: {'; '.join(parts)}; is it a file for "
                           "another architecture or width?"], "model")
    loadable = {k: v for k, v in state.items() if k in model_state and _owner(k) not in kept}
    model.load_state_dict(loadable, strict=False)
    notes = []
    for layer in sorted(kept, key=lambda p: p != head):
        weight = f"{layer}.weight"
        role = "classifier head" if layer == head else "first convolution"
        notes.append(f"{source}: {role} {layer} replaced (weight {tuple(state[weight].shape)} in the file, "
                     f"{tuple(model_state[weight].shape)} for the data), the rest loaded")
    return notes


def load_weights(model: nn.Module, model_name: str, value: str, key: str = "model.weights") -> List[str]:
    """Give ``model`` (built by name ``model_name``) the starting weights ``value``, in place.

    Args:
        model: the freshly built model, sized for the data.
        model_name: its name (``resnet18`` or ``tv:resnet18``); weights names need a torchvision model.
        value: a weights name (``DEFAULT``, ``IMAGENET1K_V1``) or a path to a state dict file.
        key: the recipe key, for the messages.

    Returns:
        The notes for the log (a head replaced for the data's classes).

    Raises:
        DataNotFoundError: the file is not there; for a weights name, one line saying which file
            to put into which folder.
        ConfigError: an unknown weights name (the known ones listed), an unreadable file, or
            weights for another architecture (the first differing keys named).

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 100)).state_dict(), path)
        >>> notes = load_weights(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 10)), "mlp", path)
        >>> "classifier head 1 replaced" in notes[0]
        True
    """
    if is_weights_name(value):
        if model_name.startswith("timm/"):
            raise ConfigError([f"{key} {value!r}: timm's pretrained weights are loaded while the model is built; "
                               f"use pfgdf_plugin.models.build_pretrained({model_name!r}, {value!r}, ...)"], "model")
        bare = model_name[3:] if model_name.startswith("tv:") else model_name
        weights = resolve_weights(bare, value)
        state = _cached_state_dict(weights)
        source = f"{key} {weights} ({weights_cache_file(weights)})"
    else:
        state = read_state_dict(value, key)
        source = f"{key} {value}"
    return fit_state_dict(model, state, source, model_name)
