"""``pfgdf-plugin bench``: methods side by side on one model, one data set, one budget.

One process trains (or reuses) the dense model, prunes a copy with every entry, fine-tunes
each copy for the same number of epochs, and measures the latency of all of them interleaved
(see :func:`pfgdf_plugin.measure.measure_latency`), then writes ``benchmarks.md``, a results
JSON and plots. Entries that take their per-layer ratios from another entry (``ratios_from``)
prune exactly as many filters per layer as that entry did, so criteria are compared at the
same structure.

A bench YAML with ``seeds``, ``targets``, ``timing`` or ``epochs_after_dense`` is a Pareto bench
(every method at several measured budgets over seeds): :mod:`pfgdf_plugin.pareto` runs it, and
this module assembles its section into ``benchmarks.md`` like any other.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn

from . import measure
from .config import ConfigError, from_dict, load_yaml, set_by_path, to_dict
from .pareto import ParetoConfig, is_pareto, pareto_config, run_pareto
from .pareto import write as write_pareto
from .pruning import METHODS, PruneContext, PruneResult, prune, prune_like, prune_matching, trains_from_scratch
from .quantize import QuantizeConfig, onnx_int8, quantize
from .recipe import DataSection, ModelSection
from .report import fmt_count, markdown_table
from .runner.steps import Data, cached_dense, finetune, load_data, measure_model, new_model, prune_and_score
from .train import TrainConfig, seed_everything


@dataclass
class BenchEntry:
    label: str = "pfgdf"
    method: str = "pfgdf"
    framework: str = "torch_pruning"
    params: Dict[str, Any] = field(default_factory=dict)
    ratio: Optional[float] = None
    ratios_from: Optional[str] = None  # prune as many filters per layer as that entry did
    match_from: Optional[str] = None  # one global ratio giving that entry's match_metric
    match_metric: str = "macs"


def _default_entries() -> List[BenchEntry]:
    return [
        BenchEntry("PFGDF (Torch-Pruning)", "pfgdf", "torch_pruning", {"k": 1.0, "min_channels": 4}),
        BenchEntry("PFGDF (NNI)", "pfgdf", "nni", {"k": 1.0, "min_channels": 4}),
        BenchEntry("L1, TP MagnitudeImportance(p=1), same per-layer ratios", "l1", "torch_pruning",
                   ratios_from="PFGDF (Torch-Pruning)"),
        BenchEntry("L1, NNI L1NormPruner, same per-layer ratios", "l1", "nni", ratios_from="PFGDF (Torch-Pruning)"),
    ]


@dataclass
class BenchConfig:
    name: str = "pfgdf_vgg16_fashion"
    seed: int = 0
    work_dir: str = "runs/bench"
    model: ModelSection = field(default_factory=lambda: ModelSection(name="vgg16_bn", width=1.0))
    data: DataSection = field(default_factory=lambda: DataSection(name="fashion_mnist", limit_train=30000))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3.0, lr=0.02))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2.0, lr=0.01))
    ignored_layers: Optional[List[str]] = None
    entries: List[BenchEntry] = field(default_factory=_default_entries)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)  # method set: every entry is also quantized
    batch_sizes: List[int] = field(default_factory=lambda: [1, 32])
    threads: List[int] = field(default_factory=lambda: [2, 1])
    onnxruntime: bool = True
    repeats: int = 30
    warmup: int = 5
    progress: bool = True


def load_bench_config(path: Optional[str], overrides: Optional[List[str]] = None
                      ) -> Union[BenchConfig, ParetoConfig]:
    """The bench config of a YAML file (with ``--set`` overrides): a :class:`BenchConfig`, or a
    :class:`~pfgdf_plugin.pareto.ParetoConfig` when the file has Pareto keys (``seeds``, ``targets``, ...).

    Raises:
        ConfigError: every problem at once, each naming its key.
    """
    data = load_yaml(path) if path else {}
    for item in overrides or []:
        set_by_path(data, item)
    if is_pareto(data):
        return pareto_config(data, path or "bench")
    cfg = from_dict(BenchConfig, data)
    errors = cfg.train.validate("train") + cfg.finetune.validate("finetune") + cfg.quantize.validate("quantize")
    if cfg.quantize.fused:
        errors.append("quantize.fused is a recipe option; a bench quantizes after fine-tuning")
    labels = [e.label for e in cfg.entries]
    for i, e in enumerate(cfg.entries):
        if e.method not in METHODS:
            errors.append(f"entries[{i}].method {e.method!r} is unknown; known: {', '.join(METHODS.names())}")
        for key in ("ratios_from", "match_from"):
            if getattr(e, key) is not None and getattr(e, key) not in labels[:i]:
                errors.append(f"entries[{i}].{key} {getattr(e, key)!r} must name an earlier entry's label")
        if e.match_metric not in ("macs", "params"):
            errors.append(f"entries[{i}].match_metric must be macs or params, got {e.match_metric!r}")
    if len(set(labels)) != len(labels):
        errors.append("entries: labels must be unique")
    if errors:
        raise ConfigError(errors, path or "bench")
    return cfg


def _dense(cfg: BenchConfig, data: Data) -> nn.Module:
    """The dense model, trained once per model/data/training setting and kept in ``work_dir``."""
    return cached_dense(cfg.model, cfg.data, cfg.train, cfg.seed, data, cfg.work_dir, cfg.progress)


def _prune_entry(entry: BenchEntry, model: nn.Module, cfg: BenchConfig, data: Data,
                 rows: Dict[str, Dict[str, Any]]) -> PruneResult:
    """Prune a copy of ``model`` as ``entry`` says: with its own method, like an earlier entry, or at
    an earlier entry's budget."""
    if entry.ratios_from:
        return prune_like(copy.deepcopy(model).eval(), data.example, entry.method, entry.framework,
                          rows[entry.ratios_from]["layers"], cfg.ignored_layers)
    if entry.match_from:
        goal = rows[entry.match_from]["summary"][entry.match_metric]
        return prune_matching(model, data.example, entry.method, entry.framework, entry.match_metric, goal,
                              cfg.ignored_layers)
    ctx = PruneContext(train_loader=data.train_loader, train_cfg=cfg.finetune, progress=cfg.progress,
                       initial_train=cfg.train)
    if trains_from_scratch(entry.method, entry.params):  # e.g. MPD start: scratch: masked for the train budget
        model = new_model(cfg.model, data)  # a fresh initialisation, in place of the trained dense model
    return prune(model, data.example, entry.method, entry.framework, entry.params, entry.ratio, cfg.ignored_layers,
                 ctx=ctx)


def run_bench(config_path: Optional[str] = None, overrides: Optional[List[str]] = None,
              out_dir: str = "docs") -> Dict[str, Any]:
    """Run the benchmark and write ``benchmarks.md``, ``bench/<name>.json`` and plots under ``out_dir``."""
    cfg = load_bench_config(config_path, overrides)
    if isinstance(cfg, ParetoConfig):
        results = run_pareto(cfg, out_dir, "pfgdf-plugin bench " + " ".join(sys.argv[2:]))
        _assemble(out_dir)
        return results
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    data = load_data(cfg.data, cfg.seed)
    model = _dense(cfg, data)
    dense = measure_model(model, data, "cpu", "eval dense", cfg.progress)
    rows: Dict[str, Dict[str, Any]] = {}
    models = {"dense": model}
    int8: Dict[str, str] = {}  # label -> int8 ONNX file of the quantized entry
    for entry in cfg.entries:
        print(f"== {entry.label}", flush=True)
        seed_everything(cfg.seed)
        res, after_prune, prune_s = prune_and_score(lambda e=entry: _prune_entry(e, model, cfg, data, rows), data,
                                                    "cpu", cfg.progress)
        pm = res.model
        finetune(pm, data.train_loader, cfg.finetune, "cpu", f"fine-tune {entry.method}", cfg.progress)
        rows[entry.label] = {"entry": to_dict(entry), "summary": measure_model(pm, data, "cpu", "eval fine-tuned",
                                                                               cfg.progress),
                             "accuracy_after_prune": after_prune["accuracy"], "prune_s": prune_s,
                             "layers": res.layers,
                             "extra": {k: v for k, v in res.extra.items()
                                       if k.startswith(("matched_", "dbp_removed", "mpd_compression", "train_epochs"))}}
        models[entry.label] = pm
        if cfg.quantize.method:
            rows[entry.label].update(_quantized(pm, entry.label, cfg, data.train_loader, data.test_loader,
                                                data.example, int8))
    lat = _latencies(models, data.example, cfg, int8)
    results = {"config": to_dict(cfg), "command": "pfgdf-plugin bench " + " ".join(sys.argv[2:]),
               "dense": dense, "rows": rows, "latency": lat, "threads": torch.get_num_threads(),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
               "data_sizes": [len(data.spec.train), len(data.spec.test)], "minutes": (time.perf_counter() - t0) / 60}
    _write(results, out_dir, cfg)
    return results


def render(json_path: str, out_dir: str = "docs") -> None:
    """Rewrite a bench's section of ``benchmarks.md`` from its saved results, measuring nothing."""
    with open(json_path, encoding="utf-8") as f:
        results = json.load(f)
    if results.get("mode") == "pareto":
        write_pareto(results, out_dir)
        _assemble(out_dir)
        return
    cfg = from_dict(BenchConfig, results["config"])
    for engine in results["latency"].values():  # JSON turned the batch-size keys into strings
        for label in engine:
            engine[label] = {int(b): v for b, v in engine[label].items()}
    _write(results, out_dir, cfg)


def _quantized(pm: nn.Module, label: str, cfg: BenchConfig, train_loader, test_loader, example: torch.Tensor,
               int8: Dict[str, str]) -> Dict[str, Any]:
    """Quantize a copy of a fine-tuned entry with NNI; measure its accuracy, and that of its int8
    ONNX Runtime model (recorded in ``int8`` for the latency table)."""
    q = cfg.quantize
    qm = copy.deepcopy(pm)
    t = time.perf_counter()
    qres = quantize(qm, q, train_loader, progress=cfg.progress)
    out: Dict[str, Any] = {"quantize_s": time.perf_counter() - t, "accuracy_quantized": measure.evaluate(
        qm, test_loader, progress=cfg.progress, desc=f"eval {q.method}")["accuracy"]}
    qres.quantizer.unwrap_model()
    qm.eval()
    try:
        onnx_dir = os.path.join(cfg.work_dir, "onnx")
        os.makedirs(onnx_dir, exist_ok=True)
        float_path = os.path.join(onnx_dir, f"quantized{len(int8)}-float.onnx")
        path = os.path.join(onnx_dir, f"quantized{len(int8)}-int8.onnx")
        measure.export_onnx(qm, example, float_path)
        onnx_int8(float_path, path, train_loader, batches=q.calibration_batches)
        out["accuracy_int8_onnx"] = measure.evaluate(measure.OnnxRuntimeModel(path), test_loader,
                                                     progress=cfg.progress, desc="eval int8 onnx")["accuracy"]
        int8[f"{label}, int8"] = path
    except Exception as e:  # no onnxruntime, or an exporter failure: the ORT int8 cells stay empty
        print(f"int8 ONNX skipped for {label}: {type(e).__name__}: {e}", flush=True)
    return out


def _latencies(models: Dict[str, nn.Module], example: torch.Tensor, cfg: BenchConfig,
               int8: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """``{engine/threads: measure_latency(...)}`` for PyTorch and, when installed, ONNX Runtime
    (which also times the ``int8`` ONNX files, label -> path)."""
    engines: Dict[str, Dict[str, nn.Module]] = {}
    onnx_dir = os.path.join(cfg.work_dir, "onnx")
    ort_ok = cfg.onnxruntime
    if ort_ok:
        try:
            import onnxruntime  # noqa: F401

            os.makedirs(onnx_dir, exist_ok=True)
            paths = {}
            for i, (label, mdl) in enumerate(models.items()):
                paths[label] = os.path.join(onnx_dir, f"model{i}.onnx")
                measure.export_onnx(mdl, example, paths[label])
        except Exception as e:  # a missing or failing exporter costs the ORT rows only
            print(f"ONNX Runtime latency skipped: {type(e).__name__}: {e}", flush=True)
            ort_ok = False
    out = {}
    shape = tuple(example.shape[1:])
    for th in cfg.threads:
        engines = {f"PyTorch, {th} thread(s)": models}
        if ort_ok:
            engines[f"ONNX Runtime, {th} thread(s)"] = {k: measure.OnnxRuntimeModel(p, th)
                                                        for k, p in {**paths, **(int8 or {})}.items()}
        for engine, mods in engines.items():
            print(f"measuring latency: {engine} (all models interleaved)", flush=True)
            out[engine] = measure.measure_latency(mods, shape, cfg.batch_sizes, warmup=cfg.warmup,
                                                  repeats=cfg.repeats, threads=th)
    return out


def _write(results: Dict[str, Any], out_dir: str, cfg: BenchConfig) -> None:
    from .report import plot_filters

    bench_dir = os.path.join(out_dir, "bench")
    os.makedirs(bench_dir, exist_ok=True)
    with open(os.path.join(bench_dir, f"{cfg.name}.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=float)
    dense, lat = results["dense"], results["latency"]
    header = ["method", "filters pruned", "params removed", "MACs", "acc. dense", "acc. pruned",
              "acc. fine-tuned", "change"]
    q = cfg.quantize
    if q.method:
        header += [f"acc. {q.bits}-bit {q.method.upper()} (NNI)", "acc. int8 ONNX Runtime"]
    table = []
    for label, r in results["rows"].items():
        s = r["summary"]
        table.append([label, f"{100 * (1 - s['filters'] / dense['filters']):.2f}%" if dense["filters"] else "-",
                      f"{100 * (1 - s['params'] / dense['params']):.2f}%",
                      f"{fmt_count(s['macs'])} ({dense['macs'] / s['macs']:.1f}x fewer)",
                      f"{100 * dense['accuracy']:.2f}", f"{100 * r['accuracy_after_prune']:.2f}",
                      f"{100 * s['accuracy']:.2f}", f"{100 * (s['accuracy'] - dense['accuracy']):+.2f} pts"])
        if q.method:
            table[-1] += [f"{100 * r[k]:.2f} ({100 * (r[k] - s['accuracy']):+.2f})" if k in r else "-"
                          for k in ("accuracy_quantized", "accuracy_int8_onnx")]
    columns = list(results["rows"]) + sorted({k for res in lat.values() for k in res if k.endswith(", int8")})
    lat_header = ["engine", "batch", "dense (ms)"] + columns
    lat_rows = []
    for engine, res in lat.items():
        for b in cfg.batch_sizes:
            dl = res["dense"][b]["median_ms"]
            lat_rows.append([engine, str(b), f"{dl:.2f}"] + [
                f"{res[label][b]['median_ms']:.2f} ({dl / res[label][b]['median_ms']:.2f}x)" if label in res else "-"
                for label in columns])
    first = next(iter(results["rows"].values()))
    plot = plot_filters(dense["filters_per_layer"], first["summary"]["filters_per_layer"],
                        os.path.join(bench_dir, f"{cfg.name}_filters.png"), f"{next(iter(results['rows']))}")
    m, d = cfg.model, cfg.data
    lines = [
        "# Benchmarks", "",
        "Made by `pfgdf-plugin bench` (this file is rewritten by it; the raw numbers are in "
        f"`docs/bench/{cfg.name}.json`).", "",
        f"## {cfg.name}", "",
        f"- Model: `{m.name}`, width {m.width:g}, {fmt_count(dense['params'])} parameters, "
        f"{fmt_count(dense['macs'])} MACs.",
        f"- Data: `{d.name}` at {d.image_size}x{d.image_size}, {results['data_sizes'][0]} training / "
        f"{results['data_sizes'][1]} test images.",
        f"- Dense training: {cfg.train.epochs:g} epochs ({cfg.train.optimizer}, lr {cfg.train.lr:g}, "
        f"{cfg.train.schedule}). Every pruned model: {cfg.finetune.epochs:g} fine-tuning epochs "
        f"(lr {cfg.finetune.lr:g}).",
        f"- Latency: median of {cfg.repeats} runs after {cfg.warmup} warm-up runs on the CPU, every model "
        f"interleaved in one process, per engine and thread count; {results['machine']}.",
        *([f"- Quantization: NNI {q.method.upper()}, {q.bits}-bit, {q.epochs:g} epoch(s) at lr {q.lr:g} after "
            "fine-tuning (change against the fine-tuned float model in brackets); the int8 ONNX model is "
            f"ONNX Runtime's static QDQ quantization of those weights, calibrated on {q.calibration_batches} "
            "training batches."] if q.method else []),
        f"- Command: `{results['command'].strip()}` ({results['minutes']:.0f} minutes).", "",
        markdown_table(header, table), "",
        "CPU latency, median ms (speedup over dense):", "",
        markdown_table(lat_header, lat_rows), "",
        f"![filters per layer](bench/{os.path.basename(plot)})", "",
    ]
    with open(os.path.join(bench_dir, f"{cfg.name}.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines[4:]))
    _assemble(out_dir)
    print("\n".join(lines[6:]), flush=True)


def _assemble(out_dir: str) -> None:
    """``benchmarks.md`` = the header plus every bench's section (``bench/<name>.md``), by name."""
    bench_dir = os.path.join(out_dir, "bench")
    parts = ["# Benchmarks", "",
             "Made by `pfgdf-plugin bench [--config FILE]`; each run rewrites its own section "
             "(`bench/<name>.md`, raw numbers in `bench/<name>.json`) and this page is assembled from them.",
             ""]
    for fname in sorted(os.listdir(bench_dir)):
        if fname.endswith(".md"):
            with open(os.path.join(bench_dir, fname), encoding="utf-8") as f:
                parts += [f.read().rstrip(), ""]
    with open(os.path.join(out_dir, "benchmarks.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
