"""Initialisation for masked training from scratch: each block gets the scale of its own fan-in.

PyTorch initialises a ``Linear``/``Conv2d`` for its whole fan-in ``n`` (weights of standard
deviation about ``1/sqrt(3n)``). A row that keeps only ``n/c`` of its inputs under a
block-diagonal mask then starts with pre-activations ``sqrt(c)`` times smaller than a dense
layer's, and the shrinkage compounds from layer to layer. :func:`block_init_` rescales each
output row by ``sqrt(n / kept)``, which is what the same initialiser would have drawn for a
layer of the block's fan-in (a Kaiming-style initialisation of the block).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def block_init_(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scale every output row of ``weight`` by ``sqrt(fan-in / kept fan-in)`` of ``mask``, in place.

    The fan-in of a row counts its inputs and kernel positions (``mask[o].numel()``); the kept
    fan-in counts those the mask keeps. Rows the mask keeps nothing of are left as they are.

    Args:
        weight: a ``Linear`` (``[out, in]``) or ``Conv2d`` (``[out, in, kh, kw]``) weight.
        mask: a mask of ``weight``'s shape (1 = kept).

    Returns:
        The per-row scale (``[out]``).

    Example:
        >>> w = torch.ones(2, 4)
        >>> mask = torch.tensor([[1., 1., 0., 0.], [0., 0., 1., 1.]])
        >>> block_init_(w, mask).tolist(), round(float(w[0, 0]), 4)
        ([1.4142135381698608, 1.4142135381698608], 1.4142)
    """
    if mask.shape != weight.shape:
        raise ValueError(f"block_init_: mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
    rows = mask.reshape(mask.shape[0], -1).to(torch.float64)
    kept = rows.sum(1)
    scale = torch.where(kept > 0, torch.sqrt(rows.shape[1] / kept.clamp(min=1)), torch.ones_like(kept))
    weight.mul_(scale.to(weight).view(-1, *([1] * (weight.dim() - 1))))
    return scale.to(torch.float32)
