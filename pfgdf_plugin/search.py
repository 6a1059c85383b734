"""NNI hyper-parameter searches over a recipe: the trial entry point and the experiment runner.

A search-space parameter is named by the recipe key it sets (``prune.params.k``,
``prune.ratio``, ``finetune.lr``); each trial reads its parameters with
``nni.get_next_parameter()``, applies them to the recipe as ``--set`` overrides, runs it,
reports the test accuracy after every fine-tuning epoch as an intermediate result, and reports
``{"default": accuracy, "params": ..., "macs": ..., "latency_ms": ...}`` as its final result.

Two ways to start a search (see ``docs/recipes.md``)::

    nnictl create --config recipes/nni/pfgdf_search.yml --port 8080     # NNI's command line
    pfgdf-plugin search recipes/nni/pfgdf_search.yml --max-trials 4    # Python API, stops NNI when done
"""

from __future__ import annotations

import math
import os
import shlex
import socket
import sys
import time
from typing import Any, Dict, List, Optional

import yaml

from .config import ConfigError, load_yaml, set_by_path
from .errors import SearchError
from .recipe import recipe_from_dict

TRIAL = "pfgdf-plugin trial"


def _format(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def apply_parameters(data: Dict[str, Any], params: Dict[str, Any]) -> List[str]:
    """Apply search-space ``params`` (recipe key -> value) to recipe ``data`` in place; return them
    as ``key=value`` override strings."""
    overrides = []
    for key, value in params.items():
        if not isinstance(key, str) or not key or key.startswith("_"):
            raise SearchError(f"search-space parameter {key!r} maps to no recipe key")
        item = f"{key}={_format(value)}"
        try:
            set_by_path(data, item)
        except ConfigError as e:
            raise SearchError(f"search-space parameter {key!r} maps to no recipe key ({'; '.join(e.errors)})") from None
        overrides.append(item)
    return overrides


def _check_mapping(data: Dict[str, Any], params: Dict[str, Any], source: str) -> None:
    """Raise :class:`SearchError` naming every parameter that is not a valid recipe key/value."""
    try:
        recipe_from_dict(data, source)
    except ConfigError as e:
        names = [k for k in params if any(k in err for err in e.errors)]
        hint = f"search-space parameter(s) {', '.join(names)}: " if names else "after the trial's parameters: "
        raise SearchError(hint + "; ".join(e.errors)) from None


def run_trial(recipe_path: str, overrides: Optional[List[str]] = None, params: Optional[Dict[str, Any]] = None,
              quiet: bool = False) -> Dict[str, Any]:
    """Run one NNI trial of ``recipe_path`` and report to NNI; returns the final result.

    Args:
        recipe_path: the recipe to run.
        overrides: ``key=value`` overrides applied before the trial's parameters.
        params: the trial's parameters; ``None`` asks NNI (``nni.get_next_parameter()``).
    """
    import nni

    data = load_yaml(recipe_path)
    for item in overrides or []:
        set_by_path(data, item)
    if params is None:
        params = nni.get_next_parameter() or {}
    apply_parameters(data, params)
    trial_id = os.environ.get("NNI_TRIAL_JOB_ID")
    if os.environ.get("NNI_OUTPUT_DIR"):
        data["output_dir"] = os.environ["NNI_OUTPUT_DIR"]
    if trial_id:
        data["name"] = f"{data.get('name', 'run')}-{trial_id}"
    data["progress"] = False
    _check_mapping(data, params, recipe_path)
    recipe = recipe_from_dict(data, recipe_path)

    from .runner import run_recipe

    def report(epoch: int, accuracy: float) -> None:
        nni.report_intermediate_result(float(accuracy))

    metrics = run_recipe(recipe, quiet=quiet, on_finetune_epoch=report)
    final: Dict[str, Any] = {"default": float(metrics["after"]["accuracy"]), "params": int(metrics["after"]["params"]),
                             "macs": int(metrics["after"]["macs"])}
    if metrics.get("latency"):
        final["latency_ms"] = float(metrics["latency"][min(metrics["latency"], key=int)]["pruned"])
    if metrics.get("quantized"):
        final["quantized_accuracy"] = float(metrics["quantized"]["accuracy"])
    nni.report_final_result(final)
    return final


# ----------------------------------------------------------------------------- experiments
def _sample(spec: Dict[str, Any], key: str) -> Any:
    """One value a search-space entry can produce (to check its key before any trial runs)."""
    if not isinstance(spec, dict) or "_type" not in spec or "_value" not in spec:
        raise SearchError(f"searchSpace.{key}: expected {{_type: ..., _value: [...]}}, got {spec!r}")
    kind, values = spec["_type"], spec["_value"]
    if not isinstance(values, list) or not values:
        raise SearchError(f"searchSpace.{key}._value must be a non-empty list, got {values!r}")
    if kind == "choice":
        return values[0]
    if kind == "randint":
        return int(values[0])
    if kind in ("uniform", "quniform", "loguniform", "qloguniform", "normal", "qnormal", "lognormal", "qlognormal"):
        return float(values[0])
    raise SearchError(f"searchSpace.{key}._type {kind!r} is not an NNI search-space type")


def trial_recipe(trial_command: str, code_dir: str) -> tuple:
    """``(recipe path, overrides)`` of a ``pfgdf-plugin trial RECIPE [--set k=v ...]`` command."""
    words = shlex.split(trial_command)
    try:
        i = words.index("trial")
    except ValueError:
        raise SearchError(f"trialCommand must run '{TRIAL} RECIPE', got {trial_command!r}") from None
    rest = words[i + 1:]
    if not rest or rest[0].startswith("-"):
        raise SearchError(f"trialCommand names no recipe: {trial_command!r}")
    overrides = [rest[j + 1] for j, w in enumerate(rest[:-1]) if w == "--set"]
    return os.path.normpath(os.path.join(code_dir, rest[0])), overrides


def load_experiment(path: str, overrides: Optional[List[str]] = None, max_trials: Optional[int] = None,
                    work_dir: Optional[str] = None):
    """Load an NNI experiment YAML, check that every search-space key is a recipe key, and make
    its trial command run with this Python (``python -m pfgdf_plugin trial``).

    Args:
        overrides: ``--set`` overrides appended to every trial's recipe.
        max_trials: replaces ``maxTrialNumber``.
        work_dir: replaces ``experimentWorkingDirectory`` (logs and trial outputs).

    Returns:
        an ``nni.experiment.ExperimentConfig``.
    """
    from nni.experiment import ExperimentConfig

    raw = load_yaml(path)
    for key in ("searchSpace", "trialCommand"):
        if key not in raw:
            raise SearchError(f"{path}: missing {key}")
    space = raw["searchSpace"]
    if not isinstance(space, dict) or not space:
        raise SearchError(f"{path}: searchSpace must be a non-empty mapping of recipe keys")
    code_dir = os.path.join(os.path.dirname(os.path.abspath(path)), raw.get("trialCodeDirectory", "."))
    recipe_path, trial_overrides = trial_recipe(raw["trialCommand"], code_dir)
    if not os.path.exists(recipe_path):
        raise SearchError(f"{path}: trialCommand's recipe {recipe_path} does not exist")
    data = load_yaml(recipe_path)
    for item in trial_overrides + list(overrides or []):
        set_by_path(data, item)
    sample = {k: _sample(v, k) for k, v in space.items()}
    apply_parameters(data, sample)
    _check_mapping(data, sample, recipe_path)

    try:
        config = ExperimentConfig.load(path)
    except Exception as e:
        raise SearchError(f"{path}: not an NNI experiment config ({type(e).__name__}: {e})") from None
    command = shlex.split(raw["trialCommand"])
    i = command.index("trial")
    tail = command[i + 1:] + [w for item in overrides or [] for w in ("--set", item)]
    config.trial_command = " ".join([shlex.quote(sys.executable), "-m", "pfgdf_plugin", "trial"]
                                    + [shlex.quote(w) for w in tail])
    if max_trials is not None:
        config.max_trial_number = int(max_trials)
    if work_dir is not None:
        config.experiment_working_directory = os.path.abspath(work_dir)
    return config


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_search(path: str, overrides: Optional[List[str]] = None, max_trials: Optional[int] = None,
               work_dir: Optional[str] = None, port: Optional[int] = None, timeout: Optional[float] = None,
               poll: float = 2.0, quiet: bool = False) -> Dict[str, Any]:
    """Run an NNI experiment to completion with ``nni.experiment.Experiment`` and stop it.

    The NNI manager is always stopped before this returns, on success, failure or Ctrl-C.

    Returns:
        ``{"id", "status", "trials": [{"trial", "parameters", "result"}...], "best"}``, trials
        sorted by their ``default`` metric, best first.
    """
    from nni.experiment import Experiment

    config = load_experiment(path, overrides, max_trials, work_dir)
    port = port or free_port()
    experiment = Experiment(config)
    t0 = time.monotonic()
    status = "UNKNOWN"
    try:
        experiment.start(port)
        if not quiet:
            print(f"NNI experiment {experiment.id} on port {port}: {config.max_trial_number} trial(s)", flush=True)
        while True:
            status = experiment.get_status()
            if status in ("DONE", "STOPPED", "ERROR"):
                break
            if timeout is not None and time.monotonic() - t0 > timeout:
                status = "TIMEOUT"
                break
            time.sleep(poll)
        trials = []
        for r in experiment.export_data():
            value = r.value
            result = value if isinstance(value, dict) else {"default": value}
            trials.append({"trial": r.trialJobId, "parameters": r.parameter, "result": result})
        jobs = {j.trialJobId: j.status for j in experiment.list_trial_jobs()}
        eid = experiment.id
    finally:
        experiment.stop()
    trials.sort(key=lambda t: -_metric(t["result"]))
    failed = [j for j, s in jobs.items() if s in ("FAILED", "SYS_CANCELED", "USER_CANCELED")]
    out = {"id": eid, "status": status, "port": port, "trials": trials, "failed_trials": failed,
           "best": trials[0] if trials else None}
    if status in ("ERROR", "TIMEOUT"):
        raise SearchError(f"NNI experiment {eid} ended with status {status} after {len(trials)} finished trial(s); "
                          f"logs under {config.experiment_working_directory}/{eid}")
    return out


def _metric(result: Dict[str, Any]) -> float:
    v = result.get("default")
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else -math.inf
