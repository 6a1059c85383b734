"""Wide models, where MPDCompress's block-diagonal layers have room to pay: registered in
:data:`pfgdf_plugin.models.MODELS` as ``wide_mlp`` and ``vgg16_bn_wide``.

* ``wide_mlp``: an MLP ``in -> 2048 -> 2048 -> num_classes`` (``in = in_channels * image_size^2``:
  1024 for 32x32 grey images, 784 for 28x28), ReLUs between the layers.
* ``vgg16_bn_wide``: VGG-16-BN's convolutions (:class:`pfgdf_plugin.models.VGG`) with the wide
  classifier of the original VGG: ``Linear(c, 4096) -> ReLU -> Dropout -> Linear(4096, 4096) ->
  ReLU -> Dropout -> Linear(4096, num_classes)``.

``width`` scales every hidden layer (and the convolutions), so tests can build them small.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .models import MIN_IMAGE_SIZE, MODELS, VGG, VGG16_CFG, _check_common, _kaiming_init, _scaled

__all__ = ["WideMLP", "WideVGG", "vgg16_bn_wide", "wide_mlp"]


class WideMLP(nn.Module):
    """Flatten, then ``fc1 .. fcN`` with ReLUs between them.

    Example:
        >>> WideMLP(64, hidden=(32, 32))(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_features: int, hidden: Sequence[int] = (2048, 2048), num_classes: int = 10) -> None:
        super().__init__()
        sizes = [int(in_features)] + [int(h) for h in hidden] + [int(num_classes)]
        self.flatten = nn.Flatten()
        layers = []
        for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            layers.append((f"fc{k}", nn.Linear(a, b)))
            if k < len(sizes) - 1:
                layers.append((f"relu{k}", nn.ReLU()))
        for name, layer in layers:
            self.add_module(name, layer)
        self._order = [name for name, _ in layers]
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        for name in self._order:
            x = getattr(self, name)(x)
        return x


class WideVGG(VGG):
    """VGG with BatchNorm and the three-layer classifier of the original VGG (hidden width 4096).

    Example:
        >>> WideVGG(VGG16_CFG, width=0.0625)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, cfg: Sequence, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 hidden: int = 4096, dropout: float = 0.5) -> None:
        super().__init__(cfg, num_classes=num_classes, in_channels=in_channels, width=width)
        c = self.classifier.in_features
        h = _scaled(hidden, width)
        self.classifier = nn.Sequential(nn.Linear(c, h), nn.ReLU(), nn.Dropout(dropout), nn.Linear(h, h), nn.ReLU(),
                                        nn.Dropout(dropout), nn.Linear(h, num_classes))
        _kaiming_init(self.classifier)


@MODELS.register("wide_mlp")
def wide_mlp(num_classes: int = 10, in_channels: int = 1, width: float = 1.0, image_size: int = 32) -> WideMLP:
    """A 1024-2048-2048-10 MLP for 32x32 grey images (784-2048-2048-10 at 28x28; about 6.3M parameters).

    Example:
        >>> wide_mlp(width=0.125)(torch.randn(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """
    _check_common(num_classes, in_channels, width)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    hidden = (_scaled(2048, width), _scaled(2048, width))
    return WideMLP(in_channels * image_size * image_size, hidden, num_classes)


@MODELS.register("vgg16_bn_wide")
def vgg16_bn_wide(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size: int = 32) -> WideVGG:
    """VGG-16-BN with the 4096-4096 classifier, for 32x32 inputs (about 33.6M parameters at width 1).

    Example:
        >>> vgg16_bn_wide(width=0.0625)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    _check_common(num_classes, in_channels, width)
    return WideVGG(VGG16_CFG, num_classes=num_classes, in_channels=in_channels, width=width)

MIN_IMAGE_SIZE.update({"wide_mlp": 1, "vgg16_bn_wide": 32})  # the smallest input each model takes
