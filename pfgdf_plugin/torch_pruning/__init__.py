"""Torch-Pruning adapters: importance criteria and pruners built on ``tp.pruner.BasePruner``."""

from .dbp import DBPPruner, DiscriminationImportance
from .mpd import MPDPruner
from .pfgdf import GaussianImportance, PFGDFPruner, auto_k_prune
from .spp import SPPImportance, SPPPruner
from .target import prune_to_target

__all__ = ["DBPPruner", "DiscriminationImportance", "GaussianImportance", "MPDPruner", "PFGDFPruner",
           "SPPImportance", "SPPPruner", "auto_k_prune", "prune_to_target"]
