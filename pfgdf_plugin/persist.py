"""Save and load pruned models without pickling code.

A pruned model is stored as an ordinary ``state_dict`` plus a JSON description of its
structure: the shape-defining attributes of every convolution (grouped and depthwise
included), linear, normalisation (BatchNorm, InstanceNorm, GroupNorm, LayerNorm and
subclasses such as ConvNeXt's ``LayerNorm2d``) and multi-head attention layer; the shape of
every other parameter or buffer (ConvNeXt's layer scale, class tokens, position embeddings);
the modules that are ``nn.Identity`` (blocks DBP removed); and the block-diagonal layers
MPDCompress created (:func:`pfgdf_plugin.methods.mpd.describe_model`). Loading builds the base
model, rebuilds that structure on a copy of it, and loads the weights with
``torch.load(..., weights_only=True)``: nothing in the file can run code.

A file that is not ours, is truncated, or whose description was edited (wrong shapes, missing
keys, sizes below one, wrong types) raises :class:`PrunedFileError` and nothing else; every size
is checked against the weights stored in the file before anything is allocated, and the base
model passed in is left exactly as it was.
"""

from __future__ import annotations

import copy
import json
import math
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn

from .errors import PrunedFileError
from .train import atomic_save

FORMAT = "pfgdf-plugin/pruned-v1"
_CONV_ATTRS = ("in_channels", "out_channels", "groups")
_ATTENTION_ATTRS = ("embed_dim", "kdim", "vdim", "num_heads")
# the integer attributes each described layer type needs, all >= 1
_REQUIRED = {"conv": _CONV_ATTRS, "linear": ("in_features", "out_features"), "batchnorm": ("num_features",),
             "groupnorm": ("num_channels", "num_groups"), "layernorm": (), "attention": _ATTENTION_ATTRS}


def _describe(module: nn.Module) -> Optional[Dict[str, Any]]:
    if isinstance(module, nn.modules.conv._ConvNd):
        return {"type": "conv", **{a: int(getattr(module, a)) for a in _CONV_ATTRS}}
    if isinstance(module, nn.Linear):
        return {"type": "linear", "in_features": module.in_features, "out_features": module.out_features}
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return {"type": "batchnorm", "num_features": module.num_features}
    if isinstance(module, nn.GroupNorm):
        return {"type": "groupnorm", "num_channels": module.num_channels, "num_groups": module.num_groups}
    if isinstance(module, nn.LayerNorm):
        return {"type": "layernorm", "normalized_shape": [int(v) for v in module.normalized_shape]}
    if isinstance(module, nn.MultiheadAttention):
        return {"type": "attention", **{a: int(getattr(module, a)) for a in _ATTENTION_ATTRS}}
    return None


def describe_structure(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """Shape-defining attributes of every conv, linear, norm and attention layer, by module name.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, groups=1), torch.nn.LayerNorm([4, 2, 2]))
        >>> describe_structure(net)["1"]
        {'type': 'layernorm', 'normalized_shape': [4, 2, 2]}
    """
    out = {}
    for name, m in model.named_modules():
        d = _describe(m)
        if d is not None:
            out[name] = d
    return out


def _loose_tensors(model: nn.Module, skip: tuple) -> Dict[str, list]:
    """Shapes of the parameters and buffers that no described layer type owns (layer scales, tokens)."""
    out = {}
    for mod_name, m in model.named_modules():
        if _describe(m) is not None and not isinstance(m, nn.MultiheadAttention):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        if prefix.startswith(skip):
            continue
        for kind in (m._parameters, m._buffers):
            for t_name, t in kind.items():
                if t is not None:
                    out[prefix + t_name] = [int(v) for v in t.shape]
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

    block_diagonal = describe_model(model)
    skip = tuple(f"{n}." for n in block_diagonal.get("modules", {}))
    meta = {"format": FORMAT, "arch": arch or {}, "structure": describe_structure(model),
            "tensors": _loose_tensors(model, skip),
            "identity": [n for n, m in model.named_modules() if n and isinstance(m, nn.Identity)],
            "block_diagonal": block_diagonal}
    full = model.state_dict()
    state = OrderedDict((k, v.detach().cpu().clone()) for k, v in full.items())
    # keep the per-module versions: some modules (torchvision's MNASNet) refuse a state dict without them
    state._metadata = copy.deepcopy(getattr(full, "_metadata", OrderedDict()))
    atomic_save({"meta": json.dumps(meta), "state_dict": state}, path)


# --------------------------------------------------------------------------- checking a description


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _shape(value: Any) -> bool:
    return isinstance(value, list) and all(_positive_int(v) for v in value)


def _entry_problem(d: Any) -> Optional[str]:
    """What is wrong with one ``structure`` entry, or ``None``."""
    if not isinstance(d, dict):
        return f"must be a mapping, got {type(d).__name__}"
    kind = d.get("type")
    if not isinstance(kind, str) or kind not in _REQUIRED:
        return f"unknown layer type {kind!r}; known: {', '.join(_REQUIRED)}"
    for key in _REQUIRED[kind]:
        if key not in d:
            return f"{kind} entry lacks {key!r}"
        if not _positive_int(d[key]):
            return f"{key} must be an int >= 1, got {d[key]!r}"
    if kind == "conv" and (d["in_channels"] % d["groups"] or d["out_channels"] % d["groups"]):
        return f"groups={d['groups']} must divide in_channels={d['in_channels']} and out_channels={d['out_channels']}"
    if kind == "groupnorm" and d["num_channels"] % d["num_groups"]:
        return f"num_groups={d['num_groups']} must divide num_channels={d['num_channels']}"
    if kind == "layernorm" and not (_shape(d.get("normalized_shape")) and d["normalized_shape"]):
        return f"normalized_shape must be a non-empty list of ints >= 1, got {d.get('normalized_shape')!r}"
    if kind == "attention" and d["embed_dim"] % d["num_heads"]:
        return f"num_heads={d['num_heads']} must divide embed_dim={d['embed_dim']}"
    return None


def _check_meta(meta: Any, state: Any, path: str) -> None:
    """Types and ranges of every part of the description, before the model is touched."""
    if not isinstance(meta, dict):
        raise PrunedFileError(f"{path}: the structure description must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise PrunedFileError(f"{path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise PrunedFileError(f"{path}: 'state_dict' must map names to tensors")
    for key, kind in (("arch", dict), ("structure", dict), ("tensors", dict), ("identity", list),
                      ("block_diagonal", dict)):
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            raise PrunedFileError(f"{path}: {key!r} must be a {kind.__name__}, got {type(meta[key]).__name__}")
    if not isinstance(meta.get("structure"), dict):
        raise PrunedFileError(f"{path}: the description lacks 'structure'")
    for name, d in meta["structure"].items():
        problem = _entry_problem(d)
        if problem is not None:
            raise PrunedFileError(f"{path}: layer {name!r}: {problem}")
    for name, shape in (meta.get("tensors") or {}).items():
        if not (isinstance(shape, list) and all(_positive_int(v) for v in shape)):
            raise PrunedFileError(f"{path}: tensor {name!r}: shape must be a list of ints >= 1, got {shape!r}")
    if not all(isinstance(n, str) and n for n in meta.get("identity") or []):
        raise PrunedFileError(f"{path}: 'identity' must list module names, got {meta.get('identity')!r}")
    _check_block_diagonal(meta.get("block_diagonal") or {}, state, path)


def _check_block_diagonal(bd: Mapping[str, Any], state: Mapping[str, torch.Tensor], path: str) -> None:
    """Each block-diagonal layer must fit the weight stored for it, so rebuilding it stays within the file's size."""
    modules = bd.get("modules") or {}
    if not isinstance(modules, dict):
        raise PrunedFileError(f"{path}: block_diagonal.modules must be a mapping, got {type(modules).__name__}")
    for name, d in modules.items():
        if not isinstance(d, dict):
            raise PrunedFileError(f"{path}: block-diagonal layer {name!r}: must be a mapping")
        sizes = [d.get("out_sizes"), d.get("in_sizes"), d.get("kernel_size", [])]
        if not all(_shape(s) for s in sizes) or not sizes[0] or not sizes[1]:
            raise PrunedFileError(f"{path}: block-diagonal layer {name!r}: out_sizes, in_sizes (and kernel_size) "
                                  f"must be lists of ints >= 1, got {sizes!r}")
        weight = next((state[k] for k in (f"{name}.weight", f"{name}.conv.weight", f"{name}.linear.weight")
                       if k in state), None)  # block, grouped-conv and dense-with-zeros kernels
        need = len(sizes[0]) * max(sizes[0]) * max(sizes[1]) * math.prod(sizes[2])
        if weight is None or need > weight.numel():
            have = None if weight is None else tuple(weight.shape)
            raise PrunedFileError(f"{path}: block-diagonal layer {name!r}: the described blocks need {need} weights, "
                                  f"the file holds {have}; weights do not fit the described structure")


# --------------------------------------------------------------------------- rebuilding


def _fit(state: Mapping[str, torch.Tensor], key: str, shape: tuple, path: str) -> torch.Tensor:
    """A fresh tensor for ``key``, shaped like the file's weight once that equals ``shape``."""
    stored = state.get(key)
    if stored is None or tuple(stored.shape) != tuple(shape):
        have = None if stored is None else tuple(stored.shape)
        raise PrunedFileError(f"{path}: weights do not fit the described structure: {key!r} is described as "
                              f"{tuple(shape)}, the file holds {have}")
    return torch.empty_like(stored)


def _replace(module: nn.Module, attr: str, key: str, shape: tuple, state, path: str) -> None:
    old = getattr(module, attr, None)
    if old is None:
        return
    new = _fit(state, key, shape, path)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(new.to(old.dtype), requires_grad=old.requires_grad))
    else:
        module._buffers[attr] = new.to(old.dtype)


def _reshape(module: nn.Module, d: Dict[str, Any], name: str, state, path: str) -> None:
    kind = d["type"]
    mine = _describe(module)
    if mine is None or mine["type"] != kind:
        raise PrunedFileError(f"{path}: layer {name!r}: the file describes a {kind} layer, the model has "
                              f"{type(module).__name__}")
    p = f"{name}." if name else ""
    if kind == "conv":
        k = tuple(module.weight.shape[2:])
        i, o, g = (int(d[a]) for a in _CONV_ATTRS)
        shape = (i, o // g, *k) if module.transposed else (o, i // g, *k)
        _replace(module, "weight", p + "weight", shape, state, path)
        _replace(module, "bias", p + "bias", (o,), state, path)
        module.in_channels, module.out_channels, module.groups = i, o, g
    elif kind == "linear":
        i, o = int(d["in_features"]), int(d["out_features"])
        _replace(module, "weight", p + "weight", (o, i), state, path)
        _replace(module, "bias", p + "bias", (o,), state, path)
        module.in_features, module.out_features = i, o
    elif kind in ("batchnorm", "groupnorm"):
        n = int(d["num_features"] if kind == "batchnorm" else d["num_channels"])
        for attr in ("weight", "bias", "running_mean", "running_var"):
            _replace(module, attr, p + attr, (n,), state, path)
        if kind == "batchnorm":
            module.num_features = n
        else:
            module.num_channels, module.num_groups = n, int(d["num_groups"])
    elif kind == "layernorm":
        shape = tuple(int(v) for v in d["normalized_shape"])
        if module.weight is None and len(shape) != len(module.normalized_shape):
            raise PrunedFileError(f"{path}: layer {name!r}: normalized_shape {list(shape)} has another rank than "
                                  f"the model's {list(module.normalized_shape)}")
        _replace(module, "weight", p + "weight", shape, state, path)
        _replace(module, "bias", p + "bias", shape, state, path)
        module.normalized_shape = shape
    else:  # attention: its projections are Linear layers and loose tensors of their own
        for a in _ATTENTION_ATTRS:
            setattr(module, a, int(d[a]))
        module.head_dim = module.embed_dim // module.num_heads
        module._qkv_same_embed_dim = module.kdim == module.embed_dim and module.vdim == module.embed_dim


def _reshape_tensors(model: nn.Module, shapes: Mapping[str, list], state, path: str) -> None:
    for key, shape in shapes.items():
        owner, _, attr = key.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            raise PrunedFileError(f"{path}: tensor {key!r} belongs to a module {type(model).__name__} "
                                  "does not have") from None
        if attr not in module._parameters and attr not in module._buffers:
            raise PrunedFileError(f"{path}: tensor {key!r} does not exist in {type(model).__name__}")
        _replace(module, attr, key, tuple(shape), state, path)


def _restore_layers(model: nn.Module, meta: Dict[str, Any], path: str) -> None:
    """Block-diagonal layers first (they bring their own sub-modules), then removed blocks."""
    from .methods.mpd import restore_model

    bd = meta.get("block_diagonal")
    if bd and bd.get("modules"):
        try:
            restore_model(model, bd)
        except Exception as e:  # any malformed entry; the model is a scratch copy
            raise PrunedFileError(f"{path}: block-diagonal layers do not fit {type(model).__name__}: "
                                  f"{type(e).__name__}: {e}") from None
    for name in meta.get("identity") or []:
        modules = dict(model.named_modules())
        if name not in modules:
            raise PrunedFileError(f"{path}: removed block {name!r} does not exist in {type(model).__name__}")
        if not isinstance(modules[name], nn.Identity):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())


def _rebuild(model: nn.Module, meta: Dict[str, Any], state, path: str) -> None:
    """Give ``model`` (a scratch copy) the described structure and the file's weights."""
    _restore_layers(model, meta, path)
    modules = dict(model.named_modules())
    rebuilt = tuple(f"{n}." for n in ((meta.get("block_diagonal") or {}).get("modules") or {}))
    for name, d in meta["structure"].items():
        if name.startswith(rebuilt):
            continue  # built from its block-diagonal description; the weights must fit it
        if name not in modules:
            raise PrunedFileError(f"{path}: layer {name!r} does not exist in {type(model).__name__}")
        _reshape(modules[name], d, name, state, path)
    _reshape_tensors(model, meta.get("tensors") or {}, state, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(x.strip() for x in first[:3])
        raise PrunedFileError(f"{path}: weights do not fit the described structure: {detail}") from None


def read_pruned(path: str) -> tuple:
    """Return ``(meta, state_dict)`` of a pruned-model file, loaded with ``weights_only=True``.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        PrunedFileError: anything else: not loadable without running code, truncated, not ours,
            or a description of the wrong types or sizes.
    """
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # unpickling refused, truncated or corrupt file
        raise PrunedFileError(f"{path}: not a loadable pruned-model file ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or "meta" not in blob or "state_dict" not in blob:
        raise PrunedFileError(f"{path}: not a pfgdf-plugin pruned-model file (no 'meta'/'state_dict')")
    try:
        meta = json.loads(blob["meta"])
    except (TypeError, ValueError, RecursionError):
        raise PrunedFileError(f"{path}: its structure description is not valid JSON") from None
    _check_meta(meta, blob["state_dict"], path)
    return meta, blob["state_dict"]


def _base_from_arch(meta: Dict[str, Any], path: str) -> nn.Module:
    from .models import build_model

    arch = dict(meta.get("arch") or {})
    if "name" not in arch:
        raise PrunedFileError(f"{path}: no architecture stored in the file; pass base_model")
    try:
        return build_model(arch.pop("name"), **arch)
    except Exception as e:  # any bad stored argument
        raise PrunedFileError(f"{path}: the stored architecture cannot be built ({type(e).__name__}: {e}); "
                              "pass base_model") from None


def load_pruned(path: str, base_model: Optional[nn.Module] = None) -> tuple:
    """Rebuild a pruned model saved by :func:`save_pruned`; returns ``(model, meta)``.

    The structure is rebuilt and the weights are loaded on a copy of ``base_model``; only when
    everything fits is the result moved into ``base_model``. On any error ``base_model`` is left
    exactly as it was (structure, weights and mode).

    Args:
        path: the file.
        base_model: a fresh instance of the unpruned architecture; on success it becomes the
            pruned model (and is returned). When omitted, it is built from the ``arch`` stored in
            the file with :func:`pfgdf_plugin.models.build_model`.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        PrunedFileError: the file is not ours, is truncated or edited, or its layers or weights do
            not fit the model; the only error a bad file raises.

    Example:
        >>> import tempfile, os
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
        >>> p = os.path.join(tempfile.mkdtemp(), "m.pt")
        >>> save_pruned(net, p)
        >>> base = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
        >>> model, meta = load_pruned(p, base)
        >>> model is base, model[1].normalized_shape
        (True, (3,))
    """
    meta, state = read_pruned(path)
    if base_model is None:
        model = _base_from_arch(meta, path)
        work = model
    else:
        model = base_model
        try:
            work = copy.deepcopy(base_model)
        except Exception as e:
            raise PrunedFileError(f"{path}: the base model {type(base_model).__name__} cannot be copied to "
                                  f"rebuild it safely ({type(e).__name__}: {e})") from None
    try:
        _rebuild(work, meta, state, path)
    except PrunedFileError:
        raise
    except Exception as e:  # an edited description that passed the checks but not the model
        raise PrunedFileError(f"{path}: the described structure does not fit {type(model).__name__} "
                              f"({type(e).__name__}: {e})") from None
    if work is not model:
        model.__dict__.clear()
        model.__dict__.update(work.__dict__)
    return model.eval(), meta
