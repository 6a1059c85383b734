"""PFGDF: pruning filters judged insignificant by the Gaussian distribution of a layer's filters.

Framework-free: every function here takes and returns tensors. The Torch-Pruning and NNI
adapters translate their own objects into these calls.

Paper: Xu et al., "Pruning Filter via Gaussian Distribution Feature for Deep Neural Networks
Acceleration", arXiv 2006.12963. Only the abstract is public; the rules below are this
project's reading of it (see docs/pfgdf.md):

* ``mode="band"`` (default, reading A): one statistic ``s_i`` per filter, a Gaussian
  ``N(mu, sigma)`` fitted to the layer's ``s_i``; filter ``i`` is insignificant when
  ``|s_i - mu| <= k * sigma``. Its importance is ``|s_i - mu| / sigma``.
* ``mode="tail"`` (reading B): a Gaussian fitted to all weights of the layer; a filter's
  importance is the share of its weights outside ``mu +- k * sigma``; it is insignificant when
  that share is at most ``tail_threshold`` (default: the share a Gaussian puts outside the
  band, ``2 * (1 - Phi(k))``, 31.7% for k = 1).

The per-layer pruning ratio is the share of insignificant filters, capped so that at least
``min_channels`` filters remain and at most ``max_ratio`` of them go. Which filters go is
``select``: the insignificant ones (``band``, default), or as many filters of the smallest L1
norm (``l1``: the Gaussian sets each layer's ratio, magnitude picks the filters).

Where things are: :func:`layer_statistics` measures one layer (scores, ``mu``, ``sigma``, the
per-filter statistic); :func:`decide_group` is the whole decision for one group of channels
given its scores (threshold, zero-variance guard, ``min_channels`` per channel group, caps,
expansion over channel groups). :func:`decide` is the two together for one weight tensor, and
both framework adapters call the same two functions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, List, Optional, Sequence

import torch

from ..errors import PFGDFError
from .channels import expand, group_mean
from .params import Params, is_int, is_number, one_of

STATISTICS = ("mean", "abs_mean", "l2")
MODES = ("band", "tail")
SELECTIONS = ("band", "l1")  # which filters go, once the band has set how many
REDUCTIONS = ("mean", "max", "first")  # how the scores of coupled layers combine


def param_problems(k: Any = 1.0, statistic: Any = "mean", mode: Any = "band", min_channels: Any = 1,
                   max_ratio: Any = 1.0, tail_threshold: Any = None) -> List[str]:
    """Every problem with PFGDF's parameters, each naming the parameter and the value."""
    found: List[str] = []
    if not is_number(k) or k <= 0:
        found.append(f"k must be > 0, got {k!r}")
    found += one_of("statistic", statistic, STATISTICS) + one_of("mode", mode, MODES)
    if not is_int(min_channels) or min_channels < 1:
        found.append(f"min_channels must be an integer >= 1, got {min_channels!r}")
    found += ratio_problems(max_ratio)
    if tail_threshold is not None and (not is_number(tail_threshold) or not 0.0 <= tail_threshold <= 1.0):
        found.append(f"tail_threshold must be in [0, 1], got {tail_threshold!r}")
    return found


def ratio_problems(max_ratio: Any, name: str = "max_ratio") -> List[str]:
    """``[]`` when ``max_ratio`` (the largest share of a layer's filters removed) is in ``[0, 1]``."""
    if is_number(max_ratio) and 0.0 <= max_ratio <= 1.0:
        return []
    return [f"{name} must be in [0, 1], got {max_ratio!r}"]


def check_params(k: float, statistic: str = "mean", mode: str = "band", min_channels: int = 1,
                 max_ratio: float = 1.0, tail_threshold: Optional[float] = None) -> None:
    """Validate PFGDF's parameters; raise ``ValueError`` naming the first bad one.

    Example:
        >>> check_params(k=1.0)
        >>> check_params(k=-1.0)
        Traceback (most recent call last):
        ...
        ValueError: k must be > 0, got -1.0
    """
    found = param_problems(k, statistic, mode, min_channels, max_ratio, tail_threshold)
    if found:
        raise ValueError(found[0])


@dataclass(frozen=True)
class PFGDFParams(Params):
    """PFGDF's knobs, with the one set of defaults the pruners and the recipes share.

    Attributes:
        k: band half-width in standard deviations (> 0).
        statistic: per-filter statistic for the band, ``mean`` | ``abs_mean`` | ``l2``.
        mode: ``band`` (reading A) or ``tail`` (reading B).
        min_channels: filters every layer keeps (>= 1).
        tail_threshold: ``mode="tail"`` cut-off; ``None``: ``erfc(k / sqrt 2)``.
        group_reduction: how coupled layers' scores combine, ``mean`` | ``max`` | ``first``.
        select: which filters go once the band has set how many: ``band`` (the insignificant
            ones) or ``l1`` (as many filters, smallest L1 norm first; the adapters supply the
            norms as their framework computes them).
    """

    error: ClassVar[type] = PFGDFError
    k: float = 1.0
    statistic: str = "mean"
    mode: str = "band"
    min_channels: int = 1
    tail_threshold: Optional[float] = None
    group_reduction: str = "mean"
    select: str = "band"

    def problems(self) -> List[str]:
        return (param_problems(self.k, self.statistic, self.mode, self.min_channels, 1.0, self.tail_threshold)
                + one_of("group_reduction", self.group_reduction, REDUCTIONS)
                + one_of("select", self.select, SELECTIONS))


def make_params(max_ratio: Any = 1.0, ratio_name: str = "max_ratio", **knobs: Any) -> PFGDFParams:
    """A :class:`PFGDFParams` from a pruner's keyword arguments; one ``PFGDFError`` lists every problem.

    ``max_ratio`` (a pruner's cap on the share of a layer removed, named ``ratio_name`` in the
    message) is checked in the same error. An int ``k`` or ``tail_threshold`` becomes a float.

    Example:
        >>> make_params(k=2).k
        2.0
        >>> make_params(1.5, k=0, mode="bands")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pfgdf_plugin.errors.PFGDFError: k must be > 0, got 0; mode must be ...; max_ratio must be in [0, 1], got 1.5
    """
    found = ratio_problems(max_ratio, ratio_name)
    try:
        params = PFGDFParams(**knobs)
    except PFGDFError as err:
        found = list(getattr(err, "problems", [str(err)])) + found
    if found:
        err = PFGDFError("; ".join(found))
        err.problems = found
        raise err
    tail = None if params.tail_threshold is None else float(params.tail_threshold)
    return dataclasses.replace(params, k=float(params.k), tail_threshold=tail)


def _check_finite(weight: torch.Tensor, layer: str) -> None:
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise PFGDFError(f"layer {layer!r}: weight holds {bad} NaN/Inf value(s); PFGDF cannot fit a "
                         "Gaussian to it (check the checkpoint or the training run that made it)")


def filter_statistic(weight: torch.Tensor, statistic: str = "mean", layer: str = "?") -> torch.Tensor:
    """One number per filter (first dimension) of ``weight``.

    Args:
        weight: ``[out, ...]`` filters, e.g. a conv weight ``[out, in, kh, kw]``.
        statistic: ``"mean"`` (mean weight), ``"abs_mean"`` (mean ``|w|``) or ``"l2"`` (L2 norm).
        layer: name used in error messages.

    Example:
        >>> filter_statistic(torch.tensor([[1., 3.], [-2., 2.]]))
        tensor([2., 0.], dtype=torch.float64)
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}; got {statistic!r}")
    _check_finite(weight, layer)
    w = weight.detach().reshape(weight.shape[0], -1).double()
    if statistic == "mean":
        return w.mean(1)
    if statistic == "abs_mean":
        return w.abs().mean(1)
    return w.norm(p=2, dim=1)


def filter_l1(weight: torch.Tensor, layer: str = "?") -> torch.Tensor:
    """The L1 norm of each filter (first dimension) of ``weight``: what ``select="l1"`` removes first.

    Example:
        >>> filter_l1(torch.tensor([[1., -3.], [-2., 2.]]))
        tensor([4., 4.], dtype=torch.float64)
    """
    _check_finite(weight, layer)
    return weight.detach().reshape(weight.shape[0], -1).double().abs().sum(1)


def fit_gaussian(values: torch.Tensor) -> tuple:
    """Maximum-likelihood ``(mu, sigma)`` of a 1-D sample (population standard deviation)."""
    v = values.detach().double().reshape(-1)
    mu = v.mean()
    sigma = (v - mu).pow(2).mean().sqrt()
    return float(mu), float(sigma)


def gaussian_tail_share(k: float) -> float:
    """Share of a Gaussian outside ``mu +- k*sigma``: ``2 * (1 - Phi(k))`` = ``erfc(k / sqrt 2)``."""
    return math.erfc(k / math.sqrt(2.0))


@dataclass
class LayerDecision:
    """PFGDF's verdict on one layer.

    Attributes:
        scores: importance per filter (higher = keep).
        insignificant: bool per filter, the Gaussian rule's verdict before the caps.
        prune: indices chosen for removal (after ``min_channels`` / ``max_ratio`` caps),
            least important first.
        mu, sigma: the fitted Gaussian (of the filter statistic for ``band``, of all weights
            for ``tail``).
        statistic: the per-filter statistic (``band``) or the tail share (``tail``).
        degenerate: ``True`` when sigma is 0 (every value equal): nothing is pruned.
    """

    scores: torch.Tensor
    insignificant: torch.Tensor
    prune: torch.Tensor
    mu: float
    sigma: float
    statistic: torch.Tensor
    degenerate: bool = False
    notes: List[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        n = self.scores.numel()
        return len(self.prune) / n if n else 0.0


def band_scores(stat: torch.Tensor, mu: float, sigma: float) -> torch.Tensor:
    """``|s - mu| / sigma``; all zeros when ``sigma == 0``."""
    if sigma <= 0:
        return torch.zeros_like(stat, dtype=torch.float64)
    return (stat.double() - mu).abs() / sigma


def tail_share(weight: torch.Tensor, k: float, layer: str = "?") -> tuple:
    """Reading B: per filter, the share of its weights outside the layer's ``mu +- k*sigma``.

    Returns ``(share, mu, sigma)``.
    """
    _check_finite(weight, layer)
    w = weight.detach().reshape(weight.shape[0], -1).double()
    mu, sigma = fit_gaussian(w)
    if sigma <= 0:
        return torch.zeros(w.shape[0], dtype=torch.float64), mu, sigma
    outside = ((w - mu).abs() > k * sigma).double().mean(1)
    return outside, mu, sigma


def capped_prune_count(n: int, n_candidates: int, min_channels: int = 1, max_ratio: float = 1.0,
                       round_to: Optional[int] = None) -> int:
    """How many of ``n`` filters to remove, given ``n_candidates`` insignificant ones.

    Never leaves fewer than ``min_channels`` (nor fewer than 1) filters, never removes more than
    ``floor(max_ratio * n)``; with ``round_to`` the remaining count is rounded up to a multiple.

    Example:
        >>> capped_prune_count(10, 10)
        9
        >>> capped_prune_count(10, 7, min_channels=4)
        6
    """
    keep_floor = max(1, min(min_channels, n))
    count = min(n_candidates, n - keep_floor, int(math.floor(max_ratio * n + 1e-9)))
    count = max(count, 0)
    if round_to and round_to > 1 and count > 0:
        keep = n - count
        keep = min(n, int(math.ceil(keep / round_to) * round_to))
        count = n - keep
    return count


def threshold(k: float, mode: str = "band", tail_threshold: Optional[float] = None) -> float:
    """Score at or below which a filter is insignificant: ``k`` (band) or the tail cut-off."""
    if mode == "band":
        return k + 1e-12
    return gaussian_tail_share(k) if tail_threshold is None else tail_threshold


def select(scores: torch.Tensor, insignificant: torch.Tensor, min_channels: int = 1,
           max_ratio: float = 1.0, round_to: Optional[int] = None) -> torch.Tensor:
    """Indices to remove: the insignificant filters, least important first, within the caps.

    Example:
        >>> select(torch.tensor([0.1, 2.0, 0.5, 0.2]), torch.tensor([True, False, True, True]),
        ...        min_channels=2).tolist()
        [0, 3]
    """
    n = scores.numel()
    count = capped_prune_count(n, int(insignificant.sum()), min_channels, max_ratio, round_to)
    # ranks only among the insignificant ones, so a capped layer drops its least important
    order = torch.argsort(torch.where(insignificant, scores.double(), torch.inf), stable=True)
    return order[:count]


@dataclass
class LayerStats:
    """What PFGDF measures on one layer (the numbers a pruner reports for it).

    Attributes:
        scores: importance per filter, float64 (higher = keep): ``|s_i - mu| / sigma`` for
            ``band``, the share of the filter's weights outside ``mu +- k*sigma`` for ``tail``;
            all zeros when ``sigma == 0``.
        mu, sigma: the fitted Gaussian: of the per-filter statistic (``band``) or of all the
            layer's weights (``tail``).
        statistic: per filter, ``s_i`` (``band``) or the tail share (``tail``), float64.
    """

    scores: torch.Tensor
    mu: float
    sigma: float
    statistic: torch.Tensor


def layer_statistics(weight: torch.Tensor, params: Optional[PFGDFParams] = None, layer: str = "?") -> LayerStats:
    """Measure one layer's filters (``weight`` is ``[out, ...]``) under ``params``' ``mode``.

    Example:
        >>> s = layer_statistics(torch.tensor([[-2.], [0.], [2.]]))
        >>> s.mu, round(s.sigma, 4), [round(v, 4) for v in s.scores.tolist()]
        (0.0, 1.633, [1.2247, 0.0, 1.2247])
    """
    p = params if params is not None else PFGDFParams()
    if p.mode == "band":
        stat = filter_statistic(weight, p.statistic, layer)
        mu, sigma = fit_gaussian(stat)
        return LayerStats(band_scores(stat, mu, sigma), mu, sigma, stat)
    share, mu, sigma = tail_share(weight, p.k, layer)
    return LayerStats(share, mu, sigma, share)


def is_degenerate(scores: torch.Tensor) -> bool:
    """``True`` when the scores tell no filter apart: all 0 (zero variance) or some NaN/Inf."""
    return float(scores.abs().sum()) == 0.0 or not bool(torch.isfinite(scores).all())


@dataclass
class GroupDecision:
    """PFGDF's verdict on one group of channels (a layer, or coupled layers scored together).

    Attributes:
        scores: importance per position (the mean over the channel groups), higher = keep.
        candidates: bool per position: inside the band, before the caps (all ``False`` when
            ``degenerate``).
        prune: channel indices to remove, least important position first, repeated in every
            channel group (``position + g * positions`` for ``g`` in ``range(channel_groups)``).
        channel_groups: interleaved copies the channels come in.
        degenerate: ``True`` when the scores tell no filter apart: nothing is pruned.
        notes: why fewer channels go than the band holds (zero variance, caps).
    """

    scores: torch.Tensor
    candidates: torch.Tensor
    prune: torch.Tensor
    channel_groups: int = 1
    degenerate: bool = False
    notes: List[str] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return self.scores.numel() * self.channel_groups

    @property
    def ratio(self) -> float:
        return self.prune.numel() / self.channels if self.channels else 0.0

    def keep(self) -> torch.Tensor:
        """Bool per channel: ``False`` for the pruned ones."""
        mask = torch.ones(self.channels, dtype=torch.bool, device=self.prune.device)
        mask[self.prune] = False
        return mask


def decide_group(scores: torch.Tensor, params: Optional[PFGDFParams] = None, channel_groups: int = 1,
                 max_ratio: float = 1.0, round_to: Optional[int] = None,
                 norms: Optional[torch.Tensor] = None) -> GroupDecision:
    """PFGDF's decision for one group of channels, given its per-channel importance scores.

    The rule, all of it: average the scores over the ``channel_groups`` copies; a position is a
    candidate when its score is at most :func:`threshold` (``k`` for ``band``, the tail cut-off
    for ``tail``); scores that tell nothing apart (:func:`is_degenerate`) prune nothing; every
    channel group keeps ``ceil(min_channels / channel_groups)`` (at least 1) positions; at most
    ``max_ratio`` of the positions go and, with ``round_to``, the kept count is rounded up to a
    multiple; the chosen positions are removed from every channel group. With ``select="l1"`` the
    band only sets how many positions go: those with the smallest ``norms`` (averaged over the
    channel groups) go instead of the insignificant ones.

    Args:
        scores: ``channel_groups * positions`` scores (any shape; flattened), higher = keep.
            Not converted: compared with the threshold in their own dtype.
        params: the PFGDF knobs (``k``, ``mode``, ``tail_threshold``, ``min_channels`` are used).
        channel_groups: interleaved copies (grouped convolutions, Torch-Pruning's channel
            groups, NNI metric blocks).
        max_ratio: largest share of the positions removed, in ``[0, 1]``.
        round_to: keep a multiple of this many positions.
        norms: ``select="l1"`` only (required then): one L1 norm per channel, like ``scores``.

    Example:
        >>> d = decide_group(torch.tensor([0.25, 3.0, 0.5, 0.75, 1.0, 0.25]), channel_groups=2)
        >>> d.scores.tolist(), d.candidates.tolist(), d.prune.tolist()
        ([0.5, 2.0, 0.375], [True, False, True], [2, 0, 5, 3])
        >>> l1 = PFGDFParams(select="l1")
        >>> norms = torch.tensor([4.0, 1.0, 3.0, 2.0])
        >>> decide_group(torch.tensor([0.2, 3.0, 0.5, 2.0]), l1, norms=norms).prune.tolist()
        [1, 3]
    """
    p = params if params is not None else PFGDFParams()
    found = ratio_problems(max_ratio)
    if not is_int(channel_groups) or channel_groups < 1:
        found.append(f"channel_groups must be an integer >= 1, got {channel_groups!r}")
    if found:
        raise PFGDFError("; ".join(found))
    flat = scores.detach().reshape(-1)
    if flat.numel() % channel_groups:
        raise PFGDFError(f"{flat.numel()} scores do not split into {channel_groups} equal channel groups")
    per_position = group_mean(flat, channel_groups)
    n = per_position.numel()
    if is_degenerate(per_position):
        return GroupDecision(per_position, torch.zeros(n, dtype=torch.bool, device=flat.device),
                             torch.zeros(0, dtype=torch.long, device=flat.device), channel_groups, True,
                             ["zero variance: every filter looks alike, none is pruned"])
    candidates = per_position <= threshold(p.k, p.mode, p.tail_threshold)
    keep_floor = max(1, -(-p.min_channels // channel_groups))  # per channel group, rounded up
    if p.select == "l1":
        if norms is None or norms.numel() != flat.numel():
            raise PFGDFError(f"select='l1' needs one L1 norm per channel ({flat.numel()}), got "
                             f"{'none' if norms is None else norms.numel()}")
        count = capped_prune_count(n, int(candidates.sum()), keep_floor, max_ratio, round_to)
        chosen = torch.argsort(group_mean(norms.detach().reshape(-1).double(), channel_groups), stable=True)[:count]
    else:
        chosen = select(per_position, candidates, keep_floor, max_ratio, round_to)
    notes = []
    if len(chosen) < int(candidates.sum()):
        unit = "filters" if channel_groups == 1 else f"positions (of {channel_groups} channel groups)"
        notes.append(f"capped at {len(chosen)} of {int(candidates.sum())} insignificant {unit}")
    return GroupDecision(per_position, candidates, expand(chosen, channel_groups, n), channel_groups, False, notes)


def decide(weight: torch.Tensor, k: float = PFGDFParams.k, statistic: str = PFGDFParams.statistic,
           mode: str = PFGDFParams.mode, min_channels: int = PFGDFParams.min_channels, max_ratio: float = 1.0,
           tail_threshold: Optional[float] = PFGDFParams.tail_threshold, layer: str = "?",
           round_to: Optional[int] = None) -> LayerDecision:
    """Apply PFGDF to one layer's filters: :func:`layer_statistics`, then :func:`decide_group`.

    Args:
        weight: ``[out, ...]`` filters.
        k: band half-width in standard deviations (> 0).
        statistic: per-filter statistic for ``mode="band"``.
        mode: ``"band"`` (reading A) or ``"tail"`` (reading B).
        min_channels: filters always kept.
        max_ratio: largest share of filters removed.
        tail_threshold: ``mode="tail"`` cut-off; default ``gaussian_tail_share(k)``.
        layer: name for error messages.
        round_to: keep a multiple of this many filters.

    Raises:
        PFGDFError: bad parameters (every problem listed), no filters, NaN/Inf weights.

    Example:
        >>> w = torch.tensor([-3., -1., -0.5, 0., 0.5, 1., 3.]).view(7, 1)
        >>> d = decide(w, k=1.0)
        >>> d.prune.tolist()   # filters within one sigma of the mean, closest first
        [3, 2, 4, 1, 5]
    """
    params = make_params(max_ratio, k=k, statistic=statistic, mode=mode, min_channels=min_channels,
                         tail_threshold=tail_threshold)
    if weight.dim() < 1 or weight.shape[0] == 0:
        raise PFGDFError(f"layer {layer!r}: no filters to score (weight shape {tuple(weight.shape)})")
    stats = layer_statistics(weight, params, layer)
    group = decide_group(stats.scores, params, max_ratio=max_ratio, round_to=round_to)
    return LayerDecision(scores=stats.scores.float(), insignificant=group.candidates, prune=group.prune,
                         mu=stats.mu, sigma=stats.sigma, statistic=stats.statistic.float(),
                         degenerate=group.degenerate, notes=group.notes)


def importance(weight: torch.Tensor, k: float = PFGDFParams.k, statistic: str = PFGDFParams.statistic,
               mode: str = PFGDFParams.mode, layer: str = "?") -> torch.Tensor:
    """Per-filter importance (higher = keep), as :func:`decide` ranks them, float32.

    ``band``: ``|s_i - mu| / sigma``; ``tail``: share of the filter's weights outside the band.
    A zero-variance layer scores all zeros.
    """
    return layer_statistics(weight, make_params(k=k, statistic=statistic, mode=mode), layer).scores.float()


@dataclass
class AutoKStep:
    k: float
    accuracy: float
    accepted: bool
    info: dict = field(default_factory=dict)


def auto_k(trial: Callable[[float], tuple], baseline: float, tolerance: float = 0.003,
           k_values: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)) -> tuple:
    """The automatic loop: widen ``k`` while the pruned, fine-tuned model stays within tolerance.

    ``trial(k)`` must prune a *copy* of the model with band ``k``, fine-tune it, evaluate it, and
    return ``(accuracy, info)``. The loop walks ``k_values`` upwards and stops at the first ``k``
    whose accuracy falls below ``baseline - tolerance``; it returns ``(best_k, history)`` where
    ``best_k`` is the widest accepted ``k`` (``None`` if even the first fails).

    Example:
        >>> acc = {0.5: 0.91, 1.0: 0.90, 1.5: 0.80}
        >>> best, hist = auto_k(lambda k: (acc[k], {}), baseline=0.91, tolerance=0.02,
        ...                     k_values=(0.5, 1.0, 1.5))
        >>> best, [h.accepted for h in hist]
        (1.0, [True, True, False])
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    ks = list(k_values)
    if not ks or any(b <= a for a, b in zip(ks, ks[1:])):
        raise ValueError(f"k_values must be a non-empty increasing sequence, got {ks!r}")
    for k in ks:
        check_params(k)
    best = None
    history: List[AutoKStep] = []
    for k in ks:
        accuracy, info = trial(k)
        ok = accuracy >= baseline - tolerance
        history.append(AutoKStep(k=k, accuracy=float(accuracy), accepted=ok, info=dict(info or {})))
        if not ok:
            break
        best = k
    return best, history
