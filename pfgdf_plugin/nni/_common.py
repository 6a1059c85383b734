"""Config-list and mask helpers shared by the NNI adapters."""

from __future__ import annotations

import copy
from typing import Any, Dict, Iterator, List, Sequence

# Ratio-like values NNI's schema wants as float (it rejects the int 1 for ``sparse_ratio``).
FLOAT_KEYS = ("sparse_ratio", "sparse_threshold", "max_sparse_ratio", "min_sparse_ratio", "sparsity",
              "sparsity_per_layer", "total_sparsity", "max_sparsity_per_layer")


def settings(entry: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
    """The entry itself and each dict of its ``target_settings``."""
    yield entry
    for setting in (entry.get("target_settings") or {}).values():
        if isinstance(setting, dict):
            yield setting


def copy_config(config_list: Sequence[Dict[str, Any]], knobs: Sequence[str], usage: str) -> List[Dict[str, Any]]:
    """A deep copy of ``config_list`` with int ratios cast to float.

    NNI's config schema rejects unknown keys, so a method's own knobs are constructor
    arguments: an entry holding one of ``knobs`` gets a ``ValueError`` that shows ``usage``.
    """
    if not isinstance(config_list, (list, tuple)):
        raise TypeError(f"config_list must be a list of dicts, got {type(config_list).__name__}")
    for i, entry in enumerate(config_list):
        if not isinstance(entry, dict):
            raise TypeError(f"config_list[{i}] must be a dict, got {type(entry).__name__}")
        found = [key for key in knobs if key in entry]
        if found:
            raise ValueError(f"config_list[{i}] has {', '.join(map(repr, found))}: NNI's config schema "
                             f"rejects unknown keys, so these are constructor arguments, e.g. {usage}")
    out = copy.deepcopy(list(config_list))
    for entry in out:
        for d in settings(entry):
            for key in FLOAT_KEYS:
                if isinstance(d.get(key), int) and not isinstance(d.get(key), bool):
                    d[key] = float(d[key])
    return out


def follow_aligned(masks, target_spaces) -> None:
    """Give every target with ``align`` (biases, usually) the mask of the target it points to, in place."""
    from collections import defaultdict

    from nni.compression.pruning.tools.sparse_gen import _expand_masks, _generate_align_sparsity

    align_ts: Dict[str, Dict[str, Any]] = defaultdict(dict)
    for module_name, ts_dict in target_spaces.items():
        for target_name, ts in ts_dict.items():
            if ts.align is None or ts.target is None or target_name in masks.get(module_name, {}):
                continue
            src = ts.align["module_name"] or module_name
            if ts.align["target_name"] in masks.get(src, {}):
                align_ts[module_name][target_name] = ts
    if align_ts:
        for module_name, module_masks in _expand_masks(_generate_align_sparsity(masks, align_ts), align_ts).items():
            masks[module_name].update(module_masks)


def weight_targets(compressor: Any, method: str, error: type = ValueError) -> Iterator[tuple]:
    """``(module name, target name, target space)`` of a pruner's parameter targets, in the
    model's order (NNI keeps them in a set, whose order follows string hashing), skipping
    aligned and empty targets; input/output targets raise ``error`` naming the target."""
    from nni.compression.base.target_space import TargetType

    order = {name: i for i, (name, _) in enumerate(compressor.bound_model.named_modules())}
    for module_name, ts in sorted(compressor._target_spaces.items(), key=lambda kv: order.get(kv[0], len(order))):
        for target_name, target_space in ts.items():
            if target_space.type is not TargetType.PARAMETER:
                raise error(f"{module_name}.{target_name}: {method} masks weights; input/output targets are "
                            "not supported")
            if target_space.target is None or target_space.align is not None:
                continue
            yield module_name, target_name, target_space
