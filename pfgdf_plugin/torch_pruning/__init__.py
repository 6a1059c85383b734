"""Torch-Pruning adapters: importance criteria and pruners built on ``tp.pruner.BasePruner``."""

from .pfgdf import GaussianImportance, PFGDFPruner, auto_k_prune
from .spp import SPPImportance, SPPPruner

__all__ = ["GaussianImportance", "PFGDFPruner", "SPPImportance", "SPPPruner", "auto_k_prune"]
