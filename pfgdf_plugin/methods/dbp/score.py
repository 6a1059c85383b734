"""DBP's ranking: each block's discrimination gain, the removal order, and per-group quotas.

A block's discrimination ``D_i`` is the held-out accuracy of a linear probe on its output
(:mod:`.probing`); its value is the gain ``D_i - D_{i-1}`` over the previous candidate (or over its
own input, ``reference="input"``). The least valuable blocks are removed first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch.nn as nn

from ...errors import DBPError
from .blocks import Block
from .params import REFERENCES, DBPParams
from .probing import check_finite_features, check_finite_model, check_labels, collect_features, probes, split

__all__ = ["BlockScore", "quota_selection", "removal_order", "score_blocks"]

_D = DBPParams()


@dataclass
class BlockScore:
    """Discrimination of one block.

    Attributes:
        name: the block's name.
        position: execution order among the candidates.
        discrimination: ``D_i``, the probe's held-out accuracy on the block's output.
        probe_loss: the probe's held-out cross-entropy on the block's output.
        reference: ``D`` of the features the gain is measured against (``D_{i-1}``).
        reference_loss: the probe's held-out cross-entropy on those features.
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
        """``discrimination - reference``."""
        return self.discrimination - self.reference

    @property
    def loss_gain(self) -> float:
        """``reference_loss - probe_loss``."""
        return self.reference_loss - self.probe_loss


def score_blocks(model: nn.Module, blocks: Sequence[Block], data: Iterable,
                 num_batches: Optional[int] = _D.num_batches, num_classes: Optional[int] = None,
                 holdout: float = _D.holdout, seed: int = _D.seed, weight_decay: float = 1e-3,
                 max_iter: int = 100, reference: str = _D.reference,
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
    check_finite_model(model)
    feats, labels, out_dim = collect_features(model, points, data, num_batches, progress)
    check_finite_features(feats, [f"{side}:{b.name}" for b in ordered for side in ("in", "out")])
    k = check_labels(labels, num_classes, out_dim)
    tr, te = split(labels.shape[0], holdout, seed)
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

