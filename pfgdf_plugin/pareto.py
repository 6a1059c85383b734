"""The Pareto bench: every method at several measured budgets, from one dense model, over seeds.

A Pareto config (a bench YAML with ``seeds``, ``targets``, ``timing`` and ``epochs_after_dense``)
trains one dense model (with the first seed; cached in ``work_dir`` like every bench's), then for
every entry, every target and every seed prunes a copy with ``prune.target`` and trains it for
what is left of the shared budget: ``epochs_after_dense - train_epochs``, where ``train_epochs``
is what the pruning stage itself trained (SPP's probabilistic phase, MPD's masked training, a
sparsity phase). So every entry gets the same number of training epochs after the dense model.

A target an entry cannot reach is kept, not dropped: the entry is marked unreachable with the
best ratio its search reached, and (with ``unreachable_retry`` > 0) pruned again at that share of
the best, so the table and the plots show what it can do. After all entries, every fine-tuned
model is saved (:func:`pfgdf_plugin.persist.save_pruned`) and timed again, with the dense model,
interleaved, in a fresh process (:mod:`pfgdf_plugin.remeasure`) with the config's ``timing``;
the measured speedup is dense median / model median. Finished cells are kept in
``work_dir/pareto-<name>/cells.json`` with their model files, so a killed bench continues.

Output (under ``out_dir/bench``): ``<name>.json`` (every seed's values), ``<name>.md`` (one table
per target) and two plots, accuracy against measured speedup and against MACs reduction.

Example:
    >>> cfg = pareto_config({"seeds": [0, 1], "targets": [{"macs": 2.0}], "epochs_after_dense": 1,
    ...                      "entries": [{"label": "l1", "method": "l1"}]})
    >>> [(e.label, t, s) for e, t, s in cells(cfg)]
    [('l1', {'macs': 2.0}, 0), ('l1', {'macs': 2.0}, 1)]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from . import measure
from .config import ConfigError, from_dict, range_problem, to_dict
from .data import make_loaders
from .errors import PluginError, TargetError
from .meter import Timing
from .methods.target import Target
from .persist import save_pruned
from .pruning import METHODS, PruneContext, prune
from .pruning.budget import with_own_target
from .pruning.registry import parse_params, resolve_layers, validate_params
from .recipe import DataSection, ModelSection
from .remeasure import measure_in_fresh_process
from .report import fmt_count, markdown_table
from .runner.steps import Data, cached_dense, dense_key, finetune, load_data, measure_model
from .train import TrainConfig, seed_everything

PARETO_KEYS = ("seeds", "targets", "timing", "epochs_after_dense")  # any of them makes a bench YAML a Pareto one
PHASE_EPOCHS = ("max_epochs", "sparsity_epochs")  # method params that set how long the pruning stage trains


@dataclass
class ParetoEntry:
    """One line of the Pareto plot: a method with fixed params, pruned to every target.

    Attributes:
        label: the line's name (unique).
        method: a registered method (``pfgdf-plugin methods``).
        framework: ``torch_pruning`` or ``nni``.
        params: the method's ``prune.params`` (without the knob the target chooses).
        targets: this entry's own targets (e.g. one budget only); ``None``: the config's.
        ignored_layers: this entry's own layers to leave alone (e.g. MPD's first convolution, whose
            one input channel cannot be split into blocks); ``None``: the config's.
    """

    label: str = ""
    method: str = "pfgdf"
    framework: str = "torch_pruning"
    params: Dict[str, Any] = field(default_factory=dict)
    targets: Optional[List[Dict[str, float]]] = None
    ignored_layers: Optional[List[str]] = None


def _default_targets() -> List[Dict[str, float]]:
    return [{"latency": 1.5}, {"latency": 2.0}, {"latency": 3.0}]


@dataclass
class ParetoConfig:
    """A Pareto bench (see the module docstring); ``finetune`` holds the optimiser of every training
    after the dense model (its epochs come from ``epochs_after_dense``)."""

    name: str = "pareto"
    seeds: List[int] = field(default_factory=lambda: [0, 1])
    work_dir: str = "runs/bench"
    model: ModelSection = field(default_factory=lambda: ModelSection(name="vgg16_bn", width=0.5))
    data: DataSection = field(default_factory=lambda: DataSection(name="fashion_mnist", limit_train=10000))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5.0, lr=0.02))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(lr=0.01))
    epochs_after_dense: float = 2.0
    targets: List[Dict[str, float]] = field(default_factory=_default_targets)
    timing: Dict[str, Any] = field(default_factory=lambda: {"engine": "pytorch", "threads": 1, "batch_size": 1})
    ignored_layers: Optional[List[str]] = None
    entries: List[ParetoEntry] = field(default_factory=list)
    unreachable_retry: float = 0.95  # an unreachable target is retried at this share of the best reached; 0: no retry
    progress: bool = True


def is_pareto(data: Dict[str, Any]) -> bool:
    """Whether a bench YAML (as a dict) is a Pareto config."""
    return any(k in data for k in PARETO_KEYS)


def _target_errors(targets: Any, key: str) -> List[str]:
    if not isinstance(targets, list) or not targets:
        return [f"{key} must be a non-empty list of targets such as {{latency: 2.0}}, got {targets!r}"]
    errors = []
    for j, t in enumerate(targets):
        try:
            Target.parse(t)
        except TargetError as e:
            msg = str(e)
            errors.append(f"{key}[{j}]{msg[len('target'):]}" if msg.startswith("target") else f"{key}[{j}]: {msg}")
    return errors


def _phase_errors(cfg: ParetoConfig, i: int, entry: ParetoEntry, target: Dict[str, float]) -> List[str]:
    """The entry's pruning-phase training (with its default) must fit in ``epochs_after_dense``."""
    m = METHODS.get(entry.method)
    parsed, _ = parse_params(m, with_own_target(m, entry.params, target))
    errors = []
    for key in PHASE_EPOCHS:
        value = getattr(parsed, key, None)
        if isinstance(value, (int, float)) and value > cfg.epochs_after_dense:
            how = "" if key in entry.params else " (the default)"
            errors.append(f"entries[{i}].params.{key} = {value:g}{how} exceeds epochs_after_dense = "
                          f"{cfg.epochs_after_dense:g}: the pruning stage's training counts against the shared "
                          f"budget; lower {key} or raise epochs_after_dense")
    return errors


def pareto_config(data: Dict[str, Any], source: str = "bench") -> ParetoConfig:
    """A validated :class:`ParetoConfig` from a bench YAML's dict; every problem is reported at once.

    Raises:
        ConfigError: naming each bad key (``seeds``, ``targets[1]``, ``entries[2].params.max_epochs``, ...).
    """
    errors: List[str] = []
    cfg = from_dict(ParetoConfig, data, "", errors)
    errors += cfg.train.validate("train") + cfg.finetune.validate("finetune")
    if isinstance(data.get("finetune"), dict) and "epochs" in data["finetune"]:
        errors.append("finetune.epochs is not used by a Pareto bench: every entry trains epochs_after_dense epochs "
                      "after the dense model (pruning stage included); remove it")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        errors.append(f"seeds must be a non-empty list of distinct integers, got {cfg.seeds!r}")
    e_problem = range_problem("epochs_after_dense", cfg.epochs_after_dense, low=0)
    errors += [e_problem] if e_problem else []
    problem = range_problem("unreachable_retry", cfg.unreachable_retry, 0, 1, high_open=True)
    errors += [problem] if problem else []
    timing: Any = cfg.timing
    try:
        Timing.parse(timing)
    except TargetError as e:
        errors.append(f"timing: {e}")
        timing = None  # the entries are checked without it
    target_problems = _target_errors(cfg.targets, "targets")
    errors += target_problems
    raw_entries = data.get("entries", [])
    if not cfg.entries and not (isinstance(raw_entries, list) and raw_entries):
        errors.append("entries must list at least one entry {label, method, framework, params}")
    labels = [e.label for e in cfg.entries]
    if len(set(labels)) != len(labels):
        errors.append("entries: labels must be unique")
    for i, e in enumerate(cfg.entries):
        errors += _entry_errors(cfg, i, e, [] if target_problems else cfg.targets, timing, e_problem is None)
    if errors:
        raise ConfigError(list(dict.fromkeys(errors)), source)
    # the shared budget is the fine-tuning section's epochs too (only the part the pruning stage leaves is used)
    cfg.finetune = dataclasses.replace(cfg.finetune, epochs=cfg.epochs_after_dense)
    return cfg


def _entry_errors(cfg: ParetoConfig, i: int, e: ParetoEntry, targets: List[Dict[str, float]], timing: Any,
                  budget_ok: bool) -> List[str]:
    """Problems of entry ``i`` with each of its targets (``targets``: the config's well-formed ones)."""
    errors = [] if e.label else [f"entries[{i}].label must be a non-empty string"]
    if e.method not in METHODS:
        return errors + [f"entries[{i}].method {e.method!r} is unknown; known: {', '.join(METHODS.names())}"]
    if e.targets is not None:
        own = _target_errors(e.targets, f"entries[{i}].targets")
        if own:
            return errors + own
        targets = e.targets
    m = METHODS.get(e.method)
    for t in targets:
        errors += validate_params(m, dict(e.params), None, e.framework, prefix=f"entries[{i}]", target=t,
                                  timing=timing)
        errors += _phase_errors(cfg, i, e, t) if budget_ok else []
    return errors


def cells(cfg: ParetoConfig) -> List[Tuple[ParetoEntry, Dict[str, float], int]]:
    """Every ``(entry, target, seed)`` of the bench, in the order they run."""
    return [(e, t, s) for e in cfg.entries for t in (e.targets or cfg.targets) for s in cfg.seeds]


def describe_target(target: Dict[str, float]) -> str:
    """``{"latency": 2.0}`` -> ``latency 2x``."""
    return Target.parse(target).describe()


# --------------------------------------------------------------------------- running


def _dense_key(cfg: ParetoConfig) -> str:
    return dense_key(cfg.model, cfg.data, cfg.train, cfg.seeds[0])


def _dense(cfg: ParetoConfig, data: Data) -> nn.Module:
    return cached_dense(cfg.model, cfg.data, cfg.train, cfg.seeds[0], data, cfg.work_dir, cfg.progress)


def _cell_key(cfg: ParetoConfig, entry: ParetoEntry, target: Dict[str, float], seed: int) -> str:
    blob = json.dumps({"dense": _dense_key(cfg), "method": entry.method, "framework": entry.framework,
                       "params": entry.params, "target": target, "seed": seed, "E": cfg.epochs_after_dense,
                       "finetune": to_dict(cfg.finetune), "timing": cfg.timing, "ignored": _ignored(cfg, entry),
                       "retry": cfg.unreachable_retry}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _ignored(cfg: ParetoConfig, entry: ParetoEntry) -> Optional[List[str]]:
    return cfg.ignored_layers if entry.ignored_layers is None else entry.ignored_layers


def _pruning_epochs(extra: Dict[str, Any]) -> float:
    """Epochs the pruning stage trained (every method reports ``train_epochs``; see ``PruneResult``)."""
    return float(extra.get("train_epochs") or 0.0)


def _arch(cfg: ParetoConfig, data: Data) -> Dict[str, Any]:
    return {"name": cfg.model.name, "width": cfg.model.width, "num_classes": data.spec.num_classes,
            "in_channels": data.spec.in_channels, "image_size": data.spec.image_size}


RETRIES = 3  # retries of an unreachable target, each at unreachable_retry x the best the last one reached


def _run_cell(cfg: ParetoConfig, entry: ParetoEntry, target: Dict[str, float], seed: int, dense: nn.Module,
              data: Data, train_loader, model_path: str) -> Dict[str, Any]:
    """Prune (retrying an unreachable target at the best reached), train what is left of the budget,
    measure and save one cell; the record is JSON."""
    m = METHODS.get(entry.method)
    params = dict(entry.params)
    if "seed" in {f.name for f in dataclasses.fields(m.params)} and "seed" not in params:
        params["seed"] = seed  # the method's own random draws follow the cell's seed too
    rec: Dict[str, Any] = {"label": entry.label, "method": entry.method, "framework": entry.framework,
                           "target": dict(target), "seed": seed, "status": "ok", "message": None,
                           "model_file": None}
    ctx = PruneContext(train_loader=train_loader, train_cfg=cfg.finetune, progress=cfg.progress)

    def run(goal: Dict[str, float]):
        seed_everything(seed)
        return prune(dense, data.example, entry.method, entry.framework, params, None, _ignored(cfg, entry),
                     ctx=ctx, target=goal, timing=cfg.timing)

    t = time.perf_counter()
    shown = target
    try:
        res = run(target)
    except TargetError as e:
        best = e.best
        rec.update(status="unreachable", message=str(e).splitlines()[0], best_reached=best)
        kind = Target.parse(target).kind
        res = None
        for _ in range(RETRIES):  # each retry measures again; when noise lowers the best, follow it
            if not cfg.unreachable_retry or best is None or best * cfg.unreachable_retry <= 1.0:
                break
            shown = {kind: round(best * cfg.unreachable_retry, 3)}
            try:
                res = run(shown)
                break
            except TargetError as e2:
                rec["message"] += f"; retry at {describe_target(shown)} failed too: {str(e2).splitlines()[0]}"
                best = e2.best
        if res is None:
            return rec
        rec["shown_at"] = shown
    except PluginError as e:  # a documented failure of this method on this model: recorded, the bench goes on
        rec.update(status="failed", message=str(e).splitlines()[0])
        return rec
    rec["prune_s"] = time.perf_counter() - t
    info = res.extra.get("target") or {}
    rec["search"] = {"requested": info.get("requested", shown), "reached": info.get("reached"),
                     "met": info.get("met"), "knob": info.get("knob"), "trials": len(info.get("trials") or [])}
    rec["accuracy_after_prune"] = measure.evaluate(res.model, data.test_loader, "cpu", "eval pruned",
                                                   cfg.progress)["accuracy"]
    parsed, _ = parse_params(m, with_own_target(m, params, shown))
    rec["train_epochs"] = _pruning_epochs(res.extra)
    rec["finetune_epochs"] = max(0.0, cfg.epochs_after_dense - rec["train_epochs"])
    t = time.perf_counter()
    if rec["finetune_epochs"] > 0:
        finetune(res.model, train_loader, dataclasses.replace(cfg.finetune, epochs=rec["finetune_epochs"]), "cpu",
                 f"fine-tune {entry.label}", cfg.progress)
    rec["finetune_s"] = time.perf_counter() - t
    summary = measure_model(res.model, data, "cpu", "eval fine-tuned", cfg.progress)
    rec.update({k: summary[k] for k in ("accuracy", "params", "macs", "filters")})
    rec["extra"] = {k: v for k, v in res.extra.items() if k in ("dbp_removed", "mpd_compression", "spp_finished")}
    save_pruned(res.model, model_path, _arch(cfg, data))
    rec["model_file"] = model_path
    return rec


def _load_cells(path: str) -> Dict[str, Dict[str, Any]]:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _reusable(rec: Optional[Dict[str, Any]]) -> bool:
    return rec is not None and (rec.get("model_file") is None or os.path.exists(rec["model_file"]))


def _check_ignored(cfg: ParetoConfig, dense: nn.Module) -> None:
    """Every ``ignored_layers`` name must be a layer of the model, before any cell runs."""
    errors = []
    for i, e in enumerate(cfg.entries):
        try:
            resolve_layers(dense, _ignored(cfg, e))
        except ValueError as err:
            key = "ignored_layers" if e.ignored_layers is None else f"entries[{i}].ignored_layers"
            errors.append(f"{key}: {str(err).split(': ', 1)[-1]}")
    if errors:
        raise ConfigError(list(dict.fromkeys(errors)), cfg.name)


def _latency(paths: Dict[str, str], input_shape: Tuple[int, ...], timing: Dict[str, Any], run_dir: str,
             reuse: bool) -> Dict[str, Any]:
    """The fresh-process latency of ``paths``; with ``reuse``, the last measurement of exactly these files."""
    cache = os.path.join(run_dir, "latency.json")
    manifest = {"models": paths, "input_shape": list(input_shape), "timing": timing}
    if reuse and os.path.exists(cache):
        with open(cache, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("manifest") == manifest:
            print(f"every cell was finished before: reusing their fresh-process latency ({cache}; delete it to "
                  "measure again)", flush=True)
            return saved["result"]
    print(f"re-measuring {len(paths)} models in a fresh process ({describe_timing(timing)}, interleaved)",
          flush=True)
    lat = measure_in_fresh_process(paths, input_shape, timing, run_dir)
    atomic_json({"manifest": manifest, "result": lat}, cache)
    return lat


def run_pareto(cfg: ParetoConfig, out_dir: str = "docs", command: Optional[str] = None) -> Dict[str, Any]:
    """Run a Pareto bench and write ``bench/<name>.json``, ``.md`` and plots under ``out_dir``.

    ``pfgdf-plugin bench --config FILE`` calls this for a Pareto config (and then assembles
    ``benchmarks.md``). Returns the results written to the JSON.
    """
    t0 = time.perf_counter()
    seed_everything(cfg.seeds[0])
    data = load_data(cfg.data, cfg.seeds[0])
    dense = _dense(cfg, data)
    _check_ignored(cfg, dense)
    dense_summary = measure_model(dense, data, "cpu", "eval dense", cfg.progress)
    run_dir = os.path.join(cfg.work_dir, f"pareto-{cfg.name}")
    os.makedirs(os.path.join(run_dir, "models"), exist_ok=True)
    cells_path = os.path.join(run_dir, "cells.json")
    done = _load_cells(cells_path)
    loaders: Dict[int, Any] = {}
    todo = cells(cfg)
    records = []
    ran = 0
    for n, (entry, target, seed) in enumerate(todo, 1):
        key = _cell_key(cfg, entry, target, seed)
        head = f"[{n}/{len(todo)}] {entry.label}, {describe_target(target)}, seed {seed}"
        rec = done.get(key)
        if _reusable(rec):
            rec["label"] = entry.label
            print(f"{head}: done before, reused", flush=True)
        else:
            if seed not in loaders:
                loaders[seed] = make_loaders(data.spec, cfg.data.batch_size, workers=cfg.data.workers, seed=seed)[0]
            print(f"{head} ...", flush=True)
            rec = _run_cell(cfg, entry, target, seed, dense, data, loaders[seed],
                            os.path.join(run_dir, "models", f"{key}.pt"))
            ran += 1
            done[key] = rec
            atomic_json(done, cells_path)
        records.append(dict(rec, key=key))
        what = (f"accuracy {100 * rec['accuracy']:.2f}%, reached {rec['search']['reached'] or 0:.2f}x in search, "
                f"{rec['train_epochs']:g}+{rec['finetune_epochs']:g} epochs" if rec.get("model_file")
                else rec["message"])
        print(f"{head}: {rec['status']}: {what} ({(time.perf_counter() - t0) / 60:.1f} min elapsed)", flush=True)
    dense_path = os.path.join(run_dir, "dense_model.pt")
    save_pruned(dense, dense_path, _arch(cfg, data))
    paths = {"dense": dense_path, **{r["key"]: r["model_file"] for r in records if r.get("model_file")}}
    lat = _latency(paths, data.input_shape, cfg.timing, run_dir, reuse=ran == 0)
    base = lat["latency"]["dense"]["median_ms"]
    for r in records:
        if r["key"] in lat["latency"]:
            own = lat["latency"][r["key"]]
            r["remeasured"] = {**own, "speedup": base / own["median_ms"]}
    t = Timing.parse(cfg.timing)
    results = {
        "mode": "pareto", "config": to_dict(cfg),
        "command": command or "pfgdf-plugin bench " + " ".join(sys.argv[2:]),
        "dense": {**{k: dense_summary[k] for k in ("accuracy", "params", "macs", "filters")},
                  "latency": lat["latency"]["dense"]},
        "cells": records, "remeasure": {"engine": t.engine, "threads": t.threads, "batch_size": t.batch_size,
                                        "warmup": t.warmup, "repeats": t.repeats, "pid": lat.get("pid")},
        "data_sizes": [len(data.spec.train), len(data.spec.test)],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "minutes": (time.perf_counter() - t0) / 60}
    write(results, out_dir)
    return results


def _cell_minutes(cells: List[Dict[str, Any]]) -> float:
    """Minutes the cells spent pruning and training, summed over every cell (a resumed run reuses them)."""
    return sum(c.get("prune_s", 0.0) + c.get("finetune_s", 0.0) for c in cells) / 60


def describe_timing(timing: Any) -> str:
    t = Timing.parse(timing)
    engine = {"pytorch": "PyTorch", "onnxruntime": "ONNX Runtime"}[t.engine]
    return f"{engine}, {t.threads} thread(s), batch {t.batch_size}"


# --------------------------------------------------------------------------- writing


def _stats(values: List[float]) -> Optional[Tuple[float, float, float]]:
    return (sum(values) / len(values), min(values), max(values)) if values else None


def _fmt_range(s: Optional[Tuple[float, float, float]], fmt: str, unit: str = "") -> str:
    if s is None:
        return "-"
    mean, lo, hi = s
    if len({f"{v:{fmt}}" for v in (lo, hi)}) == 1:
        return f"{mean:{fmt}}{unit}"
    return f"{mean:{fmt}}{unit} ({lo:{fmt}}-{hi:{fmt}})"


def summarize_cells(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One point per (entry, target): seeds' values, means and ranges, in the config's order."""
    dense = results["dense"]
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in results["cells"]:
        groups.setdefault((r["label"], json.dumps(r["target"], sort_keys=True)), []).append(r)
    out = []
    for (label, tkey), recs in groups.items():
        ok = [r for r in recs if r.get("model_file")]
        speed = [r["remeasured"]["speedup"] for r in ok if r.get("remeasured")]
        reached = [r["search"]["reached"] for r in ok if r["search"].get("reached") is not None]
        bests = [r["best_reached"] for r in recs if r.get("best_reached") is not None]
        out.append({
            "label": label, "method": recs[0]["method"], "framework": recs[0]["framework"],
            "target": json.loads(tkey), "seeds": [r["seed"] for r in ok], "n": len(recs),
            "status": ("failed" if all(r["status"] == "failed" for r in recs)
                       else "unreachable" if any(r["status"] == "unreachable" for r in recs) else "ok"),
            "messages": sorted({r["message"] for r in recs if r.get("message")}),
            "best_reached": max(bests) if bests else None,
            "unfinished": sum(1 for r in ok if (r.get("extra") or {}).get("spp_finished") is False),
            "shown_at": next((r["shown_at"] for r in recs if r.get("shown_at")), None),
            "accuracy": _stats([100 * r["accuracy"] for r in ok]),
            "change": _stats([100 * (r["accuracy"] - dense["accuracy"]) for r in ok]),
            "speedup": _stats(speed), "reached": _stats(reached),
            "macs_x": _stats([dense["macs"] / max(1, r["macs"]) for r in ok]),
            "params_x": _stats([dense["params"] / max(1, r["params"]) for r in ok]),
            "epochs": (_stats([r["train_epochs"] for r in ok]), _stats([r["finetune_epochs"] for r in ok])),
        })
    return out


def _table(points: List[Dict[str, Any]], dense: Dict[str, Any]) -> str:
    header = ["method", "seeds", "accuracy % mean (min-max)", "change vs dense", "measured speedup",
              "requested / reached in search", "MACs reduction", "params reduction", "epochs (pruning + fine-tune)"]
    rows = []
    for p in points:
        req = describe_target(p["target"]).split(" ", 1)[1]
        if p["status"] == "failed":
            rows.append([p["label"], f"0/{p['n']}", "failed: " + "; ".join(p["messages"])[:200]] + ["-"] * 6)
            continue
        reached = _fmt_range(p["reached"], ".2f", "x")
        if p["status"] == "unreachable" and p["best_reached"] is None:
            reached = "**unreachable**: " + "; ".join(p["messages"])[:200]
        elif p["status"] == "unreachable":
            shown = f", shown at {describe_target(p['shown_at']).split(' ', 1)[1]}" if p["shown_at"] else ""
            reached = f"**unreachable** (best {p['best_reached']:.2f}x{shown}): {reached}"
        pe, fe = p["epochs"]
        notes = " (unreachable)" if p["status"] == "unreachable" else ""
        if p.get("unfinished"):
            notes += f" (SPP stopped short of its ratio in {p['unfinished']}/{len(p['seeds'])} seeds)"
        rows.append([p["label"] + notes,
                     f"{len(p['seeds'])}/{p['n']}", _fmt_range(p["accuracy"], ".2f"),
                     _fmt_range(p["change"], "+.2f", " pts"), _fmt_range(p["speedup"], ".2f", "x"),
                     f"{req} / {reached}", _fmt_range(p["macs_x"], ".2f", "x"), _fmt_range(p["params_x"], ".2f", "x"),
                     f"{_fmt_range(pe, '.2g')} + {_fmt_range(fe, '.2g')}" if pe else "-"])
    return markdown_table(header, rows)


def plot_pareto(points: List[Dict[str, Any]], dense: Dict[str, Any], path: str, x: str = "speedup",
                title: str = "") -> str:
    """Accuracy against ``x`` (``speedup``: measured latency ratio; ``macs_x``: MACs reduction), one line
    per entry through its targets, error bars min-max over seeds; unreachable points hollow.

    Example:
        >>> import os, tempfile
        >>> pt = {"label": "l1", "target": {"macs": 2}, "status": "ok", "accuracy": (90.0, 89.0, 91.0),
        ...       "speedup": (1.9, 1.8, 2.0), "macs_x": (2.0, 2.0, 2.0)}
        >>> os.path.exists(plot_pareto([pt], {"accuracy": 0.92}, os.path.join(tempfile.mkdtemp(), "p.png")))
        True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(p["label"] for p in points))
    cmap = plt.get_cmap("tab20")
    markers = "osD^v<>ph"  # 9 markers against 20 colours: no two of the first 20 entries look alike
    fig, ax = plt.subplots(figsize=(10.5, 5))
    for i, label in enumerate(labels):
        pts = sorted((p for p in points if p["label"] == label and p.get(x) and p.get("accuracy")),
                     key=lambda p: p[x][0])
        if not pts:
            continue
        c, mk = cmap((2 * i) % 20 + (i // 10) % 2), markers[i % len(markers)]
        xs, ys = [p[x][0] for p in pts], [p["accuracy"][0] for p in pts]
        ax.plot(xs, ys, "-", marker=mk, color=c, lw=1.2, ms=6, alpha=0.85, label=label, zorder=3)
        for p in pts:
            (xm, xlo, xhi), (ym, ylo, yhi) = p[x], p["accuracy"]
            ax.errorbar([xm], [ym], xerr=[[xm - xlo], [xhi - xm]], yerr=[[ym - ylo], [yhi - ym]], fmt="none",
                        ecolor=c, capsize=2, lw=0.8, zorder=2)
            if p["status"] == "unreachable":  # hollow: the best this entry reached, not the target
                ax.scatter([xm], [ym], marker=mk, s=70, facecolors="white", edgecolors=[c], linewidths=1.4, zorder=4)
    ax.scatter([1.0], [100 * dense["accuracy"]], marker="*", s=140, color="black", zorder=4, label="dense")
    if x == "speedup":
        for v in sorted({float(t) for p in points for k, t in p["target"].items() if k == "latency"}):
            ax.axvline(v, color="grey", ls=":", lw=0.8)
    if any(p["status"] == "unreachable" for p in points):
        ax.scatter([], [], marker="o", facecolors="white", edgecolors="grey", label="target unreachable (best reached)")
    ax.set_xlabel("measured speedup over dense (latency ratio, fresh process)" if x == "speedup"
                  else "MACs reduction (dense / pruned)")
    ax.set_ylabel("test accuracy (%), mean, min-max over seeds")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the lines, never on them
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results: Dict[str, Any], out_dir: str) -> List[str]:
    """Write ``bench/<name>.json``, ``bench/<name>.md`` and the two plots; return the files written.

    Measures nothing: ``pfgdf-plugin bench --render bench/<name>.json`` calls it on saved results.
    """
    cfg = from_dict(ParetoConfig, results["config"], "results")
    bench_dir = os.path.join(out_dir, "bench")
    os.makedirs(bench_dir, exist_ok=True)
    json_path = os.path.join(bench_dir, f"{cfg.name}.json")
    atomic_json(results, json_path)
    dense, points = results["dense"], summarize_cells(results)
    m, d = cfg.model, cfg.data
    n_train, n_test = results["data_sizes"]
    title = (f"{m.name} width {m.width:g}, {d.name} {d.image_size}x{d.image_size} ({n_train} train), "
             f"{cfg.epochs_after_dense:g} epochs after dense, seed(s) {', '.join(map(str, cfg.seeds))}")
    speed_png = plot_pareto(points, dense, os.path.join(bench_dir, f"{cfg.name}_speedup.png"), "speedup", title)
    macs_png = plot_pareto(points, dense, os.path.join(bench_dir, f"{cfg.name}_macs.png"), "macs_x", title)
    rm = results["remeasure"]
    lines = [
        f"## {cfg.name}", "",
        "Pareto bench: every entry pruned to every target from one dense model, over seeds (mean, min-max).", "",
        f"- Model: `{m.name}`, width {m.width:g}, {fmt_count(dense['params'])} parameters, "
        f"{fmt_count(dense['macs'])} MACs; dense accuracy {100 * dense['accuracy']:.2f}% "
        f"({cfg.train.epochs:g} epochs, {cfg.train.optimizer}, lr {cfg.train.lr:g}, seed {cfg.seeds[0]}).",
        f"- Data: `{d.name}` at {d.image_size}x{d.image_size}, {n_train} training / {n_test} test images.",
        f"- Budget after the dense model: {cfg.epochs_after_dense:g} epochs for every entry (the pruning stage's "
        f"own training, e.g. SPP's or MPD's, counts against it; the rest is fine-tuning at lr {cfg.finetune.lr:g}, "
        f"{cfg.finetune.schedule}). Seeds: {', '.join(map(str, cfg.seeds))}.",
        f"- Targets: {', '.join(describe_target(t) for t in cfg.targets)} ({describe_timing(cfg.timing)}); "
        "entries with their own targets say so below. An unreachable target is retried at "
        f"{cfg.unreachable_retry:g} x the best reached and shown hollow.",
        f"- Measured speedup: every model saved and re-timed with the dense model in a fresh process, all "
        f"interleaved ({rm['engine']}, {rm['threads']} thread(s), batch {rm['batch_size']}, median of "
        f"{rm['repeats']} runs after {rm['warmup']} warm-up runs); dense {dense['latency']['median_ms']:.2f} ms. "
        f"{results['machine']}.",
        f"- Command: `{results['command'].strip()}` ({results['minutes']:.0f} minutes in its last run; "
        f"pruning and training the cells took {_cell_minutes(results['cells']):.0f} minutes in all, resumed "
        "runs included).", "",
        f"![accuracy vs measured speedup](bench/{os.path.basename(speed_png)})", "",
        f"![accuracy vs MACs reduction](bench/{os.path.basename(macs_png)})", "",
    ]
    order = list(dict.fromkeys(json.dumps(t, sort_keys=True) for t in
                               cfg.targets + [t for e in cfg.entries for t in (e.targets or [])]))
    for tkey in order:
        here = [p for p in points if json.dumps(p["target"], sort_keys=True) == tkey]
        if here:
            lines += [f"### {describe_target(json.loads(tkey))}", "", _table(here, dense), ""]
    md_path = os.path.join(bench_dir, f"{cfg.name}.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print("\n".join(lines), flush=True)
    return [json_path, md_path, speed_png, macs_png]


def atomic_json(obj: Any, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=float)
    os.replace(tmp, path)


__all__ = ["ParetoConfig", "ParetoEntry", "cells", "is_pareto", "pareto_config", "plot_pareto",
           "run_pareto", "summarize_cells", "write"]
