"""Folding permutations between neighbouring layers, so a chain of converted layers gathers as
little as it can.

Where layer ``i`` feeds layer ``j`` through channel-wise operations only (:class:`FoldLink`), the
permutation between them is paid at most once, and not at all where a neighbour's weights can
absorb it offline:

* block -> block (``bmm``/``grouped`` on both sides): ``i`` emits its raw block layout and
  ``j``'s gather reads it directly: one gather instead of two (none if it is the identity);
  between two ``bmm`` linear layers a batch is handed over feature-major
  (:attr:`~pfgdf_plugin.modules.BlockDiagonalLinear.handoff`), so that gather moves rows;
* block -> dense (a ``"dense"``-kernel layer, or a plain ``Linear``/``Conv2d`` such as the
  classifier): ``j``'s columns are permuted (zero columns for ``i``'s padding) to read ``i``'s raw
  layout: no gather;
* dense -> block: ``i``'s rows are permuted into ``j``'s block order, so ``j`` does not gather,
  unless ``j`` pads its blocks (the padded slots must read true zeros: ``j`` keeps its gather).

BatchNorms on the way are permuted to the layout that crosses them; a padded layout widens them
(padding channels: weight 1, bias 0, mean 0, variance 1, so a zero stays zero) when
``widen_norms``. :func:`fuse_activations` lets a ``bmm`` layer apply the ReLU that alone follows it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from ...modules import (BlockDiagonalLinear, ChannelPermute, MaskedDenseConv2d, MaskedDenseLinear,
                        PermutedGroupConv2d)

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
BLOCK = (BlockDiagonalLinear, PermutedGroupConv2d)
DENSE = (MaskedDenseLinear, MaskedDenseConv2d)
CONVERTED = BLOCK + DENSE


@dataclass
class FoldLink:
    """Layer ``producer`` feeds layer ``consumer`` through channel-wise operations only.

    ``norms`` names the BatchNorm layers on the way (their parameters get permuted); anything
    else on the way must be channel-agnostic and parameter-free (activations, pooling). The
    adapters find links with Torch-Pruning's dependency graph
    (:func:`pfgdf_plugin.graph.find_fold_links`).
    """

    producer: str
    consumer: str
    norms: List[str] = field(default_factory=list)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _kind(m: nn.Module) -> Optional[Tuple[str, bool]]:
    """``(kind, is_conv)`` with kind ``block``, ``dense`` or ``plain``; ``None`` for anything else."""
    if isinstance(m, BLOCK):
        return "block", isinstance(m, PermutedGroupConv2d)
    if isinstance(m, DENSE):
        return "dense", isinstance(m, MaskedDenseConv2d)
    if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1):
        return "plain", isinstance(m, nn.Conv2d)
    return None


def _width_out(m: nn.Module) -> int:
    if isinstance(m, CONVERTED):
        return m.width
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _width_in(m: nn.Module) -> int:
    return m.in_features if isinstance(m, (nn.Linear, BlockDiagonalLinear, MaskedDenseLinear)) else m.in_channels


def _core(m: nn.Module) -> nn.Module:
    """The ``nn.Linear``/``nn.Conv2d`` holding a dense or plain layer's weight."""
    if isinstance(m, MaskedDenseConv2d):
        return m.conv
    return m.linear if isinstance(m, MaskedDenseLinear) else m


@torch.no_grad()
def norm_to_layout(model: nn.Module, name: str, gather: torch.Tensor, n: int) -> None:
    """Reorder BatchNorm ``name`` (``n`` channels) to ``gather`` (entries ``n`` are padding)."""
    norm = model.get_submodule(name)
    gather = gather.to(norm.running_mean.device if norm.running_mean is not None else gather.device)
    if gather.numel() == n and not bool((gather == n).any()):
        for key in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(norm, key, None)
            if isinstance(t, torch.Tensor):
                t.copy_(t[gather.to(t.device)])
        return
    wide = type(norm)(gather.numel(), eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                      track_running_stats=norm.track_running_stats)
    for key, pad in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
        old, new = getattr(norm, key, None), getattr(wide, key, None)
        if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
            new.data = torch.cat([old.detach(), old.new_full((1,), pad)])[gather.to(old.device)].clone()
    if norm.num_batches_tracked is not None:
        wide.num_batches_tracked = norm.num_batches_tracked.clone()
    set_module(model, name, wide.train(norm.training))


@torch.no_grad()
def _read_raw(cons: nn.Module, out_pos: torch.Tensor, raw: int) -> None:
    """Make ``cons`` read a tensor of ``raw`` slots in which channel ``ch`` sits at ``out_pos[ch]``."""
    kind, conv = _kind(cons)
    if kind == "block":
        index = cons.permute_in.index if conv else cons.in_index
        new_index = torch.cat([out_pos, out_pos.new_tensor([raw])])[index.to(out_pos.device)]
        if conv:
            cons.set_gather(ChannelPermute(new_index, raw).to(index.device), raw)
        else:
            cons.set_gather(new_index.to(index.device), raw)
        return
    core = _core(cons)
    w = core.weight
    wide = w.new_zeros((w.shape[0], raw) + tuple(w.shape[2:]))
    wide[:, out_pos.to(w.device)] = w
    core.weight = nn.Parameter(wide, requires_grad=w.requires_grad)
    if kind == "dense":
        labels = torch.full((raw,), -2, dtype=torch.long, device=cons.col_labels.device)
        labels[out_pos.to(labels.device)] = cons.col_labels
        cons.col_labels = labels
    for m in {id(cons): cons, id(core): core}.values():
        setattr(m, "in_channels" if conv else "in_features", raw)


@torch.no_grad()
def _emit_rows(prod: nn.Module, gather: torch.Tensor) -> None:
    """Reorder ``prod``'s output rows (a dense or plain layer): new row ``k`` is old row ``gather[k]``."""
    core = _core(prod)
    w, bias = core.weight, core.bias
    w.copy_(w[gather.to(w.device)])
    if bias is not None:
        bias.copy_(bias[gather.to(bias.device)])
    if isinstance(prod, DENSE):
        prod.row_labels.copy_(prod.row_labels[gather.to(prod.row_labels.device)])


def fold(model: nn.Module, link: FoldLink, widen_norms: bool = False) -> bool:
    """Fold the permutation between ``link.producer`` and ``link.consumer``, in place.

    See the module docstring for the cases. Returns ``False`` (and changes nothing) when there
    is nothing to fold or it cannot: a linear and a convolution, widths that do not match, a
    producer that is already folded, a padded layout crossing a BatchNorm without
    ``widen_norms``, or two layers that both keep the original order (nothing to fold).
    """
    prod, cons = model.get_submodule(link.producer), model.get_submodule(link.consumer)
    pk, ck = _kind(prod), _kind(cons)
    if pk is None or ck is None or pk[1] != ck[1]:
        return False
    n = _width_out(prod)
    norms = [model.get_submodule(name) for name in link.norms]
    if _width_in(cons) != n or any(not isinstance(m, NORMS) or m.num_features != n for m in norms):
        return False
    if ck[0] == "block" and not cons.gather:
        return False
    if pk[0] == "block":
        if not prod.scatter:
            return False
        out_pos = prod.permute_out.index if pk[1] else prod.out_index
        raw = prod.raw_channels if pk[1] else prod.raw_features
        if raw != n and norms and not widen_norms:
            return False
        raw_gather = torch.full((raw,), n, dtype=torch.long, device=out_pos.device)
        raw_gather[out_pos] = torch.arange(n, device=out_pos.device)
        for name in link.norms:
            norm_to_layout(model, name, raw_gather, n)
        prod.drop_scatter()
        _read_raw(cons, out_pos, raw)
        if isinstance(prod, BlockDiagonalLinear) and isinstance(cons, BlockDiagonalLinear):
            prod.handoff = prod.kernel == cons.kernel == "bmm"
        return True
    if ck[0] != "block":
        return False
    gather = cons.permute_in.index if ck[1] else cons.in_index
    if gather.numel() != n or bool((gather == n).any()):
        return False
    for name in link.norms:
        norm_to_layout(model, name, gather, n)
    _emit_rows(prod, gather)
    cons.set_gather(None, n)
    return True


def drop_identities(model: nn.Module, names: List[str]) -> List[str]:
    """Remove every gather and scatter of the named block layers that is the identity.

    Returns ``"<layer>: gather"`` / ``"<layer>: scatter"`` for each one removed.
    """
    dropped = []
    for name in names:
        m = model.get_submodule(name)
        if not isinstance(m, BLOCK):
            continue
        conv = isinstance(m, PermutedGroupConv2d)
        if m.gather:
            index = m.permute_in.index if conv else m.in_index
            width = m.in_channels if conv else m.in_features
            if index.numel() == width and torch.equal(index.cpu(), torch.arange(width)):
                m.set_gather(None, width)
                dropped.append(f"{name}: gather")
        if m.scatter:
            index = m.permute_out.index if conv else m.out_index
            raw = m.raw_channels if conv else m.raw_features
            if index.numel() == raw and torch.equal(index.cpu(), torch.arange(raw)):
                m.drop_scatter()
                dropped.append(f"{name}: scatter")
    return dropped


class _ConvertedLeaves(fx.Tracer):
    """torch.fx tracing that keeps the converted layers whole (only who calls whom matters here)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, CONVERTED) or super().is_leaf_module(m, module_qualified_name)


def fuse_activations(model: nn.Module, names: List[str]) -> List[str]:
    """Let each named ``bmm`` :class:`~pfgdf_plugin.modules.BlockDiagonalLinear` apply the ReLU that
    alone reads its output, in place.

    Where ``torch.fx`` (the converted layers as leaves) shows a layer called once whose output goes
    only to an ``nn.ReLU`` module that the forward calls once (registered once, with no hooks on
    either), the layer's ``activation`` becomes ``"relu"`` and that ReLU is replaced by
    ``nn.Identity``: the same values, one pass over the activations and one PyTorch call fewer (the
    C kernels apply it as they store). A model ``torch.fx`` cannot trace is left as it is.

    Returns:
        ``"<layer> + <relu>"`` for each fusion.

    Example:
        >>> from pfgdf_plugin.modules import BlockDiagonalLinear
        >>> net = nn.Sequential(BlockDiagonalLinear(4, [2, 2], [2, 2]), nn.ReLU(), nn.Linear(4, 2))
        >>> fuse_activations(net, ["0"]), net[0].activation, type(net[1]).__name__
        (['0 + 1'], 'relu', 'Identity')
    """
    try:
        graph = _ConvertedLeaves().trace(model)
    except Exception:  # data-dependent control flow, unsupported operations: nothing is fused
        return []
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    registered = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    modules = dict(model.named_modules())
    fused = []
    for node in graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if (node.target not in names or not isinstance(layer, BlockDiagonalLinear) or layer.kernel != "bmm"
                or layer.activation is not None or calls[node.target] != 1 or len(node.users) != 1):
            continue
        (user,) = node.users
        act = modules.get(user.target) if user.op == "call_module" else None
        if (type(act) is not nn.ReLU or calls[user.target] != 1 or registered[id(act)] != 1
                or registered[id(layer)] != 1 or act._forward_hooks or act._forward_pre_hooks
                or layer._forward_hooks):
            continue
        layer.activation = "relu"
        set_module(model, user.target, nn.Identity())
        fused.append(f"{node.target} + {user.target}")
    return fused
