"""Layer benchmark: dense against MPD-converted ``Linear`` and ``Conv2d`` layers, side by side.

For every layer kind, size ``n`` (an ``n x n`` layer), block count ``c``, stack depth (one layer,
or ``depth`` layers with ReLUs between them, permutations folded), kernel, batch size, thread
count and engine (PyTorch eager, ONNX Runtime), the dense and the converted model are timed in
one process, interleaved (each round runs both, the starting one alternating), and the medians
compared. The ideal speed-up of ``c`` blocks is ``c`` (``c``-fold fewer multiplications). Writes
``layers.json`` (every row), ``layers.md`` (the table) and ``layers.png`` (speed-up against
blocks, one panel per kind and batch, the ideal as a dashed line).

``python -m pfgdf_plugin.bench_layers --out docs/bench/layers`` runs the full grid (sizes 256 to
4096, blocks 2 to 16, batch 1 and 64, 1 and 2 threads, both engines); it takes long and needs a
quiet machine: the timings are only as good as the machine is idle.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from .methods import mpd

__all__ = ["LayerGrid", "bench_layers", "main", "markdown_table", "plot_speedups"]

Clock = Callable[[], float]


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


def build_pair(kind: str, n: int, blocks: int, depth: int, kernel: str, seed: int = 0):
    """``(dense, converted)``: a stack of ``depth`` ``n x n`` layers and its MPD-converted copy.

    The converted copy is masked with random ``blocks``-block plans and converted with
    ``kernel`` (``bmm`` on a convolution means ``grouped``), permutations folded.

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
    return dense, masked.eval()


def _interleaved(runs: Dict[str, Callable[[], Any]], warmup: int, repeats: int, clock: Clock) -> Dict[str, float]:
    """Median seconds of each run, both timed in every round, the starting one alternating."""
    names = list(runs)
    for name in names:
        for _ in range(warmup):
            runs[name]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
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
            with torch.no_grad():
                return _interleaved({"dense": lambda: dense(x), "converted": lambda: converted(x)},
                                    grid.warmup, grid.repeats, clock)
        finally:
            torch.set_num_threads(previous)
    runs = {"dense": _ort_runner(dense, x, threads, folder, "dense"),
            "converted": _ort_runner(converted, x, threads, folder, "converted")}
    return _interleaved(runs, grid.warmup, grid.repeats, clock)


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
            dense, converted = build_pair(case["kind"], case["size"], case["blocks"], case["depth"], case["kernel"])
            for batch in grid.batches:
                shape = (batch, case["size"]) + ((grid.spatial, grid.spatial) if case["kind"] == "conv2d" else ())
                x = torch.randn(shape)
                for threads in grid.threads:
                    for engine in grid.engines:
                        t = _time_pair(dense, converted, x, engine, threads, grid, clock, folder)
                        speedup = t["dense"] / t["converted"] if t["converted"] > 0 else float("inf")
                        row = dict(case, batch=batch, threads=threads, engine=engine, dense_ms=t["dense"] * 1e3,
                                   converted_ms=t["converted"] * 1e3, speedup=speedup, ideal=case["blocks"],
                                   of_ideal=speedup / case["blocks"])
                        rows.append(row)
                        if progress:
                            progress(markdown_table([row], header=False))
    return rows


_COLUMNS = ("kind", "size", "blocks", "depth", "kernel", "batch", "threads", "engine", "dense_ms", "converted_ms",
            "speedup", "ideal", "of_ideal")


def markdown_table(rows: Sequence[Dict[str, Any]], header: bool = True) -> str:
    """The rows as a markdown table (times in ms, speed-ups as ``x``).

    Example:
        >>> print(markdown_table([{"kind": "linear", "size": 8, "blocks": 2, "depth": 1, "kernel": "bmm",
        ...     "batch": 1, "threads": 1, "engine": "pytorch", "dense_ms": 0.02, "converted_ms": 0.01,
        ...     "speedup": 2.0, "ideal": 2, "of_ideal": 1.0}]).splitlines()[-1])
        | linear | 8 | 2 | 1 | bmm | 1 | 1 | pytorch | 0.020 | 0.010 | 2.00x | 2x | 100% |
    """
    def cell(key: str, v: Any) -> str:
        if key.endswith("_ms"):
            return f"{v:.3f}"
        if key == "speedup":
            return f"{v:.2f}x"
        if key == "ideal":
            return f"{v}x"
        if key == "of_ideal":
            return f"{v * 100:.0f}%"
        return str(v)

    lines = []
    if header:
        lines += ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(cell(k, r[k]) for k in _COLUMNS) + " |" for r in rows]
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
    meta = {"grid": asdict(grid), "torch": torch.__version__, "cpu_threads_available": os.cpu_count()}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": list(rows)}, f, indent=1)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown_table(rows) + "\n")
    plot_speedups(rows, paths["png"])
    return paths


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``python -m pfgdf_plugin.bench_layers [--sizes 256,1024] [--out DIR] ...``."""
    d = LayerGrid()
    p = argparse.ArgumentParser(prog="bench-layers", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench_layers", help="output folder (layers.json, .md, .png)")
    for key in ("sizes", "conv_sizes", "blocks", "depths", "batches", "threads"):
        p.add_argument(f"--{key.replace('_', '-')}", default=",".join(map(str, getattr(d, key))))
    for key in ("kinds", "kernels", "engines"):
        p.add_argument(f"--{key}", default=",".join(getattr(d, key)))
    p.add_argument("--spatial", type=int, default=d.spatial)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--repeats", type=int, default=d.repeats)
    a = p.parse_args(argv)
    try:
        grid = LayerGrid(kinds=a.kinds.split(","), sizes=_ints(a.sizes), conv_sizes=_ints(a.conv_sizes),
                         blocks=_ints(a.blocks), depths=_ints(a.depths), kernels=a.kernels.split(","),
                         batches=_ints(a.batches), threads=_ints(a.threads), engines=a.engines.split(","),
                         spatial=a.spatial, warmup=a.warmup, repeats=a.repeats)
    except ValueError as e:
        p.error(str(e))
    rows = bench_layers(grid, progress=print)
    paths = write_results(rows, a.out, grid)
    print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
