"""A run's staging folder: claimed with a lock, kept for ``--resume`` after a failure, renamed to
``<output_dir>/<name>`` when the run succeeds (never over an earlier run)."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import yaml

from ..errors import RunError
from ..recipe import Recipe

STAGE_LOCK = "run.lock"
CHECKPOINTS = ("dense.pt", "train.ckpt.pt", "prune.ckpt.pt", "finetune.ckpt.pt", "pruned-init.pt")
RESUME_ONLY = (STAGE_LOCK, "train.ckpt.pt", "prune.ckpt.pt", "finetune.ckpt.pt", "pruned-init.pt", "prune.json")


def stage_dir(recipe: Recipe) -> str:
    return os.path.join(recipe.output_dir, f".{recipe.name}.partial")


def final_dir(output_dir: str, name: str) -> str:
    """``<output_dir>/<name>``, or with a time suffix when an earlier run holds that name."""
    path = os.path.join(output_dir, name)
    if not os.path.exists(path):
        return path
    return f"{path}-{time.strftime('%Y%m%d-%H%M%S')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def has_checkpoints(stage: str) -> bool:
    return any(os.path.exists(os.path.join(stage, f)) for f in CHECKPOINTS)


def _diff_keys(a: Any, b: Any, prefix: str = "") -> set:
    if isinstance(a, dict) and isinstance(b, dict):
        out = set()
        for k in set(a) | set(b):
            out |= _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


def _reopen(recipe: Recipe, stage: str, lock: str, resume: bool) -> None:
    """Check that an existing staging folder may be continued by this run."""
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


def claim_stage(recipe: Recipe, resume: bool) -> str:
    """Create (or, with ``resume``, reopen) the run's staging folder and lock it with our pid."""
    stage = stage_dir(recipe)
    lock = os.path.join(stage, STAGE_LOCK)
    if os.path.exists(stage):
        _reopen(recipe, stage, lock, resume)
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


def release_stage(stage: str, keep: bool) -> None:
    """After a failure: keep a resumable folder (unlocked), or remove one with nothing to resume."""
    if keep:
        lock = os.path.join(stage, STAGE_LOCK)
        if os.path.exists(lock):
            os.unlink(lock)
    else:
        shutil.rmtree(stage, ignore_errors=True)


def publish_stage(stage: str, recipe: Recipe) -> str:
    """Remove the resume-only files of a finished run and move its folder to its final name."""
    for f in RESUME_ONLY:
        if os.path.exists(os.path.join(stage, f)):
            os.unlink(os.path.join(stage, f))
    final = final_dir(recipe.output_dir, recipe.name)
    os.replace(stage, final)
    return final
