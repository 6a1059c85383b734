"""pfgdf-plugin: PFGDF, SPP, DBP and MPDCompress for Torch-Pruning and NNI.

Importing this package does not import NNI; ``pfgdf_plugin.nni`` does.

Example:
    >>> import torch, torch_pruning as tp, torchvision
    >>> from pfgdf_plugin import GaussianImportance
    >>> model = torchvision.models.resnet18(num_classes=10)
    >>> tp.pruner.MetaPruner(model, torch.randn(1, 3, 32, 32), importance=GaussianImportance(),
    ...                      pruning_ratio=0.5, ignored_layers=[model.fc]).step()
"""

from .errors import (BaselineError, ConfigError, DataNotFoundError, DBPError, ExportError, MemoryBudgetError,
                     MPDError, PFGDFError, PluginError, PrunedFileError, QuantizeError, RunError, SearchError, SPPError,
                     TargetError, UnknownNameError)
from .persist import load_pruned, save_pruned
from .torch_pruning import (DBPPruner, DiscriminationImportance, GaussianImportance, MPDPruner, PFGDFPruner,
                            SPPImportance, SPPPruner, auto_k_prune, prune_to_target)

__version__ = "0.1.0"

__all__ = [
    "BaselineError",
    "ConfigError",
    "DataNotFoundError",
    "DBPError",
    "ExportError",
    "MemoryBudgetError",
    "MPDError",
    "PluginError",
    "PrunedFileError",
    "QuantizeError",
    "RunError",
    "SearchError",
    "SPPError",
    "TargetError",
    "UnknownNameError",
    "DBPPruner",
    "DiscriminationImportance",
    "MPDPruner",
    "GaussianImportance",
    "PFGDFError",
    "PFGDFPruner",
    "SPPImportance",
    "SPPPruner",
    "auto_k_prune",
    "prune_to_target",
    "load_pruned",
    "save_pruned",
    "__version__",
]
