"""Layer benchmark: dense against MPD-converted ``Linear`` and ``Conv2d`` layers, side by side.

For every layer kind, size ``n`` (an ``n x n`` layer), block count ``c``, stack depth (one layer,
or ``depth`` layers with ReLUs between them, permutations folded, each ReLU applied by the ``bmm``
layer before it: :func:`~pfgdf_plugin.methods.mpd.fuse_activations`), kernel, batch size, thread
count and engine (PyTorch eager, ONNX Runtime), the dense and the converted model are timed in
one process, interleaved (each round runs both, the starting one alternating), and the medians
compared. The ideal speed-up of ``c`` blocks is ``c`` (``c``-fold fewer multiplications). Writes
``layers.json`` (every row), ``layers.md`` (the table) and ``layers.png`` (speed-up against
blocks, one panel per kind and batch, the ideal as a dashed line).

``python -m pfgdf_plugin.bench_layers --out docs/bench/layers`` runs the full grid (sizes 256 to
4096, blocks 2 to 16, batch 1 and 64, 1 and 2 threads, both engines); it takes long and needs a
quiet machine: the timings are only as good as the machine is idle.

Two fixed comparisons have their own modes (one thread, both engines):

* ``--targets``: the configurations MPDCompress's speed goals are stated for (:data:`TARGETS`:
  three ``Linear(1024, 1024)`` with ReLUs, 8 blocks, batch 1 and 64; one ``Linear(4096, 4096)``,
  8 blocks, batch 64), each row with its goal and whether it was met;
* ``--wide-mlp``: the wide MLP (:func:`pfgdf_plugin.zoo_wide.wide_mlp`, 1024-2048-2048-10) with
  ``fc1`` and ``fc2`` in 8 blocks (random masks, no training: latency does not depend on the
  values), dense against converted at batch 1 and 32, and the converted model in ONNX Runtime
  against the same model in PyTorch.

``--clock cpu`` times with the thread's CPU clock (``time.thread_time``) instead of the wall
clock: on a machine shared with other work it leaves out the time the process waits for a core
(one thread only; ONNX Runtime with one intra-op thread runs on the calling thread). ``--warm``
runs every model once, untimed, before each timed call, so neither model times the cache misses
the other one caused (the steady state of a model served alone); without it the rounds simply
alternate. ``--grad-mode inference`` times the PyTorch calls under ``torch.inference_mode()`` (the
mode PyTorch recommends for serving) instead of ``torch.no_grad()`` (the default, as the figures in
docs/mpd.md). ``--no-prepack`` leaves the converted ``bmm`` layers copying their weights into panels
on every batch instead of once (:func:`~pfgdf_plugin.methods.mpd.prepack`). ``--no-handoff``
converts without the feature-major hand-off between ``bmm`` layers (every boundary gathers
columns, as before it), to compare the two forwards; ``--no-native``
runs the converted layers on PyTorch operations only (without the C kernels of
:mod:`pfgdf_plugin.native`). The meta of every output records these settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import native
from .methods import mpd

__all__ = ["CLOCKS", "GRAD_MODES", "LayerGrid", "TARGETS", "bench_layers", "bench_targets", "bench_wide_mlp",
           "engine_table", "main", "markdown_table", "plot_speedups", "wide_mlp_pair"]

Clock = Callable[[], float]
CLOCKS: Dict[str, Clock] = {"wall": time.perf_counter, "cpu": time.thread_time}
# how the PyTorch calls are timed: without autograd (no_grad), or also without its bookkeeping (inference)
GRAD_MODES: Dict[str, Callable[[], Any]] = {"no_grad": torch.no_grad, "inference": torch.inference_mode}

# MPDCompress's speed goals (PyTorch, 1 thread, converted against dense, bmm kernel, 8 blocks)
TARGETS: Tuple[Dict[str, Any], ...] = (
    {"kind": "linear", "size": 1024, "blocks": 8, "depth": 3, "kernel": "bmm", "batch": 1, "target": 4.0},
    {"kind": "linear", "size": 1024, "blocks": 8, "depth": 3, "kernel": "bmm", "batch": 64, "target": 6.0},
    {"kind": "linear", "size": 4096, "blocks": 8, "depth": 1, "kernel": "bmm", "batch": 64, "target": 7.2},
)


@dataclass(frozen=True)
class LayerGrid:
    """What :func:`bench_layers` measures.

    Attributes:
        kinds: ``linear`` and/or ``conv2d``.
        sizes: ``n`` of the ``Linear(n, n)`` layers.
        conv_sizes: ``n`` of the ``Conv2d(n, n, 3, padding=1)`` layers (4096 channels would be
            600 MB of weights per layer; add it if the machine has the memory).
        blocks: block counts ``c`` (a size smaller than ``c`` is skipped).
        depths: layers per stack (ReLUs between them).
        kernels: converted kernels to time (a ``Conv2d`` runs ``grouped`` for ``bmm``).
        batches, threads: batch sizes and thread counts.
        engines: ``pytorch`` and/or ``onnxruntime``.
        spatial: the side of a convolution's input.
        warmup, repeats: runs before timing, and timed rounds.
        warm: run each model once, untimed, right before each of its timed calls.
        grad_mode: ``no_grad`` or ``inference`` (:data:`GRAD_MODES`): the mode of the PyTorch calls.
        handoff: let folded ``bmm`` layers hand batches over feature-major (``False``: every
            boundary gathers columns, the forward before the hand-off, for comparison).
        prepacked: freeze the converted ``bmm`` layers for inference (:func:`~pfgdf_plugin.methods.mpd.prepack`;
            ``False``: their batch products copy the weights into panels on every call).
    """

    kinds: Sequence[str] = ("linear", "conv2d")
    sizes: Sequence[int] = (256, 512, 1024, 2048, 4096)
    conv_sizes: Sequence[int] = (256, 512, 1024, 2048)
    blocks: Sequence[int] = (2, 4, 8, 16)
    depths: Sequence[int] = (1, 3)
    kernels: Sequence[str] = ("bmm", "grouped")
    batches: Sequence[int] = (1, 64)
    threads: Sequence[int] = (1, 2)
    engines: Sequence[str] = ("pytorch", "onnxruntime")
    spatial: int = 8
    warmup: int = 5
    repeats: int = 30
    warm: bool = False
    handoff: bool = True
    prepacked: bool = True
    grad_mode: str = "no_grad"

    def __post_init__(self) -> None:
        problems = [f"kinds: unknown {k!r} (linear, conv2d)" for k in self.kinds if k not in ("linear", "conv2d")]
        problems += [f"engines: unknown {e!r} (pytorch, onnxruntime)" for e in self.engines
                     if e not in ("pytorch", "onnxruntime")]
        problems += [f"kernels: unknown {k!r} (bmm, grouped, dense)" for k in self.kernels
                     if k not in ("bmm", "grouped", "dense")]
        for key in ("sizes", "conv_sizes", "blocks", "depths", "batches", "threads"):
            values = getattr(self, key)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
                problems.append(f"{key} must be positive integers, got {list(values)!r}")
        if self.grad_mode not in GRAD_MODES:
            problems.append(f"grad_mode: unknown {self.grad_mode!r} ({', '.join(GRAD_MODES)})")
        if self.warmup < 0 or self.repeats < 1:
            problems.append(f"warmup must be >= 0 and repeats >= 1, got {self.warmup} and {self.repeats}")
        if problems:
            raise ValueError("; ".join(problems))


def _stack(kind: str, n: int, depth: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    for d in range(depth):
        layers.append(nn.Linear(n, n) if kind == "linear" else nn.Conv2d(n, n, 3, padding=1))
        if d < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def build_pair(kind: str, n: int, blocks: int, depth: int, kernel: str, seed: int = 0, handoff: bool = True,
               prepacked: bool = True):
    """``(dense, converted)``: a stack of ``depth`` ``n x n`` layers and its MPD-converted copy.

    The converted copy is masked with random ``blocks``-block plans and converted with
    ``kernel`` (``bmm`` on a convolution means ``grouped``), permutations folded, ``bmm`` layers
    prepacked unless ``prepacked=False``; ``handoff=False``
    turns the feature-major hand-off between ``bmm`` layers off.

    Example:
        >>> dense, conv = build_pair("linear", 16, 4, 2, "bmm")
        >>> type(conv[0]).__name__, conv(torch.randn(2, 16)).shape
        ('BlockDiagonalLinear', torch.Size([2, 16]))
    """
    torch.manual_seed(seed)
    dense = _stack(kind, n, depth)
    masked = _stack(kind, n, depth)
    masked.load_state_dict(dense.state_dict())
    names = [str(i) for i in range(0, 2 * depth - 1, 2)]
    plans = {name: mpd.make_plan(name, masked.get_submodule(name).weight, blocks, seed=seed) for name in names}
    with torch.no_grad():
        for name, plan in plans.items():
            masked.get_submodule(name).weight.mul_(plan.mask())
    links = [mpd.FoldLink(a, b) for a, b in zip(names[:-1], names[1:])]
    if kind == "conv2d" and kernel == "bmm":
        kernel = "grouped"
    mpd.convert_model(masked, plans, links, kernel=kernel)
    _set_layout(masked, handoff, prepacked)
    return dense, masked.eval()


def _set_layout(model: nn.Module, handoff: bool, prepacked: bool) -> None:
    if not handoff:
        for m in model.modules():
            if hasattr(m, "handoff"):
                m.handoff = False
    if prepacked:
        mpd.prepack(model)


def _interleaved(runs: Dict[str, Callable[[], Any]], warmup: int, repeats: int, clock: Clock,
                 warm: bool = False) -> Dict[str, float]:
    """Median seconds of each run, both timed in every round, the starting one alternating (``warm``:
    each timed call right after an untimed one of the same run)."""
    names = list(runs)
    for name in names:
        for _ in range(warmup):
            runs[name]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            if warm:
                runs[name]()
            start = clock()
            runs[name]()
            times[name].append(clock() - start)
    return {n: float(statistics.median(t)) for n, t in times.items()}


def _ort_runner(model: nn.Module, x: torch.Tensor, threads: int, folder: str, tag: str) -> Callable[[], Any]:
    import onnxruntime

    from .measure import export_onnx

    path = os.path.join(folder, f"{tag}.onnx")
    export_onnx(model, x, path)
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {"input": x.numpy()}
    return lambda: session.run(None, feed)


def _time_pair(dense: nn.Module, converted: nn.Module, x: torch.Tensor, engine: str, threads: int,
               grid: LayerGrid, clock: Clock, folder: str) -> Dict[str, float]:
    if engine == "pytorch":
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with GRAD_MODES[grid.grad_mode]():
                return _interleaved({"dense": lambda: dense(x), "converted": lambda: converted(x)},
                                    grid.warmup, grid.repeats, clock, grid.warm)
        finally:
            torch.set_num_threads(previous)
    runs = {"dense": _ort_runner(dense, x, threads, folder, "dense"),
            "converted": _ort_runner(converted, x, threads, folder, "converted")}
    return _interleaved(runs, grid.warmup, grid.repeats, clock, grid.warm)


def _cases(grid: LayerGrid) -> Iterable[Dict[str, Any]]:
    for kind in grid.kinds:
        sizes = grid.sizes if kind == "linear" else grid.conv_sizes
        kernels = list(dict.fromkeys("grouped" if (kind == "conv2d" and k == "bmm") else k for k in grid.kernels))
        for n in sizes:
            for c in (c for c in grid.blocks if c <= n):
                for depth in grid.depths:
                    for kernel in kernels:
                        yield {"kind": kind, "size": n, "blocks": c, "depth": depth, "kernel": kernel}


def bench_layers(grid: Optional[LayerGrid] = None, clock: Optional[Clock] = None,
                 progress: Optional[Callable[[str], None]] = None) -> List[Dict[str, Any]]:
    """Time every case of ``grid``; one row per case, batch, thread count and engine.

    Args:
        grid: what to measure (:class:`LayerGrid`; the full grid by default).
        clock: seconds, ``time.perf_counter`` by default (pass a stand-in to test the plumbing).
        progress: called with a line per finished row.

    Returns:
        Rows with the case, ``batch``, ``threads``, ``engine``, ``dense_ms``, ``converted_ms``,
        ``speedup`` (dense / converted), ``ideal`` (``c``) and ``of_ideal`` (speedup / c).

    Example:
        >>> grid = LayerGrid(kinds=("linear",), sizes=(16,), blocks=(4,), depths=(1,), kernels=("bmm",),
        ...                  batches=(2,), threads=(1,), engines=("pytorch",), warmup=0, repeats=1)
        >>> ticks = iter(range(100))
        >>> rows = bench_layers(grid, clock=lambda: next(ticks))
        >>> [(r["size"], r["blocks"], r["speedup"]) for r in rows]
        [(16, 4, 1.0)]
    """
    grid = grid or LayerGrid()
    clock = clock or time.perf_counter
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for case in _cases(grid):
            dense, converted = build_pair(case["kind"], case["size"], case["blocks"], case["depth"], case["kernel"],
                                          handoff=grid.handoff, prepacked=grid.prepacked)
            for batch in grid.batches:
                shape = (batch, case["size"]) + ((grid.spatial, grid.spatial) if case["kind"] == "conv2d" else ())
                x = torch.randn(shape)
                for threads in grid.threads:
                    for engine in grid.engines:
                        t = _time_pair(dense, converted, x, engine, threads, grid, clock, folder)
                        row = _row(case, batch, threads, engine, t["dense"], t["converted"], case["blocks"])
                        rows.append(row)
                        if progress:
                            progress(markdown_table([row], header=False))
    return rows


def _row(case: Dict[str, Any], batch: int, threads: int, engine: str, dense_s: float, converted_s: float,
         ideal: float) -> Dict[str, Any]:
    speedup = dense_s / converted_s if converted_s > 0 else float("inf")
    return dict(case, batch=batch, threads=threads, engine=engine, dense_ms=dense_s * 1e3,
                converted_ms=converted_s * 1e3, speedup=speedup, ideal=ideal, of_ideal=speedup / ideal)


def bench_targets(engines: Sequence[str] = ("pytorch", "onnxruntime"), warmup: int = 5, repeats: int = 60,
                  warm: bool = False, clock: Optional[Clock] = None, targets: Sequence[Dict[str, Any]] = TARGETS,
                  progress: Optional[Callable[[str], None]] = None, handoff: bool = True,
                  grad_mode: str = "no_grad", prepacked: bool = True) -> List[Dict[str, Any]]:
    """Time the configurations of :data:`TARGETS` (1 thread): one row per target and engine, with
    ``target`` (the speed-up asked for) and ``met`` (``speedup >= target``; the goals are stated for
    PyTorch, the ONNX Runtime rows are for comparison).

    Example:
        >>> ticks = iter(range(10 ** 4))
        >>> small = [dict(kind="linear", size=16, blocks=4, depth=3, kernel="bmm", batch=2, target=2.0)]
        >>> rows = bench_targets(("pytorch",), 0, 1, clock=lambda: next(ticks), targets=small)
        >>> [(r["depth"], r["speedup"], r["target"], r["met"]) for r in rows]
        [(3, 1.0, 2.0, False)]
    """
    rows = []
    for t in targets:
        grid = LayerGrid(kinds=(t["kind"],), sizes=(t["size"],), conv_sizes=(t["size"],), blocks=(t["blocks"],),
                         depths=(t["depth"],), kernels=(t["kernel"],), batches=(t["batch"],), threads=(1,),
                         engines=tuple(engines), warmup=warmup, repeats=repeats, warm=warm, handoff=handoff,
                         prepacked=prepacked, grad_mode=grad_mode)
        for row in bench_layers(grid, clock):
            row.update(target=float(t["target"]), met=bool(row["speedup"] >= t["target"]))
            rows.append(row)
            if progress:
                progress(markdown_table([row], header=False, columns=_COLUMNS + ("target", "met")))
    return rows


def wide_mlp_pair(kernel: str = "bmm", blocks: int = 8, width: float = 1.0, seed: int = 0, handoff: bool = True,
                  prepacked: bool = True):
    """``(dense, converted)``: the wide MLP, and a copy with ``fc1``/``fc2`` masked by random
    ``blocks``-block plans and converted with ``kernel`` (``fc1 -> fc2 -> fc3`` folded; the
    classifier ``fc3`` stays dense and absorbs ``fc2``'s output permutation).

    Example:
        >>> dense, conv = wide_mlp_pair(width=1 / 64)
        >>> type(conv.fc2).__name__, conv(torch.randn(2, 1, 32, 32)).shape
        ('BlockDiagonalLinear', torch.Size([2, 10]))
    """
    from .zoo_wide import wide_mlp

    torch.manual_seed(seed)
    dense = wide_mlp(width=width).eval()
    masked = wide_mlp(width=width).eval()
    masked.load_state_dict(dense.state_dict())
    plans = {n: mpd.make_plan(n, masked.get_submodule(n).weight, blocks, seed=seed) for n in ("fc1", "fc2")}
    with torch.no_grad():
        for name, plan in plans.items():
            masked.get_submodule(name).weight.mul_(plan.mask())
    mpd.convert_model(masked, plans, [mpd.FoldLink("fc1", "fc2"), mpd.FoldLink("fc2", "fc3")], kernel=kernel)
    _set_layout(masked, handoff, prepacked)
    return dense, masked.eval()


def _weights(model: nn.Module) -> int:
    """Multiplications per sample: stored weights of plain and converted linear layers."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel()
        elif hasattr(m, "stored_weights"):
            total += m.stored_weights()
    return total


def bench_wide_mlp(kernels: Sequence[str] = ("bmm",), batches: Sequence[int] = (1, 32), blocks: int = 8,
                   engines: Sequence[str] = ("pytorch", "onnxruntime"), warmup: int = 5, repeats: int = 60,
                   warm: bool = False, clock: Optional[Clock] = None, width: float = 1.0,
                   progress: Optional[Callable[[str], None]] = None, handoff: bool = True,
                   grad_mode: str = "no_grad", prepacked: bool = True) -> List[Dict[str, Any]]:
    """The wide MLP, dense against ``fc1``/``fc2`` in ``blocks`` blocks, on 1 thread.

    For each kernel and batch, the dense and the converted model on every engine are timed in the
    same interleaved rounds, so the rows of one batch compare engines as fairly as models. One row
    per kernel, batch and engine (``kind`` ``wide_mlp``, ``size`` the hidden width, ``depth`` 3
    layers, ``ideal`` the ratio of multiplications); :func:`engine_table` sets the engines side by side.

    Example:
        >>> ticks = iter(range(10 ** 4))
        >>> rows = bench_wide_mlp(batches=(2,), engines=("pytorch",), warmup=0, repeats=1, width=1 / 64,
        ...                       clock=lambda: next(ticks))
        >>> [(r["kind"], r["size"], r["batch"], r["engine"], r["speedup"]) for r in rows]
        [('wide_mlp', 32, 2, 'pytorch', 1.0)]
    """
    clock = clock or time.perf_counter
    rows = []
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as folder, torch.no_grad():
            for kernel in kernels:
                dense, converted = wide_mlp_pair(kernel, blocks, width, handoff=handoff, prepacked=prepacked)
                ideal = round(_weights(dense) / _weights(converted), 2)
                case = {"kind": "wide_mlp", "size": dense.fc1.out_features, "blocks": blocks, "depth": 3,
                        "kernel": kernel}
                for batch in batches:
                    x = torch.randn(batch, 1, 32, 32)
                    runs: Dict[str, Callable[[], Any]] = {}
                    for engine in engines:
                        for which, model in (("dense", dense), ("converted", converted)):
                            if engine == "pytorch":
                                runs[f"{engine}:{which}"] = (lambda m, inp: lambda: m(inp))(model, x)
                            else:
                                runs[f"{engine}:{which}"] = _ort_runner(model, x, 1, folder, f"{which}_{batch}")
                    with GRAD_MODES[grad_mode]():  # the models were exported outside it
                        t = _interleaved(runs, warmup, repeats, clock, warm)
                    for engine in engines:
                        row = _row(case, batch, 1, engine, t[f"{engine}:dense"], t[f"{engine}:converted"], ideal)
                        rows.append(row)
                        if progress:
                            progress(markdown_table([row], header=False))
    finally:
        torch.set_num_threads(previous)
    return rows


def engine_table(rows: Sequence[Dict[str, Any]]) -> str:
    """ONNX Runtime against PyTorch for the rows measured on both: ``ort/pt`` is the ONNX Runtime time
    over the PyTorch time (below 1: ONNX Runtime is faster).

    Example:
        >>> r = {"kind": "linear", "size": 8, "blocks": 2, "depth": 1, "kernel": "bmm", "batch": 1, "threads": 1}
        >>> rows = [dict(r, engine="pytorch", dense_ms=2.0, converted_ms=1.0),
        ...         dict(r, engine="onnxruntime", dense_ms=1.0, converted_ms=0.5)]
        >>> print(engine_table(rows).splitlines()[-1])
        | linear | 8 | 2 | 1 | bmm | 1 | 1 | 2.000 | 1.000 | 0.50 | 1.000 | 0.500 | 0.50 |
    """
    key_cols = ("kind", "size", "blocks", "depth", "kernel", "batch", "threads")
    by_key: Dict[tuple, Dict[str, Dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault(tuple(r[k] for k in key_cols), {})[r["engine"]] = r
    lines = ["| " + " | ".join(key_cols) + " | pt dense_ms | ort dense_ms | ort/pt dense | pt converted_ms "
             "| ort converted_ms | ort/pt converted |", "|" + "---|" * (len(key_cols) + 6)]
    for key, eng in by_key.items():
        if "pytorch" in eng and "onnxruntime" in eng:
            pt, ort = eng["pytorch"], eng["onnxruntime"]
            cells = [str(v) for v in key] + [
                f"{pt['dense_ms']:.3f}", f"{ort['dense_ms']:.3f}", f"{ort['dense_ms'] / pt['dense_ms']:.2f}",
                f"{pt['converted_ms']:.3f}", f"{ort['converted_ms']:.3f}",
                f"{ort['converted_ms'] / pt['converted_ms']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_COLUMNS = ("kind", "size", "blocks", "depth", "kernel", "batch", "threads", "engine", "dense_ms", "converted_ms",
            "speedup", "ideal", "of_ideal")


def markdown_table(rows: Sequence[Dict[str, Any]], header: bool = True, columns: Sequence[str] = _COLUMNS) -> str:
    """The rows as a markdown table (times in ms, speed-ups as ``x``) of ``columns``.

    Example:
        >>> print(markdown_table([{"kind": "linear", "size": 8, "blocks": 2, "depth": 1, "kernel": "bmm",
        ...     "batch": 1, "threads": 1, "engine": "pytorch", "dense_ms": 0.02, "converted_ms": 0.01,
        ...     "speedup": 2.0, "ideal": 2, "of_ideal": 1.0}]).splitlines()[-1])
        | linear | 8 | 2 | 1 | bmm | 1 | 1 | pytorch | 0.020 | 0.010 | 2.00x | 2x | 100% |
    """
    def cell(key: str, v: Any) -> str:
        if key.endswith("_ms"):
            return f"{v:.3f}"
        if key in ("speedup", "target"):
            return f"{v:.2f}x"
        if key == "ideal":
            return f"{v:g}x"
        if key == "met":
            return "yes" if v else "no"
        if key == "of_ideal":
            return f"{v * 100:.0f}%"
        return str(v)

    lines = []
    if header:
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(k, r[k]) for k in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_speedups(rows: Sequence[Dict[str, Any]], path: str) -> str:
    """Speed-up against blocks (one line per size, depth, kernel, threads and engine; one panel per
    kind and batch), with the ``c``-fold ideal dashed; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["kind"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (kind, batch) in zip(axes[0], panels):
        sub = [r for r in rows if r["kind"] == kind and r["batch"] == batch]
        lines = sorted({(r["size"], r["depth"], r["kernel"], r["threads"], r["engine"]) for r in sub})
        for key in lines:
            pts = sorted((r["blocks"], r["speedup"]) for r in sub
                         if (r["size"], r["depth"], r["kernel"], r["threads"], r["engine"]) == key)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=1,
                    label=f"n={key[0]} x{key[1]} {key[2]} {key[3]}t {key[4]}")
        cs = sorted({r["blocks"] for r in sub})
        ax.plot(cs, cs, "k--", marker="x", lw=1.5, label="ideal (c-fold)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="blocks c", ylabel="speed-up over dense",
               title=f"{kind}, batch {batch}")
        ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_results(rows: Sequence[Dict[str, Any]], out_dir: str, grid: LayerGrid) -> Dict[str, str]:
    """``layers.json``, ``layers.md`` and ``layers.png`` in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"layers.{k}") for k in ("json", "md", "png")}
    meta = {"grid": asdict(grid), "native": native.enabled(), "torch": torch.__version__,
            "cpu_threads_available": os.cpu_count()}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": list(rows)}, f, indent=1)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown_table(rows) + "\n")
    plot_speedups(rows, paths["png"])
    return paths


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def write_mode(rows: Sequence[Dict[str, Any]], out_dir: str, name: str, meta: Dict[str, Any],
               columns: Sequence[str] = _COLUMNS) -> Dict[str, str]:
    """``<name>.json`` and ``<name>.md`` (the rows, then ONNX Runtime against PyTorch) in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"{name}.{k}") for k in ("json", "md")}
    meta = dict(meta, torch=torch.__version__, cpu_threads_available=os.cpu_count())
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": list(rows)}, f, indent=1)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown_table(rows, columns=columns) + "\n\n" + engine_table(rows) + "\n")
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``python -m pfgdf_plugin.bench_layers [--sizes 256,1024] [--out DIR] ...``;
    ``--targets`` and/or ``--wide-mlp`` run those comparisons instead of the grid."""
    d = LayerGrid()
    p = argparse.ArgumentParser(prog="bench-layers", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench_layers", help="output folder (layers.json, .md, .png)")
    for key in ("sizes", "conv_sizes", "blocks", "depths", "batches", "threads"):
        p.add_argument(f"--{key.replace('_', '-')}", default=",".join(map(str, getattr(d, key))))
    for key in ("kinds", "kernels", "engines"):
        p.add_argument(f"--{key}", default=",".join(getattr(d, key)))
    p.add_argument("--spatial", type=int, default=d.spatial)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed rounds ({d.repeats} for the grid, 60 for --targets and --wide-mlp)")
    p.add_argument("--warm", action="store_true", help="an untimed call of the same model before each timed call")
    p.add_argument("--no-prepack", action="store_true",
                   help="converted bmm layers copy their weights into panels on every batch (not prepacked)")
    p.add_argument("--no-handoff", action="store_true",
                   help="no feature-major hand-off between bmm layers (column gathers at every boundary)")
    p.add_argument("--grad-mode", choices=sorted(GRAD_MODES), default="no_grad",
                   help="time PyTorch under torch.no_grad() (default) or torch.inference_mode()")
    p.add_argument("--no-native", action="store_true",
                   help="converted layers on PyTorch operations only (not the C kernels of pfgdf_plugin.native)")
    p.add_argument("--isa", choices=("avx2", "avx512"), default=None,
                   help="cap the C kernels' batch products at these instructions (default: the widest the CPU has)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: time.perf_counter; cpu: the thread's CPU time (1 thread only)")
    p.add_argument("--targets", action="store_true", help="time the configurations of the speed goals (TARGETS)")
    p.add_argument("--wide-mlp", action="store_true", help="time the wide MLP, dense against 8 blocks")
    p.add_argument("--wide-kernels", default="bmm", help="kernels of --wide-mlp (default bmm)")
    p.add_argument("--wide-batches", default="1,32", help="batch sizes of --wide-mlp (default 1,32)")
    p.add_argument("--wide-width", type=float, default=1.0, help="width multiplier of the wide MLP (default 1)")
    a = p.parse_args(argv)
    clock = CLOCKS[a.clock]
    engines = a.engines.split(",")
    modes = a.targets or a.wide_mlp
    try:
        grid = LayerGrid(kinds=a.kinds.split(","), sizes=_ints(a.sizes), conv_sizes=_ints(a.conv_sizes),
                         blocks=_ints(a.blocks), depths=_ints(a.depths), kernels=a.kernels.split(","),
                         batches=_ints(a.batches), threads=_ints(a.threads), engines=engines,
                         spatial=a.spatial, warmup=a.warmup, repeats=a.repeats or d.repeats, warm=a.warm,
                         handoff=not a.no_handoff, prepacked=not a.no_prepack, grad_mode=a.grad_mode)
        bad = [k for k in a.wide_kernels.split(",") if k not in ("bmm", "grouped", "dense", "block", "auto")]
        if bad:
            raise ValueError(f"--wide-kernels: unknown {bad} (bmm, grouped, dense, block, auto)")
        if not 0 < a.wide_width <= 4:
            raise ValueError(f"--wide-width must be in (0, 4], got {a.wide_width}")
        if a.clock == "cpu" and not modes and any(t != 1 for t in grid.threads):
            raise ValueError(f"--clock cpu measures one thread; --threads must be 1, got {a.threads}")
        if a.isa and not native.available():
            raise ValueError("--isa: the C kernels are not available here")
    except ValueError as e:
        p.error(str(e))
    previous = native.set_enabled(not a.no_native)
    previous_isa = native.set_isa(a.isa) if a.isa else None
    try:
        return _run(a, grid, engines, clock, modes)
    finally:
        native.set_enabled(previous)
        if previous_isa:
            native.set_isa(previous_isa)


def _run(a: argparse.Namespace, grid: LayerGrid, engines: List[str], clock: Clock, modes: bool) -> int:
    meta = {"clock": a.clock, "warm": a.warm, "warmup": a.warmup, "repeats": a.repeats or 60, "threads": 1,
            "handoff": not a.no_handoff, "prepacked": not a.no_prepack, "native": native.enabled(),
            "isa": native.isa() if native.enabled() else "", "grad_mode": a.grad_mode}
    if a.targets:
        rows = bench_targets(engines, a.warmup, a.repeats or 60, a.warm, clock, progress=print,
                             handoff=not a.no_handoff, grad_mode=a.grad_mode, prepacked=not a.no_prepack)
        paths = write_mode(rows, a.out, "targets", dict(meta, targets=list(TARGETS)),
                           columns=_COLUMNS + ("target", "met"))
        print(f"wrote {paths['md']}, {paths['json']}")
    if a.wide_mlp:
        rows = bench_wide_mlp(a.wide_kernels.split(","), _ints(a.wide_batches), engines=engines,
                              warmup=a.warmup, repeats=a.repeats or 60, warm=a.warm, clock=clock,
                              width=a.wide_width, progress=print, handoff=not a.no_handoff,
                              prepacked=not a.no_prepack,
                              grad_mode=a.grad_mode)
        paths = write_mode(rows, a.out, "wide_mlp", meta)
        print(engine_table(rows))
        print(f"wrote {paths['md']}, {paths['json']}")
    if modes:
        return 0
    rows = bench_layers(grid, clock, progress=print)
    paths = write_results(rows, a.out, grid)
    print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
