"""DBP: remove whole blocks (depth) chosen by the discrimination of their output features.

Framework-free: everything here works on a plain ``torch.nn.Module`` and tensors. The
Torch-Pruning and NNI adapters only choose how candidates and targets are named, pass in how
MACs are counted and latency is measured, and call :func:`prune_`.

Paper: Wang et al., "Discrimination based Block-level Pruning for Deep Model Acceleration",
arXiv 1912.10178. Only the abstract is public. The paper states that FLOPs reduction is not
speedup, and that whole blocks are removed, chosen by the discrimination of their output
features. Everything else is this project's reading (see docs/dbp.md); each choice is a
parameter:

* **Candidates** (:func:`find_blocks`, in :mod:`.blocks`): units whose input and output shapes
  match, so a removed block becomes ``nn.Identity``: ``Conv2d`` (equal channels, stride 1)
  followed by an optional ``BatchNorm2d`` and an optional activation, as consecutive children of
  an ``nn.Sequential``; residual blocks of a registered type (:func:`register_block_type`;
  :mod:`pfgdf_plugin.models` registers its CIFAR ResNet ``BasicBlock`` and torchvision's
  ``BasicBlock``/``Bottleneck``) without a shortcut projection; or any modules the user names.
  Shapes are checked with one forward pass of the example input.
* **Discrimination** ``D_i`` (:func:`score_blocks`, probes in :mod:`.probing`): the held-out
  accuracy of a linear probe (global average pooling of the block's output, standardised, then
  multinomial logistic regression fitted by full-batch L-BFGS with a small L2 penalty) trained
  on labelled batches with the backbone frozen. All probe features come from one pass of
  forward hooks.
* **Value** of block ``i`` (:mod:`.score`): its gain ``D_i - D_{i-1}``, where ``D_{i-1}``
  belongs to the previous candidate in network order and ``D_0`` is a probe on the input of the
  first candidate (``reference="previous"``, default); ``reference="input"`` probes each block's
  own input instead. Ties in accuracy gain are broken by the drop of the probe's held-out
  cross-entropy (bigger drop = more useful), then by network order.
* **Selection** (:func:`plan_removal`, in :mod:`.plan`): remove the lowest-value blocks until a
  :class:`Target` is met: a number of blocks, a MACs or parameter ratio (dense / pruned, by the
  caller's ``macs_fn`` / ``params_fn``), or a latency ratio (blocks are removed one by one and
  the caller's ``latency_fn`` times dense against pruned after each removal).
* **Depth then width** (:mod:`.split`): a ratio target is split between depth
  (``ratio ** depth_share``) and width; when blocks alone cannot reach their part, every
  candidate goes and the adapters prune channels for the rest.

A target that cannot be met raises :class:`DBPError` before the model is changed.
"""

from ...errors import DBPError, DBPTargetError
from .blocks import (Block, find_blocks, register_block_type, registered_block_types, remove_blocks_,
                     set_block_macs_)
from .params import REFERENCES, WIDTH_IMPORTANCES, DBPParams
from .plan import TARGET_KINDS, DBPResult, Plan, Target, decide, latency_input_shape, plan_removal, prune_
from .probing import (check_finite_features, check_finite_model, check_labels, collect_features, fisher_ratio, probe,
                    probes)
from .score import BlockScore, quota_selection, removal_order, score_blocks
from .split import depth_target, target_report, width_target

__all__ = [
    "Block",
    "BlockScore",
    "DBPError",
    "DBPTargetError",
    "DBPParams",
    "DBPResult",
    "Plan",
    "REFERENCES",
    "TARGET_KINDS",
    "Target",
    "WIDTH_IMPORTANCES",
    "check_finite_features",
    "check_finite_model",
    "check_labels",
    "collect_features",
    "decide",
    "depth_target",
    "find_blocks",
    "fisher_ratio",
    "latency_input_shape",
    "plan_removal",
    "probe",
    "probes",
    "prune_",
    "quota_selection",
    "register_block_type",
    "registered_block_types",
    "remove_blocks_",
    "removal_order",
    "score_blocks",
    "set_block_macs_",
    "target_report",
    "width_target",
]
