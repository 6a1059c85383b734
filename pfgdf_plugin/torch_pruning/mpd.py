"""MPDCompress with Torch-Pruning: :class:`MPDPruner` and :func:`find_fold_links`.

The plans, masks and conversion live in :mod:`pfgdf_plugin.methods.mpd`. This module holds
the masks on a model while it trains (zeroed weights, masked gradients, re-applied after every
optimizer step), and uses Torch-Pruning's dependency graph for what the graph knows: which
layer feeds which, and so which permutations may be folded into a neighbour and which layers
produce the model's output.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Union

import torch
import torch.nn as nn
import torch_pruning as tp

from ..methods import mpd
from ..methods.mpd import BlockPlan, FoldLink, MPDError

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


class MPDPruner:
    """MPDCompress on a model: block-diagonal masks while training, then block-diagonal layers.

    On construction the pruner picks each targeted layer's blocks (``blocks`` or
    ``compression``, see :func:`pfgdf_plugin.methods.mpd.choose_blocks`) and permutations
    (:func:`pfgdf_plugin.methods.mpd.make_plan`), zeroes the masked weights in place and hooks
    every masked weight's gradient (``grad * mask``). With SGD (momentum, weight decay) and
    Adam/AdamW a masked weight then stays exactly zero; :meth:`update` (call it after
    ``optimizer.step()``, or :meth:`attach` the optimizer once) re-applies the masks anyway,
    which keeps them exact under any optimizer. :meth:`step` converts the model in place:
    ``Linear`` -> :class:`~pfgdf_plugin.modules.BlockDiagonalLinear`, ``Conv2d`` ->
    :class:`~pfgdf_plugin.modules.PermutedGroupConv2d`, with adjacent permutations folded
    (``fold=True``) where the dependency graph shows it is safe (:func:`find_fold_links`).

    Args:
        model: the network (modified in place).
        example_inputs: an input batch, for the dependency graph.
        compression: target ratio of dense to kept weights over the targeted layers (>= 1).
        blocks: ``c`` for every targeted layer (int), or ``{layer name: c}`` (only those layers;
            a classifier may be named).
        permutation: ``"random"`` (the paper) or ``"magnitude"`` (blocks that keep the most
            ``|W|`` of the current, e.g. trained, weights).
        ignored_layers: modules or names to leave dense.
        seed: seeds every layer's permutations (with the layer's name).
        round_to: block sizes in units of this many channels (``None`` = 1).
        fold: fold adjacent permutations in :meth:`step`.
        dense_output: with ``compression`` or an int ``blocks``, leave the layers producing the
            model's output (the classifier) dense. In those two modes grouped/depthwise
            convolutions and the output projections of ``nn.MultiheadAttention`` are left
            dense too, with a warning.

    Raises:
        MPDError: no or both targets, ``blocks < 1``, ``blocks`` above a layer's
            ``min(out, in)``, a grouped/depthwise convolution named in ``blocks``, an unknown
            layer name, a bad ``permutation``/``compression``/``round_to``.

    Attributes:
        plans: ``{layer name: BlockPlan}`` of the masked layers.
        links: the fold links found (used by :meth:`step` when ``fold``).
        converted: ``True`` after :meth:`step`.
        report: :meth:`step`'s report (``None`` before).

    Example:
        >>> from pfgdf_plugin.models import build_model
        >>> model = build_model("lenet300", in_channels=1, image_size=32)
        >>> pruner = MPDPruner(model, torch.randn(1, 1, 32, 32), compression=10.0)
        >>> {n: s["blocks"] for n, s in pruner.summary()["layers"].items()}
        {'fc1': 10, 'fc2': 10}
        >>> report = pruner.step()
        >>> type(model.fc1).__name__, round(report["compression"], 1), report["folded"]
        ('BlockDiagonalLinear', 10.0, ['fc1 -> fc2'])
    """

    def __init__(self, model: nn.Module, example_inputs: Any, compression: Optional[float] = None,
                 blocks: Union[int, Mapping[str, int], None] = None, permutation: str = "random",
                 ignored_layers: Optional[Sequence[Union[nn.Module, str]]] = None, seed: int = 0,
                 round_to: Optional[int] = None, fold: bool = True, dense_output: bool = True) -> None:
        if (compression is None) == (blocks is None):
            raise MPDError("give exactly one of compression= (e.g. 10.0) or blocks= (an int, or {layer name: int}); "
                           f"got compression={compression!r}, blocks={blocks!r}")
        if compression is not None:
            compression = mpd.check_compression(compression)
        mpd.check_permutation(permutation)
        self.round_to = mpd.check_round_to(round_to)
        if not mpd._is_int(seed):
            raise MPDError(f"seed must be an integer, got {seed!r}")
        self.model, self.seed, self.permutation, self.fold = model, int(seed), permutation, bool(fold)
        self.compression = compression
        named = dict(model.named_modules())
        ignored = set()
        for item in ignored_layers or ():
            if isinstance(item, str):
                if item not in named:
                    raise MPDError(f"ignored_layers names {item!r}, which is not a layer of the model")
                ignored.add(item)
            else:
                ignored.update(n for n, m in named.items() if m is item)
        self.graph = build_graph(model, example_inputs)
        chosen = self._choose(named, ignored, compression, blocks, dense_output)
        self.plans: Dict[str, BlockPlan] = {}
        self.dense_layers: List[str] = [n for n, c in chosen.items() if c == 1]
        for name, c in chosen.items():
            if c > 1:
                self.plans[name] = mpd.make_plan(name, named[name].weight, c, permutation, self.seed, self.round_to)
        self.links: List[FoldLink] = find_fold_links(model, names=list(self.plans), graph=self.graph) \
            if self.fold else []
        self._masks: Dict[str, torch.Tensor] = {}
        self._handles: list = []
        self.converted = False
        self.report: Optional[Dict[str, Any]] = None
        self._install()

    # ------------------------------------------------------------------ set-up
    def _choose(self, named, ignored, compression, blocks, dense_output) -> Dict[str, int]:
        if isinstance(blocks, Mapping):
            out = {}
            for name, c in blocks.items():
                if name not in named:
                    layers = [n for n, m in named.items() if isinstance(m, _LAYERS)]
                    raise MPDError(f"blocks names {name!r}, which is not a layer of the model; layers: "
                                   f"{', '.join(layers)}")
                o, i, _ = mpd.check_layer(name, named[name])
                out[name] = mpd.check_blocks(name, c, o, i, self.round_to)
            return out
        outputs = output_layers(self.model, self.graph) if dense_output else set()
        shapes, skipped = {}, []
        for name, m in named.items():
            if not isinstance(m, _LAYERS) or name in ignored or name in outputs:
                continue
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                skipped.append(f"{name} (groups={m.groups})")
                continue
            if isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear):
                skipped.append(f"{name} (the output projection of an nn.MultiheadAttention)")
                continue
            o, i, k = mpd.check_layer(name, m)
            shapes[name] = (o, i, max(1, int(torch.Size(k).numel())))
        if skipped:
            warnings.warn(f"MPDPruner leaves these layers dense: {', '.join(skipped)}",
                          stacklevel=3)
        if not shapes:
            raise MPDError("no layer to mask: every Linear/Conv2d is ignored, grouped, or produces the output")
        if compression is not None:
            return mpd.choose_blocks(shapes, compression, self.round_to)
        return {name: mpd.check_blocks(name, blocks, o, i, self.round_to) for name, (o, i, _) in shapes.items()}

    def _install(self) -> None:
        for name, plan in self.plans.items():
            weight = self.model.get_submodule(name).weight
            self._masks[name] = plan.mask(weight.dtype, weight.device)
            self._handles.append(weight.register_hook(self._grad_hook(name)))
        self.apply_masks()

    def _grad_hook(self, name: str):
        masks = self._masks

        def hook(grad):
            mask = masks[name]
            if mask.device != grad.device or mask.dtype != grad.dtype:
                mask = masks[name] = mask.to(grad)
            return grad * mask

        return hook

    # ------------------------------------------------------------------ training-loop API
    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every masked weight (in place)."""
        if self.converted:
            raise RuntimeError("MPDPruner.apply_masks() after step(): the model is already converted")
        for name in self.plans:
            weight = self.model.get_submodule(name).weight
            mask = self._masks[name]
            if mask.device != weight.device or mask.dtype != weight.dtype:
                mask = self._masks[name] = mask.to(weight)
            weight.mul_(mask)

    def update(self) -> None:
        """Re-apply the masks; call it after every ``optimizer.step()`` (or use :meth:`attach`)."""
        self.apply_masks()

    def attach(self, optimizer: torch.optim.Optimizer):
        """Re-apply the masks after every ``optimizer.step()``; returns the hook handle."""
        handle = optimizer.register_step_post_hook(lambda *args, **kwargs: self.update())
        self._handles.append(handle)
        return handle

    def masks(self) -> Dict[str, torch.Tensor]:
        """``{layer name: weight-shaped mask}`` (copies; 1 = kept)."""
        return {name: m.clone() for name, m in self._masks.items()}

    def summary(self) -> Dict[str, Any]:
        """The plan: per masked layer ``blocks``, ``dense``, ``kept``, ``compression``; totals over
        the masked layers (``compression``) and over every Linear/Conv2d of the model
        (``model_compression``, dense layers counted as kept)."""
        layers = {name: plan.summary() for name, plan in self.plans.items()}
        dense = sum(v["dense"] for v in layers.values())
        kept = sum(v["kept"] for v in layers.values())
        other = sum(m.weight.numel() for n, m in self.model.named_modules()
                    if isinstance(m, _LAYERS) and n not in self.plans)
        return {"layers": layers, "dense": dense, "kept": kept, "compression": dense / kept if kept else 1.0,
                "model_compression": (dense + other) / (kept + other) if kept + other else 1.0}

    # ------------------------------------------------------------------ conversion
    def step(self) -> Dict[str, Any]:
        """Convert the masked layers to block-diagonal form, in place, and drop the hooks.

        Every layer is checked first: a weight that is non-zero outside its mask raises
        :class:`~pfgdf_plugin.methods.mpd.MPDError` naming the layer, and the model is left as
        it was. Parameters are replaced: build a new optimizer to fine-tune.

        Returns:
            :func:`pfgdf_plugin.methods.mpd.summarize` of the converted layers (``dense``,
            ``kept`` effective weights, ``stored`` with padding, ``compression``) plus
            ``folded`` (the folds made) and ``dense_layers`` (targeted layers left dense).
        """
        if self.converted:
            warnings.warn("MPDPruner.step() was already called; nothing left to convert", stacklevel=2)
            return self.report
        report = mpd.convert_model(self.model, self.plans, self.links if self.fold else (), strict=True)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.converted = True
        report["dense_layers"] = list(self.dense_layers)
        self.report = report
        return report

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """The plans (JSON-safe), for resuming masked training with the same masks."""
        return {"plans": {n: p.to_dict() for n, p in self.plans.items()}, "converted": self.converted,
                "config": {"seed": self.seed, "permutation": self.permutation, "round_to": self.round_to}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s plans (the layers must match) and re-apply the masks."""
        if self.converted or state.get("converted"):
            raise RuntimeError("MPDPruner.load_state_dict(): the model or the saved state is already converted; "
                               "restore converted models with pfgdf_plugin.methods.mpd.restore_model")
        plans = {n: BlockPlan.from_dict(d) for n, d in state["plans"].items()}
        if set(plans) != set(self.plans):
            raise MPDError(f"the saved plans cover {sorted(plans)}, this pruner masks {sorted(self.plans)}")
        for name, plan in plans.items():
            if plan.weight_shape != self.plans[name].weight_shape:
                raise MPDError(f"{name}: saved plan shape {plan.weight_shape} does not match "
                               f"{self.plans[name].weight_shape}")
            weight = self.model.get_submodule(name).weight
            self._masks[name] = plan.mask(weight.dtype, weight.device)
        self.plans = plans
        self.apply_masks()


__all__ = ["CHANNELWISE_OPS", "MPDPruner", "build_graph", "find_fold_links", "output_layers"]
