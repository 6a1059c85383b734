"""Run a recipe: data -> dense model -> prune -> fine-tune -> quantize -> export -> measure -> report.

Each stage is a function of one :class:`~pfgdf_plugin.runner.stages.RunState`
(:mod:`pfgdf_plugin.runner.stages`). Outputs go to a staging folder that is renamed to
``<output_dir>/<name>`` only when the run succeeds; an earlier run of the same name is never
overwritten (the new one gets a time suffix), and the input checkpoint is only ever read
(:mod:`pfgdf_plugin.runner.staging`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from .. import distributed
from ..errors import RunError
from ..recipe import Recipe
from .exports import export_int8, export_onnx
from .staging import claim_stage, has_checkpoints, release_stage
from .stages import STAGES, RunState
from .steps import load_checkpoint

__all__ = ["RunError", "RunState", "STAGES", "export_int8", "export_onnx", "load_checkpoint", "run_recipe"]


def _open_stage(recipe: Recipe, resume: bool, started_group: bool) -> str:
    """Rank 0 claims the staging folder; every rank gets it, or every rank fails."""
    stage, error = None, None
    if distributed.is_main():
        try:
            stage = claim_stage(recipe, resume)
        except (RunError, OSError) as e:
            error = str(e)
    stage, error = distributed.broadcast_object((stage, error))
    if error:
        if started_group:
            distributed.shutdown(True)
        raise RunError(error)
    return stage


def run_recipe(recipe: Recipe, quiet: bool = False,
               on_finetune_epoch: Optional[Callable[[int, float], None]] = None,
               resume: bool = False) -> Dict[str, Any]:
    """Run every stage of ``recipe``; return the metrics (also written to ``metrics.json``).

    Under ``torchrun`` every rank runs the training stages and rank 0 alone writes the run.

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
    was_up = distributed.active()
    started_group = distributed.init_from_env(recipe.device) and not was_up
    state = RunState(recipe, _open_stage(recipe, resume, started_group), quiet=quiet or not distributed.is_main(),
                     on_finetune_epoch=on_finetune_epoch)
    try:
        for stage in STAGES:
            stage(state)
    except BaseException as e:
        if distributed.is_main():
            keep = resume or isinstance(e, KeyboardInterrupt) or has_checkpoints(state.stage)
            release_stage(state.stage, keep=keep)
        if started_group:
            distributed.shutdown(True)
        raise
    if started_group:
        distributed.barrier()  # ranks leave together once rank 0 has written the run
        distributed.shutdown(True)
    return state.output
