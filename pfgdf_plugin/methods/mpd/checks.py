"""MPDCompress's parameters (:class:`MPDParams`) and the checks of values and layers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple, Union

import torch.nn as nn

from ...errors import MPDError
from ..params import Params, is_int
from .kernels import check_kernel

PERMUTATIONS = ("random", "magnitude")
STARTS = ("dense", "scratch")
LAYERS = (nn.Linear, nn.Conv2d)


def check_blocks(name: str, blocks: Any, out_channels: int, in_channels: int, round_to: int = 1) -> int:
    """Validate ``blocks`` for a layer of ``out_channels x in_channels``; return it as an int.

    Example:
        >>> check_blocks("fc1", 10, 300, 1024)
        10
        >>> check_blocks("fc3", 20, 10, 100)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pfgdf_plugin.errors.MPDError: fc3: blocks=20 exceeds min(out, in) = min(10, 100) = 10; ...
    """
    if not is_int(blocks) or blocks < 1:
        raise MPDError(f"{name}: blocks must be an integer >= 1, got {blocks!r}")
    cap = max_blocks(out_channels, in_channels, round_to)
    if blocks > cap:
        unit = "" if round_to == 1 else f" // round_to={round_to}"
        raise MPDError(f"{name}: blocks={blocks} exceeds min(out, in){unit} = min({out_channels}, {in_channels})"
                       f"{unit} = {cap}; every block needs at least one output and one input channel")
    return int(blocks)


def check_round_to(round_to: Any) -> int:
    """``None`` -> 1; otherwise an integer >= 1."""
    if round_to is None:
        return 1
    if not is_int(round_to) or round_to < 1:
        raise MPDError(f"round_to must be None or an integer >= 1, got {round_to!r}")
    return int(round_to)


def check_permutation(permutation: Any) -> str:
    """``permutation`` if it is one of :data:`PERMUTATIONS`, else ``MPDError`` listing them."""
    if permutation not in PERMUTATIONS:
        raise MPDError(f"permutation must be one of {', '.join(PERMUTATIONS)}; got {permutation!r}")
    return permutation


def check_start(start: Any) -> str:
    """``start`` if it is one of :data:`STARTS` (when the masks go on), else ``MPDError`` listing them.

    Example:
        >>> check_start("scratch")
        'scratch'
    """
    if start not in STARTS:
        raise MPDError(f"start must be one of {', '.join(STARTS)}; got {start!r}")
    return start


def check_compression(compression: Any) -> float:
    """``compression`` as a float if it is a finite number >= 1, else ``MPDError``."""
    if isinstance(compression, bool) or not isinstance(compression, (int, float)) \
            or not math.isfinite(compression) or compression < 1:
        raise MPDError(f"compression must be a number >= 1, got {compression!r}")
    return float(compression)


def both_sizes(compression: Any, blocks: Any) -> str:
    """The message for a size given twice (``compression`` and ``blocks``)."""
    return f"give compression or blocks, not both; got compression={compression!r}, blocks={blocks!r}"


@dataclass(frozen=True)
class MPDParams(Params):
    """MPDCompress's knobs, with the one set of defaults the pruners and the recipes share.

    Give the size as ``compression`` (a model-wide factor; layers get block counts by
    :func:`choose_blocks`) or as ``blocks`` (one count for every masked layer), not both; with
    neither, ``compression`` is 10 (the paper's LeNet-300-100 setting).

    Attributes:
        compression: dense weights / kept weights over the masked layers (>= 1).
        blocks: block count of every masked layer (>= 1).
        permutation: ``random`` (the paper) or ``magnitude`` (balanced co-clustering of ``|W|``).
        seed: seed of the permutations.
        fold: fold adjacent permutations into neighbouring layers at conversion.
        round_to: every block's size a multiple of this (``None``: 1).
        dense_output: leave the output layer dense (unless it is named explicitly).
        kernel: how each converted layer runs (:mod:`~pfgdf_plugin.methods.mpd.kernels`):
            ``block`` (bmm for a Linear, grouped convolution for a Conv2d, the earlier layout),
            ``auto`` (timed at conversion), ``dense``, ``bmm`` or ``grouped``.

    Example:
        >>> MPDParams().compression, MPDParams(blocks=4).compression
        (10.0, None)
    """

    error: ClassVar[type] = MPDError
    compression: Optional[float] = None
    blocks: Optional[int] = None
    permutation: str = "random"
    seed: int = 0
    fold: bool = True
    round_to: Optional[int] = None
    dense_output: bool = True
    kernel: str = "block"

    def __post_init__(self) -> None:
        if self.compression is None and self.blocks is None:
            object.__setattr__(self, "compression", 10.0)
        super().__post_init__()

    def problems(self) -> List[str]:
        found = []
        if self.compression is not None and self.blocks is not None:
            found.append(both_sizes(self.compression, self.blocks))
        if self.blocks is not None and (not is_int(self.blocks) or self.blocks < 1):
            found.append(f"blocks must be an integer >= 1, got {self.blocks!r}")
        checks = [(check_permutation, self.permutation), (check_round_to, self.round_to),
                  (check_kernel, self.kernel)]
        if self.compression is not None:
            checks.append((check_compression, self.compression))
        for check, value in checks:
            try:
                check(value)
            except MPDError as e:
                found.append(str(e))
        if not is_int(self.seed):
            found.append(f"seed must be an integer, got {self.seed!r}")
        found += [f"{k} must be true or false, got {v!r}" for k, v in (("fold", self.fold),
                  ("dense_output", self.dense_output)) if not isinstance(v, bool)]
        return found


def pruner_params(compression: Optional[float] = None, blocks: Union[int, Mapping[str, Any], None] = None,
                  **knobs: Any) -> Tuple[MPDParams, Optional[Dict[str, Any]]]:
    """Validate a pruner's arguments with :class:`MPDParams`, which also gives the defaults.

    The pruners take ``blocks`` either as one count (an :class:`MPDParams` field) or as
    ``{layer name: count}``; each count of a mapping is checked against its layer later, by
    :func:`choose_layers`.

    Args:
        compression, blocks: the size (at most one; with neither, MPDParams's default).
        **knobs: the other fields of :class:`MPDParams`.

    Returns:
        ``(params, layer_blocks)``: ``layer_blocks`` is a copy of a ``blocks`` mapping (then
        ``params.compression`` and ``params.blocks`` are ``None``), else ``None``.

    Example:
        >>> params, layer_blocks = pruner_params(blocks={"fc1": 4})
        >>> params.compression, params.blocks, layer_blocks
        (None, None, {'fc1': 4})
        >>> pruner_params()[0].compression
        10.0
    """
    if not isinstance(blocks, Mapping):
        return MPDParams(compression=compression, blocks=blocks, **knobs), None
    layer_blocks = dict(blocks)
    problems = [both_sizes(compression, layer_blocks)] if compression is not None else []
    try:
        params = MPDParams(blocks=1, **knobs)
    except MPDError as e:
        problems += e.problems
    if problems:
        err = MPDError("; ".join(problems))
        err.problems = problems
        raise err
    object.__setattr__(params, "blocks", None)
    return params, layer_blocks


def check_layer(name: str, module: nn.Module) -> Tuple[int, int, Tuple[int, ...]]:
    """``(out, in, kernel)`` of a layer MPD can mask; ``MPDError`` for anything else."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise MPDError(f"{name}: Conv2d with groups={module.groups} (depthwise or grouped) cannot take an MPD "
                           "mask; leave it out (ignored_layers / config_list)")
        return module.out_channels, module.in_channels, tuple(module.kernel_size)
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, ()
    raise MPDError(f"{name}: MPD masks nn.Linear and nn.Conv2d layers, got {type(module).__name__}")


def layer_shape(name: str, module: nn.Module) -> Tuple[int, int, int]:
    """``(out, in, kernel_numel)`` of a layer MPD can mask (see :func:`check_layer`)."""
    out_n, in_n, kernel = check_layer(name, module)
    return out_n, in_n, math.prod(kernel) if kernel else 1


def unsupported(module: nn.Module) -> Optional[str]:
    """Why MPD leaves a ``Linear``/``Conv2d`` dense when it picks layers model-wide, or ``None``.

    Grouped and depthwise convolutions cannot take a mask; the output projection of an
    ``nn.MultiheadAttention`` is used by the attention's own functional call, not as a module.
    """
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"groups={module.groups}"
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return "the output projection of an nn.MultiheadAttention"
    return None


def max_blocks(out_channels: int, in_channels: int, round_to: int = 1) -> int:
    """The most blocks a layer can take: ``min(out, in) // round_to`` (at least 1)."""
    return max(1, min(out_channels, in_channels) // round_to)
