"""One layer's plan (:func:`make_plan`), block counts per layer (:func:`choose_layers`) and the plans' summary."""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

from ...errors import MPDError
from .blocks import BlockPlan, balanced_sizes, layer_generator, random_labels
from .checks import (LAYERS, MPDParams, both_sizes, check_blocks, check_compression, check_layer, check_permutation,
                     check_round_to, layer_shape, max_blocks, unsupported)
from .magnitude import magnitude_labels


def make_plan(name: str, weight: torch.Tensor, blocks: int, permutation: str = "random", seed: int = 0,
              round_to: int = 1, kernel: Optional[Sequence[int]] = None) -> BlockPlan:
    """The :class:`BlockPlan` of one layer.

    Args:
        name: the layer's name (seeds its generator, and names it in errors).
        weight: ``[out, in, *kernel]`` (the magnitudes matter only for ``"magnitude"``).
        blocks: ``c`` (checked against the layer's size).
        permutation: ``"random"`` or ``"magnitude"``.
        seed: the run's seed.
        round_to: block sizes in units of this many channels.
        kernel: the kernel size (default ``weight.shape[2:]``).

    Example:
        >>> plan = make_plan("fc1", torch.randn(6, 9), blocks=3, seed=0)
        >>> plan.out_sizes().tolist(), plan.in_sizes().tolist(), plan.kept_weights()
        ([2, 2, 2], [3, 3, 3], 18)
    """
    check_permutation(permutation)
    round_to = check_round_to(round_to)
    if weight.dim() < 2:
        raise MPDError(f"{name}: weight must have at least 2 dimensions, got shape {tuple(weight.shape)}")
    out_n, in_n = int(weight.shape[0]), int(weight.shape[1])
    blocks = check_blocks(name, blocks, out_n, in_n, round_to)
    if not torch.isfinite(weight.detach()).all():
        raise MPDError(f"{name}: the weight holds NaN/Inf values")
    kernel = tuple(weight.shape[2:]) if kernel is None else tuple(kernel)
    out_sizes, in_sizes = balanced_sizes(out_n, blocks, round_to), balanced_sizes(in_n, blocks, round_to)
    gen = layer_generator(name, seed)
    if permutation == "random" or blocks == 1:
        out_labels, in_labels = random_labels(out_n, out_sizes, gen), random_labels(in_n, in_sizes, gen)
    else:
        out_labels, in_labels = magnitude_labels(weight, out_sizes, in_sizes, gen)
    return BlockPlan(name, out_labels, in_labels, blocks, kernel)


def choose_blocks(shapes: Mapping[str, Tuple[int, int, int]], compression: float,
                  round_to: int = 1) -> Dict[str, int]:
    """Blocks per layer so the layers' weights shrink by at least ``compression`` overall.

    Args:
        shapes: ``{name: (out, in, kernel_numel)}`` of the targeted layers.
        compression: the target ratio of dense to kept weights (>= 1).
        round_to: block sizes in units of this many channels.

    Every layer starts at ``ceil(compression)`` blocks, capped at :func:`max_blocks`; while the
    total ratio is below the target, the layer keeping the most weights (that can take one
    more block) gets one more. Layers with fewer than two channels (units) on a side keep 1.

    Example:
        >>> choose_blocks({"fc1": (300, 1024, 1), "fc2": (100, 300, 1)}, 10.0)
        {'fc1': 10, 'fc2': 10}
        >>> choose_blocks({"a": (4, 64, 9), "b": (64, 64, 9)}, 8.0)  # "a" caps at 4: "b" takes more
        {'a': 4, 'b': 9}
    """
    compression = check_compression(compression)
    round_to = check_round_to(round_to)

    def kept(shape, c):
        o, i, k = shape
        return sum(a * b for a, b in zip(balanced_sizes(o, c, round_to), balanced_sizes(i, c, round_to))) * k

    out = {name: min(math.ceil(compression - 1e-9), max_blocks(o, i, round_to))
           for name, (o, i, k) in shapes.items()}
    dense = sum(o * i * k for o, i, k in shapes.values())
    kept_now = {name: kept(shape, out[name]) for name, shape in shapes.items()}
    while dense and dense / sum(kept_now.values()) < compression - 1e-9:
        free = [n for n in shapes if out[n] < max_blocks(shapes[n][0], shapes[n][1], round_to)]
        if not free:
            break
        name = max(free, key=lambda n: (kept_now[n], n))
        out[name] += 1
        kept_now[name] = kept(shapes[name], out[name])
    return out



def _model_wide_targets(layers: Mapping[str, nn.Module], skip: Set[str]) -> Dict[str, Tuple[int, int, int]]:
    """Shapes of the maskable layers among ``layers`` not in ``skip``; warns once about the others."""
    shapes, skipped = {}, []
    for name, module in layers.items():
        if not isinstance(module, LAYERS) or name in skip:
            continue
        why = unsupported(module)
        if why is not None:
            skipped.append(f"{name} ({why})")
            continue
        shapes[name] = layer_shape(name, module)
    if skipped:  # stacklevel: the code that called the pruner that called choose_layers
        warnings.warn(f"MPDPruner leaves these layers dense: {', '.join(skipped)}", stacklevel=5)
    if not shapes:
        raise MPDError("no layer to mask: every Linear/Conv2d is ignored, grouped, or produces the output")
    return shapes


def _named_counts(layers: Mapping[str, nn.Module], blocks: Mapping[str, Any], round_to: int) -> Dict[str, int]:
    """Each named layer's count, checked in the mapping's order: a layer of ``layers``, maskable, in its cap."""
    counts = {}
    for name, c in blocks.items():
        if name not in layers:
            known = [n for n, m in layers.items() if isinstance(m, LAYERS)]
            raise MPDError(f"blocks names {name!r}, which is not a layer of the model among {', '.join(known)}; "
                           "name one of those")
        out_n, in_n, _ = check_layer(name, layers[name])
        counts[name] = check_blocks(name, c, out_n, in_n, round_to)
    return counts


def iter_layers(layers: Mapping[str, nn.Module], compression: Optional[float] = None,
                blocks: Union[int, Mapping[str, Any], None] = None, ignored: Iterable[str] = (),
                output_layers: Iterable[str] = (), dense_output: bool = True, round_to: Optional[int] = 1,
                fallback: Optional[Mapping[str, int]] = None, model_wide: bool = True) -> Iterator[Tuple[str, int]]:
    """:func:`choose_layers` one layer at a time, in the order of ``layers``.

    What concerns the whole choice (the arguments, the names, the layers' kinds, the counts
    ``compression`` or a ``blocks`` mapping gives) is checked before this returns; a count
    that applies to one layer at a time (an int ``blocks``, a ``fallback`` count) is checked
    when its layer is reached, so a caller that plans each layer as it comes reports the first
    bad layer in the model's order. Arguments and result are :func:`choose_layers`'s.
    """
    round_to = check_round_to(round_to)
    unknown = [name for name in ignored if name not in layers]
    if unknown:
        raise MPDError(f"ignored_layers names {unknown[0]!r}, which is not a layer of the model")
    skip = set(ignored) | (set(output_layers) if dense_output else set())
    if isinstance(blocks, Mapping):
        if compression is not None:
            raise MPDError(both_sizes(compression, blocks))
        if not model_wide:  # an explicit selection: every layer in it must take a mask
            for name, module in layers.items():
                check_layer(name, module)
        counts = _named_counts(layers, blocks, round_to)
        rest = {n: c for n, c in (fallback or {}).items() if n not in counts}
        return ((name, counts[name] if name in counts
                 else check_blocks(name, rest[name], *layer_shape(name, layers[name])[:2], round_to))
                for name in layers if name in counts or name in rest)
    params = MPDParams(compression=compression, blocks=blocks)
    if model_wide:
        shapes = _model_wide_targets(layers, skip)
    else:
        shapes = {name: layer_shape(name, module) for name, module in layers.items() if name not in skip}
    if params.blocks is not None:
        per_layer, chosen = dict.fromkeys(shapes, params.blocks), {}
    else:
        per_layer = {n: c for n, c in (fallback or {}).items() if n in shapes} if compression is None else {}
        chosen = choose_blocks({n: s for n, s in shapes.items() if n not in per_layer}, params.compression, round_to)
    return ((name, chosen[name] if name in chosen else check_blocks(name, per_layer[name], o, i, round_to))
            for name, (o, i, _) in shapes.items())


def choose_layers(layers: Mapping[str, nn.Module], compression: Optional[float] = None,
                  blocks: Union[int, Mapping[str, Any], None] = None, ignored: Iterable[str] = (),
                  output_layers: Iterable[str] = (), dense_output: bool = True, round_to: Optional[int] = 1,
                  fallback: Optional[Mapping[str, int]] = None, model_wide: bool = True) -> Dict[str, int]:
    """Which layers get an MPD mask, and how many blocks each: MPD's one layer choice.

    The count comes from, in this order: ``blocks`` (an int for every target, or
    ``{layer name: count}`` for the named layers only, which may include an output layer and
    ignore ``ignored``), ``compression`` (:func:`choose_blocks` over the targets),
    ``fallback`` (a count per layer from the framework, e.g. NNI's ``sparse_ratio``; used for
    the layers a ``blocks`` mapping does not name, or when neither size is given), and last
    :class:`MPDParams`'s default ``compression`` (10) over the targets without a fallback.

    Args:
        layers: ``{name: module}`` in the model's order: every module of the model
            (``model_wide``), or the layers a framework selected (NNI's config list).
        compression, blocks: the size (at most one; see above).
        ignored: names of modules to leave dense (each must be in ``layers``).
        output_layers: names of the layers producing the model's output.
        dense_output: leave ``output_layers`` dense (unless named in a ``blocks`` mapping).
        round_to: block sizes in units of this many channels (``None``: 1).
        fallback: ``{name: count}`` used as described above.
        model_wide: ``True``: the targets are the ``Linear``/``Conv2d`` layers of ``layers``
            that can take a mask; grouped/depthwise convolutions and the output projections of
            ``nn.MultiheadAttention`` are left dense with one warning, and no target at all is
            an error. ``False``: every layer given is a target, and one that cannot take a mask
            is an error.

    Returns:
        ``{name: blocks}`` in the order of ``layers``; ``1`` means the layer stays dense (too
        small for more blocks, or asked for one).

    Raises:
        MPDError: both sizes, a bad size, an unknown name in ``ignored`` or ``blocks``, a count
            above a layer's :func:`max_blocks`, a layer that cannot take a mask (named in
            ``blocks`` or, with ``model_wide=False``, given), no target (``model_wide``).

    Example:
        >>> net = nn.Sequential(nn.Linear(1024, 300), nn.ReLU(), nn.Linear(300, 100), nn.Linear(100, 10))
        >>> choose_layers(dict(net.named_modules()), output_layers=["3"])
        {'0': 10, '2': 10}
        >>> choose_layers(dict(net.named_modules()), blocks={"3": 2, "0": 4})
        {'0': 4, '3': 2}
    """
    return dict(iter_layers(layers, compression, blocks, ignored, output_layers, dense_output, round_to, fallback,
                            model_wide))


def plan_summary(plans: Mapping[str, BlockPlan], model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Per planned layer ``blocks``, ``dense``, ``kept``, ``compression``, and the totals.

    Args:
        plans: ``{layer name: plan}``.
        model: with a model, ``model_compression`` too: the ratio over every ``Linear``/``Conv2d``
            of the model, the layers without a plan counted as kept.

    Returns:
        ``{"layers": {name: plan.summary()}, "dense", "kept", "compression"[, "model_compression"]}``.

    Example:
        >>> plan_summary({"fc": make_plan("fc", torch.randn(4, 6), blocks=2)})["compression"]
        2.0
    """
    layers = {name: plan.summary() for name, plan in plans.items()}
    dense = sum(v["dense"] for v in layers.values())
    kept = sum(v["kept"] for v in layers.values())
    out: Dict[str, Any] = {"layers": layers, "dense": dense, "kept": kept, "compression": dense / kept if kept else 1.0}
    if model is not None:
        other = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, LAYERS) and n not in plans)
        out["model_compression"] = (dense + other) / (kept + other) if kept + other else 1.0
    return out
