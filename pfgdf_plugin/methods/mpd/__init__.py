"""MPDCompress: permuted block-diagonal masks, and the conversion to block-diagonal layers.

Framework-free: plans, masks and the conversion take and return tensors and ``torch.nn``
modules. The Torch-Pruning adapter (:mod:`pfgdf_plugin.torch_pruning.mpd`) holds the masks
while a model trains and finds, with Torch-Pruning's dependency graph (:mod:`pfgdf_plugin.graph`),
which permutations can be folded into neighbouring layers; the NNI adapter (:mod:`pfgdf_plugin.nni.mpd`) writes the
same masks into NNI's wrappers. Both choose their layers with :func:`choose_layers`, report
the plans with :func:`plan_summary` and convert through :func:`convert_model`.

Paper: Supic et al., "MPDCompress - Matrix Permutation Decomposition Algorithm for Deep Neural
Network Compression", arXiv 1805.12085. Only the abstract is public here: random masks applied
during training split each weight matrix into disconnected sub-graphs, and random permutations
turn it into a block matrix (10x on LeNet-300-100 with under 1% accuracy loss). The rest is
this project's reading, and every choice is a parameter:

* **Plan.** A layer with ``c`` blocks labels each output channel and each input channel with a
  block ``0 .. c-1`` (:class:`BlockPlan`). The mask keeps ``W[o, i]`` iff both labels agree:
  ``M = P . blockdiag(ones) . Q`` for the permutations ``P`` (outputs) and ``Q`` (inputs) that
  sort the labels. For a convolution the mask is over the (out, in) channels and is
  broadcast over the kernel. Block sizes are balanced: ``n`` channels in ``c`` blocks give
  ``n % c`` blocks of ``n // c + 1`` and the rest of ``n // c`` (with ``round_to=r``, the
  channels are dealt in units of ``r``, and the ``n % r`` left over go to the last block).
  The larger output and input blocks are paired (block 0 gets the extra output and the extra
  input), so a layer keeps ``sum_b out_b * in_b`` weights, which is ``out * in / c`` when ``c``
  divides a dimension and a little more otherwise.
* **Permutations.** ``"random"`` (the paper's): the balanced labels are shuffled with a
  generator seeded from ``seed`` and the layer's name (a layer's plan does not change when
  other layers are added or removed). ``"magnitude"`` (this project's): starting from a
  trained dense layer, :func:`magnitude_labels` co-clusters rows and columns of ``|W|``
  (summed over the kernel) into balanced blocks that keep as much ``|W|`` as it can find
  (alternating capacity-constrained greedy assignments, best of several starts);
  :func:`kept_share` measures the result.
* **Compression target.** ``blocks=c`` (an int for every targeted layer, or a dict per layer)
  or ``compression=x`` over the targeted weights (:func:`choose_blocks`; with neither,
  ``compression=10``, :class:`MPDParams`'s default; :func:`choose_layers` picks the layers): every layer gets
  ``c = ceil(x)``, capped at its ``min(out, in)`` (in ``round_to`` units); if caps or unequal
  blocks leave the total short of ``x``, the layer keeping the most weights gets one more
  block at a time until ``x`` is reached or no layer can take more. Layers with fewer than two
  channels on a side stay dense (``c = 1``). The classifier (a layer whose output is the
  model's output) stays dense unless it is asked for by name.
* **Conversion.** After training, ``P^T (W*M) Q^T`` is exactly block-diagonal: a ``Linear``
  becomes a :class:`~pfgdf_plugin.modules.BlockDiagonalLinear` (gather, one batched matmul,
  scatter) and a ``Conv2d`` a :class:`~pfgdf_plugin.modules.PermutedGroupConv2d` (channel
  permutation, grouped convolution with ``groups=c``, channel permutation). Unequal blocks are
  padded to the largest with zero weights fed by zero channels; the report counts both the
  stored weights (padding included) and the effective ones. Where layer ``i`` feeds layer
  ``j`` only through channel-wise operations (activations, pooling, BatchNorm), ``i``'s output
  permutation and ``j``'s input permutation are folded into one gather in ``j`` (the
  BatchNorm's parameters are permuted to match); see :class:`FoldLink`. A neighbour whose
  weights can absorb a permutation offline (a ``"dense"``-kernel layer, or a plain
  ``Linear``/``Conv2d`` such as the classifier) does, and a gather that became the identity is
  dropped (:mod:`~pfgdf_plugin.methods.mpd.fold`).
* **Kernels.** Each converted layer runs as dense-with-zeros, batched matmul or grouped
  convolution, forced or chosen by measured time (``kernel="auto"``), and the report records
  the choice and the times (:mod:`~pfgdf_plugin.methods.mpd.kernels`).

Modules: :mod:`~pfgdf_plugin.methods.mpd.checks` (:class:`MPDParams`, value and layer checks),
:mod:`~pfgdf_plugin.methods.mpd.blocks` (:class:`BlockPlan`, random labels, plans read from
masks), :mod:`~pfgdf_plugin.methods.mpd.magnitude` (the ``"magnitude"`` permutation),
:mod:`~pfgdf_plugin.methods.mpd.plan` (:func:`make_plan`, :func:`choose_blocks`,
:func:`choose_layers`, :func:`plan_summary`), :mod:`~pfgdf_plugin.methods.mpd.convert`
(conversion, :func:`summarize`, :func:`describe_model` / :func:`restore_model`, :func:`prepack`),
:mod:`~pfgdf_plugin.methods.mpd.fold` (:class:`FoldLink`, :func:`fold`, :func:`fuse_activations`),
:mod:`~pfgdf_plugin.methods.mpd.kernels` (:func:`choose_kernel`, :func:`check_kernel`),
:mod:`~pfgdf_plugin.methods.mpd.init` (:func:`block_init_`: each block initialised for its own fan-in,
for masked training from scratch).
"""

from ...errors import MPDError
from .blocks import BlockPlan, balanced_sizes, kept_share, layer_generator, plan_from_mask, random_labels
from .checks import (LAYERS, PERMUTATIONS, STARTS, MPDParams, both_sizes, check_blocks, check_compression,
                     check_layer, check_permutation, check_round_to, check_start, layer_shape, max_blocks,
                     pruner_params, unsupported)
from .convert import (DESCRIPTION_FORMAT, check_block_diagonal, convert_layer, convert_model, describe_model,
                      prepack, restore_model, summarize)
from .fold import FoldLink, drop_identities, fold, fuse_activations
from .init import block_init_
from .kernels import KERNELS, LAYER_KERNELS, check_kernel, choose_kernel, median_time
from .magnitude import magnitude_labels
from .plan import choose_blocks, choose_layers, iter_layers, make_plan, plan_summary

__all__ = ["DESCRIPTION_FORMAT", "KERNELS", "LAYERS", "LAYER_KERNELS", "PERMUTATIONS", "STARTS", "BlockPlan",
           "FoldLink", "MPDError", "MPDParams", "balanced_sizes", "block_init_", "both_sizes",
           "check_block_diagonal", "check_blocks", "check_compression", "check_kernel", "check_layer",
           "check_permutation", "check_round_to", "check_start", "choose_blocks", "choose_kernel", "choose_layers",
           "convert_layer", "convert_model", "describe_model", "drop_identities", "fold", "fuse_activations",
           "iter_layers", "kept_share", "layer_generator", "layer_shape", "magnitude_labels", "make_plan",
           "max_blocks", "median_time", "plan_from_mask", "plan_summary", "prepack", "pruner_params", "random_labels",
           "restore_model", "summarize", "unsupported"]
