"""MPDCompress: permuted block-diagonal masks, and the conversion to block-diagonal layers.

Framework-free: plans, masks and the conversion take and return tensors and ``torch.nn``
modules. The Torch-Pruning adapter (:mod:`pfgdf_plugin.torch_pruning.mpd`) holds the masks
while a model trains and finds, with Torch-Pruning's dependency graph, which permutations can
be folded into neighbouring layers; the NNI adapter (:mod:`pfgdf_plugin.nni.mpd`) writes the
same masks into NNI's wrappers. Both convert through :func:`convert_model`.

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
  or ``compression=x`` over the targeted weights (:func:`choose_blocks`): every layer gets
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
  BatchNorm's parameters are permuted to match); see :class:`FoldLink`.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..errors import MPDError
from ..modules import BlockDiagonalLinear, PermutedGroupConv2d, module_from_description
from .params import Params

PERMUTATIONS = ("random", "magnitude")
_LAYERS = (nn.Linear, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
DESCRIPTION_FORMAT = "pfgdf_plugin.mpd/1"


# --------------------------------------------------------------------------- checks


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_blocks(name: str, blocks: Any, out_channels: int, in_channels: int, round_to: int = 1) -> int:
    """Validate ``blocks`` for a layer of ``out_channels x in_channels``; return it as an int.

    Example:
        >>> check_blocks("fc1", 10, 300, 1024)
        10
        >>> check_blocks("fc3", 20, 10, 100)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pfgdf_plugin.errors.MPDError: fc3: blocks=20 exceeds min(out, in) = min(10, 100) = 10; ...
    """
    if not _is_int(blocks) or blocks < 1:
        raise MPDError(f"{name}: blocks must be an integer >= 1, got {blocks!r}")
    cap = max_blocks(out_channels, in_channels, round_to)
    if blocks > cap:
        unit = "" if round_to == 1 else f" // round_to={round_to}"
        raise MPDError(f"{name}: blocks={blocks} exceeds min(out, in){unit} = min({out_channels}, {in_channels})"
                       f"{unit} = {cap}; every block needs at least one output and one input channel")
    return int(blocks)


def check_round_to(round_to: Any) -> int:
    """``None`` -> 1; otherwise an integer >= 1."""
    if round_to is None:
        return 1
    if not _is_int(round_to) or round_to < 1:
        raise MPDError(f"round_to must be None or an integer >= 1, got {round_to!r}")
    return int(round_to)


def check_permutation(permutation: Any) -> str:
    if permutation not in PERMUTATIONS:
        raise MPDError(f"permutation must be one of {', '.join(PERMUTATIONS)}; got {permutation!r}")
    return permutation


def check_compression(compression: Any) -> float:
    if isinstance(compression, bool) or not isinstance(compression, (int, float)) \
            or not math.isfinite(compression) or compression < 1:
        raise MPDError(f"compression must be a number >= 1, got {compression!r}")
    return float(compression)


@dataclass(frozen=True)
class MPDParams(Params):
    """MPDCompress's knobs, with the one set of defaults the pruners and the recipes share.

    Give the size as ``compression`` (a model-wide factor; layers get block counts by
    :func:`choose_blocks`) or as ``blocks`` (one count for every masked layer), not both; with
    neither, ``compression`` is 10 (the paper's LeNet-300-100 setting).

    Attributes:
        compression: dense weights / kept weights over the masked layers (>= 1).
        blocks: block count of every masked layer (>= 1).
        permutation: ``random`` (the paper) or ``magnitude`` (balanced co-clustering of ``|W|``).
        seed: seed of the permutations.
        fold: fold adjacent permutations into neighbouring layers at conversion.
        round_to: every block's size a multiple of this (``None``: 1).
        dense_output: leave the output layer dense (unless it is named explicitly).
    """

    error: ClassVar[type] = MPDError
    compression: Optional[float] = None
    blocks: Optional[int] = None
    permutation: str = "random"
    seed: int = 0
    fold: bool = True
    round_to: Optional[int] = None
    dense_output: bool = True

    def __post_init__(self) -> None:
        if self.compression is None and self.blocks is None:
            object.__setattr__(self, "compression", 10.0)
        super().__post_init__()

    def problems(self) -> List[str]:
        found = []
        if self.compression is not None and self.blocks is not None:
            found.append(f"give compression or blocks, not both; got compression={self.compression!r}, "
                         f"blocks={self.blocks!r}")
        if self.blocks is not None and (not _is_int(self.blocks) or self.blocks < 1):
            found.append(f"blocks must be an integer >= 1, got {self.blocks!r}")
        checks = [(check_permutation, self.permutation), (check_round_to, self.round_to)]
        if self.compression is not None:
            checks.append((check_compression, self.compression))
        for check, value in checks:
            try:
                check(value)
            except MPDError as e:
                found.append(str(e))
        if not _is_int(self.seed):
            found.append(f"seed must be an integer, got {self.seed!r}")
        found += [f"{k} must be true or false, got {v!r}" for k, v in (("fold", self.fold),
                  ("dense_output", self.dense_output)) if not isinstance(v, bool)]
        return found


def check_layer(name: str, module: nn.Module) -> Tuple[int, int, Tuple[int, ...]]:
    """``(out, in, kernel)`` of a layer MPD can mask; ``MPDError`` for anything else."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise MPDError(f"{name}: Conv2d with groups={module.groups} (depthwise or grouped) cannot take an MPD "
                           "mask; leave it out (ignored_layers / config_list)")
        return module.out_channels, module.in_channels, tuple(module.kernel_size)
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, ()
    raise MPDError(f"{name}: MPD masks nn.Linear and nn.Conv2d layers, got {type(module).__name__}")


def max_blocks(out_channels: int, in_channels: int, round_to: int = 1) -> int:
    """The most blocks a layer can take: ``min(out, in) // round_to`` (at least 1)."""
    return max(1, min(out_channels, in_channels) // round_to)


# --------------------------------------------------------------------------- plans


def balanced_sizes(n: int, blocks: int, round_to: int = 1) -> List[int]:
    """Sizes of ``blocks`` balanced blocks over ``n`` channels (larger blocks first).

    With ``round_to=r`` the channels are dealt in units of ``r`` and the ``n % r`` channels
    left over join the last block.

    Example:
        >>> balanced_sizes(10, 3), balanced_sizes(12, 4), balanced_sizes(20, 3, round_to=4)
        ([4, 3, 3], [3, 3, 3, 3], [8, 8, 4])
    """
    units, rest = divmod(n, round_to)
    if blocks < 1 or units < blocks:
        raise MPDError(f"cannot split {n} channels into {blocks} blocks of at least {round_to}")
    q, r = divmod(units, blocks)
    sizes = [(q + 1 if b < r else q) * round_to for b in range(blocks)]
    sizes[-1] += rest
    return sizes


def _labels(sizes: Sequence[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(list(sizes)))


def layer_generator(name: str, seed: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and the layer's name (stable across runs)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))


@dataclass
class BlockPlan:
    """One layer's blocks: a block label per output channel and per input channel.

    The mask keeps ``W[o, i]`` (all kernel taps of it, for a convolution) iff
    ``out_labels[o] == in_labels[i]``.

    Attributes:
        name: the layer's name.
        out_labels, in_labels: ``long`` labels in ``[0, blocks)``.
        blocks: ``c``.
        kernel: the convolution's kernel size, ``()`` for a linear layer.

    Example:
        >>> plan = BlockPlan("fc", torch.tensor([0, 1, 1]), torch.tensor([1, 0, 0, 1]), 2)
        >>> plan.mask()
        tensor([[0., 1., 1., 0.],
                [1., 0., 0., 1.],
                [1., 0., 0., 1.]])
        >>> plan.kept_weights(), plan.dense_weights()
        (6, 12)
    """

    name: str
    out_labels: torch.Tensor
    in_labels: torch.Tensor
    blocks: int
    kernel: Tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.out_labels = torch.as_tensor(self.out_labels, dtype=torch.long).reshape(-1).cpu()
        self.in_labels = torch.as_tensor(self.in_labels, dtype=torch.long).reshape(-1).cpu()
        self.kernel = tuple(int(k) for k in self.kernel)
        for what, labels in (("out_labels", self.out_labels), ("in_labels", self.in_labels)):
            if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= self.blocks:
                raise MPDError(f"{self.name}: {what} must hold labels in [0, {self.blocks}), got "
                               f"{labels.tolist()[:8]}{'...' if labels.numel() > 8 else ''}")
        if (self.out_sizes() == 0).any() or (self.in_sizes() == 0).any():
            raise MPDError(f"{self.name}: every one of the {self.blocks} blocks needs at least one output and one "
                           f"input channel (output sizes {self.out_sizes().tolist()}, input sizes "
                           f"{self.in_sizes().tolist()})")

    @property
    def out_channels(self) -> int:
        return int(self.out_labels.numel())

    @property
    def in_channels(self) -> int:
        return int(self.in_labels.numel())

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel) if self.kernel else 1

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        return (self.out_channels, self.in_channels) + self.kernel

    def out_sizes(self) -> torch.Tensor:
        return torch.bincount(self.out_labels, minlength=self.blocks)

    def in_sizes(self) -> torch.Tensor:
        return torch.bincount(self.in_labels, minlength=self.blocks)

    def mask2d(self) -> torch.Tensor:
        """Bool ``[out, in]``: ``True`` where the weight is kept."""
        return self.out_labels[:, None] == self.in_labels[None, :]

    def mask(self, dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> torch.Tensor:
        """The weight-shaped mask (broadcast over the kernel for a convolution)."""
        m = self.mask2d().to(dtype=dtype, device=device)
        if self.kernel:
            m = m.reshape(m.shape + (1,) * len(self.kernel)).expand(self.weight_shape).contiguous()
        return m

    def dense_weights(self) -> int:
        return self.out_channels * self.in_channels * self.kernel_numel

    def kept_weights(self) -> int:
        return int((self.out_sizes() * self.in_sizes()).sum()) * self.kernel_numel

    def summary(self) -> Dict[str, Any]:
        """``blocks``, ``dense``, ``kept`` weights and their ratio ``compression``."""
        dense, kept = self.dense_weights(), self.kept_weights()
        return {"blocks": self.blocks, "dense": dense, "kept": kept, "compression": dense / kept}

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe copy (labels as lists)."""
        return {"name": self.name, "blocks": self.blocks, "kernel": list(self.kernel),
                "out_labels": self.out_labels.tolist(), "in_labels": self.in_labels.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BlockPlan":
        return cls(str(d["name"]), torch.tensor(d["out_labels"]), torch.tensor(d["in_labels"]), int(d["blocks"]),
                   tuple(d.get("kernel", ())))


def random_labels(n: int, sizes: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Balanced labels (``sizes[b]`` channels in block ``b``) in a random order."""
    base = _labels(sizes)
    return base[torch.randperm(n, generator=generator)]


def _greedy_assign(scores: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Labels maximising ``sum scores[k, label[k]]`` greedily under block capacities ``sizes``.

    Pairs ``(channel, block)`` are taken in descending score order (ties by position); a pair
    is used when the channel is free and the block has room.
    """
    n, c = scores.shape
    order = torch.argsort(scores.reshape(-1), descending=True, stable=True).tolist()
    labels = [-1] * n
    room = list(sizes)
    left = n
    for flat in order:
        k, b = divmod(flat, c)
        if labels[k] < 0 and room[b] > 0:
            labels[k] = b
            room[b] -= 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(labels, dtype=torch.long)


def _kept_mass(a: torch.Tensor, out_labels: torch.Tensor, in_labels: torch.Tensor) -> float:
    return float((a * (out_labels[:, None] == in_labels[None, :])).sum())


def _spread_rows(a: torch.Tensor, c: int) -> torch.Tensor:
    """``c`` rows of ``a`` far apart in direction: the heaviest row, then farthest-first by cosine."""
    unit = a / a.norm(dim=1, keepdim=True).clamp_min(1e-300)
    chosen = [int(torch.argmax(a.sum(1)))]
    closest = unit @ unit[chosen[0]]
    for _ in range(c - 1):
        closest[chosen] = math.inf
        nxt = int(torch.argmin(closest))
        chosen.append(nxt)
        closest = torch.maximum(closest, unit @ unit[nxt])
    return torch.tensor(chosen)


def magnitude_labels(weight: torch.Tensor, out_sizes: Sequence[int], in_sizes: Sequence[int],
                     generator: Optional[torch.Generator] = None, n_init: int = 4,
                     max_iter: int = 20) -> Tuple[torch.Tensor, torch.Tensor]:
    """Balanced block labels that keep much of ``|W|``: alternating greedy co-clustering.

    ``A = |W|`` summed over the kernel (``[out, in]``). Input channels get initial labels, then
    the labels alternate: every output channel's mass per block (``A @ onehot(in_labels)``) is
    assigned by a capacity-constrained greedy (pairs (channel, block) taken in descending mass;
    a pair is used while the channel is free and the block has room), then every input
    channel's mass per block (``A^T @ onehot(out_labels)``) the same way. A start stops when an
    alternation no longer raises the kept mass (or after ``max_iter``). The first start labels
    the inputs from ``c`` output rows chosen far apart (the heaviest row, then farthest-first
    by cosine similarity): the chosen rows are matched to blocks by the size of their clusters
    (rows nearest to them, inputs heaviest in them; larger clusters to larger blocks), and each
    input goes, under the capacities, to the block whose row it weighs most in; the other
    ``n_init - 1`` starts label them at random (balanced, from
    ``generator``). The best labels over all starts win. Deterministic for a given generator
    state; every block keeps exactly its balanced size. It is a local search: it recovers a
    planted block structure, but nothing guarantees the best partition of an arbitrary matrix.

    Returns:
        ``(out_labels, in_labels)``.
    """
    a = weight.detach().abs().to("cpu", torch.float64)
    a = a.reshape(a.shape[0], a.shape[1], -1).sum(-1)
    out_n, in_n = a.shape
    c = len(out_sizes)
    eye = torch.eye(c, dtype=torch.float64)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    best: Optional[Tuple[float, torch.Tensor, torch.Tensor]] = None
    for start in range(max(1, n_init)):
        if start == 0:
            seeds = _spread_rows(a, c)
            rows = a[seeds] / a[seeds].sum(1, keepdim=True).clamp_min(1e-300)
            # larger clusters (rows nearest a seed, inputs heaviest in it) go to larger blocks
            unit = a / a.norm(dim=1, keepdim=True).clamp_min(1e-300)
            n_rows = torch.bincount(torch.argmax(unit @ unit[seeds].t(), 1), minlength=c).tolist()
            n_cols = torch.bincount(torch.argmax(rows, 0), minlength=c).tolist()
            by_size = sorted(range(c), key=lambda s: (-n_rows[s], -n_cols[s], s))
            blocks_by_size = sorted(range(c), key=lambda b: (-out_sizes[b], -in_sizes[b], b))
            seed_of = [0] * c
            for s_i, b in zip(by_size, blocks_by_size):
                seed_of[b] = s_i
            in_labels = _greedy_assign(rows[seed_of].t().contiguous(), in_sizes)
        else:
            in_labels = random_labels(in_n, in_sizes, generator)
        out_labels = _greedy_assign(a @ eye[in_labels], out_sizes)
        current = _kept_mass(a, out_labels, in_labels)
        for _ in range(max_iter):
            new_in = _greedy_assign(a.t() @ eye[out_labels], in_sizes)
            new_out = _greedy_assign(a @ eye[new_in], out_sizes)
            value = _kept_mass(a, new_out, new_in)
            if value <= current:
                break
            out_labels, in_labels, current = new_out, new_in, value
        if best is None or current > best[0]:
            best = (current, out_labels, in_labels)
    assert best is not None
    return best[1], best[2]


def make_plan(name: str, weight: torch.Tensor, blocks: int, permutation: str = "random", seed: int = 0,
              round_to: int = 1, kernel: Optional[Sequence[int]] = None) -> BlockPlan:
    """The :class:`BlockPlan` of one layer.

    Args:
        name: the layer's name (seeds its generator, and names it in errors).
        weight: ``[out, in, *kernel]`` (the magnitudes matter only for ``"magnitude"``).
        blocks: ``c`` (checked against the layer's size).
        permutation: ``"random"`` or ``"magnitude"``.
        seed: the run's seed.
        round_to: block sizes in units of this many channels.
        kernel: the kernel size (default ``weight.shape[2:]``).

    Example:
        >>> plan = make_plan("fc1", torch.randn(6, 9), blocks=3, seed=0)
        >>> plan.out_sizes().tolist(), plan.in_sizes().tolist(), plan.kept_weights()
        ([2, 2, 2], [3, 3, 3], 18)
    """
    check_permutation(permutation)
    round_to = check_round_to(round_to)
    if weight.dim() < 2:
        raise MPDError(f"{name}: weight must have at least 2 dimensions, got shape {tuple(weight.shape)}")
    out_n, in_n = int(weight.shape[0]), int(weight.shape[1])
    blocks = check_blocks(name, blocks, out_n, in_n, round_to)
    if not torch.isfinite(weight.detach()).all():
        raise MPDError(f"{name}: the weight holds NaN/Inf values")
    kernel = tuple(weight.shape[2:]) if kernel is None else tuple(kernel)
    out_sizes, in_sizes = balanced_sizes(out_n, blocks, round_to), balanced_sizes(in_n, blocks, round_to)
    gen = layer_generator(name, seed)
    if permutation == "random" or blocks == 1:
        out_labels, in_labels = random_labels(out_n, out_sizes, gen), random_labels(in_n, in_sizes, gen)
    else:
        out_labels, in_labels = magnitude_labels(weight, out_sizes, in_sizes, gen)
    return BlockPlan(name, out_labels, in_labels, blocks, kernel)


def choose_blocks(shapes: Mapping[str, Tuple[int, int, int]], compression: float,
                  round_to: int = 1) -> Dict[str, int]:
    """Blocks per layer so the layers' weights shrink by at least ``compression`` overall.

    Args:
        shapes: ``{name: (out, in, kernel_numel)}`` of the targeted layers.
        compression: the target ratio of dense to kept weights (>= 1).
        round_to: block sizes in units of this many channels.

    Every layer starts at ``ceil(compression)`` blocks, capped at :func:`max_blocks`; while the
    total ratio is below the target, the layer keeping the most weights (that can take one
    more block) gets one more. Layers with fewer than two channels (units) on a side keep 1.

    Example:
        >>> choose_blocks({"fc1": (300, 1024, 1), "fc2": (100, 300, 1)}, 10.0)
        {'fc1': 10, 'fc2': 10}
        >>> choose_blocks({"a": (4, 64, 9), "b": (64, 64, 9)}, 8.0)  # "a" caps at 4: "b" takes more
        {'a': 4, 'b': 9}
    """
    compression = check_compression(compression)
    round_to = check_round_to(round_to)

    def kept(shape, c):
        o, i, k = shape
        return sum(a * b for a, b in zip(balanced_sizes(o, c, round_to), balanced_sizes(i, c, round_to))) * k

    out = {name: min(math.ceil(compression - 1e-9), max_blocks(o, i, round_to))
           for name, (o, i, k) in shapes.items()}
    dense = sum(o * i * k for o, i, k in shapes.values())
    kept_now = {name: kept(shape, out[name]) for name, shape in shapes.items()}
    while dense and dense / sum(kept_now.values()) < compression - 1e-9:
        free = [n for n in shapes if out[n] < max_blocks(shapes[n][0], shapes[n][1], round_to)]
        if not free:
            break
        name = max(free, key=lambda n: (kept_now[n], n))
        out[name] += 1
        kept_now[name] = kept(shapes[name], out[name])
    return out


def kept_share(weight: torch.Tensor, plan_or_mask: Union[BlockPlan, torch.Tensor]) -> float:
    """Share of ``sum |W|`` that the mask keeps (1.0 for a zero weight).

    Example:
        >>> w = torch.tensor([[3., 1.], [1., 3.]])
        >>> kept_share(w, BlockPlan("l", torch.tensor([0, 1]), torch.tensor([0, 1]), 2))
        0.75
    """
    a = weight.detach().abs().to(torch.float64)
    if isinstance(plan_or_mask, BlockPlan):
        m = plan_or_mask.mask(torch.float64, a.device)
    else:
        m = plan_or_mask.to(a.device, torch.float64)
    total = float(a.sum())
    return 1.0 if total == 0 else float((a * m).sum()) / total


def plan_from_mask(name: str, mask: torch.Tensor) -> BlockPlan:
    """Recover the :class:`BlockPlan` behind a weight-shaped mask; ``MPDError`` if it has none.

    A mask is block-diagonal after permutation iff it is constant over the kernel, its rows
    fall into patterns that are pairwise disjoint and together cover every input channel,
    and no row is empty. Blocks are numbered by their first output channel.

    Example:
        >>> plan_from_mask("fc", torch.tensor([[0., 1, 1], [1, 0, 0], [0, 1, 1]])).out_labels.tolist()
        [0, 1, 0]
    """
    if mask.dim() < 2:
        raise MPDError(f"{name}: a mask needs at least 2 dimensions, got shape {tuple(mask.shape)}")
    m = mask.detach().to("cpu") != 0
    out_n, in_n = m.shape[0], m.shape[1]
    flat = m.reshape(out_n, in_n, -1)
    m2 = flat[..., 0]
    if not bool((flat == m2.unsqueeze(-1)).all()):
        raise MPDError(f"{name}: the mask differs between kernel positions of one (out, in) pair; an MPD mask "
                       "is broadcast over the kernel")
    patterns, inverse = torch.unique(m2, dim=0, return_inverse=True)
    first = torch.full((patterns.shape[0],), out_n, dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(out_n), reduce="amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(first.numel())
    patterns = patterns[torch.argsort(first)]
    cover = patterns.sum(0)
    if not bool(patterns.any(1).all()) or not bool((cover == 1).all()):
        bad = "an output channel keeps no input" if not bool(patterns.any(1).all()) else \
            f"input channel {int(torch.nonzero(cover != 1)[0])} is kept by {int(cover[cover != 1][0])} blocks"
        raise MPDError(f"{name}: the mask is not block-diagonal after any permutation ({bad})")
    return BlockPlan(name, rank[inverse], patterns.to(torch.long).argmax(0), int(patterns.shape[0]),
                     tuple(mask.shape[2:]))


# --------------------------------------------------------------------------- conversion


def _layout(labels: torch.Tensor, blocks: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """``(position, gather, width)``: the raw slot of each channel, the channel of each raw
    slot (``n`` for padding), and the padded block size."""
    n = labels.numel()
    sizes = torch.bincount(labels, minlength=blocks)
    width = int(sizes.max())
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.empty(n, dtype=torch.long)
    slot[order] = torch.arange(n) - starts[labels[order]]
    position = labels * width + slot
    gather = torch.full((blocks * width,), n, dtype=torch.long)
    gather[position] = torch.arange(n)
    return position, gather, width


def check_block_diagonal(plan: BlockPlan, weight: torch.Tensor) -> None:
    """``MPDError`` naming the layer if ``weight`` is non-zero where ``plan`` masks it."""
    if tuple(weight.shape) != plan.weight_shape:
        raise MPDError(f"{plan.name}: weight shape {tuple(weight.shape)} does not match the plan's "
                       f"{plan.weight_shape}")
    outside = weight.detach() * (1 - plan.mask(weight.dtype, weight.device))
    bad = int((outside != 0).sum())
    if bad:
        raise MPDError(f"{plan.name}: {bad} weights outside the block-diagonal mask are non-zero, so the layer is "
                       "not block-diagonal after permutation (apply the masks, e.g. MPDPruner.apply_masks(), or "
                       "train with the pruner's hooks)")


def _blocks_of(plan: BlockPlan, weight: torch.Tensor):
    """The padded block weights ``[c, O, I, *kernel]`` and the layouts of both sides."""
    out_pos, out_gather, o_w = _layout(plan.out_labels, plan.blocks)
    _, in_gather, i_w = _layout(plan.in_labels, plan.blocks)
    w = weight.detach()
    padded = torch.zeros((w.shape[0] + 1, w.shape[1] + 1) + tuple(w.shape[2:]), dtype=w.dtype, device=w.device)
    padded[:-1, :-1] = w
    rows = out_gather.to(w.device).view(plan.blocks, o_w, 1)
    cols = in_gather.to(w.device).view(plan.blocks, 1, i_w)
    return padded[rows, cols], out_pos, in_gather, o_w, i_w


def convert_layer(plan: BlockPlan, module: nn.Module, strict: bool = True) -> nn.Module:
    """The block-diagonal replacement of ``module`` (a Linear or a Conv2d) under ``plan``.

    Args:
        plan: the layer's plan (its shape must match).
        module: the masked layer.
        strict: refuse (``MPDError``) a weight that is non-zero outside the mask; with
            ``False`` the weight is multiplied by the mask first (NNI's masked-model view).

    Returns:
        A :class:`~pfgdf_plugin.modules.BlockDiagonalLinear` or
        :class:`~pfgdf_plugin.modules.PermutedGroupConv2d` computing what the masked layer
        computes, on the same device and dtype.

    Example:
        >>> lin = nn.Linear(6, 4)
        >>> plan = make_plan("lin", lin.weight, blocks=2)
        >>> with torch.no_grad():
        ...     _ = lin.weight.mul_(plan.mask())
        >>> x = torch.randn(3, 6)
        >>> torch.allclose(convert_layer(plan, lin)(x), lin(x), atol=1e-6)
        True
    """
    out_n, in_n, kernel = check_layer(plan.name, module)
    if (out_n, in_n) + kernel != plan.weight_shape:
        raise MPDError(f"{plan.name}: the layer's weight shape {(out_n, in_n) + kernel} does not match the plan's "
                       f"{plan.weight_shape}")
    weight = module.weight
    if strict:
        check_block_diagonal(plan, weight)
    else:
        weight = weight.detach() * plan.mask(weight.dtype, weight.device)
    blocks_w, out_pos, in_gather, o_w, i_w = _blocks_of(plan, weight)
    out_sizes, in_sizes = plan.out_sizes().tolist(), plan.in_sizes().tolist()
    bias = module.bias.detach() if module.bias is not None else None
    raw_bias = None
    if bias is not None:
        raw_bias = torch.cat([bias, bias.new_zeros(1)])[_layout(plan.out_labels, plan.blocks)[1].to(bias.device)]
    if isinstance(module, nn.Linear):
        new: nn.Module = BlockDiagonalLinear(in_n, out_sizes, in_sizes, bias=bias is not None)
        new.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            new.weight.copy_(blocks_w)
            if raw_bias is not None:
                new.bias.copy_(raw_bias.view(plan.blocks, o_w))
            new.in_index.copy_(in_gather)
            new.out_index.copy_(out_pos)
        return new.train(module.training)
    conv: nn.Conv2d = module
    new = PermutedGroupConv2d(in_n, out_sizes, in_sizes, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                              dilation=conv.dilation, bias=bias is not None, padding_mode=conv.padding_mode)
    new.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.conv.weight.copy_(blocks_w.reshape((plan.blocks * o_w, i_w) + tuple(blocks_w.shape[3:])))
        if raw_bias is not None:
            new.conv.bias.copy_(raw_bias)
        new.permute_in.index.copy_(in_gather)
        new.permute_out.index.copy_(out_pos)
    return new.train(module.training)


@dataclass
class FoldLink:
    """Layer ``producer`` feeds layer ``consumer`` through channel-wise operations only.

    ``norms`` names the BatchNorm layers on the way (their parameters get permuted); anything
    else on the way must be channel-agnostic and parameter-free (activations, pooling). The
    Torch-Pruning adapter finds links with the dependency graph
    (:func:`pfgdf_plugin.torch_pruning.mpd.find_fold_links`).
    """

    producer: str
    consumer: str
    norms: List[str] = field(default_factory=list)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


@torch.no_grad()
def _permute_norm(norm: nn.Module, gather: torch.Tensor) -> None:
    for key in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(norm, key, None)
        if isinstance(t, torch.Tensor):
            t.copy_(t[gather.to(t.device)])


def fold(model: nn.Module, link: FoldLink) -> bool:
    """Fold ``link.producer``'s output permutation into ``link.consumer``'s input gather, in place.

    Both must already be converted layers of the same kind. The producer then emits its raw
    block layout, the BatchNorms in ``link.norms`` are permuted to that layout, and the
    consumer's gather reads the raw layout directly. Returns ``False`` (and changes nothing)
    when it cannot fold: a BatchNorm on the way and a padded producer (the BatchNorm would need
    the padded width), or a producer that is already folded.
    """
    prod, cons = model.get_submodule(link.producer), model.get_submodule(link.consumer)
    kinds = (BlockDiagonalLinear, PermutedGroupConv2d)
    if not any(isinstance(prod, k) and isinstance(cons, k) for k in kinds) or not prod.scatter:
        return False
    if isinstance(prod, BlockDiagonalLinear):
        out_pos, raw = prod.out_index, prod.raw_features
        cons_n, cons_index = cons.in_features, cons.in_index
    else:
        out_pos, raw = prod.permute_out.index, prod.raw_channels
        cons_n, cons_index = cons.in_channels, cons.permute_in.index
    out_n = out_pos.numel()
    if cons_n != out_n or (link.norms and raw != out_n):
        return False
    norms = [model.get_submodule(n) for n in link.norms]
    if any(not isinstance(n, _NORMS) or n.num_features != out_n for n in norms):
        return False
    raw_gather = torch.full((raw,), 0, dtype=torch.long, device=out_pos.device)
    raw_gather[out_pos] = torch.arange(out_n, device=out_pos.device)
    for norm in norms:
        _permute_norm(norm, raw_gather)
    lookup = torch.cat([out_pos, out_pos.new_tensor([raw])])
    new_index = lookup[cons_index]
    if isinstance(prod, BlockDiagonalLinear):
        prod.out_index = None
        prod.scatter = False
        cons.in_index = new_index
        cons.in_features = raw
    else:
        prod.permute_out = nn.Identity()
        prod.scatter = False
        cons.permute_in.index = new_index
        cons.permute_in.in_channels = raw
        cons.in_channels = raw
    return True


def convert_model(model: nn.Module, plans: Mapping[str, BlockPlan], links: Iterable[FoldLink] = (),
                  strict: bool = True) -> Dict[str, Any]:
    """Replace every planned layer of ``model`` by its block-diagonal form, in place.

    Args:
        model: the masked model.
        plans: ``{layer name: plan}``; a plan with one block leaves its layer dense.
        links: fold opportunities (:class:`FoldLink`); links whose ends are not both converted
            are skipped.
        strict: see :func:`convert_layer`. Every layer is checked before any is replaced, so
            an error leaves the model as it was.

    Returns:
        :func:`summarize` of the converted model, plus ``"folded"``: the links folded.
    """
    todo = {name: plan for name, plan in plans.items() if plan.blocks > 1}
    modules = dict(model.named_modules())
    for name, plan in todo.items():
        if name not in modules:
            raise MPDError(f"{name}: no such layer in the model")
        check_layer(name, modules[name])
        if strict:
            check_block_diagonal(plan, modules[name].weight)
    for name, plan in todo.items():
        _set_module(model, name, convert_layer(plan, modules[name], strict=strict))
    folded = []
    for link in links:
        if link.producer in todo and link.consumer in todo and fold(model, link):
            folded.append(f"{link.producer} -> {link.consumer}")
    report = summarize(model)
    report["folded"] = folded
    return report


def summarize(model: nn.Module) -> Dict[str, Any]:
    """Per converted layer and in total: blocks, dense / kept (effective) / stored weights.

    ``dense`` is the weight count of the original layer, ``kept`` the weights that are not
    padding, ``stored`` what the converted layer holds in memory (padding included);
    ``compression = dense / kept``. Biases and BatchNorms are not counted.

    Returns:
        ``{"layers": {name: {...}}, "dense", "kept", "stored", "compression"}``.
    """
    layers: Dict[str, Dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, (BlockDiagonalLinear, PermutedGroupConv2d)):
            k = 1 if isinstance(m, BlockDiagonalLinear) else m.conv.weight.shape[2] * m.conv.weight.shape[3]
            dense = sum(m.out_sizes) * sum(m.in_sizes) * k
            kept = m.effective_weights()
            layers[name] = {"kind": type(m).__name__, "blocks": m.blocks, "dense": dense, "kept": kept,
                            "stored": m.stored_weights(), "compression": dense / kept}
    dense = sum(v["dense"] for v in layers.values())
    kept = sum(v["kept"] for v in layers.values())
    stored = sum(v["stored"] for v in layers.values())
    return {"layers": layers, "dense": dense, "kept": kept, "stored": stored,
            "compression": dense / kept if kept else 1.0}


# --------------------------------------------------------------------------- persistence


def describe_model(model: nn.Module) -> Dict[str, Any]:
    """A JSON-safe description of the converted layers of ``model``.

    With :func:`restore_model` it rebuilds a converted model's structure from a freshly built
    dense one, so an ordinary ``state_dict`` (``torch.load(..., weights_only=True)``) loads into
    it. Permuted BatchNorms keep their shapes and need no entry.

    Example:
        >>> import json
        >>> net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
        >>> plans = {"0": make_plan("0", net[0].weight, 2), "2": make_plan("2", net[2].weight, 2)}
        >>> for name, plan in plans.items():
        ...     _ = net.get_submodule(name).weight.data.mul_(plan.mask())
        >>> _ = convert_model(net, plans, [FoldLink("0", "2")])
        >>> desc = json.loads(json.dumps(describe_model(net)))
        >>> twin = restore_model(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)), desc)
        >>> _ = twin.load_state_dict(net.state_dict())
        >>> x = torch.randn(2, 8)
        >>> torch.equal(twin(x), net(x))
        True
    """
    return {"format": DESCRIPTION_FORMAT,
            "modules": {name: m.describe() for name, m in model.named_modules()
                        if isinstance(m, (BlockDiagonalLinear, PermutedGroupConv2d))}}


def restore_model(model: nn.Module, description: Mapping[str, Any]) -> nn.Module:
    """Replace the layers named in ``description`` (from :func:`describe_model`) by skeletons, in place.

    Load the converted model's ``state_dict`` afterwards to fill weights and indices.
    """
    if description.get("format") != DESCRIPTION_FORMAT:
        raise MPDError(f"description format must be {DESCRIPTION_FORMAT!r}, got {description.get('format')!r}")
    names = dict(model.named_modules())
    for name, d in description["modules"].items():
        if name not in names:
            raise MPDError(f"{name}: the description names a layer the model does not have")
        old = names[name]
        new = module_from_description(d)
        p = next(old.parameters(), None)
        if p is not None:
            new.to(device=p.device, dtype=p.dtype)
        _set_module(model, name, new.train(old.training))
    return model


__all__ = ["MPDError", "BlockPlan", "FoldLink", "PERMUTATIONS", "balanced_sizes", "check_blocks", "check_layer",
           "choose_blocks", "check_block_diagonal", "convert_layer", "convert_model", "describe_model", "fold",
           "kept_share", "layer_generator", "magnitude_labels", "make_plan", "max_blocks", "plan_from_mask",
           "random_labels", "restore_model", "summarize"]
