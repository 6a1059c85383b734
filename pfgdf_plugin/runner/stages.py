"""A recipe's stages, each a function of one :class:`RunState`:
data -> dense -> prune -> fine-tune -> quantize -> export -> measure -> report.

Every rank of a distributed run goes through data, dense, prune, fine-tune and quantize (and
checks that the ranks agree); export, measure and report are rank 0's. What an interrupted run
left in the staging folder (the dense model, the pruned model, training checkpoints) is picked
up by the stage it belongs to.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .. import distributed, measure
from ..persist import load_pruned, save_pruned
from ..pruning import METHODS, Method, PruneContext, PruneResult, prune, trains_from_scratch
from ..quantize import quantize
from ..recipe import Recipe
from ..report import comparison_rows, plot_filters, text_table, write_report
from ..tracking import CurveWriter
from ..train import Checkpointing, read_checkpoint, recording, seed_everything, train
from .exports import export_int8, export_onnx, ort_models
from .staging import publish_stage
from .steps import Data, dense_weights, finetune, load_data, measure_model, new_model, prune_and_score


@dataclass
class RunState:
    """Everything one run's stages read and write.

    Attributes:
        recipe: the validated recipe.
        stage: the staging folder (see :mod:`.staging`).
        quiet: print nothing but errors (every rank but 0 is quiet).
        on_finetune_epoch: called with ``(epoch, test accuracy)`` after each fine-tuning epoch.
        data: the data set and loaders; ``parallel_loader`` is this rank's share of the training set.
        resume_dense / resume_pruned: the interrupted run left the dense / pruned model.
        dense: the dense model; ``result`` the pruning stage's result (``result.model`` is
            fine-tuned in place); ``quantized`` a quantized copy, if any.
        metrics: what the stages measured, under the keys of ``metrics.json``.
        output: the run's final metrics (rank 0: as written to ``metrics.json``).
        curves: rank 0's writer of ``curves.csv`` (every training epoch of the run).
    """

    recipe: Recipe
    stage: str
    quiet: bool = False
    on_finetune_epoch: Optional[Callable[[int, float], None]] = None
    t0: float = field(default_factory=time.perf_counter)
    timings: Dict[str, float] = field(default_factory=dict)
    data: Optional[Data] = None
    parallel_loader: Any = None
    resume_dense: bool = False
    resume_pruned: bool = False
    dense: Optional[nn.Module] = None
    result: Optional[PruneResult] = None
    quantized: Optional[nn.Module] = None
    metrics: Dict[str, Any] = field(default_factory=dict)
    output: Dict[str, Any] = field(default_factory=dict)
    curves: Optional[CurveWriter] = None

    @property
    def progress(self) -> bool:
        return self.recipe.progress and not self.quiet

    @property
    def method(self) -> Method:
        return METHODS.get(self.recipe.prune.method)

    @property
    def arch(self) -> Dict[str, Any]:
        m, spec = self.recipe.model, self.data.spec
        return {"name": m.name, "width": m.width, "num_classes": spec.num_classes, "in_channels": spec.in_channels}

    def path(self, name: str) -> str:
        return os.path.join(self.stage, name)

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def recording(self):
        """Record every training epoch inside the block to ``curves.csv`` (rank 0)."""
        return recording(self.curves)

    def phase(self, phase: int) -> None:
        """Seed every random source for one phase, so a resumed run repeats it exactly."""
        seed = self.recipe.seed + 1000 * phase
        seed_everything(seed)
        if getattr(self.data.train_loader, "generator", None) is not None:
            self.data.train_loader.generator.manual_seed(seed)


def _distributed_loader(spec, d, seed: int):
    """This rank's share of the training set; the recipe's batch size is the global batch."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(spec.train, num_replicas=distributed.world_size(), rank=distributed.rank(),
                                 shuffle=True, seed=seed)
    return DataLoader(spec.train, batch_size=max(1, d.batch_size // distributed.world_size()), sampler=sampler,
                      num_workers=d.workers)


def data_stage(s: RunState) -> None:
    """Data set and loaders; what an interrupted run left, decided once for every rank."""
    r = s.recipe
    seed_everything(r.seed)
    s.log(f"[1/7] data: {r.data.name}")
    if distributed.is_main():
        s.curves = CurveWriter(s.stage)
    s.data = load_data(r.data, r.seed)
    s.parallel_loader = (_distributed_loader(s.data.spec, r.data, r.seed) if distributed.active()
                         else s.data.train_loader)
    s.resume_dense, s.resume_pruned = distributed.broadcast_object(
        (os.path.exists(s.path("dense.pt")), os.path.exists(s.path("pruned-init.pt"))
         and os.path.exists(s.path("prune.json"))))


def dense_stage(s: RunState) -> None:
    """The dense model: the interrupted run's, the recipe's checkpoint, or trained (resumably); left
    as initialised when the method trains from scratch (:attr:`~pfgdf_plugin.pruning.Method.from_scratch`),
    which then runs the ``train`` section itself in the prune stage."""
    r, m = s.recipe, s.recipe.model
    s.log(f"[2/7] model: {m.name} (width {m.width:g}), {len(s.data.spec.train)} training images")
    model = new_model(m, s.data, log=s.log)
    t = time.perf_counter()
    if s.resume_dense:
        s.log("      resuming: dense model from the interrupted run")

    def fit() -> None:
        s.phase(1)
        with s.recording():
            train(model, s.parallel_loader, r.train, device=r.device, desc="train", progress=s.progress,
                  checkpoint=Checkpointing(s.path("train.ckpt.pt"), r.checkpoint_every))

    scratch = trains_from_scratch(r.prune.method, r.prune.params)
    if scratch:  # the method trains from initialisation: the train section is its budget (see prune_stage)
        s.log(f"      not trained here: {r.prune.method} trains from initialisation ({r.train.epochs:g} epoch(s) of "
              "the train section, in the prune stage)")
    dense_weights(model, s.path("dense.pt"), fit if r.train.epochs > 0 and not scratch else None,
                  checkpoint=m.checkpoint, cached=s.resume_dense, write=distributed.is_main())
    s.timings["train_s"] = time.perf_counter() - t
    s.dense = model
    s.metrics["before"] = measure_model(model, s.data, r.device, "eval dense", s.progress)


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return None


def _save_pruned(s: RunState, after_prune: Dict[str, Any]) -> None:
    """The pruned model and its result, for a resumed run to start from."""
    res = s.result
    save_pruned(res.model, s.path("pruned-init.pt"), arch=s.arch)
    fused = None if res.fused_calibration is None else {n: {} for n in res.fused_calibration}
    blob = {"layers": res.layers, "extra": {k: _jsonable(v) for k, v in res.extra.items()},
            "fused_calibration": fused, "after_prune": after_prune}
    tmp = s.path("prune.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(blob, f, default=float)
    os.replace(tmp, s.path("prune.json"))


def _load_pruned(s: RunState) -> Dict[str, Any]:
    p = s.recipe.prune
    model, _ = load_pruned(s.path("pruned-init.pt"))
    saved = json.load(open(s.path("prune.json"), encoding="utf-8"))
    s.result = PruneResult(model, saved["layers"], p.method, p.framework, saved["extra"],
                           saved.get("fused_calibration"))
    return saved["after_prune"]


def prune_stage(s: RunState) -> None:
    """Prune a copy of the dense model (or take the interrupted run's); ranks must agree."""
    r, p = s.recipe, s.recipe.prune
    t = time.perf_counter()
    if s.resume_pruned:
        s.log(f"[3/7] prune: {p.method} via {p.framework} (resuming: pruned model from the interrupted run)")
        after_prune = _load_pruned(s)
    else:
        s.log(f"[3/7] prune: {p.method} via {p.framework}")
        s.phase(2)
        ctx = PruneContext(train_loader=s.data.train_loader, train_cfg=r.finetune, device=r.device,
                           progress=s.progress, quantize=r.quantize, checkpoint=s.path("prune.ckpt.pt"),
                           checkpoint_every=r.checkpoint_every, initial_train=r.train,
                           initial_checkpoint=s.path("train.ckpt.pt"))
        with s.recording():  # the trainings a method runs while it prunes (SPP, MPD's masked training)
            s.result, after_prune, _ = prune_and_score(
                lambda: prune(s.dense, s.data.example, p.method, p.framework, p.params, p.ratio, p.ignored_layers,
                              ctx=ctx, target=p.target, timing=p.timing), s.data, r.device, s.progress)
        if distributed.is_main():
            _save_pruned(s, after_prune)
    s.metrics["after_prune_accuracy"] = after_prune["accuracy"]
    s.timings["prune_s"] = time.perf_counter() - t
    s.metrics["distributed"] = None
    if distributed.active():  # every rank pruned on its own: check they agree
        info = {"world_size": distributed.world_size(),
                "pruned_identical": distributed.same_on_all_ranks(s.result.model.state_dict().values())}
        for key, tensors in s.method.rank_checks(s.result).items():
            info[key] = distributed.same_on_all_ranks(tensors)
        s.metrics["distributed"] = info


def finetune_stage(s: RunState) -> None:
    """Fine-tune the pruned model (resumably), evaluating after every epoch."""
    r, pruned = s.recipe, s.result.model
    s.log(f"[4/7] fine-tune: {r.finetune.epochs:g} epoch(s)")
    t = time.perf_counter()
    ckpt = s.path("finetune.ckpt.pt")
    log = list((read_checkpoint(ckpt) or {}).get("extra", {}).get("log", []))

    def on_epoch(epoch: int) -> None:
        acc = measure.evaluate(pruned, s.data.test_loader, r.device, "eval", False)["accuracy"]
        log.append({"epoch": epoch + 1, "accuracy": acc})
        if s.curves is not None:
            s.curves.note(test_accuracy=acc)
        pruned.train()
        if s.on_finetune_epoch is not None:
            s.on_finetune_epoch(epoch, acc)

    teacher = s.dense if r.finetune.distill_weight > 0 else None
    s.phase(3)
    with s.recording():
        finetune(pruned, s.parallel_loader, r.finetune, r.device, "fine-tune", s.progress, teacher=teacher,
                 on_epoch=on_epoch, checkpoint=Checkpointing(ckpt, r.checkpoint_every, lambda: {"log": list(log)}))
    s.timings["finetune_s"] = time.perf_counter() - t
    s.metrics["finetune_log"] = log
    s.metrics["after"] = measure_model(pruned, s.data, r.device, "eval fine-tuned", s.progress)
    if s.metrics["distributed"] is not None:
        s.metrics["distributed"]["finetuned_identical"] = distributed.same_on_all_ranks(pruned.state_dict().values())


def quantize_stage(s: RunState) -> None:
    """Quantize a copy of the fine-tuned model with NNI (``quantize.method``), if asked."""
    q, r = s.recipe.quantize, s.recipe
    s.metrics["quantized"] = None
    if not q.method:
        s.log("[5/7] quantize: skipped (quantize.method is null)")
        return
    s.log(f"[5/7] quantize: {q.bits}-bit {q.method}" + (" (also fused with pruning)" if q.fused else ""))
    t = time.perf_counter()
    s.phase(4)
    s.quantized = copy.deepcopy(s.result.model)
    with s.recording():
        qres = quantize(s.quantized, q, s.data.train_loader, r.device, s.progress)
    info = {"method": q.method, "bits": q.bits, "scheme": q.config_list()[0]["quant_scheme"], "fused": q.fused,
            "steps": qres.steps, "layers": len(qres.calibration),
            "accuracy": measure.evaluate(s.quantized, s.data.test_loader, r.device, "eval quantized",
                                         s.progress)["accuracy"]}
    if s.result.fused_calibration is not None:
        info["fused_layers"] = len(s.result.fused_calibration)
    qres.quantizer.unwrap_model()  # float weights trained (or calibrated) for integer arithmetic
    s.quantized.cpu().eval()
    s.timings["quantize_s"] = time.perf_counter() - t
    s.metrics["quantized"] = info


def export_stage(s: RunState) -> None:
    """Save the pruned model; export the float models and the int8 model to ONNX (rank 0)."""
    if not distributed.is_main():
        return
    r, pruned, x = s.recipe, s.result.model, s.data.example
    s.log("[6/7] save and export")
    save_pruned(pruned, s.path("pruned.pt"), arch=s.arch)
    s.metrics["onnx"] = None
    if not r.export.onnx:
        return
    info = export_onnx(pruned, x, s.path("pruned.onnx"))
    if info.get("status") == "ok" and "max_abs_diff" in info:
        export_onnx(s.dense, x, s.path("dense.onnx"))
        if s.quantized is not None:
            info["int8"] = export_int8(s.quantized, x, s.stage, s.data.train_loader, s.data.test_loader,
                                       r.quantize.calibration_batches, s.progress)
    s.metrics["onnx"] = info


def measure_stage(s: RunState) -> None:
    """CPU latency of the dense and the pruned model (and of their ONNX Runtime sessions) (rank 0)."""
    if not distributed.is_main():
        return
    s.log("[7/7] measure and report")
    rep = s.recipe.report
    s.metrics["latency"] = None
    if not rep.latency:
        return
    shape, kw = s.data.input_shape, {"warmup": rep.warmup, "repeats": rep.repeats, "threads": rep.threads}
    lat = measure.measure_latency({"dense": s.dense, "pruned": s.result.model}, shape, rep.batch_sizes, **kw)
    s.metrics["latency"] = {str(bs): {"dense": lat["dense"][bs]["median_ms"], "pruned": lat["pruned"][bs]["median_ms"]}
                            for bs in rep.batch_sizes}
    ort = ort_models(s.stage, rep.threads)
    if ort:
        lat = measure.measure_latency(ort, shape, rep.batch_sizes, **kw)
        s.metrics["onnx"]["latency"] = {str(bs): {k: lat[k][bs]["median_ms"] for k in ort} for bs in rep.batch_sizes}


def _metrics(s: RunState) -> Dict[str, Any]:
    """``metrics.json``: the run's description, every stage's measurements, the method's own entries."""
    r, x = s.recipe, s.metrics
    m, p = r.model, r.prune
    return {"name": r.name, "model": f"{m.name} (width {m.width:g})", "data": s.data.describe(r.data.name),
            "method": p.method, "framework": p.framework, "finetune_epochs": r.finetune.epochs,
            "before": x["before"], "after": x["after"], "after_prune_accuracy": x["after_prune_accuracy"],
            "finetune_log": x["finetune_log"], "latency": x["latency"], "onnx": x["onnx"],
            "quantized": x["quantized"],
            "layers": {n: {k: v for k, v in e.items() if k != "statistic"} for n, e in s.result.layers.items()},
            "torch_threads": torch.get_num_threads(), "distributed": x["distributed"]}


def report_stage(s: RunState) -> None:
    """Write ``metrics.json``, ``report.md`` and the plots, publish the run folder, print the table."""
    x = s.metrics
    if not distributed.is_main():  # rank 0 saves, exports, measures and reports
        s.output = {"rank": distributed.rank(), "before": x["before"], "after": x["after"],
                    "quantized": x["quantized"], "distributed": x["distributed"], "finetune_log": x["finetune_log"]}
        return
    metrics = _metrics(s)
    plots: List[str] = []
    if s.recipe.report.plots:
        plots.append(plot_filters(x["before"]["filters_per_layer"], x["after"]["filters_per_layer"],
                                  s.path("filters_per_layer.png"), f"{s.recipe.prune.method}: filters per layer"))
    own, own_plots = s.method.report(s.result, s.stage if s.recipe.report.plots else None)
    metrics.update(own)
    plots += own_plots
    s.timings["total_s"] = time.perf_counter() - s.t0
    metrics["timings"] = s.timings
    if s.curves is not None:
        s.curves.close()
        metrics["curves"] = os.path.basename(s.curves.path) if os.path.exists(s.curves.path) else None
    with open(s.path("metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2, default=float)
    write_report(s.stage, metrics, plots)
    final = publish_stage(s.stage, s.recipe)
    metrics["run_dir"] = final
    s.output = metrics
    if not s.quiet:
        print()
        print(text_table(["metric", "before", "after", "change"],
                         comparison_rows(x["before"], x["after"], x["latency"], x["quantized"], x["onnx"])))
        print(f"\nreport: {os.path.join(final, 'report.md')}  ({s.timings['total_s']:.0f} s)")
        sys.stdout.flush()


STAGES = (data_stage, dense_stage, prune_stage, finetune_stage, quantize_stage, export_stage, measure_stage,
          report_stage)
