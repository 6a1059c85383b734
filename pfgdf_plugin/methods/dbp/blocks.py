"""DBP's candidates: which units of a network can be removed, and removing them.

A removable unit keeps its input shape, so ``nn.Identity`` can stand in for it: a ``Conv2d``
(equal channels, stride 1) with an optional ``BatchNorm2d`` and activation after it, as
consecutive children of an ``nn.Sequential``; a residual block of a registered type (see
:func:`register_block_type`) that the type's rule calls removable; or any modules the user names.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ...errors import DBPError

__all__ = [
    "Block",
    "blocks_removed",
    "call_model",
    "find_blocks",
    "register_block_type",
    "registered_block_types",
    "remove_blocks_",
    "set_block_macs_",
]

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh)

BlockType = Union[type, str]
_BLOCK_TYPES: Dict[BlockType, Callable[[nn.Module], bool]] = {}

Raw = List[Tuple[str, Tuple[str, ...], str]]  # (name, member names, kind) per candidate


@dataclass
class Block:
    """A removable unit.

    Attributes:
        name: the block's name (its first member's module name).
        members: module names replaced by ``nn.Identity`` when the block is removed.
        kind: ``"conv"`` (a Conv[-BN][-act] run), ``"residual"`` or ``"named"`` (user-given).
        position: execution order among the candidates (0 = runs first).
        shape: per-sample feature shape, the same at the block's input and output.
        macs: the MACs per sample the block's removal saves, by the ``macs_fn`` given to
            :func:`find_blocks` (``None`` when none was given).
    """

    name: str
    members: Tuple[str, ...]
    kind: str
    position: int = -1
    shape: Tuple[int, ...] = ()
    macs: Optional[int] = None


# --------------------------------------------------------------------------- the registry of residual block types


def register_block_type(block_type: BlockType, removable: Callable[[nn.Module], bool]) -> None:
    """Teach :func:`find_blocks` a residual block type.

    An instance of a registered type is one candidate as a whole (its children are not searched)
    when ``removable(instance)`` is true, typically when it has no shortcut projection and
    stride 1; otherwise it is skipped, children included. Registering a type again replaces its rule.

    Args:
        block_type: the class, or ``"package.module:ClassName"`` for a class of a library that
            need not be imported: it is looked up in ``sys.modules`` at discovery time (a model
            built from that library has imported it), and never imported here.
        removable: ``module -> bool``.

    Example:
        >>> class Res(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv = nn.Conv2d(4, 4, 3, padding=1)
        ...     def forward(self, x):
        ...         return x + self.conv(x)
        >>> register_block_type(Res, lambda m: True)
        >>> [b.name for b in find_blocks(nn.Sequential(nn.Conv2d(3, 4, 1), Res()), torch.randn(1, 3, 8, 8))]
        ['1']
    """
    if isinstance(block_type, str):
        module, _, qualname = block_type.partition(":")
        if not module or not qualname:
            raise ValueError(f"register_block_type: a type given by name must read 'package.module:ClassName', "
                             f"got {block_type!r}")
    elif not isinstance(block_type, type) or not issubclass(block_type, nn.Module):
        raise TypeError(f"register_block_type: block_type must be an nn.Module subclass or a "
                        f"'package.module:ClassName' string, got {block_type!r}")
    if not callable(removable):
        raise TypeError(f"register_block_type: removable must be a callable module -> bool, got {removable!r}")
    _BLOCK_TYPES[block_type] = removable


def registered_block_types() -> List[BlockType]:
    """The registered residual block types (classes or ``"module:ClassName"`` names), in registration order."""
    return list(_BLOCK_TYPES)


def _resolve(block_type: BlockType) -> Optional[type]:
    if isinstance(block_type, type):
        return block_type
    module_name, _, qualname = block_type.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None


def _residual_verdict(m: nn.Module) -> Optional[bool]:
    """``True``/``False`` for registered residual block types, ``None`` for anything else."""
    for block_type, removable in _BLOCK_TYPES.items():
        cls = _resolve(block_type)
        if cls is not None and isinstance(m, cls):
            return bool(removable(m))
    return None


# --------------------------------------------------------------------------- running a model


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """``model`` applied to a tensor, a tuple/list of positional inputs, or a dict of keyword inputs."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def modes(model: nn.Module) -> Dict[nn.Module, bool]:
    """The training flag of every module, for :func:`restore`."""
    return {m: m.training for m in model.modules()}


def restore(saved: Dict[nn.Module, bool]) -> None:
    """Set back the training flags :func:`modes` recorded."""
    for m, t in saved.items():
        m.training = t


def shape_of(x: Any) -> Optional[Tuple[int, ...]]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else None


# --------------------------------------------------------------------------- discovery


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


def _auto_candidates(model: nn.Module) -> Raw:
    found: Raw = []
    residual_prefixes: List[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in residual_prefixes):
            continue
        verdict = _residual_verdict(m)
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


def _named_candidates(model: nn.Module, candidates: Sequence) -> Raw:
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, (list, tuple)):
        raise DBPError(f"candidates must be a list of block names (or of lists of member names), got {candidates!r}")
    modules = dict(model.named_modules())
    out = []
    for c in candidates:
        members = (c,) if isinstance(c, str) else tuple(c) if isinstance(c, (list, tuple)) else ()
        if not members or not all(isinstance(n, str) for n in members):
            raise DBPError(f"candidates must be module names or sequences of module names, got {c!r}")
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


@torch.no_grad()
def _trace_shapes(model: nn.Module, example_inputs: Any, raw: Raw):
    """One forward pass: per candidate the input/output shapes of every call and the execution order."""
    named = dict(model.named_modules())
    calls: Dict[str, List[Any]] = {name: [] for name, _, _ in raw}
    first_inputs: Dict[str, List[Any]] = {name: [] for name, _, _ in raw}
    order: Dict[str, int] = {}
    handles = []
    for name, members, _ in raw:
        first, last = named[members[0]], named[members[-1]]

        def pre(mod, args, kwargs, _n=name):
            if _n not in order:
                order[_n] = len(order)
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            extra = len(args) + len(kwargs) - len(tensors)
            first_inputs[_n].append(tensors[0].shape if len(tensors) == 1 and not extra and not kwargs else
                                    ("args", len(args), len(kwargs)))

        def post(mod, args, out, _n=name):
            calls[_n].append(shape_of(out))

        handles.append(first.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(last.register_forward_hook(post))
    saved = modes(model)
    model.eval()
    try:
        call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        restore(saved)
    return first_inputs, calls, order


def _problem(ins: List[Any], outs: List[Any]) -> Optional[str]:
    """Why a candidate cannot become ``nn.Identity`` (``None`` if it can)."""
    if not ins:
        return "never runs in the forward pass of example_inputs"
    if len(ins) > 1 or len(outs) > 1:
        return (f"runs {max(len(ins), len(outs))} times per forward pass; only a module that runs once "
                "can be removed")
    if not isinstance(ins[0], torch.Size):
        return "does not take exactly one tensor, so nn.Identity cannot stand in for it"
    if outs[0] is None:
        return "does not return a single tensor"
    if tuple(ins[0]) != tuple(outs[0]):
        return (f"changes the shape: input {tuple(ins[0])} -> output {tuple(outs[0])}; only blocks whose "
                "output shape equals their input shape can become nn.Identity")
    return None


def find_blocks(model: nn.Module, example_inputs: Any, candidates: Optional[Sequence] = None,
                macs_fn: Optional[Callable[[nn.Module], float]] = None) -> List[Block]:
    """The removable blocks of ``model``, in execution order.

    Args:
        model: the network (not modified; its train/eval modes are restored).
        example_inputs: a batch for one forward pass (tensor, tuple of positional inputs, or
            dict of keyword inputs).
        candidates: ``None`` to discover blocks automatically (see the module docstring), or
            module names to use instead; an entry may also be a sequence of names forming one
            block (run consecutively, e.g. ``["features.3", "features.4", "features.5"]``).
        macs_fn: ``model -> MACs``, e.g. ``lambda m: pfgdf_plugin.measure.count_macs(m, x)``;
            with it every block's ``macs`` is what its removal saves (counted on a copy).

    Raises:
        DBPError: no removable block; a named candidate that does not exist, never runs, runs
            more than once, takes other than one tensor, or whose output shape differs from its
            input shape.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
        ...                     nn.ReLU(), nn.Conv2d(8, 8, 1))
        >>> [(b.name, b.members) for b in find_blocks(net, torch.randn(1, 3, 8, 8))]
        [('1', ('1', '2', '3')), ('4', ('4',))]
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
        first_inputs, calls, order = _trace_shapes(model, example_inputs, raw)
    except DBPError:
        raise
    except Exception as e:
        raise DBPError(f"the forward pass of {type(model).__name__} on example_inputs failed: "
                       f"{type(e).__name__}: {e}") from e
    blocks: List[Block] = []
    for name, members, kind in raw:
        problem = _problem(first_inputs[name], calls[name])
        if problem and named:
            label = name if len(members) == 1 else f"{name} (members {', '.join(members)})"
            raise DBPError(f"candidate {label} {problem}")
        if not problem:
            blocks.append(Block(name=name, members=members, kind=kind, position=order[name],
                                shape=tuple(first_inputs[name][0])[1:]))
    if not blocks:
        raise DBPError(f"{type(model).__name__} has no removable block: no candidate keeps its input shape")
    blocks.sort(key=lambda b: b.position)
    for i, b in enumerate(blocks):
        b.position = i
    if macs_fn is not None:
        set_block_macs_(model, blocks, macs_fn)
    return blocks


def _swap_(model: nn.Module, names: Iterable[str], replacement: Optional[Dict[str, nn.Module]] = None
           ) -> Dict[str, nn.Module]:
    """Put ``replacement[name]`` (default ``nn.Identity()``) at each module name; return what was there."""
    old = {}
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old[name] = getattr(parent, attr)
        setattr(parent, attr, nn.Identity() if replacement is None else replacement[name])
    return old


def set_block_macs_(model: nn.Module, blocks: Sequence[Block], macs_fn: Callable[[nn.Module], float]) -> None:
    """Set each block's ``macs`` to what removing it alone saves, counted by ``macs_fn``.

    Each block is swapped out of ``model`` itself while it is counted and put back after (no copy
    of the model: on a network of hundreds of millions of parameters a copy is gigabytes).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU())
        >>> blocks = [Block("0", ("0", "1"), "conv")]
        >>> set_block_macs_(net, blocks, lambda m: sum(p.numel() for p in m.parameters()))
        >>> blocks[0].macs, isinstance(net[0], nn.Conv2d)
        (6, True)
    """
    dense = float(macs_fn(model))
    for b in blocks:
        with blocks_removed(model, [b]):
            b.macs = int(round(dense - float(macs_fn(model))))


@contextlib.contextmanager
def blocks_removed(model: nn.Module, blocks: Iterable[Block]):
    """``model`` itself with ``blocks`` replaced by ``nn.Identity`` inside the ``with``; put back after, also on error.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU())
        >>> with blocks_removed(net, [Block("0", ("0",), "conv")]):
        ...     type(net[0]).__name__
        'Identity'
        >>> type(net[0]).__name__
        'Conv2d'
    """
    taken: List[Tuple[Block, Dict[str, nn.Module]]] = []
    try:
        for b in blocks:
            taken.append((b, _swap_(model, b.members)))
        yield model
    finally:
        for b, old in reversed(taken):
            _swap_(model, b.members, old)


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
        _swap_(model, b.members)
