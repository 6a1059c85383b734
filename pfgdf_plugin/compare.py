"""Runs side by side: ``pfgdf-plugin compare RUN_DIR [RUN_DIR ...] [--out FILE]``.

Each run folder (written by ``pfgdf-plugin run``) holds ``metrics.json`` and the resolved
``recipe.yaml``; :func:`compare_runs` puts their accuracy before and after, size, MACs, measured
latency, method, framework and key settings in one table, and plots accuracy against latency.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import RunError
from .report import fmt_count, plot_accuracy_latency, text_table

__all__ = ["RunSummary", "compare_runs", "load_run"]

RunSummary = Dict[str, Any]

_NEEDED = ("method", "framework", "before", "after")


def _not_a_run(path: str, why: str) -> RunError:
    return RunError(f"compare: {path} is not a run folder ({why}); pass folders written by "
                    f"`pfgdf-plugin run`, e.g. runs/pfgdf_vgg16")


def _settings(recipe: Dict[str, Any]) -> str:
    """The knobs that tell runs of one method apart: prune params, ratio, epochs, model width."""
    p = recipe.get("prune") or {}
    parts = [f"{k}={v}" for k, v in sorted((p.get("params") or {}).items())]
    if p.get("ratio") is not None:
        parts.append(f"ratio={p['ratio']}")
    ft = (recipe.get("finetune") or {}).get("epochs")
    if ft is not None:
        parts.append(f"ft={ft:g}" if isinstance(ft, (int, float)) else f"ft={ft}")
    return " ".join(parts) or "-"


def load_run(path: str) -> RunSummary:
    """What :func:`compare_runs` needs from one run folder.

    Raises:
        RunError: ``path`` is not a folder, has no readable ``metrics.json``, or the metrics
            lack a run's entries; the message names the folder and what is missing.
    """
    if not os.path.isdir(path):
        raise _not_a_run(path, "no such folder" if not os.path.exists(path) else "a file, not a folder")
    mpath = os.path.join(path, "metrics.json")
    if not os.path.isfile(mpath):
        raise _not_a_run(path, "no metrics.json")
    try:
        with open(mpath, encoding="utf-8") as f:
            metrics = json.load(f)
    except (OSError, ValueError) as e:
        raise _not_a_run(path, f"metrics.json cannot be read: {type(e).__name__}: {e}") from None
    missing = [k for k in _NEEDED if not isinstance(metrics, dict) or k not in metrics]
    if missing:
        raise _not_a_run(path, f"metrics.json has no {', '.join(repr(k) for k in missing)}")
    recipe: Dict[str, Any] = {}
    rpath = os.path.join(path, "recipe.yaml")
    if os.path.isfile(rpath):
        import yaml

        with open(rpath, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
        recipe = loaded if isinstance(loaded, dict) else {}
    return {"path": path, "label": os.path.basename(os.path.normpath(path)), "metrics": metrics,
            "recipe": recipe, "settings": _settings(recipe)}


def _latency(metrics: Dict[str, Any]) -> Optional[Tuple[int, float, float]]:
    """``(batch size, dense ms, pruned ms)`` at the smallest batch size measured, or None."""
    lat = metrics.get("latency") or {}
    if not lat:
        return None
    bs = min(lat, key=int)
    return int(bs), float(lat[bs]["dense"]), float(lat[bs]["pruned"])


def _row(run: RunSummary) -> List[str]:
    m = run["metrics"]
    b, a = m["before"], m["after"]
    lat = _latency(m)
    return [run["label"], m["method"], m["framework"], str(m.get("model", "-")),
            f"{100 * b['accuracy']:.2f}", f"{100 * a['accuracy']:.2f}",
            f"{fmt_count(a['params'])} ({100 * (1 - a['params'] / b['params']):.0f}% fewer)",
            f"{fmt_count(a['macs'])} ({b['macs'] / a['macs']:.2f}x fewer)",
            "-" if lat is None else f"{lat[1]:.2f} -> {lat[2]:.2f} (b{lat[0]})",
            run["settings"]]


HEADER = ["run", "method", "framework", "model", "acc before (%)", "acc after (%)", "params", "MACs",
          "latency ms dense -> pruned", "settings"]


def _unique_labels(runs: List[RunSummary]) -> None:
    labels = [r["label"] for r in runs]
    for r in runs:
        if labels.count(r["label"]) > 1:
            r["label"] = os.path.normpath(r["path"])


def compare_runs(run_dirs: Sequence[str], out: Optional[str] = "compare.png") -> Tuple[str, Optional[str]]:
    """One table of several runs and a plot of their accuracy against latency.

    The plot's cost axis is the measured latency at the smallest batch size, or MACs when a run
    has no latency (``report.latency: false``).

    Args:
        run_dirs: run folders (each with ``metrics.json``; ``recipe.yaml`` gives the settings).
        out: the PNG to write (its folder is created); None writes no plot.

    Returns:
        ``(table as text, path of the plot or None)``.

    Raises:
        RunError: a folder is not a run (the message names it); nothing is written.

    Example:
        >>> try:
        ...     compare_runs(["no/such/run"])
        ... except RunError as e:
        ...     print(str(e).split(";")[0])
        compare: no/such/run is not a run folder (no such folder)
    """
    if isinstance(run_dirs, str) or not run_dirs:
        raise ValueError(f"compare: give one or more run folders, got {run_dirs!r}")
    runs = [load_run(p) for p in run_dirs]  # every folder is checked before anything is written
    _unique_labels(runs)
    table = text_table(HEADER, [_row(r) for r in runs])
    if out is None:
        return table, None
    lats = [_latency(r["metrics"]) for r in runs]
    use_latency = all(lat is not None for lat in lats)
    points = []
    for r, lat in zip(runs, lats):
        m = r["metrics"]
        dense_x, pruned_x = (lat[1], lat[2]) if use_latency else (m["before"]["macs"], m["after"]["macs"])
        points.append({"label": r["label"], "method": m["method"],
                       "dense": (dense_x, 100 * m["before"]["accuracy"]),
                       "pruned": (pruned_x, 100 * m["after"]["accuracy"])})
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    xlabel = f"latency, batch {lats[0][0]} (ms, median)" if use_latency and len({x[0] for x in lats}) == 1 else (
        "latency, smallest batch measured (ms, median)" if use_latency else "MACs")
    plot_accuracy_latency(points, out, xlabel=xlabel)
    return table, out
