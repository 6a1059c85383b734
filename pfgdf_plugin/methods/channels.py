"""Channel groups: layers whose channels come in ``g`` interleaved copies (grouped convolutions,
``out_channel_groups`` of Torch-Pruning, blocks of an NNI dependency group) are scored once per
position and pruned at the same position in every copy.

Example:
    >>> import torch
    >>> group_mean(torch.tensor([1., 2., 3., 5., 6., 7.]), 2)
    tensor([3., 4., 5.])
    >>> expand(torch.tensor([0, 2]), 2, 3).tolist()
    [0, 2, 3, 5]
"""

from __future__ import annotations

import torch


def group_mean(values: torch.Tensor, groups: int) -> torch.Tensor:
    """``values`` of ``groups * size`` channels -> one value per position (the mean over the copies)."""
    if groups <= 1:
        return values
    if values.numel() % groups:
        raise ValueError(f"{values.numel()} channels do not split into {groups} equal channel groups")
    return values.view(groups, -1).mean(0)


def expand(idxs: torch.Tensor, groups: int, size: int) -> torch.Tensor:
    """Positions chosen within one copy of ``size`` channels -> the same positions in all ``groups`` copies."""
    idxs = torch.as_tensor(idxs, dtype=torch.long)
    if groups <= 1:
        return idxs
    return torch.cat([idxs + g * size for g in range(groups)])
