"""PFGDF's framework-free rule, checked on hand-computed tensors."""

import math

import pytest
import torch

from pfgdf_plugin.methods import pfgdf


def test_filter_statistics_by_hand():
    w = torch.tensor([[1.0, -3.0], [2.0, 2.0], [0.0, -4.0]])
    assert pfgdf.filter_statistic(w, "mean").tolist() == [-1.0, 2.0, -2.0]
    assert pfgdf.filter_statistic(w, "abs_mean").tolist() == [2.0, 2.0, 2.0]
    assert pfgdf.filter_statistic(w, "l2").tolist() == pytest.approx([math.sqrt(10), math.sqrt(8), 4.0])


def test_band_rule_by_hand():
    # mean 0, population sigma sqrt(20.5/7) ~ 1.711: five filters lie within one sigma
    w = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0]).view(7, 1, 1, 1)
    d = pfgdf.decide(w, k=1.0)
    assert d.mu == pytest.approx(0.0)
    assert d.sigma == pytest.approx(math.sqrt(20.5 / 7))
    assert d.prune.tolist() == [3, 2, 4, 1, 5]
    assert d.scores[0].item() == pytest.approx(3 / d.sigma, rel=1e-6)
    # a wider band takes the outliers too, but never the whole layer
    assert len(pfgdf.decide(w, k=2.0).prune) == 6


def test_band_share_matches_the_gaussian():
    torch.manual_seed(0)
    w = torch.randn(20000, 1) * 0.3 + 0.1
    d = pfgdf.decide(w, k=1.0)
    assert 0.66 < d.ratio < 0.70  # a 1-sigma band holds 68.3%


def test_caps_keep_min_channels_and_never_empty_a_layer():
    w = torch.tensor([0.0, 0.1, -0.1, 0.05, 5.0]).view(5, 1)
    assert len(pfgdf.decide(w, k=10.0).prune) == 4  # everything in band, one kept
    assert len(pfgdf.decide(w, k=10.0, min_channels=3).prune) == 2
    assert len(pfgdf.decide(w, k=10.0, max_ratio=0.5).prune) == 2
    assert pfgdf.capped_prune_count(10, 10) == 9
    assert pfgdf.capped_prune_count(10, 7, round_to=4) == 6  # keeps 3, rounded up to 4


def test_capped_layer_drops_its_least_important_members():
    scores = torch.tensor([0.9, 0.1, 3.0, 0.5])
    idx = pfgdf.select(scores, scores <= 1.0, min_channels=2)
    assert idx.tolist() == [1, 3]


def test_zero_variance_layer_prunes_nothing():
    d = pfgdf.decide(torch.ones(8, 3, 3, 3), k=1.0)
    assert d.degenerate and len(d.prune) == 0 and d.notes


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_layer(bad):
    w = torch.randn(4, 2)
    w[1, 0] = bad
    with pytest.raises(pfgdf.PFGDFError, match="layer 'features.3'.*NaN/Inf"):
        pfgdf.decide(w, layer="features.3")


@pytest.mark.parametrize("kwargs,match", [
    ({"k": 0}, "k must be > 0"), ({"k": -1.0}, "k must be > 0"), ({"k": float("nan")}, "k must be > 0"),
    ({"k": 1.0, "statistic": "median"}, "statistic must be one of"),
    ({"k": 1.0, "mode": "bands"}, "mode must be one of"),
    ({"k": 1.0, "min_channels": 0}, "min_channels must be"),
])
def test_bad_parameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pfgdf.decide(torch.randn(4, 2), **kwargs)


def test_tail_mode_scores_heavy_filters_high():
    torch.manual_seed(1)
    w = torch.randn(16, 64) * 0.01
    w[3] = torch.randn(64)  # one filter with large weights: many in the layer's tails
    d = pfgdf.decide(w, k=1.0, mode="tail")
    assert int(d.scores.argmax()) == 3
    assert 3 not in d.prune.tolist()
    assert pfgdf.threshold(1.0, "tail") == pytest.approx(2 * (1 - 0.841344746), rel=1e-6)


def test_auto_k_widens_until_accuracy_breaks():
    seen = []

    def trial(k):
        seen.append(k)
        return {0.5: 0.90, 1.0: 0.899, 1.5: 0.85, 2.0: 0.95}[k], {"k": k}

    best, hist = pfgdf.auto_k(trial, baseline=0.90, tolerance=0.003, k_values=(0.5, 1.0, 1.5, 2.0))
    assert best == 1.0 and seen == [0.5, 1.0, 1.5]
    assert [h.accepted for h in hist] == [True, True, False]
    with pytest.raises(ValueError, match="increasing"):
        pfgdf.auto_k(trial, 0.9, k_values=(1.0, 0.5))
