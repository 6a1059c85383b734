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

import os
import tempfile
from typing import Any, Callable

import torch
import torch.nn as nn

from . import measure
from .errors import TargetError

ENGINES = ("pytorch", "onnxruntime")


def check_engine(engine: Any, threads: Any, batch_size: Any) -> None:
    """Named errors for the latency settings of a target."""
    if engine not in ENGINES:
        raise TargetError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    for name, value in (("threads", threads), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TargetError(f"{name} must be an integer >= 1, got {value!r}")


def _input_shape(example_inputs: Any) -> tuple:
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() != 4:
        raise TargetError("a latency target needs example_inputs as one image batch tensor [N, C, H, W], got "
                          f"{type(example_inputs).__name__}")
    return tuple(example_inputs.shape[1:])


def latency_ratio(dense: nn.Module, candidate: nn.Module, example_inputs: Any, engine: str = "pytorch",
                  threads: int = 1, batch_size: int = 1, warmup: int = 5, repeats: int = 30) -> float:
    """``dense / candidate`` median latency, both timed side by side in this process."""
    shape = _input_shape(example_inputs)
    models = {"dense": dense, "candidate": candidate}
    if engine == "onnxruntime":
        with tempfile.TemporaryDirectory() as tmp:
            paths = {k: os.path.join(tmp, f"{k}.onnx") for k in models}
            for k, m in models.items():
                measure.export_onnx(m, example_inputs[:1], paths[k])
            ort = {k: measure.OnnxRuntimeModel(p, threads) for k, p in paths.items()}
            res = measure.measure_latency(ort, shape, (batch_size,), warmup=warmup, repeats=repeats, threads=threads)
    else:
        res = measure.measure_latency(models, shape, (batch_size,), warmup=warmup, repeats=repeats, threads=threads)
    return res["dense"][batch_size]["median_ms"] / res["candidate"][batch_size]["median_ms"]


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
