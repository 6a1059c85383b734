"""Layers the compression methods create.

MPDCompress (:mod:`pfgdf_plugin.methods.mpd`) turns a masked ``nn.Linear`` into a
:class:`BlockDiagonalLinear` and a masked ``nn.Conv2d`` into a :class:`PermutedGroupConv2d`
(:class:`ChannelPermute` -> grouped ``nn.Conv2d`` -> :class:`ChannelPermute`).

Shared conventions:

* **Block layout.** A layer with ``c`` blocks of ``out_sizes[b]`` outputs and ``in_sizes[b]``
  inputs stores every block padded to ``O = max(out_sizes)`` by ``I = max(in_sizes)``: block
  ``b``'s real channels sit in slots ``0 .. size - 1`` of its ``O`` (``I``) slots; the rest are
  padding. The "raw" output of such a layer has ``c * O`` channels, block after block.
* **Index buffers, not parameters.** Permutations are ``long`` buffers (saved in the
  ``state_dict``, moved by ``.to()``, never trained). An index equal to the number of input
  channels selects a channel of zeros: that is how padded slots are fed. Because padded inputs
  are zeros and padded outputs are never read, the values stored in padded weight slots cannot
  change any output, so fine-tuning a converted layer needs no extra mask.
* **Rebuilding without pickled code.** Every module here has :meth:`describe` (a JSON-safe
  dict of its structure) and ``from_description`` (a skeleton with placeholder indices of the
  right shapes): rebuild the skeleton, then ``load_state_dict(torch.load(path,
  weights_only=True))`` fills weights and indices.

All modules trace with ``torch.fx``, deep-copy, and export to ONNX.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = ["BlockDiagonalLinear", "ChannelPermute", "PermutedGroupConv2d", "MODULE_TYPES", "module_from_description"]


def _sizes(values: Sequence[int], what: str) -> List[int]:
    out = [int(v) for v in values]
    if not out or any(v < 0 for v in out) or sum(out) == 0:
        raise ValueError(f"{what} must be a non-empty list of block sizes >= 0 with a positive sum, "
                         f"got {list(values)!r}")
    return out


def _with_zero_channel(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` with one channel of zeros appended along ``dim`` (the target of padded indices)."""
    return torch.cat([x, torch.zeros_like(x.narrow(dim, 0, 1))], dim)


class ChannelPermute(nn.Module):
    """Reorder (and optionally pad) the channels of dim 1: ``out[:, k] = x[:, index[k]]``.

    An entry equal to ``in_channels`` selects a channel of zeros (used to pad a block of a
    grouped convolution). ``index`` is a registered ``long`` buffer.

    Args:
        index: 1-D indices into the input channels, values in ``[0, in_channels]``.
        in_channels: channels of the input.

    Example:
        >>> p = ChannelPermute(torch.tensor([2, 0, 3]), in_channels=3)
        >>> p(torch.tensor([[10., 20., 30.]]))
        tensor([[30., 10.,  0.]])
    """

    def __init__(self, index: torch.Tensor, in_channels: int) -> None:
        super().__init__()
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1).clone()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) > in_channels):
            raise ValueError(f"ChannelPermute: indices must be in [0, {in_channels}], got range "
                             f"[{int(index.min())}, {int(index.max())}]")
        self.in_channels = int(in_channels)
        self.out_channels = int(index.numel())
        self.padded = bool((index == in_channels).any())
        self.register_buffer("index", index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padded:
            x = _with_zero_channel(x, 1)
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, padded={self.padded}"

    def describe(self) -> Dict[str, Any]:
        """JSON-safe structure (the index itself is in the ``state_dict``)."""
        return {"type": "ChannelPermute", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "padded": self.padded}

    @classmethod
    def from_description(cls, d: Dict[str, Any]) -> "ChannelPermute":
        """A skeleton with placeholder indices; load a ``state_dict`` to fill them."""
        n, c = int(d["out_channels"]), int(d["in_channels"])
        index = torch.zeros(n, dtype=torch.long)
        if d.get("padded") and n:
            index[-1] = c  # keeps the padded flag; the state_dict overwrites the values
        return cls(index, c)


def _check_layout(out_sizes: Sequence[int], in_sizes: Sequence[int]) -> Tuple[List[int], List[int]]:
    o, i = _sizes(out_sizes, "out_sizes"), _sizes(in_sizes, "in_sizes")
    if len(o) != len(i):
        raise ValueError(f"out_sizes and in_sizes must list the same number of blocks, got {len(o)} and {len(i)}")
    return o, i


class BlockDiagonalLinear(nn.Module):
    """A linear layer whose weight is block-diagonal after permuting its inputs and outputs.

    ``forward`` gathers the inputs into block order (``in_index``), multiplies all ``c``
    blocks in one ``torch.bmm`` (blocks padded to a common size with zero inputs), adds the
    bias and gathers the outputs back into their original order (``out_index``). Without
    ``out_index`` (``scatter=False``: the next layer has absorbed the output permutation) the
    output is the raw block layout of ``c * O`` features.

    Args:
        in_features: features of the input (for a layer whose input permutation was folded
            into the previous layer, that layer's raw width).
        out_sizes, in_sizes: real outputs / inputs of each block.
        bias: whether the layer has a bias.
        scatter: whether ``forward`` returns the original output order (``out_index``).

    Attributes:
        weight: ``[c, O, I]`` parameter (padded slots hold zeros).
        bias: ``[c, O]`` parameter or ``None``.
        in_index: ``long [c * I]`` buffer; entries equal to ``in_features`` feed zeros.
        out_index: ``long [out_features]`` buffer (raw position of each output) or ``None``.

    Example:
        >>> layer = BlockDiagonalLinear(5, out_sizes=[2, 1], in_sizes=[3, 2])
        >>> layer.weight.shape, layer(torch.randn(4, 5)).shape
        (torch.Size([2, 2, 3]), torch.Size([4, 3]))
        >>> layer.effective_weights(), layer.stored_weights()
        (8, 12)
    """

    def __init__(self, in_features: int, out_sizes: Sequence[int], in_sizes: Sequence[int], bias: bool = True,
                 scatter: bool = True) -> None:
        super().__init__()
        o, i = _check_layout(out_sizes, in_sizes)
        self.out_sizes, self.in_sizes = o, i
        self.blocks = len(o)
        self.block_out, self.block_in = max(o), max(i)
        self.in_features = int(in_features)
        self.out_features = sum(o)
        self.raw_features = self.blocks * self.block_out
        self.scatter = bool(scatter)
        self.weight = nn.Parameter(torch.zeros(self.blocks, self.block_out, self.block_in))
        self.bias = nn.Parameter(torch.zeros(self.blocks, self.block_out)) if bias else None
        in_index = torch.full((self.blocks, self.block_in), self.in_features, dtype=torch.long)
        out_index = torch.zeros(self.out_features, dtype=torch.long)
        start, k = 0, 0
        for b in range(self.blocks):  # default layout: channels in natural order, block after block
            in_index[b, :i[b]] = torch.arange(start, start + i[b])
            start += i[b]
            out_index[k:k + o[b]] = torch.arange(o[b]) + b * self.block_out
            k += o[b]
        if start > self.in_features:
            raise ValueError(f"BlockDiagonalLinear: in_sizes sum to {start}, more than in_features={self.in_features}")
        self.register_buffer("in_index", in_index.reshape(-1))
        self.register_buffer("out_index", out_index if self.scatter else None)
        self.padded_in = bool((self.in_index == self.in_features).any())

    @property
    def width(self) -> int:
        """Features of the output: ``out_features``, or the raw width when ``scatter=False``."""
        return self.out_features if self.scatter else self.raw_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if self.padded_in:
            x = _with_zero_channel(x, 1)
        x = x.index_select(1, self.in_index).reshape(-1, self.blocks, self.block_in).transpose(0, 1)
        y = torch.bmm(x, self.weight.transpose(1, 2))  # [c, N, O]
        if self.bias is not None:
            y = y + self.bias.unsqueeze(1)
        y = y.transpose(0, 1).reshape(-1, self.raw_features)
        if self.scatter:
            y = y.index_select(1, self.out_index)
        return y.reshape(lead + (self.width,))

    def effective_weights(self) -> int:
        """Weights that are not padding: ``sum(out_sizes[b] * in_sizes[b])``."""
        return sum(a * b for a, b in zip(self.out_sizes, self.in_sizes))

    def stored_weights(self) -> int:
        """Weights held in memory, padding included: ``c * O * I``."""
        return self.weight.numel()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.blocks}, "
                f"block={self.block_out}x{self.block_in}, bias={self.bias is not None}, scatter={self.scatter}")

    def describe(self) -> Dict[str, Any]:
        """JSON-safe structure; weights and indices are in the ``state_dict``."""
        return {"type": "BlockDiagonalLinear", "in_features": self.in_features, "out_sizes": list(self.out_sizes),
                "in_sizes": list(self.in_sizes), "bias": self.bias is not None, "scatter": self.scatter}

    @classmethod
    def from_description(cls, d: Dict[str, Any]) -> "BlockDiagonalLinear":
        """A skeleton of the described layer; load a ``state_dict`` to fill it."""
        layer = cls(int(d["in_features"]), d["out_sizes"], d["in_sizes"], bias=bool(d["bias"]),
                    scatter=bool(d["scatter"]))
        return layer


class PermutedGroupConv2d(nn.Module):
    """A convolution whose (out, in) channel mask is block-diagonal after permutations.

    ``permute_in`` (:class:`ChannelPermute`) gathers the input channels into block order,
    ``conv`` is an ``nn.Conv2d`` with ``groups = c`` over blocks padded to a common size
    (``in_channels = c * I``, ``out_channels = c * O``; padded input channels are zeros), and
    ``permute_out`` gathers the outputs back into their original order, or is an
    ``nn.Identity`` when the next layer has absorbed the output permutation (``scatter=False``:
    the output then has ``c * O`` channels in block layout).

    Args:
        in_channels: channels of the input (for a layer whose input permutation was folded, the
            previous layer's raw width).
        out_sizes, in_sizes: real output / input channels of each block.
        kernel_size, stride, padding, dilation, bias, padding_mode: as for ``nn.Conv2d``.
        scatter: whether the output is in the original channel order.

    Example:
        >>> layer = PermutedGroupConv2d(6, [2, 2], [3, 3], kernel_size=3, padding=1)
        >>> layer.conv.groups, layer(torch.randn(1, 6, 5, 5)).shape
        (2, torch.Size([1, 4, 5, 5]))
    """

    def __init__(self, in_channels: int, out_sizes: Sequence[int], in_sizes: Sequence[int],
                 kernel_size: Union[int, Tuple[int, int]], stride: Union[int, Tuple[int, int]] = 1,
                 padding: Union[str, int, Tuple[int, int]] = 0, dilation: Union[int, Tuple[int, int]] = 1,
                 bias: bool = True, padding_mode: str = "zeros", scatter: bool = True) -> None:
        super().__init__()
        o, i = _check_layout(out_sizes, in_sizes)
        self.out_sizes, self.in_sizes = o, i
        self.blocks = len(o)
        self.block_out, self.block_in = max(o), max(i)
        self.in_channels = int(in_channels)
        self.out_channels = sum(o)
        self.raw_channels = self.blocks * self.block_out
        self.scatter = bool(scatter)
        in_index = torch.full((self.blocks, self.block_in), self.in_channels, dtype=torch.long)
        out_index = torch.zeros(self.out_channels, dtype=torch.long)
        start, k = 0, 0
        for b in range(self.blocks):
            in_index[b, :i[b]] = torch.arange(start, start + i[b])
            start += i[b]
            out_index[k:k + o[b]] = torch.arange(o[b]) + b * self.block_out
            k += o[b]
        if start > self.in_channels:
            raise ValueError(f"PermutedGroupConv2d: in_sizes sum to {start}, more than in_channels={self.in_channels}")
        self.permute_in = ChannelPermute(in_index.reshape(-1), self.in_channels)
        self.conv = nn.Conv2d(self.blocks * self.block_in, self.raw_channels, kernel_size, stride=stride,
                              padding=padding, dilation=dilation, groups=self.blocks, bias=bias,
                              padding_mode=padding_mode)
        with torch.no_grad():
            self.conv.weight.zero_()
            if self.conv.bias is not None:
                self.conv.bias.zero_()
        self.permute_out: nn.Module = (ChannelPermute(out_index, self.raw_channels) if self.scatter
                                       else nn.Identity())

    @property
    def width(self) -> int:
        """Channels of the output: ``out_channels``, or the raw width when ``scatter=False``."""
        return self.out_channels if self.scatter else self.raw_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.permute_out(self.conv(self.permute_in(x)))

    def effective_weights(self) -> int:
        """Weights that are not padding: ``sum(out_sizes[b] * in_sizes[b]) * kh * kw``."""
        k = self.conv.weight.shape[2] * self.conv.weight.shape[3]
        return sum(a * b for a, b in zip(self.out_sizes, self.in_sizes)) * k

    def stored_weights(self) -> int:
        """Weights held in memory, padding included."""
        return self.conv.weight.numel()

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, blocks={self.blocks}, "
                f"block={self.block_out}x{self.block_in}, scatter={self.scatter}")

    def describe(self) -> Dict[str, Any]:
        """JSON-safe structure; weights and indices are in the ``state_dict``."""
        c = self.conv
        return {"type": "PermutedGroupConv2d", "in_channels": self.in_channels, "out_sizes": list(self.out_sizes),
                "in_sizes": list(self.in_sizes), "kernel_size": list(c.kernel_size), "stride": list(c.stride),
                "padding": c.padding if isinstance(c.padding, str) else list(c.padding),
                "dilation": list(c.dilation), "bias": c.bias is not None, "padding_mode": c.padding_mode,
                "scatter": self.scatter}

    @classmethod
    def from_description(cls, d: Dict[str, Any]) -> "PermutedGroupConv2d":
        """A skeleton of the described layer; load a ``state_dict`` to fill it."""
        pad = d["padding"] if isinstance(d["padding"], str) else tuple(d["padding"])
        layer = cls(int(d["in_channels"]), d["out_sizes"], d["in_sizes"], tuple(d["kernel_size"]),
                    stride=tuple(d["stride"]), padding=pad, dilation=tuple(d["dilation"]), bias=bool(d["bias"]),
                    padding_mode=d["padding_mode"], scatter=bool(d["scatter"]))
        return layer


MODULE_TYPES = {cls.__name__: cls for cls in (BlockDiagonalLinear, ChannelPermute, PermutedGroupConv2d)}


def module_from_description(d: Dict[str, Any]) -> nn.Module:
    """Build the skeleton of any module of this file from its :meth:`describe` output.

    Example:
        >>> layer = BlockDiagonalLinear(4, [2, 2], [2, 2])
        >>> type(module_from_description(layer.describe())).__name__
        'BlockDiagonalLinear'
    """
    kind = d.get("type") if isinstance(d, dict) else None
    if kind not in MODULE_TYPES:
        raise ValueError(f"unknown module type {kind!r} in description; known: {', '.join(sorted(MODULE_TYPES))}")
    return MODULE_TYPES[kind].from_description(d)

