"""PFGDF's one decision (``decide_group``) and one measurement (``layer_statistics``), by hand."""

import math

import pytest
import torch

from pfgdf_plugin.errors import PFGDFError
from pfgdf_plugin.methods import pfgdf
from pfgdf_plugin.methods.pfgdf import PFGDFParams, decide_group


def test_channel_groups_are_averaged_decided_once_and_expanded():
    # two copies of three positions: per position (0.2+0.4)/2, (3+1)/2, (0.6+0.2)/2
    d = decide_group(torch.tensor([0.2, 3.0, 0.6, 0.4, 1.0, 0.2]), PFGDFParams(k=1.0), channel_groups=2)
    assert d.scores.tolist() == pytest.approx([0.3, 2.0, 0.4])
    assert d.candidates.tolist() == [True, False, True]
    assert d.prune.tolist() == [0, 2, 3, 5]  # least important position first, then the same in copy 2
    assert d.keep().tolist() == [False, True, False, False, True, False]
    assert d.channels == 6 and d.ratio == pytest.approx(4 / 6) and not d.degenerate and not d.notes


def test_a_position_at_exactly_k_is_inside_the_band():
    d = decide_group(torch.tensor([1.0, 1.001, 0.5, 4.0]), PFGDFParams(k=1.0))
    assert d.candidates.tolist() == [True, False, True, False]
    assert d.prune.tolist() == [2, 0]


def test_tail_mode_uses_the_gaussian_tail_share_or_the_given_cut_off():
    scores = torch.tensor([0.30, 0.32, 0.10, 0.90])
    d = decide_group(scores, PFGDFParams(k=1.0, mode="tail"))  # cut-off erfc(1/sqrt 2) = 0.3173
    assert d.candidates.tolist() == [True, False, True, False]
    d = decide_group(scores, PFGDFParams(k=1.0, mode="tail", tail_threshold=0.2))
    assert d.candidates.tolist() == [False, False, True, False]


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_zero_variance_prunes_nothing_even_with_channel_groups(groups):
    d = decide_group(torch.zeros(8), PFGDFParams(k=5.0), channel_groups=groups)
    assert d.degenerate and d.prune.numel() == 0 and not d.candidates.any()
    assert d.keep().all() and "zero variance" in d.notes[0]


def test_non_finite_scores_are_degenerate():
    d = decide_group(torch.tensor([0.1, float("nan"), 2.0]), PFGDFParams(k=1.0))
    assert d.degenerate and d.prune.numel() == 0


def test_zero_scores_in_one_copy_only_are_not_degenerate():
    d = decide_group(torch.tensor([0.0, 0.0, 0.5, 2.0]), PFGDFParams(k=1.0), channel_groups=2)
    assert not d.degenerate and d.prune.tolist() == [0, 2]


@pytest.mark.parametrize("min_channels,groups,kept_per_group", [
    (1, 1, 1), (1, 4, 1), (5, 1, 5), (5, 2, 3), (6, 4, 2), (8, 4, 2), (9, 4, 3), (100, 2, 8)])
def test_min_channels_is_spread_over_the_channel_groups_rounded_up(min_channels, groups, kept_per_group):
    torch.manual_seed(0)
    scores = torch.rand(8 * groups) * 0.1  # every position inside a k=1 band
    d = decide_group(scores, PFGDFParams(k=1.0, min_channels=min_channels), channel_groups=groups)
    assert d.channels - d.prune.numel() == kept_per_group * groups
    pruned = set(d.prune.tolist())
    for p in range(8):  # a position goes from every copy or from none
        assert len({p + g * 8 in pruned for g in range(groups)}) == 1


def test_max_ratio_caps_and_drops_the_least_important_first():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2])
    d = decide_group(scores, PFGDFParams(k=1.0), max_ratio=0.5)
    assert d.prune.tolist() == [1, 5, 3]
    assert d.notes == ["capped at 3 of 6 insignificant filters"]
    grouped = decide_group(torch.cat([scores, scores]), PFGDFParams(k=1.0), channel_groups=2, max_ratio=0.5)
    assert grouped.prune.tolist() == [1, 5, 3, 7, 11, 9]
    assert "positions (of 2 channel groups)" in grouped.notes[0]
    assert decide_group(scores, PFGDFParams(k=1.0), max_ratio=0.0).prune.numel() == 0


def test_round_to_rounds_the_kept_positions_up():
    scores = torch.tensor([0.1] * 7 + [5.0, 6.0, 7.0])
    d = decide_group(scores, PFGDFParams(k=1.0), round_to=4)  # 7 candidates would keep 3: kept 4
    assert d.prune.numel() == 6


def test_bad_arguments_raise_pfgdf_error_naming_them():
    with pytest.raises(PFGDFError, match=r"max_ratio must be in \[0, 1\], got 1.5; channel_groups must be"):
        decide_group(torch.rand(4), max_ratio=1.5, channel_groups=0)
    with pytest.raises(PFGDFError, match="5 scores do not split into 2 equal channel groups"):
        decide_group(torch.rand(5), channel_groups=2)


def test_layer_statistics_band_and_tail_by_hand():
    w = torch.tensor([[1.0, 3.0], [-2.0, 2.0], [0.0, -4.0]])  # filter means 2, 0, -2
    s = pfgdf.layer_statistics(w, PFGDFParams(statistic="mean"))
    sigma = math.sqrt(8 / 3)
    assert s.mu == pytest.approx(0.0) and s.sigma == pytest.approx(sigma)
    assert s.statistic.tolist() == pytest.approx([2.0, 0.0, -2.0])
    assert s.scores.tolist() == pytest.approx([2 / sigma, 0.0, 2 / sigma])
    # tail: all six weights, mu 0, sigma sqrt(34/6); outside one sigma (2.38): 3 and -4
    t = pfgdf.layer_statistics(w, PFGDFParams(k=1.0, mode="tail"))
    assert t.mu == pytest.approx(0.0) and t.sigma == pytest.approx(math.sqrt(34 / 6))
    assert t.scores.tolist() == [0.5, 0.0, 0.5] and torch.equal(t.statistic, t.scores)


def test_decide_is_layer_statistics_then_decide_group():
    torch.manual_seed(3)
    w = torch.randn(24, 4, 3, 3)
    for knobs in ({}, {"k": 0.5, "statistic": "l2"}, {"mode": "tail", "min_channels": 20}):
        params = PFGDFParams(**knobs)
        layer = pfgdf.decide(w, **knobs, max_ratio=0.6)
        stats = pfgdf.layer_statistics(w, params)
        group = decide_group(stats.scores, params, max_ratio=0.6)
        assert layer.prune.tolist() == group.prune.tolist()
        assert torch.equal(layer.insignificant, group.candidates)
        assert (layer.mu, layer.sigma) == (stats.mu, stats.sigma)


def test_tail_layer_without_any_tail_weight_is_degenerate_like_a_zero_variance_one():
    # k = 10: no weight of this layer lies outside mu +- 10 sigma, so every tail share is 0
    d = pfgdf.decide(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]), k=10.0, mode="tail")
    assert d.sigma > 0 and d.degenerate and d.prune.numel() == 0


def test_make_params_lists_every_problem_and_names_the_ratio():
    with pytest.raises(PFGDFError) as info:
        pfgdf.make_params(2.0, "max_pruning_ratio", k=0, statistic="median", group_reduction="sum")
    assert info.value.problems == [
        "k must be > 0, got 0", "statistic must be one of mean, abs_mean, l2; got 'median'",
        "group_reduction must be one of mean, max, first; got 'sum'", "max_pruning_ratio must be in [0, 1], got 2.0"]
    p = pfgdf.make_params(k=2, tail_threshold=0)
    assert p == PFGDFParams(k=2.0, tail_threshold=0.0) and isinstance(p.k, float)
    assert pfgdf.REDUCTIONS == ("mean", "max", "first")


def test_select_l1_takes_the_band_count_in_norm_order_over_channel_groups():
    scores = torch.tensor([0.1, 5.0, 0.2, 5.0, 0.1, 5.0, 0.2, 5.0])  # 2 channel groups of 4 positions
    norms = torch.tensor([9.0, 1.0, 8.0, 2.0, 9.0, 1.0, 8.0, 2.0])
    band = decide_group(scores, PFGDFParams(), channel_groups=2)
    l1 = decide_group(scores, PFGDFParams(select="l1"), channel_groups=2, norms=norms)
    assert sorted(band.prune.tolist()) == [0, 2, 4, 6]
    assert sorted(l1.prune.tolist()) == [1, 3, 5, 7]  # as many, the smallest norms
    with pytest.raises(PFGDFError, match="select='l1' needs one L1 norm per channel"):
        decide_group(scores, PFGDFParams(select="l1"), channel_groups=2)
    with pytest.raises(PFGDFError, match="select must be one of band, l1"):
        PFGDFParams(select="l2")
