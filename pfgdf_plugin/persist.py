"""Save and load pruned models without pickling code.

A pruned model is stored as an ordinary ``state_dict`` plus a JSON description of its
structure: the shape of every conv, linear and norm layer (channels, features, groups), the
modules that are ``nn.Identity`` (blocks DBP removed), and the block-diagonal layers MPDCompress
created (:func:`pfgdf_plugin.methods.mpd.describe_model`). Loading builds the base model,
rebuilds that structure, and loads the weights with ``torch.load(..., weights_only=True)``:
nothing in the file can run code.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from .errors import PrunedFileError
from .train import atomic_save

FORMAT = "pfgdf-plugin/pruned-v1"
_CONV_ATTRS = ("in_channels", "out_channels", "groups")


def _describe(module: nn.Module) -> Optional[Dict[str, Any]]:
    if isinstance(module, nn.modules.conv._ConvNd):
        return {"type": "conv", **{a: int(getattr(module, a)) for a in _CONV_ATTRS}}
    if isinstance(module, nn.Linear):
        return {"type": "linear", "in_features": module.in_features, "out_features": module.out_features}
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return {"type": "batchnorm", "num_features": module.num_features}
    if isinstance(module, nn.GroupNorm):
        return {"type": "groupnorm", "num_channels": module.num_channels, "num_groups": module.num_groups}
    return None


def describe_structure(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """Shape-defining attributes of every conv, linear and norm layer, by module name."""
    out = {}
    for name, m in model.named_modules():
        d = _describe(m)
        if d is not None:
            out[name] = d
    return out


def save_pruned(model: nn.Module, path: str, arch: Optional[Dict[str, Any]] = None) -> None:
    """Write ``model`` as a state dict plus its layer structure (atomically).

    Args:
        model: the pruned network.
        path: output file (``.pt``).
        arch: how to rebuild the base model, e.g. ``{"name": "vgg16_bn", "width": 0.5,
            "num_classes": 10, "in_channels": 1}``; lets :func:`load_pruned` work from the file alone.

    Example:
        >>> import torch, tempfile, os
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> p = os.path.join(tempfile.mkdtemp(), "m.pt")
        >>> save_pruned(m, p)
        >>> m2 = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> load_pruned(p, m2)[0][0].out_channels
        4
    """
    from .methods.mpd import describe_model

    meta = {"format": FORMAT, "arch": arch or {}, "structure": describe_structure(model),
            "identity": [n for n, m in model.named_modules() if n and isinstance(m, nn.Identity)],
            "block_diagonal": describe_model(model)}
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_save({"meta": json.dumps(meta), "state_dict": state}, path)


def _reshape(module: nn.Module, d: Dict[str, Any], name: str) -> None:
    kind = d.get("type")
    mine = _describe(module)
    if mine is None or mine["type"] != kind:
        raise PrunedFileError(f"layer {name!r}: the file describes a {kind} layer, the model has "
                              f"{type(module).__name__}")
    if kind == "conv":
        for a in _CONV_ATTRS:
            setattr(module, a, int(d[a]))
        k = tuple(module.weight.shape[2:])
        if module.transposed:
            shape = (module.in_channels, module.out_channels // module.groups, *k)
        else:
            shape = (module.out_channels, module.in_channels // module.groups, *k)
        module.weight = nn.Parameter(torch.empty(shape))
        if module.bias is not None:
            module.bias = nn.Parameter(torch.empty(module.out_channels))
    elif kind == "linear":
        module.in_features, module.out_features = int(d["in_features"]), int(d["out_features"])
        module.weight = nn.Parameter(torch.empty(module.out_features, module.in_features))
        if module.bias is not None:
            module.bias = nn.Parameter(torch.empty(module.out_features))
    elif kind == "batchnorm":
        n = int(d["num_features"])
        module.num_features = n
        if module.weight is not None:
            module.weight = nn.Parameter(torch.empty(n))
            module.bias = nn.Parameter(torch.empty(n))
        if module.running_mean is not None:
            module.running_mean = torch.zeros(n)
            module.running_var = torch.ones(n)
    elif kind == "groupnorm":
        module.num_channels, module.num_groups = int(d["num_channels"]), int(d["num_groups"])
        if module.weight is not None:
            module.weight = nn.Parameter(torch.empty(module.num_channels))
            module.bias = nn.Parameter(torch.empty(module.num_channels))


def _restore_layers(model: nn.Module, meta: Dict[str, Any], path: str) -> None:
    """Block-diagonal layers first (they bring their own sub-modules), then removed blocks."""
    from .methods.mpd import MPDError, restore_model

    bd = meta.get("block_diagonal")
    if bd and bd.get("modules"):
        try:
            restore_model(model, bd)
        except (MPDError, KeyError, TypeError, ValueError) as e:
            raise PrunedFileError(f"{path}: block-diagonal layers do not fit {type(model).__name__}: {e}") from None
    for name in meta.get("identity", []):
        modules = dict(model.named_modules())
        if name not in modules:
            raise PrunedFileError(f"{path}: removed block {name!r} does not exist in {type(model).__name__}")
        if not isinstance(modules[name], nn.Identity):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())


def read_pruned(path: str) -> tuple:
    """Return ``(meta, state_dict)`` of a pruned-model file, loaded with ``weights_only=True``."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # unpickling refused or corrupt file
        raise PrunedFileError(f"{path}: not a loadable pruned-model file ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or "meta" not in blob or "state_dict" not in blob:
        raise PrunedFileError(f"{path}: not a pfgdf-plugin pruned-model file (no 'meta'/'state_dict')")
    try:
        meta = json.loads(blob["meta"])
    except (TypeError, ValueError):
        raise PrunedFileError(f"{path}: its structure description is not valid JSON") from None
    if meta.get("format") != FORMAT:
        raise PrunedFileError(f"{path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta, blob["state_dict"]


def load_pruned(path: str, base_model: Optional[nn.Module] = None) -> tuple:
    """Rebuild a pruned model saved by :func:`save_pruned`; returns ``(model, meta)``.

    Args:
        path: the file.
        base_model: a fresh instance of the unpruned architecture; reshaped in place. When
            omitted, it is built from the ``arch`` stored in the file with
            :func:`pfgdf_plugin.models.build_model`.

    Raises:
        PrunedFileError: the file is not ours, or its layers or weights do not fit the model.
    """
    meta, state = read_pruned(path)
    if base_model is None:
        arch = dict(meta.get("arch") or {})
        if "name" not in arch:
            raise PrunedFileError(f"{path}: no architecture stored in the file; pass base_model")
        from .models import build_model

        base_model = build_model(arch.pop("name"), **arch)
    _restore_layers(base_model, meta, path)
    modules = dict(base_model.named_modules())
    rebuilt = tuple(f"{n}." for n in ((meta.get("block_diagonal") or {}).get("modules") or {}))
    for name, d in meta["structure"].items():
        if name.startswith(rebuilt):
            continue  # built from its block-diagonal description; the weights must fit it
        if name not in modules:
            raise PrunedFileError(f"layer {name!r} of {path} does not exist in {type(base_model).__name__}")
        _reshape(modules[name], d, name)
    try:
        base_model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(x.strip() for x in first[:3])
        raise PrunedFileError(f"{path}: weights do not fit the described structure: {detail}") from None
    return base_model.eval(), meta
