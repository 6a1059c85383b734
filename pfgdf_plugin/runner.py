"""Run a recipe: data -> model (train or load) -> prune -> fine-tune -> quantize -> export -> report.

Outputs go to a staging folder that is renamed to ``<output_dir>/<name>`` only when the run
succeeds; an earlier run of the same name is never overwritten (the new one gets a time
suffix), and the input checkpoint is only ever read.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Dict, Optional

import torch
import yaml

from .errors import RunError
from . import distributed, measure
from .data import build_dataset, make_loaders
from .models import build_model
from .persist import load_pruned, save_pruned
from .pruning import PruneContext, PruneResult, prune
from .quantize import onnx_int8, quantize
from .recipe import Recipe
from .report import (comparison_rows, plot_dbp_blocks, plot_filters, plot_gaussians, plot_mpd_blocks,
                     plot_probabilities, text_table, write_report)
from .train import Checkpointing, atomic_save, read_checkpoint, seed_everything, train


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def _final_dir(output_dir: str, name: str) -> str:
    path = os.path.join(output_dir, name)
    if not os.path.exists(path):
        return path
    return f"{path}-{time.strftime('%Y%m%d-%H%M%S')}"


def load_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Load a plain state dict (or a dict with ``state_dict``) with ``weights_only=True``."""
    if not os.path.exists(path):
        raise RunError(f"model.checkpoint: no such file {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunError(f"model.checkpoint {path}: cannot be loaded safely ({type(e).__name__}: {e})") from None
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise RunError(f"model.checkpoint {path}: expected a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).splitlines()[:2])
        raise RunError(f"model.checkpoint {path} does not fit model {type(model).__name__}: {detail}") from None


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str) -> Dict[str, Any]:
    """Export to ONNX; when onnxruntime is installed, check its output against torch."""
    info: Dict[str, Any] = {"file": os.path.basename(path)}
    try:
        import onnx  # noqa: F401
    except ImportError:
        return {"status": "skipped: onnx is not installed (pip install 'pfgdf-plugin[export]')"}
    try:
        measure.export_onnx(model, example, path)
    except Exception as e:  # export is a report stage: record, never lose the run
        return {"status": f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    info["status"] = "ok"
    try:
        ort_model = measure.OnnxRuntimeModel(path)
    except ImportError:
        return info
    with torch.no_grad():
        info["max_abs_diff"] = float((model.eval()(example) - ort_model(example)).abs().max())
    return info


def export_int8(quantized: torch.nn.Module, example: torch.Tensor, stage: str, train_loader, test_loader,
                recipe: Recipe, progress: bool) -> Dict[str, Any]:
    """Float ONNX of the quantization-trained weights, rewritten to int8 QDQ by ONNX Runtime;
    its test accuracy is measured through ONNX Runtime."""
    float_path = os.path.join(stage, ".quantized-float.onnx")
    path = os.path.join(stage, "pruned-int8.onnx")
    try:
        measure.export_onnx(quantized, example, float_path)
        onnx_int8(float_path, path, train_loader, batches=min(recipe.quantize.calibration_batches, len(train_loader)))
        acc = measure.evaluate(measure.OnnxRuntimeModel(path), test_loader, "cpu", "eval int8 onnx", progress)
    except ImportError:
        return {"status": "skipped: onnxruntime is not installed (pip install 'pfgdf-plugin[export]')"}
    except Exception as e:  # export is a report stage: record, never lose the run
        return {"status": f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    finally:
        if os.path.exists(float_path):
            os.unlink(float_path)
    return {"status": "ok", "file": os.path.basename(path), "accuracy": acc["accuracy"]}


def _ort_models(stage: str, threads: Optional[int]) -> Dict[str, Any]:
    files = {"dense": "dense.onnx", "pruned": "pruned.onnx", "pruned int8": "pruned-int8.onnx"}
    try:
        return {k: measure.OnnxRuntimeModel(os.path.join(stage, f), threads) for k, f in files.items()
                if os.path.exists(os.path.join(stage, f))}
    except ImportError:
        return {}


def run_recipe(recipe: Recipe, quiet: bool = False,
               on_finetune_epoch: Optional[Callable[[int, float], None]] = None,
               resume: bool = False) -> Dict[str, Any]:
    """Run every stage of ``recipe``; return the metrics (also written to ``metrics.json``).

    Args:
        recipe: a validated recipe (see :func:`pfgdf_plugin.recipe.load_recipe`).
        quiet: print nothing but errors.
        on_finetune_epoch: called with ``(epoch, test_accuracy)`` after each fine-tuning epoch
            (NNI trials report intermediate results through it).
        resume: continue the interrupted run of this recipe from its staging folder
            (``<output_dir>/.<name>.partial``): the dense model, the pruned model and the
            training checkpoints found there are reused, and the run ends as an uninterrupted
            one would. Without it, a leftover staging folder is an error that says so.
    """
    t0 = time.perf_counter()
    timings: Dict[str, float] = {}
    was_up = distributed.active()
    started_group = distributed.init_from_env(recipe.device) and not was_up
    main = distributed.is_main()
    quiet = quiet or not main
    progress = recipe.progress and not quiet
    stage, error = None, None
    if main:
        try:
            stage = _claim_stage(recipe, resume)
        except (RunError, OSError) as e:
            error = str(e)
    stage, error = distributed.broadcast_object((stage, error))  # every rank fails, or none does
    if error:
        if started_group:
            distributed.shutdown(True)
        raise RunError(error)
    try:
        metrics = _run(recipe, stage, quiet, progress, on_finetune_epoch, t0, timings)
    except BaseException as e:
        if main:
            _release_stage(stage, keep=resume or isinstance(e, KeyboardInterrupt) or _has_checkpoints(stage))
        if started_group:
            distributed.shutdown(True)
        raise
    if started_group:
        distributed.barrier()  # ranks leave together once rank 0 has written the run
        distributed.shutdown(True)
    return metrics


STAGE_LOCK = "run.lock"
CHECKPOINTS = ("dense.pt", "train.ckpt.pt", "prune.ckpt.pt", "finetune.ckpt.pt", "pruned-init.pt")


def _stage_dir(recipe: Recipe) -> str:
    return os.path.join(recipe.output_dir, f".{recipe.name}.partial")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _has_checkpoints(stage: str) -> bool:
    return any(os.path.exists(os.path.join(stage, f)) for f in CHECKPOINTS)


def _claim_stage(recipe: Recipe, resume: bool) -> str:
    """Create (or, with ``resume``, reopen) the run's staging folder and lock it with our pid."""
    stage = _stage_dir(recipe)
    lock = os.path.join(stage, STAGE_LOCK)
    if os.path.exists(stage):
        try:
            pid = int(open(lock, encoding="utf-8").read().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid and pid != os.getpid() and _alive(pid):
            raise RunError(f"run {recipe.name!r} is already in progress (pid {pid}, folder {stage})")
        if not resume:
            raise RunError(f"an interrupted run of {recipe.name!r} is waiting in {stage}: continue it with "
                           "`pfgdf-plugin run RECIPE --resume`, or delete that folder to start over")
        saved = yaml.safe_load(open(os.path.join(stage, "recipe.yaml"), encoding="utf-8"))
        now = yaml.safe_load(yaml.safe_dump(recipe.to_dict()))
        diff = sorted(_diff_keys(saved, now) - {"progress"})
        if diff:
            raise RunError(f"--resume: the recipe differs from the interrupted run's at {', '.join(diff)} "
                           f"(saved in {os.path.join(stage, 'recipe.yaml')})")
    else:
        if resume:
            raise RunError(f"--resume: no interrupted run of {recipe.name!r} in {recipe.output_dir} "
                           f"(no folder {stage})")
        os.makedirs(stage)
        with open(os.path.join(stage, "recipe.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(recipe.to_dict(), f, sort_keys=False)
    with open(lock, "w", encoding="utf-8") as f:
        f.write(str(os.getpid()))
    return stage


def _release_stage(stage: str, keep: bool) -> None:
    """After a failure: keep a resumable folder (unlocked), or remove one with nothing to resume."""
    if keep:
        lock = os.path.join(stage, STAGE_LOCK)
        if os.path.exists(lock):
            os.unlink(lock)
    else:
        shutil.rmtree(stage, ignore_errors=True)


def _diff_keys(a: Any, b: Any, prefix: str = "") -> set:
    if isinstance(a, dict) and isinstance(b, dict):
        out = set()
        for k in set(a) | set(b):
            out |= _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


def _phase(recipe: Recipe, loader, phase: int) -> None:
    """Seed every random source for one phase, so a resumed run repeats it exactly."""
    seed_everything(recipe.seed + 1000 * phase)
    if getattr(loader, "generator", None) is not None:
        loader.generator.manual_seed(recipe.seed + 1000 * phase)


def _distributed_loader(spec, d, seed: int):
    """This rank's share of the training set; the recipe's batch size is the global batch."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(spec.train, num_replicas=distributed.world_size(), rank=distributed.rank(),
                                 shuffle=True, seed=seed)
    return DataLoader(spec.train, batch_size=max(1, d.batch_size // distributed.world_size()), sampler=sampler,
                      num_workers=d.workers)


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return None


def _run(recipe: Recipe, stage: str, quiet: bool, progress: bool, on_finetune_epoch, t0: float,
         timings: Dict[str, float]) -> Dict[str, Any]:
    seed_everything(recipe.seed)
    d = recipe.data
    _log(f"[1/7] data: {d.name}", quiet)
    spec = build_dataset(d.name, root=d.root, image_size=d.image_size, in_channels=d.in_channels,
                         limit_train=d.limit_train, limit_test=d.limit_test, seed=recipe.seed)
    train_loader, test_loader = make_loaders(spec, d.batch_size, workers=d.workers, seed=recipe.seed)
    parallel_loader = _distributed_loader(spec, d, recipe.seed) if distributed.active() else train_loader
    example = next(iter(test_loader))[0][:1]
    input_shape = tuple(example.shape[1:])
    main = distributed.is_main()
    dense_path = os.path.join(stage, "dense.pt")
    init_path, prune_json = os.path.join(stage, "pruned-init.pt"), os.path.join(stage, "prune.json")
    # what an interrupted run left, decided once for every rank before anyone writes
    have_dense, have_pruned = distributed.broadcast_object(
        (os.path.exists(dense_path), os.path.exists(init_path) and os.path.exists(prune_json)))

    m = recipe.model
    _log(f"[2/7] model: {m.name} (width {m.width:g}), {len(spec.train)} training images", quiet)
    model = build_model(m.name, num_classes=spec.num_classes, in_channels=spec.in_channels, width=m.width)
    t = time.perf_counter()
    if have_dense:
        _log("      resuming: dense model from the interrupted run", quiet)
        load_checkpoint(model, dense_path)
    elif m.checkpoint:
        load_checkpoint(model, m.checkpoint)
    elif recipe.train.epochs > 0:
        _phase(recipe, train_loader, 1)
        ckpt = os.path.join(stage, "train.ckpt.pt")
        train(model, parallel_loader, recipe.train, device=recipe.device, desc="train", progress=progress,
              checkpoint=Checkpointing(ckpt, recipe.checkpoint_every))
    timings["train_s"] = time.perf_counter() - t
    model.cpu().eval()
    if main and not have_dense:
        atomic_save({"state_dict": model.state_dict()}, dense_path)
    before = measure.summarize(model, example)
    before.update(measure.evaluate(model, test_loader, recipe.device, "eval dense", progress))

    p = recipe.prune
    arch = {"name": m.name, "width": m.width, "num_classes": spec.num_classes, "in_channels": spec.in_channels}
    t = time.perf_counter()
    if have_pruned:
        _log(f"[3/7] prune: {p.method} via {p.framework} (resuming: pruned model from the interrupted run)", quiet)
        pruned, _ = load_pruned(init_path)
        saved = json.load(open(prune_json, encoding="utf-8"))
        result = PruneResult(pruned, saved["layers"], p.method, p.framework, saved["extra"])
        after_prune = saved["after_prune"]
    else:
        _log(f"[3/7] prune: {p.method} via {p.framework}", quiet)
        _phase(recipe, train_loader, 2)
        ctx = PruneContext(train_loader=train_loader, train_cfg=recipe.finetune, device=recipe.device,
                           progress=progress, quantize=recipe.quantize,
                           checkpoint=os.path.join(stage, "prune.ckpt.pt"), checkpoint_every=recipe.checkpoint_every)
        result = prune(model, example, p.method, p.framework, p.params, p.ratio, p.ignored_layers, ctx=ctx)
        pruned = result.model
        after_prune = measure.evaluate(pruned, test_loader, recipe.device, "eval pruned", progress)
        extra = {k: _jsonable(v) for k, v in result.extra.items()}
        if "fused_calibration" in result.extra:
            extra["fused_calibration"] = {n: {} for n in result.extra["fused_calibration"]}
        if main:
            save_pruned(pruned, init_path, arch=arch)
            with open(prune_json + ".tmp", "w", encoding="utf-8") as f:
                json.dump({"layers": result.layers, "extra": extra, "after_prune": after_prune}, f, default=float)
            os.replace(prune_json + ".tmp", prune_json)
    timings["prune_s"] = time.perf_counter() - t
    dist_info = None
    if distributed.active():  # every rank pruned on its own: check they agree
        dist_info = {"world_size": distributed.world_size(),
                     "pruned_identical": distributed.same_on_all_ranks(pruned.state_dict().values())}
        history = result.extra.get("spp_history") or {}
        if history:
            dist_info["spp_probabilities_identical"] = distributed.same_on_all_ranks(
                torch.tensor(v[-1]) for v in history.values())

    _log(f"[4/7] fine-tune: {recipe.finetune.epochs:g} epoch(s)", quiet)
    t = time.perf_counter()
    ft_ckpt = os.path.join(stage, "finetune.ckpt.pt")
    saved_ft = read_checkpoint(ft_ckpt)
    ft_log = list((saved_ft or {}).get("extra", {}).get("log", []))

    def on_epoch(epoch: int) -> None:
        acc = measure.evaluate(pruned, test_loader, recipe.device, "eval", False)["accuracy"]
        ft_log.append({"epoch": epoch + 1, "accuracy": acc})
        pruned.train()
        if on_finetune_epoch is not None:
            on_finetune_epoch(epoch, acc)

    teacher = model if recipe.finetune.distill_weight > 0 else None
    _phase(recipe, train_loader, 3)
    train(pruned, parallel_loader, recipe.finetune, device=recipe.device, desc="fine-tune", teacher=teacher,
          progress=progress, on_epoch=on_epoch,
          checkpoint=Checkpointing(ft_ckpt, recipe.checkpoint_every, lambda: {"log": list(ft_log)}))
    timings["finetune_s"] = time.perf_counter() - t
    pruned.cpu().eval()
    after = measure.summarize(pruned, example)
    after.update(measure.evaluate(pruned, test_loader, recipe.device, "eval fine-tuned", progress))

    if dist_info is not None:
        dist_info["finetuned_identical"] = distributed.same_on_all_ranks(pruned.state_dict().values())

    q = recipe.quantize
    quantized, quant_info = None, None
    if q.method:
        _log(f"[5/7] quantize: {q.bits}-bit {q.method}" + (" (also fused with pruning)" if q.fused else ""), quiet)
        t = time.perf_counter()
        _phase(recipe, train_loader, 4)
        quantized = copy.deepcopy(pruned)
        qres = quantize(quantized, q, train_loader, recipe.device, progress)
        quant_info = {"method": q.method, "bits": q.bits, "scheme": q.config_list()[0]["quant_scheme"],
                      "fused": q.fused, "steps": qres.steps, "layers": len(qres.calibration),
                      "accuracy": measure.evaluate(quantized, test_loader, recipe.device, "eval quantized",
                                                   progress)["accuracy"]}
        if "fused_calibration" in result.extra:
            quant_info["fused_layers"] = len(result.extra["fused_calibration"])
        qres.quantizer.unwrap_model()  # float weights trained (or calibrated) for integer arithmetic
        quantized.cpu().eval()
        timings["quantize_s"] = time.perf_counter() - t
    else:
        _log("[5/7] quantize: skipped (quantize.method is null)", quiet)

    if not main:  # rank 0 saves, exports, measures and reports
        return {"rank": distributed.rank(), "before": before, "after": after, "quantized": quant_info,
                "distributed": dist_info, "finetune_log": ft_log}
    _log("[6/7] save and export", quiet)
    save_pruned(pruned, os.path.join(stage, "pruned.pt"), arch=arch)
    onnx_info = None
    if recipe.export.onnx:
        onnx_info = export_onnx(pruned, example, os.path.join(stage, "pruned.onnx"))
        if onnx_info.get("status") == "ok" and "max_abs_diff" in onnx_info:
            export_onnx(model, example, os.path.join(stage, "dense.onnx"))
            if quantized is not None:
                onnx_info["int8"] = export_int8(quantized, example, stage, train_loader, test_loader, recipe, progress)

    _log("[7/7] measure and report", quiet)
    latency = None
    if recipe.report.latency:
        r = recipe.report
        lat = measure.measure_latency({"dense": model, "pruned": pruned}, input_shape, r.batch_sizes,
                                      warmup=r.warmup, repeats=r.repeats, threads=r.threads)
        latency = {str(bs): {"dense": lat["dense"][bs]["median_ms"], "pruned": lat["pruned"][bs]["median_ms"]}
                   for bs in r.batch_sizes}
        ort = _ort_models(stage, r.threads)
        if ort:
            lat = measure.measure_latency(ort, input_shape, r.batch_sizes, warmup=r.warmup, repeats=r.repeats,
                                          threads=r.threads)
            onnx_info["latency"] = {str(bs): {k: lat[k][bs]["median_ms"] for k in ort} for bs in r.batch_sizes}
    metrics: Dict[str, Any] = {
        "name": recipe.name, "model": f"{m.name} (width {m.width:g})",
        "data": f"{d.name} ({len(spec.train)} train / {len(spec.test)} test, {input_shape})",
        "method": p.method, "framework": p.framework, "finetune_epochs": recipe.finetune.epochs,
        "before": before, "after": after, "after_prune_accuracy": after_prune["accuracy"],
        "finetune_log": ft_log, "latency": latency, "onnx": onnx_info, "quantized": quant_info,
        "layers": {n: {k: v for k, v in e.items() if k != "statistic"} for n, e in result.layers.items()},
        "torch_threads": torch.get_num_threads(), "distributed": dist_info,
    }
    plots = []
    if recipe.report.plots:
        plots.append(plot_filters(before["filters_per_layer"], after["filters_per_layer"],
                                  os.path.join(stage, "filters_per_layer.png"), f"{p.method}: filters per layer"))
        if p.method == "pfgdf":
            g = plot_gaussians(result.layers, float(result.extra.get("k", 1.0)),
                               os.path.join(stage, "pfgdf_gaussian.png"), result.extra.get("mode", "band"),
                               result.extra.get("statistic", "mean"))
            if g:
                plots.append(g)
        if result.extra.get("dbp_blocks"):
            plots.append(plot_dbp_blocks(result.extra["dbp_blocks"], os.path.join(stage, "dbp_blocks.png")))
        if result.extra.get("mpd_snapshot"):
            plots.append(plot_mpd_blocks(result.extra["mpd_snapshot"], result.layers,
                                         os.path.join(stage, "mpd_blocks.png")))
        if result.extra.get("spp_history"):
            plots.append(plot_probabilities(result.extra["spp_history"], result.extra["spp_history_every"],
                                            os.path.join(stage, "spp_probabilities.png")))
    if "dbp_removed" in result.extra:
        metrics["dbp"] = {"removed": result.extra["dbp_removed"], "macs_ratio": result.extra["dbp_macs_ratio"],
                          "latency_ratio": result.extra["dbp_latency_ratio"], "blocks": result.extra["dbp_blocks"]}
    if "mpd_compression" in result.extra:
        metrics["mpd"] = {"compression": result.extra["mpd_compression"], "folded": result.extra["mpd_folded"]}
    if "spp_steps" in result.extra:
        metrics["spp"] = {"steps": result.extra["spp_steps"], "finished": result.extra["spp_finished"]}
    timings["total_s"] = time.perf_counter() - t0
    metrics["timings"] = timings
    with open(os.path.join(stage, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2, default=float)
    write_report(stage, metrics, plots)
    for f in (STAGE_LOCK, "train.ckpt.pt", "prune.ckpt.pt", "finetune.ckpt.pt", "pruned-init.pt", "prune.json"):
        if os.path.exists(os.path.join(stage, f)):
            os.unlink(os.path.join(stage, f))  # resume-only files: the run is complete
    final = _final_dir(recipe.output_dir, recipe.name)
    os.replace(stage, final)
    metrics["run_dir"] = final
    if not quiet:
        print()
        print(text_table(["metric", "before", "after", "change"],
                         comparison_rows(before, after, latency, quant_info, onnx_info)))
        print(f"\nreport: {os.path.join(final, 'report.md')}  ({timings['total_s']:.0f} s)")
        sys.stdout.flush()
    return metrics
