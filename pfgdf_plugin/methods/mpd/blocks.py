"""Block plans: which output and input channels share a block, the masks, and plans read back from masks."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ...errors import MPDError


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
