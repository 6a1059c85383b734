"""The torchvision zoo conformance sweep: every method of the plugin on every classifier Torch-Pruning can prune.

The list is found, not written down: every model of ``torchvision.models.list_models(module=torchvision.models)``
(``weights=None``, ``num_classes=10``) that Torch-Pruning's ``MagnitudeImportance`` prunes with a plain
``tp.pruner.MetaPruner`` (ratio 0.3, the final classifier ignored) at the smallest input of :data:`SIZES` that
the model takes. The others are listed with the reason. Each model of the list then goes through :data:`CHECKS`;
a check passes, fails with the plugin's own documented error (a :class:`~pfgdf_plugin.errors.PluginError`, or
:func:`pfgdf_plugin.nni.speedup`'s documented refusal of a model it cannot trace), or fails with anything else:
a bug, listed as such. :func:`write_markdown` writes the counts, the model x check table and every failure.

Run it with ``make zoo`` or ``python -m pfgdf_plugin.zoo_sweep --out docs/zoo.md``.

Example:
    >>> r = run_check(lambda case: None, None)
    >>> r.status, r.cell()
    ('pass', 'pass')
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .errors import PluginError

__all__ = ["CHECKS", "Case", "Result", "SIZES", "eligible", "main", "run_check", "sweep", "write_markdown",
           "zoo_models"]

SIZES: Tuple[int, ...] = (32, 64, 128, 224)  # input sizes tried, smallest first
NUM_CLASSES = 10
RATIO = 0.3
PASS, PLUGIN, OTHER = "pass", "documented error", "other failure"
# pfgdf_plugin.nni.speedup's documented refusals (its docstring's Raises): plain RuntimeError / ValueError
_SPEEDUP_REFUSALS = ("torch.fx could not trace", "outputs a single feature per sample")


@dataclass
class Result:
    """One check on one model: ``status`` is ``pass``, ``plugin error`` or ``other failure``."""

    status: str
    error: str = ""
    message: str = ""
    seconds: float = 0.0

    def cell(self) -> str:
        """The table cell: ``pass`` or the error's type."""
        return PASS if self.status == PASS else self.error


@dataclass
class Case:
    """One model of the list: its name, input size and a dense copy to start every check from."""

    name: str
    size: int
    dense: nn.Module
    cache: Dict[str, object] = field(default_factory=dict)

    def fresh(self) -> nn.Module:
        """A deep copy of the dense model, in eval mode, with a fixed seed for what follows."""
        torch.manual_seed(0)
        return copy.deepcopy(self.dense).eval()

    def x(self, batch: int = 2) -> torch.Tensor:
        """A fixed random batch at the case's size."""
        return torch.randn(batch, 3, self.size, self.size, generator=torch.Generator().manual_seed(batch))

    def data(self, batches: int = 2, batch: int = 20) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """A few random labelled batches (every class present) for the data-driven methods."""
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(batch, 3, self.size, self.size, generator=g), torch.arange(batch) % NUM_CLASSES)
                for _ in range(batches)]


def build(name: str) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=10)`` in eval mode (seeded)."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES).eval()


def classifier(model: nn.Module) -> Tuple[str, nn.Module]:
    """The final classifier: the last Linear or Conv2d producing ``NUM_CLASSES`` outputs."""
    found = [(n, m) for n, m in model.named_modules()
             if (isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES)
             or (isinstance(m, nn.Conv2d) and m.out_channels == NUM_CLASSES)]
    if not found:
        raise ValueError(f"{type(model).__name__}: no Linear/Conv2d with {NUM_CLASSES} outputs to ignore")
    return found[-1]


def _check_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y = model.eval()(x)
    if tuple(y.shape) != (x.shape[0], NUM_CLASSES) or not torch.isfinite(y).all():
        raise AssertionError(f"output {tuple(y.shape)} (finite: {bool(torch.isfinite(y).all())}), "
                             f"expected ({x.shape[0]}, {NUM_CLASSES}) finite")
    return y


def _meta_prune(model: nn.Module, x: torch.Tensor, importance) -> nn.Module:
    import torch_pruning as tp

    pruner = tp.pruner.MetaPruner(model, x[:1], importance=importance, pruning_ratio=RATIO,
                                  ignored_layers=[classifier(model)[1]])
    pruner.step()
    _check_output(model, x)
    return model


def _fewer_params(pruned: nn.Module, dense: nn.Module) -> None:
    before, after = (sum(p.numel() for p in m.parameters()) for m in (dense, pruned))
    if after >= before:
        raise AssertionError(f"not smaller: {after} parameters after, {before} before")


# --------------------------------------------------------------------------- the checks


def check_gaussian(case: Case) -> None:
    """``GaussianImportance`` in a ``MetaPruner`` (ratio 0.3): the result runs and is smaller."""
    from .torch_pruning import GaussianImportance

    _fewer_params(_meta_prune(case.fresh(), case.x(), GaussianImportance()), case.dense)


def check_pfgdf(case: Case) -> None:
    """``PFGDFPruner`` (its defaults), then ``step()``: the result runs."""
    from .torch_pruning import PFGDFPruner

    model = case.fresh()
    PFGDFPruner(model, case.x(1), ignored_layers=[classifier(model)[1]]).step()
    _check_output(model, case.x())


def check_discrimination(case: Case) -> None:
    """``DiscriminationImportance`` (two random batches) in a ``MetaPruner``: the result runs, is smaller."""
    from .torch_pruning import DiscriminationImportance

    imp = DiscriminationImportance(data=case.data(), num_batches=2, num_classes=NUM_CLASSES)
    _fewer_params(_meta_prune(case.fresh(), case.x(), imp), case.dense)


def check_spp(case: Case) -> None:
    """``SPPPruner`` (ratio 0.3, ``A=0.9``, ``interval=1``): ``update()`` until finished (at most 8), ``step()``."""
    from .torch_pruning import SPPPruner

    model = case.fresh()
    pruner = SPPPruner(model, case.x(1), pruning_ratio=RATIO, interval=1, A=0.9,
                       ignored_layers=[classifier(model)[1]])
    for _ in range(8):
        pruner.update()
        if pruner.finished:
            break
    pruner.step()
    _check_output(model, case.x())
    _fewer_params(model, case.dense)


def check_dbp(case: Case) -> None:
    """DBP: ``find_blocks`` (``DBPError`` if none), then ``DBPPruner(target={"blocks": 1})`` removes one."""
    from .methods.dbp import find_blocks
    from .torch_pruning import DBPPruner

    model = case.fresh()
    find_blocks(model, case.x(1))
    pruner = DBPPruner(model, case.x(1), data=case.data(), target={"blocks": 1}, num_batches=2,
                       num_classes=NUM_CLASSES)
    pruner.step()
    if len(pruner.removed) != 1:
        raise AssertionError(f"removed {len(pruner.removed)} blocks, asked for 1")
    _check_output(model, case.x())


def check_mpd(case: Case) -> None:
    """``MPDPruner(compression=2)`` then ``step()``: converted == masked within 1e-4 (relative to the max)."""
    from .torch_pruning import MPDPruner

    model = case.fresh()
    x = case.x()
    pruner = MPDPruner(model, x[:1], compression=2.0)
    masked = _check_output(model, x)
    pruner.step()
    converted = _check_output(model, x)
    err = float((masked - converted).abs().max() / masked.abs().max().clamp_min(1e-12))
    if err > 1e-4:
        raise AssertionError(f"converted differs from masked by {err:.2e} (relative), more than 1e-4")


def check_nni(case: Case) -> None:
    """NNI ``PFGDFPruner`` on the Conv2d layers (classifier excluded; coupled layers grouped with
    ``dependency_config_list``, as ``speedup`` asks), ``compress``, ``unwrap``, ``speedup``."""
    from .nni import PFGDFPruner, dependency_config_list, speedup

    model = case.fresh()
    config = [{"op_types": ["Conv2d"], "exclude_op_names": [classifier(model)[0]]}]
    pruner = PFGDFPruner(model, dependency_config_list(model, case.x(1), config))
    _, masks = pruner.compress()
    pruner.unwrap_model()
    speedup(model, masks, case.x(4))
    _check_output(model, case.x())


def _gaussian_pruned(case: Case) -> nn.Module:
    if "gaussian" not in case.cache:
        from .torch_pruning import GaussianImportance

        case.cache["gaussian"] = _meta_prune(case.fresh(), case.x(), GaussianImportance())
    return copy.deepcopy(case.cache["gaussian"]).eval()


def check_persist(case: Case) -> None:
    """``save_pruned`` / ``load_pruned`` of the GaussianImportance-pruned model: identical outputs."""
    from .persist import load_pruned, save_pruned

    pruned = _gaussian_pruned(case)
    x = case.x()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pruned.pt")
        save_pruned(pruned, path)
        loaded, _ = load_pruned(path, case.fresh())
    a, b = _check_output(pruned, x), _check_output(loaded, x)
    if not torch.equal(a, b):
        raise AssertionError(f"loaded model differs from the saved one by {float((a - b).abs().max()):.2e}")


def check_onnx(case: Case) -> None:
    """ONNX export of the GaussianImportance-pruned model, run by onnxruntime: within 1e-4 relative."""
    from .measure import OnnxRuntimeModel, export_onnx

    pruned = _gaussian_pruned(case)
    x = case.x()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pruned.onnx")
        export_onnx(pruned, x[:1], path)
        got = OnnxRuntimeModel(path, threads=1)(x)
    want = _check_output(pruned, x)
    err = float((want - got).abs().max() / want.abs().max().clamp_min(1e-12))
    if err > 1e-4:
        raise AssertionError(f"onnxruntime differs from PyTorch by {err:.2e} (relative), more than 1e-4")


CHECKS: Dict[str, Callable[[Case], None]] = {
    "gaussian": check_gaussian, "pfgdf": check_pfgdf, "discrimination": check_discrimination, "spp": check_spp,
    "dbp": check_dbp, "mpd": check_mpd, "nni_speedup": check_nni, "persist": check_persist, "onnx": check_onnx,
}


def _documented(exc: BaseException, check: Optional[str]) -> bool:
    if isinstance(exc, PluginError):
        return True
    return check == "nni_speedup" and isinstance(exc, (RuntimeError, ValueError)) \
        and any(s in str(exc) for s in _SPEEDUP_REFUSALS)


def run_check(fn: Callable[[Case], None], case: Optional[Case], name: Optional[str] = None) -> Result:
    """Run one check; a documented error gives ``plugin error``, anything else ``other failure``."""
    start = time.perf_counter()
    try:
        fn(case)
    except Exception as exc:  # the sweep records every failure instead of stopping
        status = PLUGIN if _documented(exc, name) else OTHER
        line = " ".join(re.sub(re.escape(tempfile.gettempdir()) + r"/\w+/", "", str(exc)).split())[:300]
        return Result(status, type(exc).__name__, line, time.perf_counter() - start)
    return Result(PASS, seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------- the list


def zoo_models() -> List[str]:
    """Every classification model of ``torchvision.models`` (``list_models(module=torchvision.models)``)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def param_count(name: str) -> int:
    """The model's parameter count at 1000 classes, from its torchvision weights' metadata (no build)."""
    import torchvision

    try:
        return int(torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"])
    except (ValueError, KeyError, AttributeError):  # no weights entry: count on the meta device
        with torch.device("meta"):
            model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)
        return sum(p.numel() for p in model.parameters())


def eligible(name: str, sizes: Sequence[int] = SIZES) -> Tuple[Optional[Case], str]:
    """``(Case, "")`` when ``MagnitudeImportance`` in a plain ``MetaPruner`` prunes ``name`` (ratio 0.3,
    classifier ignored) at the smallest size of ``sizes`` its forward pass takes; else ``(None, reason)``."""
    import torch_pruning as tp

    dense = build(name)
    forward_errors = []
    for size in sizes:
        case = Case(name, size, dense)
        try:
            _check_output(dense, case.x())
        except Exception as exc:  # a size the model does not take: try the next one
            forward_errors.append(f"{size}: {type(exc).__name__}")
            continue
        try:
            _fewer_params(_meta_prune(case.fresh(), case.x(), tp.importance.MagnitudeImportance()), dense)
        except Exception as exc:  # the model is outside the list; the reason is recorded
            return None, f"MagnitudeImportance at {size}x{size}: {type(exc).__name__}: " \
                         + " ".join(str(exc).split())[:240]
        return case, ""
    return None, "no input size works (" + ", ".join(forward_errors) + ")"


def sweep(names: Sequence[str], checks: Optional[Sequence[str]] = None, max_params: float = float("inf"),
          log: Callable[[str], None] = print, budget: float = float("inf"),
          clock: Callable[[], float] = time.monotonic,
          after_each: Optional[Callable[[Dict[str, object]], None]] = None, isolate: bool = False,
          threads: int = 1, memory_gb: Optional[float] = None) -> Dict[str, object]:
    """Find the list among ``names`` and run ``checks`` (default: all of :data:`CHECKS`) on each model.

    ``after_each(out)`` is called with the results so far after every model (the command line rewrites
    the markdown file, so a sweep cut short keeps what it did). ``isolate=True`` runs each model in its own
    process (``threads`` torch threads, address space capped at ``memory_gb``): a check that kills its process
    (out of memory, a crash in native code) is recorded as that check's failure and the sweep goes on.

    Returns ``{"checks": [...], "rows": {model: {"size": s, "results": {check: Result}}},
    "excluded": {model: reason}, "skipped": {model: reason}}``. Models above ``max_params`` parameters,
    and every model left once ``budget`` seconds (of ``clock``) have passed, are skipped with the reason.
    """
    checks = list(CHECKS) if checks is None else list(checks)
    out = {"checks": checks, "rows": {}, "excluded": {}, "skipped": {}}
    start = clock()
    for name in names:
        params = param_count(name)
        if params > max_params:
            out["skipped"][name] = f"{params / 1e6:.0f}M parameters, above the sweep's {max_params / 1e6:.0f}M"
            log(f"{name}: skipped ({out['skipped'][name]})")
            continue
        if clock() - start > budget:
            out["skipped"][name] = f"the sweep's time budget ({budget:.0f} s) ran out before this model"
            continue
        if isolate:
            size, results, reason = _sweep_isolated(name, checks, threads, memory_gb)
        else:
            case, reason = eligible(name)
            size, results = (case.size, {c: run_check(CHECKS[c], case, c) for c in checks}) if case else (0, {})
        if reason:
            out["excluded"][name] = reason
            log(f"{name}: not in the list ({reason})")
            continue
        out["rows"][name] = {"size": size, "params": params, "results": results}
        log(f"{name} @{size}: " + ", ".join(f"{c}={r.cell()}" for c, r in results.items()))
        if after_each is not None:
            after_each(out)
    return out


def _sweep_one(name: str, checks: Sequence[str], path: str) -> None:
    """In a child process: ``eligible`` and the checks of one model, the results written to ``path`` (JSON)
    after each check, so the parent knows how far a process that died got."""
    case, reason = eligible(name)
    state: Dict[str, object] = {"reason": reason, "size": case.size if case else 0, "results": {}}

    def save() -> None:
        with open(path + ".tmp", "w") as f:
            json.dump(state, f)
        os.replace(path + ".tmp", path)

    save()
    for c in checks if case else ():
        state["results"][c] = dataclasses.asdict(run_check(CHECKS[c], case, c))
        save()


def _died(code: int, memory_gb: Optional[float]) -> str:
    if code < 0:
        sig = signal.Signals(-code).name
        why = " (the kernel's out-of-memory killer, most likely)" if sig == "SIGKILL" else ""
        return f"the check's process was killed by {sig}{why}"
    cap = f" (address space capped at {memory_gb:g} GB)" if memory_gb else ""
    return f"the check's process exited with code {code}{cap}"


def _sweep_isolated(name: str, checks: Sequence[str], threads: int, memory_gb: Optional[float]
                    ) -> Tuple[int, Dict[str, Result], str]:
    """``(size, {check: Result}, reason)`` of one model, each run of checks in a child process; a check whose
    process dies is recorded as an ``other failure`` naming how it died, and the rest run in a new process."""
    results: Dict[str, Result] = {}
    size, reason = 0, ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.json")
        while True:
            todo = [c for c in checks if c not in results]
            cmd = [sys.executable, "-m", "pfgdf_plugin.zoo_sweep", "--one", name, "--state", path,
                   "--threads", str(threads), "--checks", *todo]
            if memory_gb:
                cmd += ["--memory-gb", str(memory_gb)]
            start = time.perf_counter()
            code = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
            state = {"results": {}}
            if os.path.exists(path):
                with open(path) as f:
                    state = json.load(f)
            size, reason = state.get("size", 0), state.get("reason", "")
            results.update({c: Result(**r) for c, r in state["results"].items()})
            if code == 0 or reason:
                return size, results, reason
            if not size and "size" not in state:  # died before finding the input size
                return 0, {}, f"building or trying the model: {_died(code, memory_gb)}"
            dead = next(c for c in checks if c not in results)
            results[dead] = Result(OTHER, "ProcessDied", _died(code, memory_gb), time.perf_counter() - start)
            if all(c in results for c in checks):
                return size, results, ""


# --------------------------------------------------------------------------- docs/zoo.md


def _counts(out: Dict[str, object]) -> List[str]:
    rows = out["rows"]
    lines = ["| check | pass | documented error | other failure |", "|---|---|---|---|"]
    for c in out["checks"]:
        statuses = [row["results"][c].status for row in rows.values()]
        lines.append(f"| {c} | {statuses.count(PASS)} | {statuses.count(PLUGIN)} | {statuses.count(OTHER)} |")
    return lines


def write_markdown(out: Dict[str, object], path: str, seconds: Optional[float] = None,
                   note: str = "") -> None:
    """Write the sweep: counts at the top, then the model x check table, then every failure's reason."""
    rows, checks = out["rows"], out["checks"]
    total = len(rows) + len(out["excluded"]) + len(out["skipped"])
    lines = ["# Torchvision zoo conformance sweep", "",
             "Written by `python -m pfgdf_plugin.zoo_sweep --out docs/zoo.md` (`make zoo`); see the module's "
             "docstring for what each check does. `weights=None`, `num_classes=10`, CPU, one thread. A documented "
             "error is a `PluginError` subclass, or `pfgdf_plugin.nni.speedup`'s documented refusal (a plain "
             "`RuntimeError`/`ValueError` naming the layer NNI cannot handle); any other failure is a bug.", "",
             f"Models in `torchvision.models.list_models(module=torchvision.models)`: {total}; in the list "
             f"(MagnitudeImportance prunes them with a plain MetaPruner, ratio {RATIO}): {len(rows)}; not in the "
             f"list: {len(out['excluded'])}; skipped: {len(out['skipped'])}."
             + (f" Sweep time: {seconds:.0f} s." if seconds is not None else ""), ""]
    if note:
        lines += [note, ""]
    lines += ["## Counts", ""] + _counts(out) + ["", "## Model x check", "",
                                                  "| model | input | " + " | ".join(checks) + " |",
                                                  "|---|---|" + "---|" * len(checks)]
    for name, row in rows.items():
        cells = [r.cell() if r.status != OTHER else f"**{r.cell()}** (bug)" for r in row["results"].values()]
        lines.append(f"| {name} | {row['size']} | " + " | ".join(cells) + " |")
    lines += ["", "## Failures", ""]
    failures = [(n, c, r) for n, row in rows.items() for c, r in row["results"].items() if r.status != PASS]
    for n, c, r in failures:
        tag = "documented error" if r.status == PLUGIN else "other failure (a bug)"
        lines.append(f"- **{n}** / {c} ({tag}): `{r.error}`: {r.message.replace('|', '/')}")
    if not failures:
        lines.append("None.")
    lines += ["", "## Not in the list", ""] + [f"- **{n}**: {why}" for n, why in out["excluded"].items()]
    lines += ["", "## Skipped", ""] + [f"- **{n}**: {why}" for n, why in out["skipped"].items()]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


def to_json(out: Dict[str, object]) -> Dict[str, object]:
    """The sweep's results as plain JSON (see :func:`from_json`)."""
    rows = {n: {**r, "results": {c: dataclasses.asdict(x) for c, x in r["results"].items()}}
            for n, r in out["rows"].items()}
    return {**out, "rows": rows}


def from_json(blob: Dict[str, object]) -> Dict[str, object]:
    """Inverse of :func:`to_json`."""
    rows = {n: {**r, "results": {c: Result(**x) for c, x in r["results"].items()}} for n, r in blob["rows"].items()}
    return {**blob, "rows": rows}


def merge(parts: Sequence[Dict[str, object]]) -> Dict[str, object]:
    """Several sweeps' results as one, the models smallest first; where two sweeps ran a model, the later
    part's results are kept, check by check (a rerun of some checks with more memory, say).

    Example:
        >>> a = {"checks": ["onnx"], "rows": {"alexnet": {"size": 64, "params": 2, "results": {}}},
        ...      "excluded": {}, "skipped": {"vgg11": "time"}}
        >>> b = {"checks": ["onnx"], "rows": {"vgg11": {"size": 32, "params": 9, "results": {}}},
        ...      "excluded": {}, "skipped": {}}
        >>> list(merge([a, b])["rows"]), merge([a, b])["skipped"]
        (['alexnet', 'vgg11'], {})
    """
    out = {"checks": list(parts[0]["checks"]), "rows": {}, "excluded": {}, "skipped": {}}
    for part in parts:  # a later sweep of a model (say, with more memory) replaces an earlier one
        for name, row in part["rows"].items():
            out["excluded"].pop(name, None)
            if name in out["rows"]:  # a rerun of some checks: those checks' results replace the earlier ones
                out["rows"][name] = {**row, "results": {**out["rows"][name]["results"], **row["results"]}}
            else:
                out["rows"][name] = row
        for name, why in part["excluded"].items():
            out["rows"].pop(name, None)
            out["excluded"][name] = why
    swept = set(out["rows"]) | set(out["excluded"])
    for part in parts:
        out["skipped"].update({n: why for n, why in part["skipped"].items() if n not in swept})
    out["rows"] = dict(sorted(out["rows"].items(), key=lambda item: item[1]["params"]))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``python -m pfgdf_plugin.zoo_sweep --out docs/zoo.md [--models a b] [--max-params 1e8]``."""
    ap = argparse.ArgumentParser(prog="python -m pfgdf_plugin.zoo_sweep", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/zoo.md", help="the markdown file to write")
    ap.add_argument("--models", nargs="*", help="these models only (default: the whole torchvision list)")
    ap.add_argument("--checks", nargs="*", choices=list(CHECKS), help="these checks only (default: all)")
    ap.add_argument("--max-params", type=float, default=float("inf"),
                    help="skip models with more parameters (time and memory on a small machine; default: none)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--budget", type=float, default=float("inf"), help="seconds; the models left are skipped")
    ap.add_argument("--memory-gb", type=float, default=None,
                    help="cap each model's process at this much address space (default: none)")
    ap.add_argument("--in-process", action="store_true",
                    help="run every model in this process (default: one process per model)")
    ap.add_argument("--json", help="also write the results as JSON here (for --merge)")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="write --out from these sweeps' JSON files (a later file's result wins); run nothing")
    ap.add_argument("--largest-first", action="store_true", help="sweep the largest models first")
    ap.add_argument("--seconds", type=float, default=None, help="with --merge: the sweeps' total time, for the page")
    ap.add_argument("--note", default="", help="with --merge: a paragraph under the page's header (how it was run)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child process: this model only
    ap.add_argument("--state", help=argparse.SUPPRESS)  # ... writing its results here
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        if args.memory_gb:
            import resource

            cap = int(args.memory_gb * 2 ** 30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        import warnings

        warnings.filterwarnings("ignore")
        _sweep_one(args.one, args.checks or list(CHECKS), args.state)
        return 0
    import warnings

    warnings.filterwarnings("ignore")
    if args.merge:
        parts = []
        for path in args.merge:
            with open(path) as f:
                parts.append(from_json(json.load(f)))
        write_markdown(merge(parts), args.out, args.seconds, note=args.note)
        print(f"wrote {args.out} from {len(parts)} sweeps", file=sys.stderr)
        return 0
    start = time.perf_counter()
    names = sorted(args.models or zoo_models(), key=param_count)  # smallest first: most models within a budget
    if args.largest_first:
        names.reverse()

    def save(so_far: Dict[str, object], note: str = "") -> None:
        write_markdown(so_far, args.out, time.perf_counter() - start, note=note)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(to_json(so_far), f, indent=1)
    out = sweep(names, args.checks, args.max_params,
                log=lambda s: print(s, file=sys.stderr, flush=True), budget=args.budget,
                isolate=not args.in_process, threads=args.threads, memory_gb=args.memory_gb,
                after_each=lambda so_far: save(so_far, "(sweep in progress)"))
    save(out)
    print(f"wrote {args.out}: {len(out['rows'])} models swept", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
