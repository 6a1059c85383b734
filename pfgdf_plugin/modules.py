"""Layers the compression methods create.

MPDCompress (:mod:`pfgdf_plugin.methods.mpd`) turns a masked ``nn.Linear`` into a
:class:`BlockDiagonalLinear` (kernel ``"bmm"``: one batched matmul over the blocks, or
``"grouped"``: a grouped 1-D convolution) or a :class:`MaskedDenseLinear` (kernel ``"dense"``:
the full matrix with its zeros), and a masked ``nn.Conv2d`` into a :class:`PermutedGroupConv2d`
(:class:`ChannelPermute` -> grouped ``nn.Conv2d`` -> :class:`ChannelPermute`) or a
:class:`MaskedDenseConv2d`.

Shared conventions:

* **Block layout.** A layer with ``c`` blocks of ``out_sizes[b]`` outputs and ``in_sizes[b]``
  inputs stores every block padded to ``O = max(out_sizes)`` by ``I = max(in_sizes)``: block
  ``b``'s real channels sit in slots ``0 .. size - 1`` of its ``O`` (``I``) slots; the rest are
  padding. The "raw" output of such a layer has ``c * O`` channels, block after block.
* **Index buffers, not parameters.** Permutations are ``long`` buffers (saved in the
  ``state_dict``, moved by ``.to()``, never trained). An index equal to the number of input
  channels selects a channel of zeros: that is how padded slots are fed. Because padded inputs
  are zeros and padded outputs are never read, the values stored in padded weight slots cannot
  change any output, so fine-tuning a converted layer needs no extra mask. A gather that is the
  identity is not stored at all (``gather=False`` / ``scatter=False``).
* **Dense kernels keep their block structure while training.** :class:`MaskedDenseLinear` and
  :class:`MaskedDenseConv2d` hold the whole matrix (zeros included, rows and columns in whatever
  order their neighbours need, so they never gather); in training mode they multiply the weight
  by the block mask (built from two small label buffers), so gradients outside the blocks are
  zero; in eval mode (and in an ONNX export) they are a plain ``linear`` / ``conv2d``.
* **Rebuilding without pickled code.** Every module here has :meth:`describe` (a JSON-safe
  dict of its structure) and ``from_description`` (a skeleton with placeholder indices of the
  right shapes): rebuild the skeleton, then ``load_state_dict(torch.load(path,
  weights_only=True))`` fills weights and indices.

All modules trace with ``torch.fx``, deep-copy, and export to ONNX.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Proxy

from . import native as _native

__all__ = ["BlockDiagonalLinear", "ChannelPermute", "MaskedDenseConv2d", "MaskedDenseLinear", "PermutedGroupConv2d",
           "BLOCK_KERNELS", "MODULE_TYPES", "module_from_description"]

BLOCK_KERNELS = ("bmm", "grouped")
# what a BlockDiagonalLinear may apply to its own output (the ReLU that followed it, fused away)
ACTIVATIONS = (None, "relu")


def _sizes(values: Sequence[int], what: str) -> List[int]:
    out = [int(v) for v in values]
    if not out or any(v < 0 for v in out) or sum(out) == 0:
        raise ValueError(f"{what} must be a non-empty list of block sizes >= 0 with a positive sum, "
                         f"got {list(values)!r}")
    return out


def _with_zero_channel(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` with one channel of zeros appended along ``dim`` (the target of padded indices; ONNX: one ``Pad``)."""
    return F.pad(x, (0, 0) * (x.dim() - 1 - dim) + (0, 1))


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


def _needs_grad(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether autograd records a layer's forward (in-place and ``out=`` shortcuts are off then)."""
    return torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad))


def _check_layout(out_sizes: Sequence[int], in_sizes: Sequence[int]) -> Tuple[List[int], List[int]]:
    o, i = _sizes(out_sizes, "out_sizes"), _sizes(in_sizes, "in_sizes")
    if len(o) != len(i):
        raise ValueError(f"out_sizes and in_sizes must list the same number of blocks, got {len(o)} and {len(i)}")
    return o, i


def _natural_layout(out_sizes: Sequence[int], in_sizes: Sequence[int], width: int, what: str
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Default gathers: channels in natural order, block after block (``width`` feeds zeros)."""
    blocks, block_in, block_out = len(in_sizes), max(in_sizes), max(out_sizes)
    in_index = torch.full((blocks, block_in), width, dtype=torch.long)
    out_index = torch.zeros(sum(out_sizes), dtype=torch.long)
    start, k = 0, 0
    for b in range(blocks):
        in_index[b, :in_sizes[b]] = torch.arange(start, start + in_sizes[b])
        start += in_sizes[b]
        out_index[k:k + out_sizes[b]] = torch.arange(out_sizes[b]) + b * block_out
        k += out_sizes[b]
    if start > width:
        raise ValueError(f"{what}: in_sizes sum to {start}, more than the {width} input channels")
    return in_index.reshape(-1), out_index


def _check_kernel(kernel: str, allowed: Sequence[str], what: str) -> str:
    if kernel not in allowed:
        raise ValueError(f"{what}: kernel must be one of {', '.join(allowed)}; got {kernel!r}")
    return kernel


class BlockDiagonalLinear(nn.Module):
    """A linear layer whose weight is block-diagonal after permuting its inputs and outputs.

    ``forward`` gathers the inputs into block order (``in_index``), multiplies the ``c`` blocks
    (padded to a common size with zero inputs), adds the bias and gathers the outputs back into
    their original order (``out_index``). ``kernel="bmm"`` multiplies with one batched matmul,
    ``kernel="grouped"`` with a grouped 1-D convolution (ONNX: ``Conv`` with ``group=c``). Without
    ``out_index`` (``scatter=False``: the next layer has absorbed the output permutation, or it
    is the identity) the output is the raw block layout of ``c * O`` features; without
    ``in_index`` (``gather=False``) the input must already be in block layout
    (``in_features == c * I``).

    The ``bmm`` forward of a 2-D input ``[N, F]``: at ``N = 1`` the gathered input viewed as
    ``[c, 1, I]`` times the weight stored ``[c, I, O]`` (bias fused in, ``baddbmm``) already is
    the output. For ``N > 1`` in eager mode a chain of ``bmm`` layers hands batches over
    features first (:attr:`handoff`, set when the permutation between two of them is folded):
    the producer multiplies ``[c, O, I] x [c, I, N]`` (free transposes of the weight and of the
    gathered input) and passes ``[width, N]`` on as a transposed view, and the consumer gathers
    whole rows of it instead of columns of ``[N, features]`` (see :meth:`_bmm_eager`). Any
    other layer multiplies ``[c, N, I]`` (a free transpose of the gathered ``[N, c, I]``) and,
    without autograd, writes straight into the ``[N, c, O]`` output through a transposed view
    (with autograd: ``baddbmm`` and one copy). Traced for export (``torch.onnx``,
    ``torch.jit.trace``) it emits the feature-major form ONNX Runtime runs fastest:
    ``Transpose``, ``Gather`` (only where one is needed), ``Reshape``, one 3-D ``MatMul`` of
    the ``[c, O, I]`` blocks, ``Add``, ``Reshape``, ``Transpose`` (ONNX Runtime cancels the
    ``Transpose`` pairs between two such layers across an activation).

    Args:
        in_features: features of the input (for a layer whose input permutation was folded
            into the previous layer, that layer's raw width).
        out_sizes, in_sizes: real outputs / inputs of each block.
        bias: whether the layer has a bias.
        scatter: whether ``forward`` returns the original output order (``out_index``).
        kernel: ``"bmm"`` or ``"grouped"``.
        gather: whether ``forward`` gathers its input (``in_index``).

    Attributes:
        weight: the blocks (padded slots hold zeros): a ``[c, I, O]`` parameter for ``bmm`` (what
            the batched matmul reads at batch 1), ``[c, O, I]`` for ``grouped``. The ``state_dict``
            holds ``[c, O, I]`` (each block oriented like an ``nn.Linear`` weight) for both kernels,
            so a saved layer loads into either (``state_dict(keep_vars=True)``, which tracers use to
            find the parameters, holds the parameter itself); :meth:`block_weight` is that view.
        bias: ``[c, O]`` parameter or ``None``.
        handoff: at ``N > 1`` in eager mode, return the output as the transposed view of a
            contiguous ``[width, N]`` tensor (the next ``bmm`` layer reads it feature-major
            without a copy) instead of a contiguous ``[N, width]`` one. Set by the folding
            between two ``bmm`` layers; values are the same either way.
        activation: ``None``, or ``"relu"``: the layer applies the ReLU that followed it (set by
            :func:`~pfgdf_plugin.methods.mpd.fuse_activations`, which replaces that ReLU by an
            ``nn.Identity``; the C kernels apply it as they store the result).
        in_index: ``long [c * I]`` buffer (entries equal to ``in_features`` feed zeros) or ``None``.
        out_index: ``long [out_features]`` buffer (raw position of each output) or ``None``.

    Example:
        >>> layer = BlockDiagonalLinear(5, out_sizes=[2, 1], in_sizes=[3, 2])
        >>> layer.block_weight().shape, layer.weight.shape, layer(torch.randn(4, 5)).shape
        (torch.Size([2, 2, 3]), torch.Size([2, 3, 2]), torch.Size([4, 3]))
        >>> layer.effective_weights(), layer.stored_weights()
        (8, 12)
        >>> x = torch.randn(4, 5)
        >>> twin = BlockDiagonalLinear(5, [2, 1], [3, 2], kernel="grouped")
        >>> _ = twin.load_state_dict(layer.state_dict())
        >>> torch.allclose(twin(x), layer(x), atol=1e-6)
        True
    """

    def __init__(self, in_features: int, out_sizes: Sequence[int], in_sizes: Sequence[int], bias: bool = True,
                 scatter: bool = True, kernel: str = "bmm", gather: bool = True) -> None:
        super().__init__()
        o, i = _check_layout(out_sizes, in_sizes)
        self.out_sizes, self.in_sizes = o, i
        self.blocks = len(o)
        self.block_out, self.block_in = max(o), max(i)
        self.in_features = int(in_features)
        self.out_features = sum(o)
        self.raw_features = self.blocks * self.block_out
        self.scatter, self.gather = bool(scatter), bool(gather)
        self.kernel = _check_kernel(kernel, BLOCK_KERNELS, "BlockDiagonalLinear")
        shape = ((self.blocks, self.block_in, self.block_out) if self.kernel == "bmm"
                 else (self.blocks, self.block_out, self.block_in))
        self.weight = nn.Parameter(torch.zeros(shape))
        self.bias = nn.Parameter(torch.zeros(self.blocks, self.block_out)) if bias else None
        in_index, out_index = _natural_layout(o, i, self.in_features, "BlockDiagonalLinear")
        self.register_buffer("in_index", None)
        self.register_buffer("out_index", out_index if self.scatter else None)
        self.padded_in = False
        self.handoff = False
        self.activation: Optional[str] = None
        self.prepacked = False
        self.register_buffer("packed_weight", None, persistent=False)
        self._pack_key: Optional[Tuple[int, int, int]] = None
        self.set_gather(in_index if self.gather else None, self.in_features)

    def block_weight(self) -> torch.Tensor:
        """The blocks as ``[c, O, I]`` (a view of :attr:`weight`; what the ``state_dict`` holds)."""
        return self.weight.transpose(1, 2) if self.kernel == "bmm" else self.weight

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # keep_vars=True (the tracers' view: the parameters themselves) leaves the parameter as it is
        if self.kernel == "bmm" and not keep_vars and prefix + "weight" in destination:
            destination[prefix + "weight"] = destination[prefix + "weight"].transpose(1, 2)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if self.kernel == "bmm" and isinstance(state_dict.get(key), torch.Tensor) and state_dict[key].dim() == 3:
            state_dict[key] = state_dict[key].transpose(1, 2)  # Module.load_state_dict works on its own copy
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def set_gather(self, index: Optional[torch.Tensor], in_features: int) -> None:
        """Read inputs of ``in_features`` through ``index`` (``None``: already in block layout)."""
        if index is None and int(in_features) != self.blocks * self.block_in:
            raise ValueError(f"BlockDiagonalLinear: without a gather the input must have {self.blocks} x "
                             f"{self.block_in} features, got {in_features}")
        self.in_features, self.gather = int(in_features), index is not None
        self.in_index = index
        self.padded_in = index is not None and bool((index == self.in_features).any())

    def drop_scatter(self) -> None:
        """Emit the raw block layout (the next layer reads it, or the scatter is the identity)."""
        self.out_index, self.scatter = None, False

    @property
    def width(self) -> int:
        """Features of the output: ``out_features``, or the raw width when ``scatter=False``."""
        return self.out_features if self.scatter else self.raw_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(x) is torch.Tensor and x.dim() == 2 and self.kernel == "bmm" and not torch._C._get_tracing_state():
            return self._bmm_eager(x)  # the common case, with as little Python around the kernels as possible
        if not isinstance(x, Proxy) and x.dim() == 2:  # no reshapes around the layer (ONNX: no Shape/Concat chain)
            y = self._forward_2d(x)
        else:
            y = self._forward_2d(x.reshape(-1, self.in_features)).reshape(x.shape[:-1] + (self.width,))
        return y if self.activation is None else torch.relu(y)

    def _bmm_eager(self, x: torch.Tensor) -> torch.Tensor:
        """Eager ``bmm`` forward of a 2-D tensor: gather, batched matmul, scatter.

        A batch that arrives feature-major (``x.t()`` contiguous: the hand-off of a previous
        layer) is gathered by rows of ``[features, N]``, several times faster than the columns of
        ``[N, features]``. A :attr:`handoff` layer multiplies ``[c, O, I] x [c, I, N]`` and passes
        its output on as the transposed view of ``[width, N]``; any other layer runs :meth:`_bmm`
        and returns a contiguous ``[N, width]``. For inference (no autograd, float32, CPU) with the C
        kernels of :mod:`pfgdf_plugin.native` built, batch 1 is one fused gather + block
        matrix-vector product + bias, and a batch one block matrix product that packs the gathered
        inputs (batch-first or features-first), adds the bias and writes the hand-off or the
        scattered batch-first output. At batch 1 a small layer
        runs a few short kernels and the Python around them is a measurable share of its time,
        so the registered tensors are read from the module's dicts (``nn.Module.__getattr__``
        costs about a microsecond a lookup)."""
        buffers, params = self._buffers, self._parameters
        w, bias = params["weight"], params.get("bias")
        n = x.shape[0]
        index, out_index = buffers["in_index"], buffers["out_index"]
        features_first = n > 1 and x.stride(0) == 1 and x.stride(1) == n
        if (_native._ENABLED and n and x.dtype == torch.float32 and w.dtype == torch.float32 and x.is_cpu
                and w.is_cpu and not _needs_grad(x, w, bias)):
            relu = self.activation is not None
            if n == 1:
                return _native.block_gemv(x.contiguous(), index, self.in_features, w, bias, out_index, relu)
            x = x if features_first or x.stride(1) == 1 else x.contiguous()  # the kernel packs the gather
            packed = self._packed(w) if self.prepacked else None
            if self.handoff:  # features first, as the next layer reads it
                y = _native.block_gemm(x, index, self.in_features, w, bias, relu=relu, packed=packed)
                return (y if out_index is None else y.index_select(0, out_index)).t()
            return _native.block_gemm(x, index, self.in_features, w, bias, relu=relu, batch_first=True,
                                      out_index=out_index, packed=packed)
        if features_first:
            x = self._gather_rows(x.t()).t()
        elif index is not None:
            x = (_with_zero_channel(x, 1) if self.padded_in else x).index_select(1, index)
        if n > 1 and self.handoff:  # multiply features first: [c, O, I] x [c, I, N]
            c, i, o = self.blocks, self.block_in, self.block_out
            y = torch.bmm(w.transpose(1, 2), x.reshape(n, c, i).permute(1, 2, 0))
            if bias is not None:
                y.add_(bias.view(c, o, 1))
            y = y.view(c * o, n).t()
        else:
            y = self._bmm(x, w, bias)
        y = y if out_index is None else y.index_select(1, out_index)
        return y if self.activation is None else torch.relu(y)

    def prepack(self, on: bool = True) -> None:
        """Let the C kernels' batch products read a copy of the weights laid out as their tiles use it
        (:func:`pfgdf_plugin.native.pack`), made at the first batch and kept in the non-persistent
        buffer ``packed_weight``, instead of copying the weights into panels on every call. For
        inference: the copy is made again when the weight is changed in place through the parameter
        (its version counter moves), replaced, or :func:`~pfgdf_plugin.native.set_isa` changes, but
        not after an edit through ``weight.data``, which PyTorch does not count: call ``prepack()``
        again after one. ``prepack(False)`` drops the copy."""
        self.prepacked = bool(on)
        self.packed_weight, self._pack_key = None, None

    def _packed(self, w: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """The packed weights for this call, packed again when the key says they are stale."""
        key = (w._version, w.data_ptr(), _native._LIB.isa())
        packed = self._buffers.get("packed_weight")
        if packed is None or self._pack_key != key:
            packed, _ = _native.pack(w)
            self.packed_weight, self._pack_key = packed, key
        return packed, key[2]

    def _gather_rows(self, xt: torch.Tensor) -> torch.Tensor:
        """``[features, N]`` (features first) -> ``[c * I, N]`` in block layout."""
        index = self._buffers["in_index"]
        if index is None:
            return xt
        if self.padded_in:
            xt = _with_zero_channel(xt, 0)
        return xt.index_select(0, index)

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "bmm" and torch.jit.is_tracing():
            return self._bmm_feature_major(x)
        index = self.in_index
        if index is not None:
            if self.padded_in:
                x = _with_zero_channel(x, 1)
            x = x.index_select(1, index)
        if self.kernel == "grouped":
            w = self.weight.reshape(self.raw_features, self.block_in, 1)
            b = self.bias.reshape(-1) if self.bias is not None else None
            y = F.conv1d(x.unsqueeze(-1), w, b, groups=self.blocks).squeeze(-1)
        else:
            y = self._bmm(x, self.weight, self.bias)
        index = self.out_index
        return y if index is None else y.index_select(1, index)

    def _bmm(self, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``[N, c * I]`` in block layout -> ``[N, c * O]`` raw output, with as few copies as the mode allows."""
        c, i, o = self.blocks, self.block_in, self.block_out
        if isinstance(x, Proxy):  # torch.fx: one graph for every batch size
            n = -1
        else:
            n = x.shape[0]
            if n == 1:  # [1, c*I] is [c, 1, I], and [c, 1, O] is [1, c*O]: no transpose at all
                xb = x.reshape(c, 1, i)
                y = torch.bmm(xb, w) if bias is None else torch.baddbmm(bias.view(c, 1, o), xb, w)
                return y.view(1, c * o)
            if not _needs_grad(x, w, bias):
                out = x.new_empty((n, c, o))  # the matmul writes [c, N, O] straight into the [N, c, O] output
                torch.bmm(x.reshape(n, c, i).transpose(0, 1), w, out=out.transpose(0, 1))
                if bias is not None:
                    out += bias
                return out.view(n, c * o)
        xb = x.reshape(n, c, i).transpose(0, 1)
        y = torch.bmm(xb, w) if bias is None else torch.baddbmm(bias.unsqueeze(1), xb, w)
        return y.transpose(0, 1).reshape(n, c * o)

    def _bmm_feature_major(self, x: torch.Tensor) -> torch.Tensor:
        """The traced (ONNX) form: features first, ``[c, O, I] x [c, I, N]``; no batch-size arithmetic."""
        xt = self._gather_rows(x.t())
        y = torch.matmul(self.block_weight(), xt.reshape(self.blocks, self.block_in, -1))
        if self.bias is not None:
            y = y + self.bias.unsqueeze(2)
        y = y.reshape(self.raw_features, -1)
        if self.out_index is not None:
            y = y.index_select(0, self.out_index)
        return y.t()

    def effective_weights(self) -> int:
        """Weights that are not padding: ``sum(out_sizes[b] * in_sizes[b])``."""
        return sum(a * b for a, b in zip(self.out_sizes, self.in_sizes))

    def stored_weights(self) -> int:
        """Weights held in memory, padding included: ``c * O * I``."""
        return self.weight.numel()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.blocks}, "
                f"block={self.block_out}x{self.block_in}, bias={self.bias is not None}, kernel={self.kernel}, "
                f"gather={self.gather}, scatter={self.scatter}" + (", handoff=True" if self.handoff else "")
                + (", prepacked=True" if self.prepacked else "")
                + (f", activation={self.activation}" if self.activation else ""))

    def describe(self) -> Dict[str, Any]:
        """JSON-safe structure; weights and indices are in the ``state_dict``."""
        return {"type": "BlockDiagonalLinear", "in_features": self.in_features, "out_sizes": list(self.out_sizes),
                "in_sizes": list(self.in_sizes), "bias": self.bias is not None, "scatter": self.scatter,
                "gather": self.gather, "kernel": self.kernel, "handoff": self.handoff, "activation": self.activation}

    @classmethod
    def from_description(cls, d: Dict[str, Any]) -> "BlockDiagonalLinear":
        """A skeleton of the described layer; load a ``state_dict`` to fill it."""
        layer = cls(int(d["in_features"]), d["out_sizes"], d["in_sizes"], bias=bool(d["bias"]),
                    scatter=bool(d["scatter"]), kernel=str(d.get("kernel", "bmm")), gather=bool(d.get("gather", True)))
        layer.handoff = bool(d.get("handoff", False))
        layer.activation = d.get("activation")
        if layer.activation not in ACTIVATIONS:
            raise ValueError(f"BlockDiagonalLinear: activation must be one of {ACTIVATIONS}, got {layer.activation!r}")
        return layer


class PermutedGroupConv2d(nn.Module):
    """A convolution whose (out, in) channel mask is block-diagonal after permutations.

    ``permute_in`` (:class:`ChannelPermute`) gathers the input channels into block order,
    ``conv`` is an ``nn.Conv2d`` with ``groups = c`` over blocks padded to a common size
    (``in_channels = c * I``, ``out_channels = c * O``; padded input channels are zeros), and
    ``permute_out`` gathers the outputs back into their original order, or is an
    ``nn.Identity`` when the next layer has absorbed the output permutation (``scatter=False``:
    the output then has ``c * O`` channels in block layout). ``permute_in`` is an
    ``nn.Identity`` when the input already arrives in block layout (``gather=False``).

    Args:
        in_channels: channels of the input (for a layer whose input permutation was folded, the
            previous layer's raw width).
        out_sizes, in_sizes: real output / input channels of each block.
        kernel_size, stride, padding, dilation, bias, padding_mode: as for ``nn.Conv2d``.
        scatter: whether the output is in the original channel order.
        gather: whether the input is gathered into block order.

    Example:
        >>> layer = PermutedGroupConv2d(6, [2, 2], [3, 3], kernel_size=3, padding=1)
        >>> layer.conv.groups, layer(torch.randn(1, 6, 5, 5)).shape
        (2, torch.Size([1, 4, 5, 5]))
    """

    kernel = "grouped"

    def __init__(self, in_channels: int, out_sizes: Sequence[int], in_sizes: Sequence[int],
                 kernel_size: Union[int, Tuple[int, int]], stride: Union[int, Tuple[int, int]] = 1,
                 padding: Union[str, int, Tuple[int, int]] = 0, dilation: Union[int, Tuple[int, int]] = 1,
                 bias: bool = True, padding_mode: str = "zeros", scatter: bool = True, gather: bool = True) -> None:
        super().__init__()
        o, i = _check_layout(out_sizes, in_sizes)
        self.out_sizes, self.in_sizes = o, i
        self.blocks = len(o)
        self.block_out, self.block_in = max(o), max(i)
        self.in_channels = int(in_channels)
        self.out_channels = sum(o)
        self.raw_channels = self.blocks * self.block_out
        self.scatter = bool(scatter)
        in_index, out_index = _natural_layout(o, i, self.in_channels, "PermutedGroupConv2d")
        self.permute_in: nn.Module = nn.Identity()
        self.gather = False
        self.set_gather(ChannelPermute(in_index, self.in_channels) if gather else None, self.in_channels)
        self.conv = nn.Conv2d(self.blocks * self.block_in, self.raw_channels, kernel_size, stride=stride,
                              padding=padding, dilation=dilation, groups=self.blocks, bias=bias,
                              padding_mode=padding_mode)
        with torch.no_grad():
            self.conv.weight.zero_()
            if self.conv.bias is not None:
                self.conv.bias.zero_()
        self.permute_out: nn.Module = (ChannelPermute(out_index, self.raw_channels) if self.scatter
                                       else nn.Identity())

    def set_gather(self, permute: Optional[ChannelPermute], in_channels: int) -> None:
        """Read inputs of ``in_channels`` through ``permute`` (``None``: already in block layout)."""
        if permute is None and int(in_channels) != self.blocks * self.block_in:
            raise ValueError(f"PermutedGroupConv2d: without a gather the input must have {self.blocks} x "
                             f"{self.block_in} channels, got {in_channels}")
        self.in_channels, self.gather = int(in_channels), permute is not None
        self.permute_in = permute if permute is not None else nn.Identity()

    def drop_scatter(self) -> None:
        """Emit the raw block layout (the next layer reads it, or the scatter is the identity)."""
        self.permute_out, self.scatter = nn.Identity(), False

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
                f"block={self.block_out}x{self.block_in}, gather={self.gather}, scatter={self.scatter}")

    def describe(self) -> Dict[str, Any]:
        """JSON-safe structure; weights and indices are in the ``state_dict``."""
        c = self.conv
        return {"type": "PermutedGroupConv2d", "in_channels": self.in_channels, "out_sizes": list(self.out_sizes),
                "in_sizes": list(self.in_sizes), "kernel_size": list(c.kernel_size), "stride": list(c.stride),
                "padding": c.padding if isinstance(c.padding, str) else list(c.padding),
                "dilation": list(c.dilation), "bias": c.bias is not None, "padding_mode": c.padding_mode,
                "scatter": self.scatter, "gather": self.gather,
                "padded_in": bool(self.gather and self.permute_in.padded)}

    @classmethod
    def from_description(cls, d: Dict[str, Any]) -> "PermutedGroupConv2d":
        """A skeleton of the described layer; load a ``state_dict`` to fill it."""
        pad = d["padding"] if isinstance(d["padding"], str) else tuple(d["padding"])
        layer = cls(int(d["in_channels"]), d["out_sizes"], d["in_sizes"], tuple(d["kernel_size"]),
                    stride=tuple(d["stride"]), padding=pad, dilation=tuple(d["dilation"]), bias=bool(d["bias"]),
                    padding_mode=d["padding_mode"], scatter=bool(d["scatter"]), gather=bool(d.get("gather", True)))
        if layer.gather and "padded_in" in d:
            layer.permute_in.padded = bool(d["padded_in"])
        return layer


def _block_mask(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` bool: a row and a column share a block (padding labels never match)."""
    return (rows[:, None] == cols[None, :]) & (rows[:, None] >= 0)


def _zeroed_with_labels(owner: nn.Module, layer: nn.Module) -> nn.Module:
    """``layer`` with zero weights, and on ``owner`` the block labels of its rows and columns (unset: -1, -2)."""
    with torch.no_grad():
        layer.weight.zero_()
        if layer.bias is not None:
            layer.bias.zero_()
    out, inp = layer.weight.shape[:2]
    owner.register_buffer("row_labels", torch.full((out,), -1, dtype=torch.long))
    owner.register_buffer("col_labels", torch.full((inp,), -2, dtype=torch.long))
    return layer


class MaskedDenseLinear(nn.Module):
    """The ``"dense"`` kernel of a converted linear layer: the whole matrix, zeros included.

    ``linear`` is an ``nn.Linear`` whose rows and columns may be in any order and may include
    zero padding rows/columns, so the layer absorbs its neighbours' permutations and never
    gathers. ``row_labels`` / ``col_labels`` (``long`` buffers) hold each row's and column's
    block (``-1``/``-2`` for padding); in training mode the weight is multiplied by their block
    mask, so a weight outside the blocks gets no gradient and stays zero. In eval mode (and in an
    ONNX export, and for MACs counters) it is just ``linear``.

    Args:
        in_features, out_features: width of the input and of the output (padding included).
        out_sizes, in_sizes: real outputs / inputs of each block (for the weight counts).
        bias: whether the layer has a bias.

    Example:
        >>> layer = MaskedDenseLinear(4, 4, [2, 2], [2, 2])
        >>> _ = layer.row_labels.copy_(torch.tensor([0, 0, 1, 1]))
        >>> _ = layer.col_labels.copy_(torch.tensor([0, 1, 0, 1]))
        >>> _ = torch.nn.init.ones_(layer.linear.weight)
        >>> layer.masked_weight()[0].tolist(), layer.effective_weights(), layer.stored_weights()
        ([1.0, 0.0, 1.0, 0.0], 8, 16)
    """

    kernel = "dense"

    def __init__(self, in_features: int, out_features: int, out_sizes: Sequence[int], in_sizes: Sequence[int],
                 bias: bool = True) -> None:
        super().__init__()
        self.out_sizes, self.in_sizes = _check_layout(out_sizes, in_sizes)
        self.blocks = len(self.out_sizes)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.linear = _zeroed_with_labels(self, nn.Linear(self.in_features, self.out_features, bias=bias))

    @property
    def width(self) -> int:
        return self.out_features

    def masked_weight(self) -> torch.Tensor:
        """The weight times its block mask (what training uses)."""
        return self.linear.weight * _block_mask(self.row_labels, self.col_labels).to(self.linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return F.linear(x, self.masked_weight(), self.linear.bias)
        return self.linear(x)

    def effective_weights(self) -> int:
        """Weights inside the blocks: ``sum(out_sizes[b] * in_sizes[b])``."""
        return sum(a * b for a, b in zip(self.out_sizes, self.in_sizes))

    def stored_weights(self) -> int:
        """Weights held in memory: the whole matrix."""
        return self.linear.weight.numel()

    def extra_repr(self) -> str:
        return f"blocks={self.blocks}, kernel=dense"

    def describe(self) -> Dict[str, Any]:
        """JSON-safe structure; weights and labels are in the ``state_dict``."""
        return {"type": "MaskedDenseLinear", "in_features": self.in_features, "out_features": self.out_features,
                "out_sizes": list(self.out_sizes), "in_sizes": list(self.in_sizes),
                "bias": self.linear.bias is not None}

    @classmethod
    def from_description(cls, d: Dict[str, Any]) -> "MaskedDenseLinear":
        """A skeleton of the described layer; load a ``state_dict`` to fill it."""
        return cls(int(d["in_features"]), int(d["out_features"]), d["out_sizes"], d["in_sizes"], bias=bool(d["bias"]))


class MaskedDenseConv2d(nn.Module):
    """The ``"dense"`` kernel of a converted convolution: an ``nn.Conv2d`` (``conv``) holding the
    whole weight, zeros included, masked by ``row_labels`` / ``col_labels`` while training (see
    :class:`MaskedDenseLinear`).

    Example:
        >>> layer = MaskedDenseConv2d(4, 6, [3, 3], [2, 2], kernel_size=3, padding=1)
        >>> layer(torch.randn(1, 4, 5, 5)).shape, layer.effective_weights()
        (torch.Size([1, 6, 5, 5]), 108)
    """

    kernel = "dense"

    def __init__(self, in_channels: int, out_channels: int, out_sizes: Sequence[int], in_sizes: Sequence[int],
                 kernel_size: Union[int, Tuple[int, int]], stride: Union[int, Tuple[int, int]] = 1,
                 padding: Union[str, int, Tuple[int, int]] = 0, dilation: Union[int, Tuple[int, int]] = 1,
                 bias: bool = True, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.out_sizes, self.in_sizes = _check_layout(out_sizes, in_sizes)
        self.blocks = len(self.out_sizes)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.conv = _zeroed_with_labels(self, nn.Conv2d(self.in_channels, self.out_channels, kernel_size,
                                                        stride=stride, padding=padding, dilation=dilation,
                                                        bias=bias, padding_mode=padding_mode))

    @property
    def width(self) -> int:
        return self.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.conv(x)
        mask = _block_mask(self.row_labels, self.col_labels).to(self.conv.weight.dtype)
        w = self.conv.weight * mask[:, :, None, None]
        return self.conv._conv_forward(x, w, self.conv.bias)

    def effective_weights(self) -> int:
        k = self.conv.weight.shape[2] * self.conv.weight.shape[3]
        return sum(a * b for a, b in zip(self.out_sizes, self.in_sizes)) * k

    def stored_weights(self) -> int:
        return self.conv.weight.numel()

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, blocks={self.blocks}, kernel=dense"

    def describe(self) -> Dict[str, Any]:
        """JSON-safe structure; weights and labels are in the ``state_dict``."""
        c = self.conv
        return {"type": "MaskedDenseConv2d", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "out_sizes": list(self.out_sizes), "in_sizes": list(self.in_sizes),
                "kernel_size": list(c.kernel_size), "stride": list(c.stride),
                "padding": c.padding if isinstance(c.padding, str) else list(c.padding),
                "dilation": list(c.dilation), "bias": c.bias is not None, "padding_mode": c.padding_mode}

    @classmethod
    def from_description(cls, d: Dict[str, Any]) -> "MaskedDenseConv2d":
        """A skeleton of the described layer; load a ``state_dict`` to fill it."""
        pad = d["padding"] if isinstance(d["padding"], str) else tuple(d["padding"])
        return cls(int(d["in_channels"]), int(d["out_channels"]), d["out_sizes"], d["in_sizes"],
                   tuple(d["kernel_size"]), stride=tuple(d["stride"]), padding=pad, dilation=tuple(d["dilation"]),
                   bias=bool(d["bias"]), padding_mode=d["padding_mode"])


MODULE_TYPES = {cls.__name__: cls for cls in (BlockDiagonalLinear, ChannelPermute, PermutedGroupConv2d,
                                              MaskedDenseLinear, MaskedDenseConv2d)}


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

