"""Torch-Pruning adapters: importance criteria and pruners built on ``tp.pruner.BasePruner``."""

from .pfgdf import GaussianImportance, PFGDFPruner

__all__ = ["GaussianImportance", "PFGDFPruner"]
