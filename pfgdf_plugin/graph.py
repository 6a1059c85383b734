"""Torch-Pruning's dependency graph, read for what both adapters need: which layer feeds which.

:func:`build_graph` builds the graph without changing any module's train/eval mode;
:func:`find_fold_links` lists the layer pairs whose MPD permutations can be folded into one
gather (:class:`~pfgdf_plugin.methods.mpd.FoldLink`); :func:`output_layers` names the layers
that produce the model's output. The Torch-Pruning adapter and the NNI adapter both use it, so
neither imports the other.
"""

from __future__ import annotations

from typing import Any, Iterable, List, Optional, Set

import torch
import torch.nn as nn
import torch_pruning as tp

from .methods.mpd import FoldLink

# Operations a permutation of the channels passes through unchanged (by grad_fn name, without
# the trailing version digit): activations and pooling. Anything else stops a fold.
CHANNELWISE_OPS = frozenset({
    "ReluBackward", "LeakyReluBackward", "GeluBackward", "SiluBackward", "SigmoidBackward", "TanhBackward",
    "HardswishBackward", "HardsigmoidBackward", "HardtanhBackward", "EluBackward", "MishBackward",
    "SoftplusBackward", "ClampBackward", "ClampMinBackward", "ThresholdBackward", "CeluBackward", "SeluBackward",
    "MaxPool2DWithIndicesBackward", "AvgPool2DBackward", "AdaptiveAvgPool2DBackward",
    "AdaptiveMaxPool2DBackward", "CloneBackward",
})
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_LAYERS = (nn.Linear, nn.Conv2d)


def _grad_fn_kind(module: nn.Module) -> Optional[str]:
    if not isinstance(module, tp.ops._ElementWiseOp):
        return None
    return str(module._grad_fn).rstrip("0123456789")


def _data_inputs(node) -> list:
    """A node's inputs without the weight transposes Torch-Pruning records for ``nn.Linear``."""
    return [i for i in node.inputs if not (_grad_fn_kind(i.module) in ("TBackward", "PermuteBackward")
                                           and not i.inputs)]


def build_graph(model: nn.Module, example_inputs: Any) -> "tp.DependencyGraph":
    """Torch-Pruning's dependency graph of ``model``, leaving each module's train/eval mode as it was."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)  # Torch-Pruning calls model(*inputs) first: a bare batch would unpack
    modes = {m: m.training for m in model.modules()}
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode


def find_fold_links(model: nn.Module, example_inputs: Any = None, names: Optional[Iterable[str]] = None,
                    graph: Optional["tp.DependencyGraph"] = None) -> List[FoldLink]:
    """Pairs of layers whose permutations can be folded, from the dependency graph.

    Layer ``i`` links to layer ``j`` (both in ``names``, both ``Linear`` or both ``Conv2d``)
    when ``i``'s output reaches ``j`` through a chain where every node has exactly one
    consumer and one data input, and every node is a BatchNorm or a channel-wise,
    parameter-free operation (:data:`CHANNELWISE_OPS`). A residual addition, a concatenation,
    a reshape or a second consumer stops the chain, so no link crosses them.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> find_fold_links(net, torch.randn(1, 8), names=["0", "2"])
        [FoldLink(producer='0', consumer='2', norms=[])]
    """
    if graph is None:
        if example_inputs is None:
            raise ValueError("find_fold_links needs example_inputs (or a built dependency graph)")
        graph = build_graph(model, example_inputs)
    named = dict(model.named_modules())
    wanted = set(named) if names is None else set(names)
    name_of = {m: n for n, m in named.items()}
    links = []
    for name in [n for n in named if n in wanted]:
        module = named[name]
        if not isinstance(module, _LAYERS) or module not in graph.module2node:
            continue
        node, norms = graph.module2node[module], []
        while True:
            outs = {id(o): o for o in node.outputs}
            if len(outs) != 1:
                break
            nxt = next(iter(outs.values()))
            if len(_data_inputs(nxt)) != 1:
                break
            target = nxt.module
            if isinstance(target, _LAYERS) and name_of.get(target) in wanted:
                if type(target) is type(module) or (isinstance(target, nn.Conv2d) and isinstance(module, nn.Conv2d)):
                    links.append(FoldLink(name, name_of[target], norms))
                break
            if isinstance(target, _NORMS) and target in name_of:
                norms = norms + [name_of[target]]
            elif _grad_fn_kind(target) not in CHANNELWISE_OPS:
                break
            node = nxt
    return links


def output_layers(model: nn.Module, graph: "tp.DependencyGraph") -> Set[str]:
    """Names of the ``Linear``/``Conv2d`` layers from which no other such layer is reachable
    (the classifier, for a plain network)."""
    name_of = {m: n for n, m in model.named_modules()}
    out = set()
    for module, node in graph.module2node.items():
        if not isinstance(module, _LAYERS) or module not in name_of:
            continue
        seen, stack, reaches = set(), list(node.outputs), False
        while stack and not reaches:
            cur = stack.pop()
            if id(cur) in seen:
                continue
            seen.add(id(cur))
            if isinstance(cur.module, _LAYERS):
                reaches = True
            stack.extend(cur.outputs)
        if not reaches:
            out.add(name_of[module])
    return out


__all__ = ["CHANNELWISE_OPS", "build_graph", "find_fold_links", "output_layers"]
