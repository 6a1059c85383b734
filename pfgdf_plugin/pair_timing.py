"""A paired timer for latency targets met step by step: ``(dense, pruned) -> (dense_ms, pruned_ms)``.

DBP removes blocks one at a time and times the dense model against the pruned copy after each
removal; it needs both medians, not only their ratio (:func:`pfgdf_plugin.meter.latency_ratio`).
The timing settings are the budgets' :class:`pfgdf_plugin.meter.Timing` (engine ``pytorch`` or
``onnxruntime``, threads, batch size, warm-up and timed runs; defaults PyTorch, 1 thread, batch 1).

Example:
    >>> import torch, torch.nn as nn
    >>> timer = paired_timer(torch.randn(1, 3, 8, 8), {"warmup": 0, "repeats": 2})
    >>> dense_ms, pruned_ms = timer(nn.Conv2d(3, 4, 3), nn.Identity())
    >>> dense_ms > 0 and pruned_ms > 0
    True
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from . import measure
from .meter import Timing
from .methods.dbp import latency_input_shape

__all__ = ["paired_timer"]


def paired_timer(example_inputs: Any, timing: Optional[Union[Timing, Mapping[str, Any]]] = None
                 ) -> Callable[[nn.Module, nn.Module], Tuple[float, float]]:
    """A timer of two models side by side (interleaved, in this process, medians) with ``timing``'s settings.

    Args:
        example_inputs: one image batch ``[N, C, H, W]`` (its sample shape is timed).
        timing: a :class:`~pfgdf_plugin.meter.Timing` or a dict of its fields (``None``: defaults).

    Raises:
        TargetError: bad timing settings.
        DBPError: ``example_inputs`` is not one image batch.
    """
    t = Timing.parse(timing)
    shape = latency_input_shape(example_inputs)
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
