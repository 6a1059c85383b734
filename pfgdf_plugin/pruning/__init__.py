"""The pruning stage of a recipe: one registry entry per method, one function per framework.

Each entry validates the method's ``prune.params`` (one typed dataclass per method), calls the
method's adapter, and reports what is its own (:attr:`Method.report`). Built-in criteria of
Torch-Pruning and NNI are registered too, so a recipe can compare against them on the same model
and budget (:func:`prune_like`, :func:`prune_matching`).

Modules: :mod:`.registry` (``Method``, ``METHODS``, validation, :func:`prune`), one module per
method (:mod:`.pfgdf`, :mod:`.spp`, :mod:`.dbp`, :mod:`.mpd`, :mod:`.builtin`, :mod:`.baselines`), each
registering itself, and :mod:`.compare`.
"""

from . import baselines, builtin, dbp, mpd, pfgdf, spp  # noqa: F401  (each registers its method)
from .compare import prune_like, prune_matching
from .registry import (FRAMEWORKS, METHODS, Method, NoParams, PruneContext, PruneResult, parse_params, prune,
                       resolve_layers, trains_from_scratch, validate_params)

__all__ = [
    "FRAMEWORKS",
    "METHODS",
    "Method",
    "NoParams",
    "PruneContext",
    "PruneResult",
    "parse_params",
    "prune",
    "prune_like",
    "prune_matching",
    "resolve_layers",
    "trains_from_scratch",
    "validate_params",
]
