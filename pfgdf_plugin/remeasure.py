"""Latency measured again in a fresh process: saved models loaded and timed side by side.

A latency target is met during a search inside a long-running process (trained models, data
loaders and caches around it). To check what a target delivers, the pruned models are saved
with :func:`pfgdf_plugin.persist.save_pruned` and timed again here, in a new Python process
that holds nothing else: every model, the dense one included, runs interleaved with
:func:`pfgdf_plugin.measure.measure_latency` under the same engine, threads and batch size as
the target (:class:`pfgdf_plugin.meter.Timing`).

Run as ``python -m pfgdf_plugin.remeasure MANIFEST.json OUT.json``; the manifest is
``{"models": {key: path}, "input_shape": [C, H, W], "timing": {...}}`` and the output is
``{"latency": {key: {"median_ms", "p10_ms", "p90_ms"}}, "threads", "engine", "batch_size"}``.

Example:
    >>> import os, tempfile, torch.nn as nn
    >>> from pfgdf_plugin.persist import save_pruned
    >>> d = tempfile.mkdtemp()
    >>> for name, width in (("dense", 8), ("thin", 2)):
    ...     save_pruned(nn.Sequential(nn.Conv2d(3, width, 3), nn.Conv2d(width, 4, 3)), os.path.join(d, name + ".pt"))
    >>> base = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3))
    >>> res = measure_saved({"dense": os.path.join(d, "dense.pt"), "thin": os.path.join(d, "thin.pt")},
    ...                     (3, 8, 8), {"warmup": 0, "repeats": 2}, base_model=base)
    >>> sorted(res["latency"]), res["latency"]["thin"]["median_ms"] > 0
    (['dense', 'thin'], True)
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from . import measure
from .errors import RunError
from .meter import Timing
from .persist import load_pruned


def measure_saved(paths: Mapping[str, str], input_shape: Sequence[int], timing: Any = None,
                  base_model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Load every saved model and time them all interleaved, in this process.

    Args:
        paths: ``{key: file written by save_pruned}``.
        input_shape: ``(C, H, W)`` of one sample.
        timing: a :class:`~pfgdf_plugin.meter.Timing` or its fields (engine, threads, batch size,
            warm-up and timed runs); default PyTorch, 1 thread, batch 1.
        base_model: the unpruned architecture, when the files do not store one (a copy is used per file).

    Returns:
        ``{"latency": {key: {"median_ms", "p10_ms", "p90_ms"}}, "engine", "threads", "batch_size"}``.
    """
    t = Timing.parse(timing)
    models: Dict[str, nn.Module] = {}
    for key, path in paths.items():
        model, _ = load_pruned(path, None if base_model is None else copy.deepcopy(base_model))
        models[key] = model.cpu().eval()
    shape = tuple(int(s) for s in input_shape)
    with tempfile.TemporaryDirectory() as tmp:
        if t.engine == "onnxruntime":
            for i, (key, m) in enumerate(list(models.items())):
                onnx_path = os.path.join(tmp, f"m{i}.onnx")
                measure.export_onnx(m, torch.zeros(1, *shape), onnx_path)
                models[key] = measure.OnnxRuntimeModel(onnx_path, t.threads)
        res = measure.measure_latency(models, shape, (t.batch_size,), warmup=t.warmup, repeats=t.repeats,
                                      threads=t.threads)
    return {"latency": {k: v[t.batch_size] for k, v in res.items()}, "engine": t.engine, "threads": t.threads,
            "batch_size": t.batch_size}


def measure_in_fresh_process(paths: Mapping[str, str], input_shape: Sequence[int], timing: Any,
                             work_dir: str) -> Dict[str, Any]:
    """:func:`measure_saved` run by a new Python process (``python -m pfgdf_plugin.remeasure``).

    The files must store their architecture (``save_pruned(..., arch=...)``). The manifest and the
    output are written to ``work_dir``.

    Raises:
        RunError: the process failed; the message holds the end of its error output.
    """
    os.makedirs(work_dir, exist_ok=True)
    manifest = os.path.join(work_dir, "remeasure_manifest.json")
    out = os.path.join(work_dir, "remeasure_out.json")
    with open(manifest, "w", encoding="utf-8") as f:
        json.dump({"models": dict(paths), "input_shape": list(input_shape),
                   "timing": vars(Timing.parse(timing))}, f, indent=1)
    if os.path.exists(out):
        os.remove(out)
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this package importable from there
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "pfgdf_plugin.remeasure", manifest, out], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(out):
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise RunError(f"re-measuring latency in a fresh process failed (exit {proc.returncode}): {tail}")
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m pfgdf_plugin.remeasure MANIFEST.json OUT.json", file=sys.stderr)
        return 2
    with open(args[0], encoding="utf-8") as f:
        manifest = json.load(f)
    res = measure_saved(manifest["models"], manifest["input_shape"], manifest.get("timing"))
    res["pid"] = os.getpid()
    with open(args[1], "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
