"""NNI 3.0 adapters: ``nni.compression`` pruners that call :mod:`pfgdf_plugin.methods`, and speedup helpers.

Importing this subpackage imports NNI; ``import pfgdf_plugin`` alone does not.

Example:
    >>> import torch
    >>> from pfgdf_plugin.models import build_model
    >>> from pfgdf_plugin.nni import PFGDFPruner, speedup
    >>> model = build_model("vgg16_bn", width=0.25)
    >>> pruner = PFGDFPruner(model, [{"op_types": ["Conv2d"]}], k=1.0)
    >>> _, masks = pruner.compress()
    >>> pruner.unwrap_model()
    >>> model = speedup(model, masks, torch.randn(4, 3, 32, 32))
"""

from .pfgdf import PFGDFPruner
from .speedup import apply_masks, dependency_config_list, speedup

__all__ = ["PFGDFPruner", "apply_masks", "dependency_config_list", "speedup"]
