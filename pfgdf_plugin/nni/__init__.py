"""NNI 3.0 adapters: ``nni.compression`` pruners that call :mod:`pfgdf_plugin.methods`, and speedup helpers.

Importing this subpackage imports NNI; ``import pfgdf_plugin`` alone does not.

See :class:`PFGDFPruner` for an example of pruning and speedup.
"""

from .dbp import DBPPruner
from .mpd import MPDPruner, convert
from .pfgdf import PFGDFPruner
from .spp import SPPPruner
from .speedup import apply_masks, dependency_config_list, speedup

__all__ = ["DBPPruner", "MPDPruner", "PFGDFPruner", "SPPPruner", "apply_masks", "convert", "dependency_config_list",
           "speedup"]
