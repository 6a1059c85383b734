"""DBP: remove whole blocks (depth) chosen by the discrimination of their output features.

Framework-free: everything here works on a plain ``torch.nn.Module`` and tensors. The
Torch-Pruning and NNI adapters only choose how candidates and targets are named and call
:func:`prune_`.

Paper: Wang et al., "Discrimination based Block-level Pruning for Deep Model Acceleration",
arXiv 1912.10178. Only the abstract is public. The paper states that FLOPs reduction is not
speedup, and that whole blocks are removed, chosen by the discrimination of their output
features. Everything else is this project's reading (see docs/dbp.md); each choice is a
parameter:

* **Candidates** (:func:`find_blocks`): units whose input and output shapes match, so a removed
  block becomes ``nn.Identity``: ``Conv2d`` (equal channels, stride 1) followed by an optional
  ``BatchNorm2d`` and an optional activation, as consecutive children of an ``nn.Sequential``;
  residual blocks without a shortcut projection (torchvision ``BasicBlock``/``Bottleneck``, the
  CIFAR ResNet ``BasicBlock`` of :mod:`pfgdf_plugin.models`); or any modules the user names.
  Shapes are checked with one forward pass of the example input.
* **Discrimination** ``D_i`` (:func:`score_blocks`): the held-out accuracy of a linear probe
  (global average pooling of the block's output, standardised, then multinomial logistic
  regression fitted by full-batch L-BFGS with a small L2 penalty) trained on labelled batches
  with the backbone frozen. All probe features come from one pass of forward hooks.
* **Value** of block ``i``: its gain ``D_i - D_{i-1}``, where ``D_{i-1}`` belongs to the
  previous candidate in network order and ``D_0`` is a probe on the input of the first
  candidate (``reference="previous"``, default); ``reference="input"`` probes each block's own
  input instead. Ties in accuracy gain are broken by the drop of the probe's held-out
  cross-entropy (bigger drop = more useful), then by network order.
* **Selection** (:func:`plan_removal`): remove the lowest-value blocks until a :class:`Target`
  is met: a number of blocks, a MACs ratio (dense / pruned), or a measured batch-1 CPU latency
  ratio (blocks are removed one by one and the latency measured after each removal).

A target that cannot be met raises :class:`DBPError` before the model is changed.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DBPError
from .params import Params

__all__ = [
    "Block",
    "BlockScore",
    "DBPError",
    "DBPResult",
    "Plan",
    "Target",
    "collect_features",
    "count_macs",
    "find_blocks",
    "fisher_ratio",
    "plan_removal",
    "probe",
    "probes",
    "prune_",
    "quota_selection",
    "remove_blocks_",
    "removal_order",
    "score_blocks",
]

TARGET_KINDS = ("blocks", "macs", "latency")
REFERENCES = ("previous", "input")
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh)


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """How much to remove: ``Target("blocks", 3)``, ``Target("macs", 1.5)`` or ``Target("latency", 1.3)``.

    * ``blocks``: remove exactly this many blocks (an int >= 0).
    * ``macs``: remove blocks until dense MACs / pruned MACs >= value (>= 1).
    * ``latency``: remove blocks one at a time, measuring batch-1 CPU latency after each
      removal, until dense latency / pruned latency >= value (>= 1).

    Build one with :meth:`parse`, which also takes ``{"blocks": 3}``, ``{"macs": 1.5}``,
    ``{"latency": 1.3}`` or a bare int (blocks).

    Example:
        >>> Target.parse({"macs": 2})
        Target(kind='macs', value=2.0)
        >>> Target.parse(3)
        Target(kind='blocks', value=3)
        >>> Target.parse({"flops": 2})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: target: unknown kind 'flops'; give one of {'blocks': int}, ...
    """

    kind: str
    value: Union[int, float]

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"target: unknown kind {self.kind!r}; give one of {_TARGET_USAGE}")
        v = self.value
        if self.kind == "blocks":
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"target: 'blocks' must be an int >= 0, got {v!r}")
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 1:
                raise ValueError(f"target: {self.kind!r} must be a ratio >= 1 (dense / pruned), got {v!r}")
            object.__setattr__(self, "value", float(v))

    @classmethod
    def parse(cls, spec: Any) -> "Target":
        """A :class:`Target` from a ``Target``, an int (blocks) or a one-key dict."""
        if isinstance(spec, Target):
            return spec
        if isinstance(spec, int) and not isinstance(spec, bool):
            return cls("blocks", spec)
        if isinstance(spec, Mapping):
            if len(spec) != 1:
                raise ValueError(f"target must have exactly one key, one of {_TARGET_USAGE}; got {dict(spec)!r}")
            ((kind, value),) = spec.items()
            return cls(str(kind), value)
        raise TypeError(f"target must be a dict such as {_TARGET_USAGE}, an int or a Target; "
                        f"got {type(spec).__name__}")

    def describe(self) -> str:
        if self.kind == "blocks":
            return f"{self.value} block(s)"
        return f"{self.kind} ratio {self.value:g}"


_TARGET_USAGE = "{'blocks': int}, {'macs': ratio >= 1}, {'latency': ratio >= 1}"


@dataclass(frozen=True)
class DBPParams(Params):
    """DBP's knobs, with the one set of defaults the pruners and the recipes share.

    The budget (``blocks``, ``macs`` or ``latency``) is given beside these as a :class:`Target`.

    Attributes:
        num_batches: training batches whose features train the linear probes (>= 1).
        holdout: share of those samples the probes are scored on (0 < holdout < 1).
        reference: what a block's gain is measured against, ``previous`` candidate | its ``input``.
        seed: seed of the train/hold-out split.
        candidates: block names (or lists of member names) to choose from; ``None``: every
            removable block found.
    """

    error: ClassVar[type] = DBPError
    num_batches: int = 8
    holdout: float = 0.25
    reference: str = "previous"
    seed: int = 0
    candidates: Optional[List[Any]] = None

    def problems(self) -> List[str]:
        found = []
        if isinstance(self.num_batches, bool) or not isinstance(self.num_batches, int) or self.num_batches < 1:
            found.append(f"num_batches must be >= 1, got {self.num_batches!r}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) \
                or not 0 < self.holdout < 1:
            found.append(f"holdout must be in (0, 1), got {self.holdout!r}")
        if self.reference not in REFERENCES:
            found.append(f"reference must be one of {', '.join(REFERENCES)}; got {self.reference!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            found.append(f"seed must be an integer, got {self.seed!r}")
        if self.candidates is not None and (isinstance(self.candidates, (str, bytes))
                                            or not isinstance(self.candidates, (list, tuple))):
            found.append(f"candidates must be a list of block names (or lists of member names), "
                         f"got {self.candidates!r}")
        return found


# --------------------------------------------------------------------------- blocks


@dataclass
class Block:
    """A removable unit.

    Attributes:
        name: the block's name (its first member's module name).
        members: module names replaced by ``nn.Identity`` when the block is removed.
        kind: ``"conv"`` (a Conv[-BN][-act] run), ``"residual"`` or ``"named"`` (user-given).
        position: execution order among the candidates (0 = runs first).
        shape: per-sample feature shape, the same at the block's input and output.
        macs: multiply-accumulates of the block's conv/linear layers per sample (bias adds
            count one per output element, as in Torch-Pruning's counter).
    """

    name: str
    members: Tuple[str, ...]
    kind: str
    position: int = -1
    shape: Tuple[int, ...] = ()
    macs: int = 0


def _is_residual_without_projection(m: nn.Module) -> Optional[bool]:
    """``True``/``False`` for known residual block types, ``None`` for anything else."""
    from ..models import BasicBlock as CifarBasicBlock

    if isinstance(m, CifarBasicBlock):
        return len(m.shortcut) == 0 and tuple(m.conv1.stride) == (1, 1)
    resnet = sys.modules.get("torchvision.models.resnet")  # a model built from it has imported it
    if resnet is None:
        return None
    if isinstance(m, (resnet.BasicBlock, resnet.Bottleneck)):
        return m.downsample is None and m.stride == 1
    return None


def _conv_run(children: List[Tuple[str, nn.Module]], i: int) -> int:
    """Length of a removable Conv[-BN][-act] run starting at ``children[i]`` (0 if none)."""
    conv = children[i][1]
    if not (isinstance(conv, nn.Conv2d) and conv.in_channels == conv.out_channels
            and all(s == 1 for s in conv.stride)):
        return 0
    n = 1
    if i + n < len(children) and isinstance(children[i + n][1], nn.BatchNorm2d) \
            and children[i + n][1].num_features == conv.out_channels:
        n += 1
    if i + n < len(children) and isinstance(children[i + n][1], _ACTIVATIONS):
        n += 1
    return n


def _auto_candidates(model: nn.Module) -> List[Tuple[str, Tuple[str, ...], str]]:
    found: List[Tuple[str, Tuple[str, ...], str]] = []
    residual_prefixes: List[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in residual_prefixes):
            continue
        verdict = _is_residual_without_projection(m)
        if verdict is not None:
            residual_prefixes.append(name)
            if verdict and name:
                found.append((name, (name,), "residual"))
            continue
        if isinstance(m, nn.Sequential):
            children = [(f"{name}.{n}" if name else n, c) for n, c in m.named_children()]
            i = 0
            while i < len(children):
                k = _conv_run(children, i)
                if k:
                    members = tuple(n for n, _ in children[i:i + k])
                    found.append((members[0], members, "conv"))
                    i += k
                else:
                    i += 1
    return found


def _named_candidates(model: nn.Module, candidates: Sequence) -> List[Tuple[str, Tuple[str, ...], str]]:
    modules = dict(model.named_modules())
    out = []
    for c in candidates:
        members = (c,) if isinstance(c, str) else tuple(c)
        if not members or not all(isinstance(n, str) for n in members):
            raise TypeError(f"candidates must be module names or sequences of module names, got {c!r}")
        for n in members:
            if n == "":
                raise DBPError("candidates: the whole model ('') cannot be a block")
            if n not in modules:
                known = [k for k in modules if k][:12]
                raise DBPError(f"candidates: no module named {n!r} in {type(model).__name__} "
                               f"(some names: {', '.join(known)}, ...)")
        out.append((members[0], members, "named"))
    names = [n for _, ms, _ in out for n in ms]
    for a in names:
        for b in names:
            if a != b and b.startswith(a + "."):
                raise DBPError(f"candidates: {b!r} lies inside {a!r}; a module can belong to one block only")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DBPError(f"candidates: {', '.join(map(repr, dup))} named more than once")
    return out


def _run(model: nn.Module, example_inputs: Any) -> Any:
    from ..measure import call

    return call(model, example_inputs)


def _modes(model: nn.Module) -> Dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore(modes: Dict[nn.Module, bool]) -> None:
    for m, t in modes.items():
        m.training = t


def _leaf_macs(module: nn.Module, inp: tuple, out: Any) -> int:
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        return 0
    per_sample = out.numel() // max(1, out.shape[0])
    if isinstance(module, nn.modules.conv._ConvNd):
        k = math.prod(module.kernel_size) * (module.in_channels // module.groups)
        if module.transposed:  # each input element meets out/groups * k filters
            x = inp[0]
            per_in = x.numel() // max(1, x.shape[0])
            return per_in * (module.out_channels // module.groups) * math.prod(module.kernel_size) + \
                (per_sample if module.bias is not None else 0)
        return per_sample * k + (per_sample if module.bias is not None else 0)
    if isinstance(module, nn.Linear):
        return per_sample * module.in_features + (per_sample if module.bias is not None else 0)
    return 0


def _shape_of(x: Any) -> Optional[Tuple[int, ...]]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else None


@torch.no_grad()
def _trace_shapes(model: nn.Module, example_inputs: Any, raw: List[Tuple[str, Tuple[str, ...], str]]):
    """One forward pass: per candidate the input/output shapes of every call, the execution
    order, and per conv/linear module its MACs; plus the model's output."""
    modules = dict(model.named_modules())
    calls: Dict[str, List[Tuple[Any, Any]]] = {name: [] for name, _, _ in raw}
    first_inputs: Dict[str, List[Any]] = {name: [] for name, _, _ in raw}
    order: Dict[str, int] = {}
    macs: Dict[str, int] = {}
    handles = []
    counter = [0]
    for name, members, _ in raw:
        first, last = modules[members[0]], modules[members[-1]]

        def pre(mod, args, kwargs, _n=name):
            if _n not in order:
                order[_n] = counter[0]
                counter[0] += 1
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            extra = len(args) + len(kwargs) - len(tensors)
            first_inputs[_n].append(tensors[0].shape if len(tensors) == 1 and not extra and not kwargs else
                                    ("args", len(args), len(kwargs)))

        def post(mod, args, out, _n=name):
            calls[_n].append(_shape_of(out))

        handles.append(first.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(last.register_forward_hook(post))
    for mname, m in modules.items():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            def count(mod, args, out, _n=mname):
                macs[_n] = macs.get(_n, 0) + _leaf_macs(mod, args, out)
            handles.append(m.register_forward_hook(count))
    modes = _modes(model)
    model.eval()
    try:
        out = _run(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        _restore(modes)
    return first_inputs, calls, order, macs, out


def _macs_inside(members: Sequence[str], macs: Mapping[str, int]) -> int:
    return int(sum(v for n, v in macs.items() if any(n == m or n.startswith(m + ".") for m in members)))


def find_blocks(model: nn.Module, example_inputs: Any, candidates: Optional[Sequence] = None) -> List[Block]:
    """The removable blocks of ``model``, in execution order.

    Args:
        model: the network (not modified; its train/eval modes are restored).
        example_inputs: a batch for one forward pass (tensor, tuple of positional inputs, or
            dict of keyword inputs).
        candidates: ``None`` to discover blocks automatically (see the module docstring), or
            module names to use instead; an entry may also be a sequence of names forming one
            block (run consecutively, e.g. ``["features.3", "features.4", "features.5"]``).

    Raises:
        DBPError: no removable block; a named candidate that does not exist, never runs, runs
            more than once, takes other than one tensor, or whose output shape differs from its
            input shape.

    Example:
        >>> from pfgdf_plugin.models import build_model
        >>> blocks = find_blocks(build_model("vgg16_bn", width=0.25), torch.randn(1, 3, 32, 32))
        >>> len(blocks), blocks[0].name, blocks[0].members
        (9, 'features.3', ('features.3', 'features.4', 'features.5'))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = candidates is not None
    raw = _named_candidates(model, candidates) if named else _auto_candidates(model)
    if not raw:
        raise DBPError(f"{type(model).__name__} has no removable block: DBP needs units whose input and "
                       "output shapes match (Conv-BN-ReLU with equal channels and stride 1 in an "
                       "nn.Sequential, or a residual block without downsampling); name others with candidates=[...]")
    try:
        first_inputs, calls, order, macs, _ = _trace_shapes(model, example_inputs, raw)
    except DBPError:
        raise
    except Exception as e:
        raise DBPError(f"the forward pass of {type(model).__name__} on example_inputs failed: "
                       f"{type(e).__name__}: {e}") from e
    blocks: List[Block] = []
    for name, members, kind in raw:
        label = name if len(members) == 1 else f"{name} (members {', '.join(members)})"
        ins, outs = first_inputs[name], calls[name]
        problem = None
        if not ins:
            problem = "never runs in the forward pass of example_inputs"
        elif len(ins) > 1 or len(outs) > 1:
            problem = (f"runs {max(len(ins), len(outs))} times per forward pass; only a module that runs once "
                       "can be removed")
        elif not isinstance(ins[0], torch.Size):
            problem = "does not take exactly one tensor, so nn.Identity cannot stand in for it"
        elif outs[0] is None:
            problem = "does not return a single tensor"
        elif tuple(ins[0]) != tuple(outs[0]):
            problem = (f"changes the shape: input {tuple(ins[0])} -> output {tuple(outs[0])}; only blocks whose "
                       "output shape equals their input shape can become nn.Identity")
        if problem:
            if named:
                raise DBPError(f"candidate {label} {problem}")
            continue
        blocks.append(Block(name=name, members=members, kind=kind, position=order[name],
                            shape=tuple(ins[0])[1:], macs=_macs_inside(members, macs)))
    if not blocks:
        raise DBPError(f"{type(model).__name__} has no removable block: no candidate keeps its input shape")
    blocks.sort(key=lambda b: b.position)
    for i, b in enumerate(blocks):
        b.position = i
    return blocks


def remove_blocks_(model: nn.Module, blocks: Iterable[Block]) -> None:
    """Replace every member of ``blocks`` with ``nn.Identity``, in place.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU())
        >>> remove_blocks_(net, [Block("0", ("0", "1"), "conv")])
        >>> net
        Sequential(
          (0): Identity()
          (1): Identity()
        )
    """
    for b in blocks:
        for name in b.members:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, nn.Identity())


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Conv and linear multiply-accumulates per sample (bias adds count one per output element).

    The default MACs measure of :func:`plan_removal`; the adapters pass Torch-Pruning's
    counter instead (which also counts BatchNorm, activations and pooling).

    Example:
        >>> count_macs(nn.Conv2d(3, 8, 3, padding=1), torch.randn(1, 3, 8, 8))
        14336
    """
    macs: Dict[nn.Module, int] = {}
    handles = []
    for m in model.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            handles.append(m.register_forward_hook(
                lambda mod, a, o: macs.__setitem__(mod, macs.get(mod, 0) + _leaf_macs(mod, a, o))))
    modes = _modes(model)
    model.eval()
    try:
        _run(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        _restore(modes)
    return int(sum(macs.values()))


# --------------------------------------------------------------------------- data and probes


def _batches(data: Iterable, num_batches: Optional[int]):
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    for i, batch in enumerate(data):
        if num_batches is not None and i >= num_batches:
            break
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DBPError(f"data must yield (inputs, labels) batches; batch {i} is a {type(batch).__name__}")
        x, y = batch[0], batch[1]
        if not isinstance(y, torch.Tensor):
            y = torch.as_tensor(y)
        if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
            raise DBPError(f"data batch {i}: labels must be a 1-D tensor of integer class indices, got "
                           f"dtype {y.dtype} and shape {tuple(y.shape)}")
        yield x, y.long()


def _pool(t: torch.Tensor) -> torch.Tensor:
    """Global average pooling to ``[batch, channels]``."""
    if t.dim() >= 3:
        return t.flatten(2).mean(2)
    if t.dim() == 2:
        return t
    return t.reshape(t.shape[0], -1)


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def collect_features(model: nn.Module, points: Mapping[str, Tuple[nn.Module, str]], data: Iterable,
                     num_batches: Optional[int] = None, progress: bool = False, desc: str = "DBP features",
                     strict: bool = True) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, Any]:
    """Globally pooled features at several points of ``model``, from one pass over ``data``.

    Args:
        model: the network, run in eval mode under ``torch.no_grad`` (modes restored afterwards).
        points: ``{key: (module, "in" | "out")}``: pool the module's (first) input or its output.
        data: ``(inputs, labels)`` batches.
        num_batches: how many batches to use (``None``: all).
        progress: show a tqdm bar.
        desc: the bar's label.
        strict: raise :class:`DBPError` when a point does not run exactly once per forward pass;
            with ``False`` such points are left out of the result instead.

    Returns:
        ``(features, labels, out_dim)``: ``features[key]`` is ``[N, C]`` (float64), ``labels`` is
        ``[N]``, ``out_dim`` the size of the model output's last dimension (``None`` if not 2-D).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU())
        >>> data = [(torch.randn(4, 1, 5, 5), torch.tensor([0, 1, 0, 1]))]
        >>> f, y, _ = collect_features(net, {"conv": (net[0], "out")}, data)
        >>> f["conv"].shape, y.tolist()
        (torch.Size([4, 3]), [0, 1, 0, 1])
    """
    from tqdm.auto import tqdm

    store: Dict[str, List[torch.Tensor]] = {k: [] for k in points}
    handles = []
    for key, (module, where) in points.items():
        if where not in ("in", "out"):
            raise ValueError(f"points[{key!r}]: where must be 'in' or 'out', got {where!r}")
        if where == "in":
            handles.append(module.register_forward_pre_hook(
                lambda m, a, _k=key: store[_k].append(_pool(a[0].detach()).double().cpu())))
        else:
            handles.append(module.register_forward_hook(
                lambda m, a, o, _k=key: store[_k].append(_pool(o.detach()).double().cpu())))
    modes = _modes(model)
    model.eval()
    device = _device_of(model)
    labels: List[torch.Tensor] = []
    out_dim = None
    dropped: set = set()
    try:
        total = num_batches
        if total is None and hasattr(data, "__len__"):
            total = len(data)  # type: ignore[arg-type]
        for x, y in tqdm(_batches(data, num_batches), total=total, desc=desc, leave=False, disable=not progress):
            x = x.to(device) if isinstance(x, torch.Tensor) else x
            before = {k: len(v) for k, v in store.items()}
            try:
                out = _run(model, x)
            except Exception as e:
                raise DBPError(f"the forward pass of {type(model).__name__} on a data batch failed: "
                               f"{type(e).__name__}: {e}") from e
            if isinstance(out, torch.Tensor) and out.dim() == 2:
                out_dim = int(out.shape[1])
            for k, v in store.items():
                if k in dropped:
                    continue
                ok = len(v) == before[k] + 1 and v[-1].shape[0] == y.shape[0]
                if not ok and not strict:
                    dropped.add(k)
                    continue
                if len(v) != before[k] + 1:
                    raise DBPError(f"feature point {k!r} ran {len(v) - before[k]} times in one forward pass; "
                                   "it must run exactly once")
                if v[-1].shape[0] != y.shape[0]:
                    raise DBPError(f"feature point {k!r} has batch size {v[-1].shape[0]} but the labels "
                                   f"have {y.shape[0]}")
            labels.append(y.cpu())
    finally:
        for h in handles:
            h.remove()
        _restore(modes)
    if not labels:
        raise DBPError("data yielded no batches")
    return {k: torch.cat(v) for k, v in store.items() if k not in dropped}, torch.cat(labels), out_dim


def _check_finite_model(model: nn.Module) -> None:
    """:class:`DBPError` naming the first layer whose parameters or buffers hold NaN/Inf values."""
    for name, m in model.named_modules():
        for key, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise DBPError(f"layer {name or type(model).__name__!r}: {key} holds NaN/Inf values; DBP cannot "
                               "score features computed from it")


def _check_finite_features(feats: Mapping[str, torch.Tensor], keys: Iterable[str]) -> None:
    """:class:`DBPError` naming the first of ``keys`` (``"in:<name>"`` / ``"out:<name>"``) whose features
    hold NaN/Inf values."""
    for key in keys:
        f = feats.get(key)
        if f is not None and not bool(torch.isfinite(f).all()):
            where, _, name = key.partition(":")
            raise DBPError(f"the {'input' if where == 'in' else 'output'} of {name!r} holds NaN/Inf values on the "
                           "data (NaN inputs or an overflow); DBP cannot score it")


def _check_labels(labels: torch.Tensor, num_classes: Optional[int], out_dim: Optional[int]) -> int:
    """Validate labels against the class count the probe expects; return that count."""
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 2):
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    expected = num_classes if num_classes is not None else out_dim
    lo, hi = int(labels.min()), int(labels.max())
    if expected is None:
        expected = hi + 1
        source = "inferred from the labels"
    else:
        source = "num_classes" if num_classes is not None else "the model's output size"
    if lo < 0 or hi >= expected:
        raise DBPError(f"labels must lie in [0, {expected - 1}] ({expected} classes, {source}); "
                       f"the data holds labels from {lo} to {hi}")
    present = torch.unique(labels)
    if present.numel() < 2:
        raise DBPError(f"the data holds only class {int(present[0])}: a discrimination probe needs at least 2 classes")
    if present.numel() < expected:
        missing = sorted(set(range(expected)) - set(present.tolist()))
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise DBPError(f"the probe expects {expected} classes ({source}) but the data holds only "
                       f"{present.numel()} (missing: {shown}); use more batches (num_batches), a shuffled "
                       "loader, or num_classes=...")
    return expected


def _split(n: int, holdout: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(holdout, (int, float)) or isinstance(holdout, bool) or not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout!r}")
    n_test = int(round(n * holdout))
    if n_test < 1 or n - n_test < 2:
        raise DBPError(f"{n} labelled samples are too few to train and score a probe "
                       f"(holdout={holdout}); use more batches")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[n_test:], perm[:n_test]


def _lbfgs(loss_and_grad: Callable[[torch.Tensor], Tuple[float, torch.Tensor]], theta: torch.Tensor,
           max_iter: int, history: int = 10, tol: float = 1e-10) -> torch.Tensor:
    """Minimise a smooth convex function by L-BFGS with a backtracking (Armijo) line search.

    Plain tensor arithmetic only: every step is elementwise in ``theta`` apart from a few global
    scalars, so coordinates of ``theta`` that start equal and see equal gradients stay equal.
    """
    f, g = loss_and_grad(theta)
    steps: List[Tuple[torch.Tensor, torch.Tensor, float]] = []
    for _ in range(max_iter):
        if float(g.abs().max()) <= tol:
            break
        q = g.clone()
        alphas = []
        for s_, y_, rho in reversed(steps):
            a = rho * float(s_ @ q)
            q -= a * y_
            alphas.append(a)
        if steps:
            s_, y_, _ = steps[-1]
            q *= float(s_ @ y_) / float(y_ @ y_)
        else:
            q *= min(1.0, 1.0 / float(g.abs().sum()))
        for (s_, y_, rho), a in zip(steps, reversed(alphas)):
            q += (a - rho * float(y_ @ q)) * s_
        d = -q
        slope = float(g @ d)
        if slope >= 0:  # not a descent direction: restart from the gradient
            steps.clear()
            d = -g * min(1.0, 1.0 / float(g.abs().sum()))
            slope = float(g @ d)
        t = 1.0
        while True:
            new = theta + t * d
            f_new, g_new = loss_and_grad(new)
            if f_new <= f + 1e-4 * t * slope or t < 1e-10:
                break
            t *= 0.5
        s_, y_ = new - theta, g_new - g
        sy = float(s_ @ y_)
        if sy > 1e-16:
            steps.append((s_, y_, 1.0 / sy))
            if len(steps) > history:
                steps.pop(0)
        done = abs(f - f_new) <= 1e-14 * max(1.0, abs(f))
        theta, f, g = new, f_new, g_new
        if done:
            break
    return theta


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
          num_classes: int, weight_decay: float = 1e-3, max_iter: int = 100) -> Tuple[float, float]:
    """Held-out ``(accuracy, cross-entropy)`` of a multinomial logistic-regression probe.

    One probe of :func:`probes`.

    Example:
        >>> x = torch.tensor([[0.], [1.], [2.], [3.], [10.], [11.], [12.], [13.]])
        >>> y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
        >>> acc, loss = probe(x[::2], y[::2], x[1::2], y[1::2], num_classes=2)
        >>> acc
        1.0
    """
    idx = torch.arange(train_x.shape[0] + test_x.shape[0])
    x = torch.cat([train_x, test_x])
    y = torch.cat([train_y, test_y])
    return probes([x], y, idx[:train_x.shape[0]], idx[train_x.shape[0]:], num_classes, weight_decay, max_iter)[0]


def probes(features: Sequence[torch.Tensor], labels: torch.Tensor, train_idx: torch.Tensor, test_idx: torch.Tensor,
           num_classes: int, weight_decay: float = 1e-3, max_iter: int = 100) -> List[Tuple[float, float]]:
    """Held-out ``(accuracy, cross-entropy)`` of one linear probe per feature matrix, fitted together.

    Each probe is a multinomial logistic regression on standardised features (the training
    part's mean and standard deviation), weights and bias started at zero, minimising mean
    cross-entropy plus ``weight_decay * ||W||^2``. The probes are independent problems; they are
    solved as one separable objective by full-batch L-BFGS in float64 with analytic gradients
    (one loop for all of them, no ``torch.optim``), which keeps equal feature matrices on equal
    iterates, so equal features score exactly equal.

    Args:
        features: ``[N, C_p]`` matrices (the channel count may differ between them).
        labels: ``[N]`` class indices.
        train_idx, test_idx: sample indices fitting and scoring the probes.
        num_classes: the probes' output size.
        weight_decay: L2 penalty on the weights (>= 0).
        max_iter: L-BFGS iterations.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    p = len(features)
    cmax = max(int(f.shape[1]) for f in features)
    n_tr, n_te = int(train_idx.numel()), int(test_idx.numel())
    xtr = torch.zeros(p, n_tr, cmax, dtype=torch.float64)
    xte = torch.zeros(p, n_te, cmax, dtype=torch.float64)
    for i, f in enumerate(features):
        f = f.double()
        a, t = f[train_idx], f[test_idx]
        mu = a.mean(0)
        sd = a.std(0, unbiased=False)
        sd = torch.where(sd > 1e-12, sd, torch.ones_like(sd))
        xtr[i, :, :f.shape[1]] = (a - mu) / sd
        xte[i, :, :f.shape[1]] = (t - mu) / sd
    ytr = labels[train_idx].long()
    yte = labels[test_idx].long()
    onehot = F.one_hot(ytr, num_classes).double().expand(p, n_tr, num_classes)
    n_w = p * cmax * num_classes

    def loss_and_grad(theta: torch.Tensor) -> Tuple[float, torch.Tensor]:
        w = theta[:n_w].view(p, cmax, num_classes)
        b = theta[n_w:].view(p, 1, num_classes)
        logp = torch.log_softmax(torch.bmm(xtr, w) + b, dim=2)
        loss = -(onehot * logp).sum() / n_tr + weight_decay * (w * w).sum()
        r = (logp.exp() - onehot) / n_tr
        gw = torch.bmm(xtr.transpose(1, 2), r) + 2.0 * weight_decay * w
        return float(loss), torch.cat([gw.reshape(-1), r.sum(1).reshape(-1)])

    theta = _lbfgs(loss_and_grad, torch.zeros(n_w + p * num_classes, dtype=torch.float64), max_iter)
    w = theta[:n_w].view(p, cmax, num_classes)
    b = theta[n_w:].view(p, 1, num_classes)
    out = []
    with torch.no_grad():
        logits = torch.bmm(xte, w) + b
        for i in range(p):
            acc = float((logits[i].argmax(1) == yte).double().mean())
            out.append((acc, float(F.cross_entropy(logits[i], yte))))
    return out


def fisher_ratio(features: torch.Tensor, labels: torch.Tensor, num_classes: Optional[int] = None) -> torch.Tensor:
    """Per channel: between-class variance / within-class variance of ``features[:, c]``.

    A channel whose classes do not overlap at all scores very high (its within-class variance is
    floored at ``1e-12`` of the channel's total variance); a constant channel scores 0.

    Example:
        >>> f = torch.tensor([[0., 5.], [0., 1.], [1., 2.], [1., 4.]])
        >>> fisher_ratio(f, torch.tensor([0, 0, 1, 1])).tolist()[1]
        0.0
    """
    x = features.double()
    k = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    onehot = F.one_hot(labels.long(), k).double()  # [N, K]
    counts = onehot.sum(0)
    present = counts > 0
    means = (onehot.t() @ x)[present] / counts[present, None]  # [K', C]
    mu = x.mean(0)
    n = x.shape[0]
    between = (counts[present, None] * (means - mu) ** 2).sum(0) / n
    total = ((x - mu) ** 2).sum(0) / n
    within = (total - between).clamp_min(0)
    floor = 1e-12 * total + 1e-300
    ratio = between / torch.maximum(within, floor)
    return torch.where(total > 0, ratio, torch.zeros_like(ratio))


# --------------------------------------------------------------------------- scoring


@dataclass
class BlockScore:
    """Discrimination of one block.

    Attributes:
        name: the block's name.
        position: execution order among the candidates.
        discrimination: ``D_i``, the probe's held-out accuracy on the block's output.
        probe_loss: the probe's held-out cross-entropy on the block's output.
        reference: ``D`` of the features the gain is measured against (``D_{i-1}``).
        gain: ``D_i - reference``; the block's value (lowest removed first).
        loss_gain: reference loss minus ``probe_loss`` (tie-breaker: bigger = more useful).
    """

    name: str
    position: int
    discrimination: float
    probe_loss: float
    reference: float
    reference_loss: float

    @property
    def gain(self) -> float:
        return self.discrimination - self.reference

    @property
    def loss_gain(self) -> float:
        return self.reference_loss - self.probe_loss


def score_blocks(model: nn.Module, blocks: Sequence[Block], data: Iterable, num_batches: Optional[int] = 8,
                 num_classes: Optional[int] = None, holdout: float = 0.25, seed: int = 0,
                 weight_decay: float = 1e-3, max_iter: int = 100, reference: str = "previous",
                 progress: bool = False) -> Tuple[List[BlockScore], Dict[str, Any]]:
    """Discrimination and gain of every block, from one pass of forward hooks over ``data``.

    Args:
        model: the network (not modified).
        blocks: from :func:`find_blocks`, in execution order.
        data: ``(inputs, labels)`` batches of held-out training data.
        num_batches: batches to use (``None``: all of ``data``).
        num_classes: classes the probe expects (default: the model's output size, else the
            labels' maximum + 1). Labels outside, or fewer classes present, raise :class:`DBPError`;
            so do NaN/Inf weights or buffers (naming the layer) and NaN/Inf features (naming the block).
        holdout: share of the samples that scores the probes (the rest trains them).
        seed: seeds the train/held-out split.
        weight_decay, max_iter: the probe's L2 penalty and L-BFGS iterations (see :func:`probe`).
        reference: ``"previous"`` (gain over the previous candidate's output, the first block
            over its own input) or ``"input"`` (gain over each block's own input).
        progress: show a tqdm bar while collecting features.

    Returns:
        ``(scores, info)``: one :class:`BlockScore` per block in ``blocks`` order, and
        ``info = {"baseline": D_0, "baseline_loss": ..., "samples": N, "classes": K}``.
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {', '.join(REFERENCES)}; got {reference!r}")
    if not blocks:
        raise DBPError("no blocks to score")
    modules = dict(model.named_modules())
    ordered = sorted(blocks, key=lambda b: b.position)
    points: Dict[str, Tuple[nn.Module, str]] = {}
    for b in ordered:
        points[f"out:{b.name}"] = (modules[b.members[-1]], "out")
        if reference == "input" or b is ordered[0]:
            points[f"in:{b.name}"] = (modules[b.members[0]], "in")
    _check_finite_model(model)
    feats, labels, out_dim = collect_features(model, points, data, num_batches, progress)
    _check_finite_features(feats, [f"{side}:{b.name}" for b in ordered for side in ("in", "out")])
    k = _check_labels(labels, num_classes, out_dim)
    tr, te = _split(labels.shape[0], holdout, seed)
    keys = list(feats)
    results = dict(zip(keys, probes([feats[key] for key in keys], labels, tr, te, k, weight_decay, max_iter)))

    def d(key: str) -> Tuple[float, float]:
        return results[key]

    base = d(f"in:{ordered[0].name}")
    scores = []
    prev = base
    for b in ordered:
        ref = d(f"in:{b.name}") if reference == "input" else prev
        acc, loss = d(f"out:{b.name}")
        scores.append(BlockScore(b.name, b.position, acc, loss, ref[0], ref[1]))
        prev = (acc, loss)
    by_name = {s.name: s for s in scores}
    info = {"baseline": base[0], "baseline_loss": base[1], "samples": int(labels.shape[0]), "classes": k}
    return [by_name[b.name] for b in blocks], info


def removal_order(scores: Sequence[BlockScore]) -> List[str]:
    """Block names, least useful first: lowest gain, then smallest loss drop, then network order.

    Example:
        >>> s = [BlockScore("a", 0, 0.5, 1.0, 0.4, 1.2), BlockScore("b", 1, 0.5, 1.0, 0.5, 1.0)]
        >>> removal_order(s)
        ['b', 'a']
    """
    return [s.name for s in sorted(scores, key=lambda s: (round(s.gain, 12), round(s.loss_gain, 12), s.position))]


def quota_selection(order: Sequence[str], groups: Sequence[Tuple[Sequence[str], int]]) -> List[str]:
    """For each ``(names, count)`` group, its ``count`` least useful blocks; in ``order``.

    Example:
        >>> quota_selection(["c", "a", "d", "b"], [(["a", "b"], 1), (["c", "d"], 2)])
        ['c', 'a', 'd']
    """
    chosen = set()
    for names, count in groups:
        members = set(names)
        if count > len(members):
            raise DBPError(f"cannot remove {count} of the {len(members)} blocks {sorted(members)}")
        chosen.update([n for n in order if n in members][:count])
    return [n for n in order if n in chosen]


# --------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """Which blocks to remove, and what that achieves.

    Attributes:
        removed: block names in removal order.
        macs_ratio: dense / pruned MACs (per the ``macs_fn`` used).
        latency_ratio: measured dense / pruned batch-1 CPU latency (``None`` unless measured).
        measurements: for latency targets, one dict per removal:
            ``{"removed": n, "dense_ms", "pruned_ms", "ratio"}``.
    """

    removed: List[str]
    macs_ratio: float
    latency_ratio: Optional[float] = None
    measurements: List[Dict[str, float]] = field(default_factory=list)


def _latency_ratio(dense: nn.Module, pruned: nn.Module, example: torch.Tensor, warmup: int, repeats: int,
                   threads: Optional[int]) -> Dict[str, float]:
    from ..measure import measure_latency

    r = measure_latency({"dense": dense, "pruned": pruned}, tuple(example.shape[1:]), batch_sizes=(1,),
                        warmup=warmup, repeats=repeats, threads=threads)
    d, p = r["dense"][1]["median_ms"], r["pruned"][1]["median_ms"]
    return {"dense_ms": d, "pruned_ms": p, "ratio": d / p if p > 0 else float("inf")}


def _output_shape(model: nn.Module, example_inputs: Any) -> Any:
    modes = _modes(model)
    model.eval()
    try:
        with torch.no_grad():
            out = _run(model, example_inputs)
    finally:
        _restore(modes)
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return tuple(_shape_of(o) for o in out)
    return type(out).__name__


def plan_removal(model: nn.Module, blocks: Sequence[Block], order: Sequence[str], target: Any,
                 example_inputs: Any, macs_fn: Optional[Callable[[nn.Module], float]] = None,
                 latency_warmup: int = 5, latency_repeats: int = 30,
                 latency_threads: Optional[int] = None) -> Plan:
    """Decide which blocks to remove (in ``order``) to meet ``target``, on a copy of ``model``.

    ``model`` is never changed. The copy's output shape is checked after the removals.

    Args:
        model: the dense network.
        blocks: candidates (from :func:`find_blocks`).
        order: candidate names, least useful first (:func:`removal_order`); only these are removed.
        target: a :class:`Target` or anything :meth:`Target.parse` takes.
        example_inputs: a batch; for latency targets a tensor ``[B, C, H, W]`` (timed at batch 1).
        macs_fn: ``model -> MACs``; default :func:`count_macs` on ``example_inputs``.
        latency_warmup, latency_repeats, latency_threads: see
            :func:`pfgdf_plugin.measure.measure_latency` (dense and pruned are timed side by side).

    Raises:
        DBPError: the target cannot be met even by removing every block in ``order``, or a
            removal changes the model's output shape.
    """
    target = Target.parse(target)
    by_name = {b.name: b for b in blocks}
    unknown = [n for n in order if n not in by_name]
    if unknown:
        raise DBPError(f"order names unknown blocks: {', '.join(unknown)}")
    if macs_fn is None:
        def macs_fn(m: nn.Module) -> float:
            return count_macs(m, example_inputs)
    if target.kind == "latency":
        ex = example_inputs
        if isinstance(ex, (tuple, list)) and len(ex) == 1:
            ex = ex[0]
        if not isinstance(ex, torch.Tensor) or ex.dim() != 4:
            raise DBPError("a latency target needs example_inputs to be one image batch tensor [B, C, H, W], "
                           f"got {type(example_inputs).__name__}")
    dense_macs = float(macs_fn(model))
    dense_shape = _output_shape(model, example_inputs)
    work = copy.deepcopy(model)

    def check_shape() -> None:
        shape = _output_shape(work, example_inputs)
        if shape != dense_shape:
            raise DBPError(f"removing blocks {', '.join(removed)} changes the model's output shape from "
                           f"{dense_shape} to {shape}")

    def macs_ratio() -> float:
        m = float(macs_fn(work))
        return dense_macs / m if m > 0 else float("inf")

    removed: List[str] = []
    if target.kind == "blocks":
        n = int(target.value)
        if n > len(order):
            raise DBPError(f"target {target.describe()} cannot be met: only {len(order)} removable block(s) "
                           f"({', '.join(order)})")
        removed = list(order[:n])
        remove_blocks_(work, [by_name[x] for x in removed])
        check_shape()
        return Plan(removed, macs_ratio())

    if target.kind == "macs":
        remove_blocks_(work, [by_name[x] for x in order])
        best = macs_ratio()
        if best < target.value:
            raise DBPError(f"target {target.describe()} cannot be met: removing all {len(order)} candidate "
                           f"block(s) reaches a MACs ratio of {best:.3f}")
        work = copy.deepcopy(model)
        ratio = 1.0
        for name in order:
            if ratio >= target.value:
                break
            remove_blocks_(work, [by_name[name]])
            removed.append(name)
            ratio = macs_ratio()
        check_shape()
        return Plan(removed, ratio)

    # latency
    measurements: List[Dict[str, float]] = []
    ratio = 1.0
    if target.value > 1.0:
        all_removed = copy.deepcopy(model)
        remove_blocks_(all_removed, [by_name[x] for x in order])
        best = _latency_ratio(model, all_removed, ex, latency_warmup, latency_repeats, latency_threads)
        del all_removed
        if best["ratio"] < target.value:
            raise DBPError(f"target {target.describe()} cannot be met: removing all {len(order)} candidate "
                           f"block(s) measured a latency ratio of {best['ratio']:.3f} "
                           f"({best['dense_ms']:.3f} ms -> {best['pruned_ms']:.3f} ms at batch 1)")
        for name in order:
            remove_blocks_(work, [by_name[name]])
            removed.append(name)
            m = _latency_ratio(model, work, ex, latency_warmup, latency_repeats, latency_threads)
            measurements.append({"removed": len(removed), **m})
            ratio = m["ratio"]
            if ratio >= target.value:
                break
        if ratio < target.value:
            raise DBPError(f"target {target.describe()} was not met: with all {len(order)} block(s) removed the "
                           f"latency ratio measured {ratio:.3f} (the machine may be too noisy; retry or lower it)")
    check_shape()
    return Plan(removed, macs_ratio(), ratio, measurements)


# --------------------------------------------------------------------------- the whole method


@dataclass
class DBPResult:
    """What :func:`prune_` did.

    Attributes:
        blocks: the candidates (:class:`Block`), in network order.
        scores: their :class:`BlockScore`, same order.
        removed: names of the removed blocks, in removal order (least useful first).
        target: the :class:`Target`.
        plan: the :class:`Plan` (achieved MACs / latency ratios).
        info: ``baseline`` (``D_0``), ``baseline_loss``, ``samples``, ``classes``.
    """

    blocks: List[Block]
    scores: List[BlockScore]
    removed: List[str]
    target: Target
    plan: Plan
    info: Dict[str, Any]

    def report(self) -> Dict[str, Dict[str, Any]]:
        """``{block name: {members, kind, position, macs, discrimination, probe_loss, reference,
        gain, loss_gain, rank, removed}}`` in network order; ``rank`` 0 is the least useful."""
        order = removal_order(self.scores)
        rank = {n: i for i, n in enumerate(order)}
        removed = set(self.removed)
        out: Dict[str, Dict[str, Any]] = {}
        for b, s in zip(self.blocks, self.scores):
            out[b.name] = {"members": list(b.members), "kind": b.kind, "position": b.position, "macs": b.macs,
                           "discrimination": s.discrimination, "probe_loss": s.probe_loss,
                           "reference": s.reference, "gain": s.gain, "loss_gain": s.loss_gain,
                           "rank": rank[b.name], "removed": b.name in removed}
        return out


def prune_(model: nn.Module, example_inputs: Any, data: Iterable, target: Any,
           candidates: Optional[Sequence] = None, blocks: Optional[Sequence[Block]] = None,
           groups: Optional[Sequence[Tuple[Sequence[str], int]]] = None, num_batches: Optional[int] = 8,
           num_classes: Optional[int] = None, holdout: float = 0.25, seed: int = 0,
           weight_decay: float = 1e-3, max_iter: int = 100, reference: str = "previous",
           macs_fn: Optional[Callable[[nn.Module], float]] = None, latency_warmup: int = 5,
           latency_repeats: int = 30, latency_threads: Optional[int] = None,
           progress: bool = False) -> DBPResult:
    """DBP end to end: find blocks, score them, plan, then replace the chosen ones with ``nn.Identity``.

    Everything that can fail (bad target, bad data, unreachable target) fails before ``model``
    is changed.

    Args:
        model: pruned in place.
        example_inputs: a batch for the shape pass, MACs counting and (latency) timing.
        data: ``(inputs, labels)`` batches for the probes.
        target: a :class:`Target` or ``{"blocks": n}`` / ``{"macs": r}`` / ``{"latency": r}``.
        candidates: module names to consider instead of the automatic discovery.
        blocks: already discovered blocks (skips :func:`find_blocks`).
        groups: optional quotas ``[(block names, count), ...]`` (NNI-style per-entry ratios);
            with them ``target`` must be blocks-kind and equal to the total count.
        other arguments: see :func:`score_blocks` and :func:`plan_removal`.

    Example:
        >>> from pfgdf_plugin.models import build_model
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = build_model("resnet20", width=0.25)
        >>> data = [(torch.randn(20, 3, 32, 32), torch.arange(20) % 10)]
        >>> result = prune_(model, torch.randn(1, 3, 32, 32), data, {"blocks": 2})
        >>> len(result.removed), len(result.blocks)
        (2, 7)
    """
    target = Target.parse(target)
    if blocks is None:
        blocks = find_blocks(model, example_inputs, candidates)
    blocks = list(blocks)
    if not blocks:
        raise DBPError(f"{type(model).__name__} has no removable block")
    if target.kind == "blocks" and target.value > len(blocks):
        raise DBPError(f"target {target.describe()} cannot be met: only {len(blocks)} removable block(s) "
                       f"({', '.join(b.name for b in blocks)})")
    if groups is not None:
        if target.kind != "blocks" or target.value != sum(c for _, c in groups):
            raise ValueError("with groups, target must be {'blocks': total of the group counts}")
        known = {b.name for b in blocks}
        for names, _count in groups:
            missing = [n for n in names if n not in known]
            if missing:
                raise DBPError(f"groups name unknown blocks: {', '.join(missing)}")
    elif target.kind == "macs":
        # fail before the probes if even removing everything is not enough
        plan_removal(model, blocks, [b.name for b in blocks], target, example_inputs, macs_fn)
    scores, info = score_blocks(model, blocks, data, num_batches, num_classes, holdout, seed, weight_decay,
                                max_iter, reference, progress)
    order = removal_order(scores)
    if groups is not None:
        order = quota_selection(order, groups)
    plan = plan_removal(model, blocks, order, target, example_inputs, macs_fn, latency_warmup,
                        latency_repeats, latency_threads)
    by_name = {b.name: b for b in blocks}
    remove_blocks_(model, [by_name[n] for n in plan.removed])
    return DBPResult(blocks, scores, list(plan.removed), target, plan, info)
