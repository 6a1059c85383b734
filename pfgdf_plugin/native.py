"""The optional C kernels of the MPD-converted layers (``pfgdf_plugin/csrc/blockdiag.c``).

Inference of a :class:`pfgdf_plugin.modules.BlockDiagonalLinear` is a gather, a batched matmul, a
bias and a scatter. At batch 1 PyTorch runs them as four or five short kernels whose dispatch costs
as much as the multiplications; at larger batches the gather and the bias are each a pass over the
activations besides the matmul. The library fuses them: the batch-1 layer is one call (gather, block
matrix-vector product, bias, scatter); a batch is one block matrix product that packs its inputs from
where the gather would fetch them (batch-first or features-first), adds the bias and writes either a
features-first ``[features, N]`` result that the next layer reads as it is (the hand-off) or the
scattered batch-first output. It is built at install time (``setup.py``: plain C kernels behind a
small CPython module whose calls cost a fraction of a microsecond; optional). The kernels are
written for x86-64 CPUs with AVX2 and FMA, the batch products also with AVX-512 (chosen at run
time: :func:`isa`, capped by :func:`set_isa`); :func:`pack` lays a weight out as the batch products
read it, so that a layer done training need not copy it on every call
(:meth:`~pfgdf_plugin.modules.BlockDiagonalLinear.prepack`). Without the library, on other
CPUs, with ``PFGDF_NATIVE=0`` in the environment, or after
:func:`set_enabled(False) <set_enabled>`, the layers run on PyTorch operations only (the same
values up to float rounding).

The functions here check nothing but what keeps memory safe (contiguous float32 / int64 CPU
tensors of the right sizes); the layer decides when to call them (no autograd, float32, CPU).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Optional, Tuple

import torch

__all__ = ["available", "block_gemm", "block_gemv", "enabled", "isa", "pack", "set_enabled", "set_isa"]


def _load() -> Optional[ModuleType]:
    try:
        lib = importlib.import_module("pfgdf_plugin._blockdiag")
    except ImportError:
        return None
    if not all(hasattr(lib, name) for name in ("tuned", "isa", "set_isa", "block_gemv", "block_gemm", "pack_weights",
                                               "packed_floats")):
        return None  # a library built from other sources: not ours to call
    return lib if lib.tuned() else None  # the kernels need AVX2 + FMA (see blockdiag.c)


_LIB = _load()
_ENABLED = _LIB is not None and os.environ.get("PFGDF_NATIVE", "1") != "0"


def available() -> bool:
    """Whether the C library was built, loads, and runs on this CPU (x86-64 with AVX2 and FMA)."""
    return _LIB is not None


def enabled() -> bool:
    """Whether the layers use the library (available, and not switched off)."""
    return _ENABLED


def set_enabled(on: bool) -> bool:
    """Switch the library on or off for the layers (on only where it is available); returns the
    previous setting. Used to time both forwards (``python -m pfgdf_plugin.bench_layers --no-native``)."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(on) and _LIB is not None
    return previous


_ISAS = {0: "", 1: "avx2", 2: "avx512"}


def isa() -> str:
    """The instructions the batch products run on: ``"avx512"`` (tiles of 16-float registers, where
    the CPU has AVX-512), ``"avx2"``, or ``""`` without the library."""
    return _ISAS[_LIB.isa()] if _LIB is not None else ""


def set_isa(name: str) -> str:
    """Cap the batch products at ``"avx2"`` or ``"avx512"`` (the widest the CPU has, the default);
    returns the previous cap. For comparing both on one CPU (tests, ``bench_layers --isa``); set it
    while no product runs."""
    levels = {v: k for k, v in _ISAS.items() if v}
    if name not in levels:
        raise ValueError(f"pfgdf_plugin.native.set_isa: {name!r} is not one of {', '.join(levels)}")
    if _LIB is None:
        raise RuntimeError("pfgdf_plugin.native.set_isa: the C library is not available")
    return _ISAS[_LIB.set_isa(levels[name])]


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _check(t: torch.Tensor, dtype: torch.dtype, numel: int, what: str) -> None:
    if t.dtype != dtype or not t.is_cpu or not t.is_contiguous() or t.numel() != numel:
        raise ValueError(f"pfgdf_plugin.native: {what} must be a contiguous {dtype} CPU tensor of {numel} "
                         f"elements, got {t.dtype} {tuple(t.shape)} on {t.device}")


def block_gemv(x: torch.Tensor, index: Optional[torch.Tensor], in_features: int, weight: torch.Tensor,
               bias: Optional[torch.Tensor], out_index: Optional[torch.Tensor] = None,
               relu: bool = False) -> torch.Tensor:
    """``[1, c * O]``: ``x[0, index]`` (``None``: ``x`` itself) as ``[c, 1, I]`` times ``weight``
    ``[c, I, O]``, plus ``bias`` ``[c, O]``, through ``max(0, .)`` if ``relu``; with ``out_index``,
    ``[1, M]``: its columns ``out_index`` (the scatter). Index entries outside ``[0, in_features)``
    (``out_index``: ``[0, c * O)``) read zero."""
    c, i, o = weight.shape
    _check(weight, torch.float32, c * i * o, "weight")
    _check(x, torch.float32, in_features if index is not None else c * i, "x")
    if index is not None:
        _check(index, torch.int64, c * i, "index")
    if bias is not None:
        _check(bias, torch.float32, c * o, "bias")
    m = c * o if out_index is None else out_index.numel()
    if out_index is not None:
        _check(out_index, torch.int64, m, "out_index")
    y = torch.empty(1, m)  # (the tuple form costs more, a measurable share at batch 1)
    if _LIB.block_gemv(x.data_ptr(), _ptr(index), in_features, weight.data_ptr(), _ptr(bias), int(relu),
                       y.data_ptr(), c, i, o, _ptr(out_index), m):
        raise MemoryError("pfgdf_plugin.native.block_gemv: out of memory")
    return y


def pack(weight: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """``weight`` ``[c, I, O]`` laid out as the batch products read it on this CPU, for
    :func:`block_gemm`'s ``packed``: ``(floats, level)``, level 2 for AVX-512 tiles, 1 for AVX2. A
    product given it skips copying its weights into panels on every call (15-25% of a product at
    batch 64); the copy is only valid while ``weight`` keeps its values and :func:`isa` its setting."""
    if _LIB is None:
        raise RuntimeError("pfgdf_plugin.native.pack: the C library is not available")
    c, i, o = weight.shape
    _check(weight, torch.float32, c * i * o, "weight")
    level = _LIB.isa()
    out = torch.empty(_LIB.packed_floats(c, i, o, level))
    got = _LIB.pack_weights(weight.data_ptr(), c, i, o, out.data_ptr(), out.numel())
    if got != level:
        raise RuntimeError(f"pfgdf_plugin.native.pack: the library packed for level {got}, not {level}")
    return out, level


def block_gemm(x: torch.Tensor, index: Optional[torch.Tensor], in_features: int, weight: torch.Tensor,
               bias: Optional[torch.Tensor], relu: bool = False, batch_first: bool = False,
               out_index: Optional[torch.Tensor] = None,
               packed: Optional[Tuple[torch.Tensor, int]] = None) -> torch.Tensor:
    """Features-first ``[c * O, N]``: columns ``index`` of ``x`` ``[N, in_features]`` (``None``: all,
    ``in_features = c * I``) as ``[c, I, N]``, multiplied by ``weight`` ``[c, I, O]`` transposed, plus
    ``bias`` ``[c, O]``, through ``max(0, .)`` if ``relu``. ``x`` is batch-first (unit column stride,
    rows may be strided) or the transposed view of a contiguous ``[in_features, N]``; index entries
    outside ``[0, in_features)`` read zeros. ``batch_first``: the result as a contiguous ``[N, M]``
    instead, column ``k`` its row ``out_index[k]`` (``None``: all ``c * O`` rows in order), scattered
    by the kernel's stores. ``packed``: :func:`pack` of ``weight`` (made under the current
    :func:`isa`), which the product reads instead of ``weight``'s values."""
    c, i, o = weight.shape
    n = x.shape[0]
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != in_features or not x.is_cpu:
        raise ValueError(f"pfgdf_plugin.native: x must be a float32 CPU [N, {in_features}] tensor, "
                         f"got {x.dtype} {tuple(x.shape)} on {x.device}")
    if x.stride(1) == 1:
        fs, rs = 1, x.stride(0)
    elif x.stride(0) == 1 and x.stride(1) == n:
        fs, rs = n, 1
    else:
        raise ValueError(f"pfgdf_plugin.native: x must be batch-first with unit column stride or the transpose of "
                         f"a contiguous [{in_features}, N], got strides {x.stride()}")
    _check(weight, torch.float32, c * i * o, "weight")
    if index is None and in_features != c * i:
        raise ValueError(f"pfgdf_plugin.native: without an index x must have {c * i} features, got {in_features}")
    if index is not None:
        _check(index, torch.int64, c * i, "index")
    if bias is not None:
        _check(bias, torch.float32, c * o, "bias")
    m = -1
    if batch_first:
        m = c * o if out_index is None else out_index.numel()
        if out_index is not None:
            _check(out_index, torch.int64, m, "out_index")
    pk, pk_level = packed if packed is not None else (None, 0)
    if pk is not None:
        _check(pk, torch.float32, pk.numel(), "packed")
    out = torch.empty((n, m) if batch_first else (c * o, n))
    rc = _LIB.block_gemm(x.data_ptr(), in_features, n, fs, rs, _ptr(index), weight.data_ptr(), _ptr(bias),
                         int(relu), out.data_ptr(), c, i, o, _ptr(out_index), m, _ptr(pk),
                         0 if pk is None else pk.numel(), pk_level) if n else 0
    if rc == -2:
        raise ValueError(f"pfgdf_plugin.native: out_index must name each of the {c * o} rows at most once")
    if rc == -4:
        raise ValueError(f"pfgdf_plugin.native: packed ({pk.numel()} floats for level {pk_level}) is not the layout "
                         f"of a [{c}, {i}, {o}] weight under isa {isa()!r}: pack it again")
    if rc:
        raise MemoryError("pfgdf_plugin.native.block_gemm: out of memory for the packed tiles")
    return out
