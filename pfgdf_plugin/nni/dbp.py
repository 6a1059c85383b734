"""DBP in NNI 3.0's conventions: :class:`DBPPruner`.

The method lives in :mod:`pfgdf_plugin.methods.dbp`; this module reads an NNI ``config_list``
(which blocks, what share of them to remove), takes the probes' labelled batches from an NNI
evaluator or from ``data=``, and calls :func:`pfgdf_plugin.methods.dbp.prune_` with the project's
MACs and parameter counters (:func:`pfgdf_plugin.measure.count_macs`, ``count_params``) and
latency timer (:func:`pfgdf_plugin.meter.paired_timer`). NNI's DBP is depth only: a target
that removing every selected block cannot reach is a
:class:`~pfgdf_plugin.errors.DBPTargetError` (the Torch-Pruning ``DBPPruner`` then prunes width).

Why it is not an ``nni.compression`` ``Pruner``: NNI's pruners express their decision as masks
over weights, inputs and outputs of wrapped modules, and ``ModelSpeedup`` then shrinks tensors.
A mask cannot say "skip this block", so DBP edits the model directly (removed blocks become
``nn.Identity``) and :meth:`DBPPruner.compress` returns ``(model, {})``: the pruned model and no
masks. The result is an ordinary ``nn.Module``, ready for NNI's width pruners and quantizers.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from nni.compression.utils.evaluator import Evaluator

from .. import measure
from .. import models as _models  # noqa: F401  (registers the residual block types DBP can remove)
from ..meter import Timing, paired_timer
from ..methods import dbp
from ._common import copy_config

_D = dbp.DBPParams()

# DBP's own knobs: NNI's config schema rejects unknown keys, so they are constructor arguments
# (candidate blocks are chosen by the entries' op_names / op_types instead).
_KNOBS = ("target", "num_batches", "num_classes", "seed", "holdout", "reference")
_SELECT_KEYS = ("op_names", "op_types", "op_names_re", "exclude_op_names", "exclude_op_types",
                "exclude_op_names_re")
_ALLOWED = _SELECT_KEYS + ("sparse_ratio", "sparsity", "exclude")


class _Enough(Exception):
    """Stops the evaluator's training loop once enough batches are captured."""


def _detach(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.detach().clone()
    if isinstance(batch, (tuple, list)):
        return [_detach(b) for b in batch]
    return batch


def capture_batches(evaluator: Evaluator, model: nn.Module, num_batches: int) -> List[Tuple[Any, Any]]:
    """Labelled batches from an NNI evaluator's training loop, without training ``model``.

    A deep copy of ``model`` is bound to the evaluator and its training loop started; the loss
    patch (``evaluator.patch_loss``) records each training batch and stops the loop with an
    internal exception once ``num_batches`` are captured, so the copy takes at most
    ``num_batches - 1`` optimizer steps and is then discarded. ``model`` itself is never trained.
    Each batch must be ``(inputs, labels, ...)`` as a tuple or list.

    Raises:
        DBPError: the loop yielded no batch, or a batch is not ``(inputs, labels)``.
    """
    if not evaluator._initialization_complete:
        evaluator._init_optimizer_helpers(model)  # what NNI's Compressor does with its pure model
    shadow = copy.deepcopy(model)
    captured: List[Tuple[Any, Any]] = []

    def grab(loss: torch.Tensor, batch: Any) -> torch.Tensor:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise dbp.DBPError(f"the evaluator's training batches must be (inputs, labels) tuples for DBP's "
                               f"probes, got a {type(batch).__name__}; pass data=... instead")
        captured.append((_detach(batch[0]), _detach(batch[1])))
        if len(captured) >= num_batches:
            raise _Enough
        return loss

    evaluator.bind_model(shadow)
    try:
        evaluator.patch_loss(grab)
        try:
            evaluator.train(max_steps=num_batches, max_epochs=None)
        except _Enough:
            pass
    finally:
        evaluator.unbind_model()
    if not captured:
        raise dbp.DBPError("the evaluator's training loop yielded no batch for DBP's probes; pass data=... instead")
    return captured


def _parse_config(config_list: Sequence[Dict[str, Any]], with_target: bool) -> List[Dict[str, Any]]:
    out = copy_config(config_list, _KNOBS, "DBPPruner(model, config_list, evaluator, target={'macs': 1.5})")
    for i, entry in enumerate(out):
        unknown = [k for k in entry if k not in _ALLOWED]
        if unknown:
            raise ValueError(f"config_list[{i}]: unknown key(s) {', '.join(map(repr, unknown))} for DBPPruner; "
                             f"known: {', '.join(_ALLOWED)}")
        if "sparsity" in entry:
            if "sparse_ratio" in entry:
                raise ValueError(f"config_list[{i}] has both 'sparsity' and 'sparse_ratio'; keep 'sparse_ratio'")
            entry["sparse_ratio"] = entry.pop("sparsity")
        if entry.get("exclude"):
            continue
        if not any(k in entry for k in ("op_names", "op_types", "op_names_re")):
            raise ValueError(f"config_list[{i}] selects no blocks: give 'op_names' (block names), "
                             "'op_types' (module types, e.g. ['BasicBlock']) or 'op_names_re'")
        if with_target:
            if "sparse_ratio" in entry:
                raise ValueError(f"config_list[{i}] has 'sparse_ratio' but target= is given too; use one of them")
        else:
            if "sparse_ratio" not in entry:
                raise ValueError(f"config_list[{i}] needs 'sparse_ratio' (the share of its blocks to remove, in "
                                 "[0, 1]) unless target= is given")
            r = entry["sparse_ratio"]
            if isinstance(r, bool) or not isinstance(r, float) or not 0.0 <= r <= 1.0:
                raise ValueError(f"config_list[{i}]: 'sparse_ratio' must be in [0, 1], got {r!r}")
    return out


def _matches(entry: Dict[str, Any], block: dbp.Block, types: Sequence[str]) -> bool:
    def hit(names_key: str, types_key: str, re_key: str) -> bool:
        return (block.name in (entry.get(names_key) or [])
                or any(t in (entry.get(types_key) or []) for t in types)
                or any(re.fullmatch(p, block.name) for p in (entry.get(re_key) or [])))

    return hit("op_names", "op_types", "op_names_re") and not hit(
        "exclude_op_names", "exclude_op_types", "exclude_op_names_re")


class DBPPruner:
    """Remove whole blocks chosen by the discrimination of their outputs (DBP, depth pruning), NNI style.

    ``config_list`` picks the candidate blocks and how many go:

    * ``op_names``: block names as :func:`pfgdf_plugin.methods.dbp.find_blocks` reports them
      (``"layer1.3"``, ``"features.10"``); a name that is not a discovered block is taken as a
      user-named candidate, whose output shape must equal its input shape.
    * ``op_types``: module type names; a block matches when one of its member modules has the type
      (``"BasicBlock"``, ``"Bottleneck"``, or ``"Conv2d"`` for Conv-BN-ReLU blocks).
    * ``op_names_re``, and ``exclude_op_names`` / ``exclude_op_types`` / ``exclude_op_names_re``
      inside an entry, as in NNI; ``{"exclude": True, ...}`` entries remove blocks from the others.
    * ``sparse_ratio``: the share of the entry's blocks to remove (``floor(ratio * n)`` of them,
      the least discriminative ones); ints are cast to float. A block matched by several entries
      belongs to the last one, as in NNI.

    Or give ``target=`` (``{"blocks": n}``, ``{"macs": r}``, ``{"params": r}``, ``{"latency": r}``)
    for all selected blocks together; entries then carry no ``sparse_ratio``. This pruner removes
    blocks only: a ratio target that removing every selected block cannot reach raises
    :class:`~pfgdf_plugin.errors.DBPTargetError` (use the Torch-Pruning ``DBPPruner`` for depth
    then width). DBP's other knobs are constructor arguments, because NNI's config schema rejects
    unknown keys.

    The probes' labelled batches come from ``data=`` or, without it, from the evaluator's
    training loop (:func:`capture_batches`: a copy of the model runs up to ``num_batches`` training
    steps; the model itself is not trained).

    Args:
        model: the network (pruned in place by :meth:`compress`).
        config_list: see above.
        evaluator: an NNI evaluator (e.g. ``TorchEvaluator``) whose training batches feed the probes.
        data: ``(inputs, labels)`` batches; used instead of the evaluator's.
        example_inputs: a batch for the shape pass (default: the evaluator's dummy input, else the
            first data batch's first sample).
        target: a global target instead of per-entry ``sparse_ratio``.
        num_batches, num_classes, seed, holdout, reference, weight_decay, max_iter, progress,
            latency_fn, timing: see :class:`pfgdf_plugin.torch_pruning.dbp.DBPPruner`.

    After :meth:`compress`: ``removed``, ``report``, ``result`` and ``target_report`` (its
    ``width`` always ``None``, ``width_ratio`` 0.0) as in the Torch-Pruning ``DBPPruner``. MACs
    ratios use :func:`pfgdf_plugin.measure.count_macs`, as the Torch-Pruning ``DBPPruner`` does,
    so one ``{"macs": r}`` target removes the same blocks in both frameworks (when blocks alone
    reach it).

    Example:
        >>> import torch
        >>> from pfgdf_plugin.models import build_model
        >>> model = build_model("resnet20", width=0.25)
        >>> data = [(torch.randn(20, 3, 32, 32), torch.arange(20) % 10)]
        >>> pruner = DBPPruner(model, [{"op_types": ["BasicBlock"], "sparse_ratio": 0.5}], data=data)
        >>> model, masks = pruner.compress()
        >>> len(pruner.removed), masks
        (3, {})
    """

    def __init__(self, model: nn.Module, config_list: List[Dict[str, Any]], evaluator: Optional[Evaluator] = None,
                 *, data: Optional[Iterable] = None, example_inputs: Any = None, target: Any = None,
                 num_batches: Optional[int] = _D.num_batches, num_classes: Optional[int] = None,
                 seed: int = _D.seed, holdout: float = _D.holdout, reference: str = _D.reference,
                 weight_decay: float = 1e-3, max_iter: int = 100, progress: bool = False,
                 latency_fn: Optional[Callable[[nn.Module, nn.Module], Tuple[float, float]]] = None,
                 timing: Optional[Union[Timing, Mapping[str, Any]]] = None) -> None:
        if evaluator is not None and not isinstance(evaluator, Evaluator):
            raise TypeError(f"evaluator must be an nni.compression Evaluator, got {type(evaluator).__name__}")
        if data is None and evaluator is None:
            raise TypeError("DBPPruner needs labelled batches for its probes: pass data=... or an evaluator "
                            "(e.g. nni.compression.utils.TorchEvaluator)")
        if data is None and num_batches is None:
            raise ValueError("num_batches must be set when the batches come from the evaluator")
        if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                        or num_batches < 1):
            raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
        if reference not in dbp.REFERENCES:
            raise ValueError(f"reference must be one of {', '.join(dbp.REFERENCES)}; got {reference!r}")
        self.target = None if target is None else dbp.Target.parse(target)
        self.timing = Timing.parse(timing)
        self.config_list = _parse_config(config_list, self.target is not None)
        self.bound_model = model
        self.evaluator = evaluator
        self.data = data
        if example_inputs is None and evaluator is not None:
            example_inputs = evaluator.get_dummy_input()
        if example_inputs is None and data is not None:
            first = next(iter(data), None)
            if first is None:
                raise dbp.DBPError("data yielded no batches")
            example_inputs = first[0][:1]
        if example_inputs is None:
            raise TypeError("DBPPruner needs example_inputs=... (the evaluator has no dummy input)")
        self.example_inputs = example_inputs
        if self.target is not None and self.target.kind == "latency" and latency_fn is None:
            dbp.latency_input_shape(example_inputs)  # DBPError for anything but one image batch
            latency_fn = paired_timer(example_inputs, self.timing)
        self._options = dict(num_batches=num_batches, num_classes=num_classes, holdout=float(holdout),
                             seed=int(seed), weight_decay=float(weight_decay), max_iter=int(max_iter),
                             reference=reference, latency_fn=latency_fn, progress=progress)
        self.blocks, self.groups = self._select()
        dbp.set_block_macs_(model, self.blocks, self._macs)
        self.result: Optional[dbp.DBPResult] = None
        self.report: Dict[str, Dict[str, Any]] = {}
        self.removed: List[str] = []
        self.width_ratio = 0.0
        self.target_report: Dict[str, Any] = {}

    def _macs(self, model: nn.Module) -> float:
        return float(measure.count_macs(model, self.example_inputs))

    def _select(self) -> Tuple[List[dbp.Block], List[Tuple[List[str], int]]]:
        model = self.bound_model
        try:
            auto = dbp.find_blocks(model, self.example_inputs)
        except dbp.DBPError:
            auto = []
        auto_names = {b.name for b in auto}
        extra: List[str] = []
        for entry in self.config_list:
            if not entry.get("exclude"):
                extra += [n for n in entry.get("op_names") or [] if n not in auto_names and n not in extra]
        def overlaps(b: dbp.Block) -> bool:
            return any(m == e or m.startswith(e + ".") or e.startswith(m + ".") for m in b.members for e in extra)

        dropped = [b for b in auto if overlaps(b)] if extra else []
        if extra:
            kept = [b for b in auto if not overlaps(b)]
            named = dbp.find_blocks(model, self.example_inputs, [b.members for b in kept] + extra)
            kinds = {b.name: b.kind for b in kept}
            for b in named:
                b.kind = kinds.get(b.name, b.kind)
            pool = named
        else:
            pool = auto
        if not pool:
            raise dbp.DBPError(f"{type(model).__name__} has no removable block: name candidates in op_names")
        modules = dict(model.named_modules())
        owner: Dict[str, int] = {}
        excluded: set = set()
        for i, entry in enumerate(self.config_list):
            for b in pool:
                types = [type(modules[m]).__name__ for m in b.members]
                if _matches(entry, b, types):
                    if entry.get("exclude"):
                        excluded.add(b.name)
                    else:
                        owner[b.name] = i
        for b in dropped:
            types = [type(modules[m]).__name__ for m in b.members]
            if any(_matches(e, b, types) for e in self.config_list if not e.get("exclude")):
                inner = [e for e in extra if any(m == e or m.startswith(e + ".") or e.startswith(m + ".")
                                                 for m in b.members)]
                raise dbp.DBPError(f"config_list selects block {b.name!r} and {', '.join(map(repr, inner))}, which "
                                   "overlap; a module can belong to one block only")
        chosen = [b for b in pool if b.name in owner and b.name not in excluded]
        if not chosen:
            raise dbp.DBPError(f"config_list selects none of the removable blocks "
                               f"({', '.join(b.name for b in pool)})")
        groups: List[Tuple[List[str], int]] = []
        if self.target is None:
            for i, entry in enumerate(self.config_list):
                names = [b.name for b in chosen if owner[b.name] == i]
                if names:
                    groups.append((names, int(entry["sparse_ratio"] * len(names) + 1e-9)))
        return chosen, groups

    def _batches(self) -> Iterable:
        if self.data is not None:
            return self.data
        assert self.evaluator is not None and self._options["num_batches"] is not None
        return capture_batches(self.evaluator, self.bound_model, self._options["num_batches"])

    def compress(self, max_steps: Optional[int] = None, max_epochs: Optional[int] = None):
        """Score the selected blocks and replace the chosen ones with ``nn.Identity``.

        Returns ``(model, {})``: the pruned model (the same object, changed in place) and no
        masks (depth removal is not a mask). ``max_steps``/``max_epochs`` are not used: DBP
        trains only its probes.
        """
        if max_steps is not None or max_epochs is not None:
            raise ValueError("DBPPruner does not train the model: call compress() without max_steps/max_epochs")
        if self.result is not None:
            raise RuntimeError(f"DBPPruner.compress() already removed {len(self.removed)} block(s); build a new "
                               "DBPPruner on the pruned model to remove more")
        if self.target is not None:
            target, groups = self.target, None
        else:
            target, groups = dbp.Target("blocks", sum(c for _, c in self.groups)), self.groups
        self.result = dbp.prune_(self.bound_model, self.example_inputs, self._batches(), target, blocks=self.blocks,
                                 groups=groups, macs_fn=self._macs, params_fn=measure.count_params,
                                 **self._options)
        self.report = self.result.report()
        self.removed = list(self.result.removed)
        reached = len(self.removed) if target.kind == "blocks" else self.result.plan.ratio(target.kind)
        self.target_report = dbp.target_report(self.result, reached)
        return self.bound_model, {}
