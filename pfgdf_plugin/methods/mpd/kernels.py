"""Which kernel runs each converted layer: dense-with-zeros, batched matmul or grouped convolution.

A converted layer can run as

* ``"dense"``: the whole matrix with its zeros (:class:`~pfgdf_plugin.modules.MaskedDenseLinear`,
  :class:`~pfgdf_plugin.modules.MaskedDenseConv2d`); it absorbs its neighbours' permutations,
  so it never gathers, but it does every multiplication of the dense layer;
* ``"bmm"`` (``Linear`` only): one batched matmul over the ``c`` blocks
  (:class:`~pfgdf_plugin.modules.BlockDiagonalLinear`);
* ``"grouped"``: a grouped convolution with ``groups = c`` (a 1-D one for a ``Linear``,
  :class:`~pfgdf_plugin.modules.PermutedGroupConv2d` for a ``Conv2d``).

``kernel="block"`` (the default) is the block kernel of the layer's type (``bmm`` for a
``Linear``, ``grouped`` for a ``Conv2d``) with the layout of earlier versions. ``kernel="auto"``
times every kernel the layer can run, on the engine in use (PyTorch, ``torch.get_num_threads()``
threads), at each batch size of ``batches``, and keeps a block kernel only if it is faster than
dense at every one of them; otherwise the layer stays dense and the report says why. The timer is
a parameter (``timer(module, inputs) -> seconds``), so a caller can pass a deterministic one.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ...errors import MPDError

KERNELS = ("block", "auto", "dense", "bmm", "grouped")
LAYER_KERNELS = {"Linear": ("dense", "bmm", "grouped"), "Conv2d": ("dense", "grouped")}
BLOCK_DEFAULT = {"Linear": "bmm", "Conv2d": "grouped"}
Timer = Callable[[nn.Module, torch.Tensor], float]
KernelSpec = Union[str, Mapping[str, str]]


def check_kernel(kernel: Any) -> KernelSpec:
    """``kernel`` if it is one of :data:`KERNELS` or a ``{layer name: kernel}`` mapping of them.

    Example:
        >>> check_kernel("auto"), check_kernel({"fc1": "bmm"})
        ('auto', {'fc1': 'bmm'})
        >>> check_kernel("fast")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pfgdf_plugin.errors.MPDError: kernel must be one of block, auto, dense, bmm, grouped ...; got 'fast'
    """
    if isinstance(kernel, Mapping):
        bad = {k: v for k, v in kernel.items() if not isinstance(k, str) or v not in KERNELS}
        if bad:
            raise MPDError(f"kernel: every entry of a mapping must be a layer name -> one of {', '.join(KERNELS)}; "
                           f"got {bad!r}")
        return dict(kernel)
    if kernel not in KERNELS:
        raise MPDError(f"kernel must be one of {', '.join(KERNELS)} (or {{layer: kernel}}); got {kernel!r}")
    return kernel


def layer_kind(module: nn.Module) -> str:
    return "Conv2d" if isinstance(module, nn.Conv2d) else "Linear"


def requested_kernel(name: str, module: nn.Module, kernel: KernelSpec) -> str:
    """The kernel asked for ``name``: ``auto``, or a kernel its layer type runs (``block`` resolved).

    A mapping leaves the layers it does not name at ``block``. ``MPDError`` names the layer when
    its type cannot run the kernel (``bmm`` on a ``Conv2d``).
    """
    asked = kernel.get(name, "block") if isinstance(kernel, Mapping) else kernel
    kind = layer_kind(module)
    if asked == "block":
        return BLOCK_DEFAULT[kind]
    if asked != "auto" and asked not in LAYER_KERNELS[kind]:
        raise MPDError(f"{name}: kernel={asked!r} does not run a {kind}; a {kind} runs "
                       f"{', '.join(LAYER_KERNELS[kind])} (or auto); give kernel as {{layer: kernel}} to choose "
                       "per layer")
    return asked


def median_time(module: nn.Module, inputs: torch.Tensor, repeats: int = 15, warmup: int = 3) -> float:
    """Median wall time (seconds) of ``module(inputs)`` under ``torch.no_grad()``, in eval mode."""
    was_training = module.training
    module.eval()
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            module(inputs)
        for _ in range(repeats):
            start = time.perf_counter()
            module(inputs)
            times.append(time.perf_counter() - start)
    module.train(was_training)
    return statistics.median(times)


def sample_input(module: nn.Module, batch: int, spatial: Tuple[int, int] = (16, 16)) -> torch.Tensor:
    """A random input batch for ``module`` (a ``Linear`` or ``Conv2d``, or a converted one)."""
    p = next(module.parameters())
    if isinstance(module, nn.Linear):
        shape: Tuple[int, ...] = (batch, module.in_features)
    elif isinstance(module, nn.Conv2d):
        shape = (batch, module.in_channels) + tuple(spatial)
    else:
        raise MPDError(f"sample_input: a Linear or Conv2d, got {type(module).__name__}")
    return torch.randn(shape, dtype=p.dtype, device=p.device)


def choose_kernel(name: str, candidates: Mapping[str, nn.Module], inputs: Mapping[int, torch.Tensor],
                  timer: Optional[Timer] = None) -> Dict[str, Any]:
    """Time every candidate of one layer and pick one (``dense`` unless a block kernel gains).

    Args:
        name: the layer (for the reason).
        candidates: ``{kernel: converted module}``; must contain ``"dense"``.
        inputs: ``{batch size: input}``.
        timer: ``timer(module, inputs) -> seconds``; :func:`median_time` by default.

    Returns:
        ``{"kernel", "reason", "times": {kernel: {batch: seconds}}, "threads", "engine"}``.

    Example:
        >>> fake = lambda m, x: {"dense": 4.0, "bmm": 1.0, "grouped": 2.0}[m.kernel] * x.shape[0]
        >>> cands = {"dense": nn.Identity(), "bmm": nn.Identity(), "grouped": nn.Identity()}
        >>> for k, m in cands.items():
        ...     m.kernel = k
        >>> choose_kernel("fc1", cands, {1: torch.zeros(1, 4), 32: torch.zeros(32, 4)}, fake)["kernel"]
        'bmm'
    """
    timer = timer or median_time
    times = {k: {b: float(timer(m, x)) for b, x in inputs.items()} for k, m in candidates.items()}
    dense = times["dense"]
    gains = {k: [dense[b] / t[b] if t[b] > 0 else float("inf") for b in t] for k, t in times.items() if k != "dense"}
    winners = {k: sum(g) / len(g) for k, g in gains.items() if all(x > 1.0 for x in g)}
    shown = ", ".join(f"{k} {min(g):.2f}-{max(g):.2f}x" for k, g in gains.items())
    if winners:
        best = max(winners, key=winners.get)
        reason = f"{best} is faster than dense at every batch ({shown} the dense speed)"
    else:
        best = "dense"
        reason = (f"too small to gain: no block kernel is faster than dense at every batch ({shown} the dense "
                  "speed); stays dense")
    return {"kernel": best, "reason": reason, "times": times, "threads": torch.get_num_threads(),
            "engine": "pytorch", "layer": name}


def describe_choice(kernel: str, asked: str) -> Dict[str, Any]:
    """The report entry of a kernel that was given, not measured."""
    why = "forced" if asked != "block" else "the block kernel of the layer type (kernel='block')"
    return {"kernel": kernel, "reason": why, "times": {}, "threads": torch.get_num_threads(), "engine": "pytorch"}


def batches_ok(batches: Sequence[int]) -> Tuple[int, ...]:
    """``batches`` as a non-empty tuple of positive ints, else ``MPDError``."""
    out = tuple(batches)
    if not out or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in out):
        raise MPDError(f"batches must be positive integers (the batch sizes kernel='auto' times), got {batches!r}")
    return out
