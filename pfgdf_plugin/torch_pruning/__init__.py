"""Torch-Pruning adapters: importance criteria and pruners built on ``tp.pruner.BasePruner``."""

from .pfgdf import GaussianImportance, PFGDFPruner, auto_k_prune

__all__ = ["GaussianImportance", "PFGDFPruner", "auto_k_prune"]
