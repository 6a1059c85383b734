"""Meters for budgets: dense / candidate ratios of latency, MACs or parameters, measured on copies.

A meter is the callable that :func:`pfgdf_plugin.methods.target.search` needs: it takes a pruned
candidate and returns ``dense / candidate`` for one quantity. Latency is timed with the dense model
and the candidate interleaved in one process (medians), on PyTorch or ONNX Runtime, with a chosen
number of threads and batch size (defaults: PyTorch, 1 thread, batch 1).

Example:
    >>> import torch.nn as nn
    >>> dense = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    >>> meter = ratio_meter("params", dense, torch.randn(1, 3, 8, 8))
    >>> meter(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3))) > 1.5
    True
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from . import measure
from .errors import TargetError
from .methods.target import SearchResult, Target, search

ENGINES = ("pytorch", "onnxruntime")


def check_engine(engine: Any, threads: Any, batch_size: Any) -> None:
    """Named errors for the latency settings of a target."""
    if engine not in ENGINES:
        raise TargetError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    for name, value in (("threads", threads), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TargetError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class Timing:
    """How latency targets are timed: engine, threads, batch size, warm-up and timed runs (medians).

    Example:
        >>> Timing.parse({"engine": "onnxruntime", "threads": 2})
        Timing(engine='onnxruntime', threads=2, batch_size=1, warmup=5, repeats=30)
    """

    engine: str = "pytorch"
    threads: int = 1
    batch_size: int = 1
    warmup: int = 5
    repeats: int = 30

    def __post_init__(self) -> None:
        check_engine(self.engine, self.threads, self.batch_size)
        for name, value, low in (("warmup", self.warmup, 0), ("repeats", self.repeats, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise TargetError(f"{name} must be an integer >= {low}, got {value!r}")

    @classmethod
    def parse(cls, spec: Union["Timing", Mapping[str, Any], None]) -> "Timing":
        """A :class:`Timing` from ``None`` (the defaults), a ``Timing`` or a dict of its fields."""
        if spec is None:
            return cls()
        if isinstance(spec, Timing):
            return spec
        if not isinstance(spec, Mapping):
            raise TargetError(f"timing must be a dict such as {{'engine': 'pytorch', 'threads': 1}}; got {spec!r}")
        unknown = sorted(set(spec) - {"engine", "threads", "batch_size", "warmup", "repeats"})
        if unknown:
            raise TargetError(f"timing: unknown key(s) {', '.join(unknown)}; known: engine, threads, batch_size, "
                              "warmup, repeats")
        return cls(**spec)


def _input_shape(example_inputs: Any) -> tuple:
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() != 4:
        raise TargetError("a latency target needs example_inputs as one image batch tensor [N, C, H, W], got "
                          f"{type(example_inputs).__name__}")
    return tuple(example_inputs.shape[1:])


def paired_timer(example_inputs: Any, timing: Optional[Union["Timing", Mapping[str, Any]]] = None
                 ) -> Callable[[nn.Module, nn.Module], Tuple[float, float]]:
    """A timer of two models side by side: ``(dense, pruned) -> (dense_ms, pruned_ms)``, medians.

    Both run interleaved in this process with ``timing``'s settings (engine ``pytorch`` or
    ``onnxruntime``, threads, batch size, warm-up and timed runs; defaults PyTorch, 1 thread,
    batch 1). DBP, which removes blocks one at a time, needs both medians; budgets need their
    ratio (:func:`latency_ratio`).

    Example:
        >>> import torch.nn as nn
        >>> timer = paired_timer(torch.randn(1, 3, 8, 8), {"warmup": 0, "repeats": 2})
        >>> dense_ms, pruned_ms = timer(nn.Conv2d(3, 4, 3), nn.Identity())
        >>> dense_ms > 0 and pruned_ms > 0
        True
    """
    t = Timing.parse(timing)
    shape = _input_shape(example_inputs)
    bs = t.batch_size

    def timer(dense: nn.Module, pruned: nn.Module) -> Tuple[float, float]:
        models = {"dense": dense, "pruned": pruned}
        with tempfile.TemporaryDirectory() as tmp:
            if t.engine == "onnxruntime":
                for name, m in list(models.items()):
                    path = os.path.join(tmp, f"{name}.onnx")
                    measure.export_onnx(m, torch.zeros(1, *shape), path)
                    models[name] = measure.OnnxRuntimeModel(path, t.threads)
            res = measure.measure_latency(models, shape, (bs,), warmup=t.warmup, repeats=t.repeats,
                                          threads=t.threads)
        return res["dense"][bs]["median_ms"], res["pruned"][bs]["median_ms"]

    return timer


def latency_ratio(dense: nn.Module, candidate: nn.Module, example_inputs: Any, engine: str = "pytorch",
                  threads: int = 1, batch_size: int = 1, warmup: int = 5, repeats: int = 30) -> float:
    """``dense / candidate`` median latency, both timed side by side in this process."""
    dense_ms, candidate_ms = paired_timer(example_inputs, Timing(engine, threads, batch_size, warmup, repeats))(
        dense, candidate)
    return dense_ms / candidate_ms


def ratio_meter(kind: str, dense: nn.Module, example_inputs: Any, engine: str = "pytorch", threads: int = 1,
                batch_size: int = 1, warmup: int = 5, repeats: int = 30) -> Callable[[nn.Module], float]:
    """A callable ``candidate -> dense / candidate`` for ``kind`` in ``latency`` | ``macs`` | ``params``.

    The dense model's MACs and parameters are counted once; latency is re-timed beside every
    candidate so that machine noise falls on both alike.
    """
    check_engine(engine, threads, batch_size)
    if kind == "params":
        base = measure.count_params(dense)
        return lambda candidate: base / max(1, measure.count_params(candidate))
    if kind == "macs":
        base = measure.count_macs(dense, example_inputs)
        return lambda candidate: base / max(1, measure.count_macs(candidate, example_inputs))
    if kind == "latency":
        _input_shape(example_inputs)
        return lambda candidate: latency_ratio(dense, candidate, example_inputs, engine, threads, batch_size,
                                               warmup, repeats)
    raise TargetError(f"unknown target kind {kind!r}; known: latency, macs, params")


def meet_target(model: nn.Module, example_inputs: Any, target: Any, prune_copy: Callable[[nn.Module, Any], nn.Module],
                lo: float, hi: float, *, integer: bool = False, steps: int = 12, knob_name: str = "knob",
                timing: Optional[Union[Timing, Mapping[str, Any]]] = None) -> SearchResult:
    """The least pruning knob whose result meets ``target``, found on copies; ``model`` is never touched.

    Args:
        model: the dense network (only deep-copied and measured).
        example_inputs: a batch for counting MACs and for timing (``[N, C, H, W]``).
        target: ``{"latency": r}``, ``{"macs": r}`` or ``{"params": r}`` (or a :class:`Target`).
        prune_copy: ``(copy_of_model, knob) -> pruned model``; the ratio it reaches must grow with the knob.
        lo, hi: the knob's range (``hi``: the most pruning allowed).
        integer: the knob is a whole number (a block count).
        steps: bisection steps.
        knob_name: the knob's name in messages (``k``, ``pruning_ratio``, ``blocks``).
        timing: latency settings (:class:`Timing` or its fields; defaults: PyTorch, 1 thread, batch 1).

    Raises:
        TargetError: malformed target or timing, or a target even ``hi`` does not reach (naming the best).

    Example:
        >>> import torch.nn as nn
        >>> def thin(m, width):   # a stand-in pruner: a narrower copy
        ...     return nn.Sequential(nn.Conv2d(3, 16 - width, 3), nn.Conv2d(16 - width, 4, 3))
        >>> dense = thin(None, 0)
        >>> res = meet_target(dense, torch.randn(1, 3, 8, 8), {"params": 2.0}, thin, 0, 15, integer=True)
        >>> res.knob, res.reached >= 2.0
        (9, True)
    """
    goal = Target.parse(target)
    t = Timing.parse(timing)
    meter = ratio_meter(goal.kind, model, example_inputs, t.engine, t.threads, t.batch_size, t.warmup, t.repeats)
    return search(lambda knob: meter(prune_copy(copy.deepcopy(model), knob)), goal, lo, hi, integer, steps, knob_name)


def modules_of(copied: nn.Module, original: nn.Module, modules: Optional[Any]) -> list:
    """The modules of ``copied`` at the names ``modules`` have in ``original`` (for ``ignored_layers`` of a copy).

    Raises:
        TargetError: a module that is not part of ``original``.
    """
    names = {id(m): n for n, m in original.named_modules()}
    found = dict(copied.named_modules())
    out = []
    for m in modules or ():
        if isinstance(m, str):
            out.append(m)
            continue
        if id(m) not in names:
            raise TargetError(f"ignored_layers holds a {type(m).__name__} that is not a module of the model")
        out.append(found[names[id(m)]])
    return out


def target_or_none(owner: str, target: Any, **given: Any) -> Optional[Target]:
    """``target`` parsed (``None`` without one); a named error when it comes with an explicit knob.

    A pruner with a budget chooses its own knob (PFGDF's ``k``, SPP's ratio, MPD's blocks): giving
    both is ambiguous, so ``given`` (the knobs the caller set, ``None`` = not given) must be empty.

    Raises:
        TargetError: a malformed target, or a target together with a knob (naming both).

    Example:
        >>> target_or_none("PFGDFPruner", {"macs": 2}, k=None)
        Target(kind='macs', value=2.0)
        >>> target_or_none("PFGDFPruner", {"macs": 2}, k=1.0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pfgdf_plugin.errors.TargetError: PFGDFPruner: give target={'macs': 2} or k=1.0, not both; ...
    """
    if target is None:
        return None
    goal = Target.parse(target)
    both = [f"{name}={value!r}" for name, value in given.items() if value is not None and value != {}]
    if both:
        raise TargetError(f"{owner}: give target={target!r} or {' / '.join(both)}, not both; the target "
                          "chooses it (drop one of them)")
    return goal
