"""The ``"magnitude"`` permutation: balanced co-clustering of ``|W|`` into blocks."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .blocks import random_labels


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
