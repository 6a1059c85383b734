"""MPD's one layer choice (choose_layers / iter_layers), plan summary and pruner parameters, on hand-made layers."""

import warnings

import pytest
import torch
import torch.nn as nn

from pfgdf_plugin.methods import mpd
from pfgdf_plugin.methods.mpd import MPDError, MPDParams


def _net():
    # 0: 8x12 conv (3x3), 1: depthwise, 3: 24x8 linear-ish conv (1x1), 5: classifier 10x24
    return nn.Sequential(nn.Conv2d(12, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(), nn.Conv2d(8, 24, 1),
                         nn.Flatten(), nn.Linear(24, 10))


def _layers(net):
    return dict(net.named_modules())


def test_the_split_package_keeps_every_public_name():
    for name in ("make_plan", "describe_model", "restore_model", "BlockPlan", "FoldLink", "MPDError", "convert_model",
                 "summarize", "choose_blocks", "check_blocks", "plan_from_mask", "magnitude_labels", "kept_share",
                 "MPDParams", "PERMUTATIONS", "fold", "convert_layer", "choose_layers", "plan_summary"):
        assert hasattr(mpd, name), name
    assert mpd.MPDError is __import__("pfgdf_plugin.errors", fromlist=["MPDError"]).MPDError


def test_without_a_size_the_default_compression_is_mpdparams():
    net = nn.Sequential(nn.Linear(1024, 300), nn.ReLU(), nn.Linear(300, 100), nn.Linear(100, 10))
    assert MPDParams().compression == 10.0
    assert mpd.choose_layers(_layers(net), output_layers=["3"]) == {"0": 10, "2": 10}
    assert mpd.choose_layers(_layers(net), compression=10.0, output_layers=["3"]) == {"0": 10, "2": 10}
    # the classifier counts too when dense_output is off: 10 x 100 caps at 10 blocks
    assert mpd.choose_layers(_layers(net), dense_output=False, output_layers=["3"]) == {"0": 10, "2": 10, "3": 10}


def test_model_wide_choice_skips_grouped_layers_with_one_warning_and_honours_ignored():
    net = _net()
    with pytest.warns(UserWarning, match=r"leaves these layers dense: 1 \(groups=8\)"):
        chosen = mpd.choose_layers(_layers(net), blocks=2, output_layers=["5"])
    assert chosen == {"0": 2, "3": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert mpd.choose_layers(_layers(net), blocks=2, ignored=["3"], output_layers=["5"]) == {"0": 2}
        with pytest.raises(MPDError, match=r"^no layer to mask"):
            mpd.choose_layers(_layers(net), blocks=2, ignored=["0", "3"], output_layers=["5"])
    with pytest.raises(MPDError, match=r"ignored_layers names 'conv9', which is not a layer of the model"):
        mpd.choose_layers(_layers(net), blocks=2, ignored=["conv9"])


def test_a_blocks_mapping_names_its_layers_in_the_model_order():
    net = _net()
    # a mapping may name the classifier and skips `ignored`; the result follows the model's order
    assert mpd.choose_layers(_layers(net), blocks={"5": 2, "0": 3}, ignored=["0"], output_layers=["5"]) == \
        {"0": 3, "5": 2}
    with pytest.raises(MPDError, match=r"^1: Conv2d with groups=8 \(depthwise or grouped\)"):
        mpd.choose_layers(_layers(net), blocks={"1": 2})
    with pytest.raises(MPDError, match=r"blocks names 'fc', which is not a layer of the model among 0, 1, 3, 5"):
        mpd.choose_layers(_layers(net), blocks={"fc": 2})
    with pytest.raises(MPDError, match=r"^5: blocks=11 exceeds min\(out, in\) = min\(10, 24\) = 10"):
        mpd.choose_layers(_layers(net), blocks={"0": 2, "5": 11})
    with pytest.raises(MPDError, match=r"give compression or blocks, not both"):
        mpd.choose_layers(_layers(net), compression=2.0, blocks={"0": 2})


def test_compression_caps_small_layers_and_gives_the_rest_to_the_largest():
    # hand-computed: "a" (4 x 64, 3x3) caps at 4 blocks, so "b" (64 x 64) takes 9 to reach 8x overall
    layers = {"a": nn.Conv2d(64, 4, 3), "b": nn.Conv2d(64, 64, 3)}
    assert mpd.choose_layers(layers, compression=8.0, model_wide=False) == {"a": 4, "b": 9}
    assert mpd.choose_blocks({"a": (4, 64, 9), "b": (64, 64, 9)}, 8.0) == {"a": 4, "b": 9}


def test_an_explicit_selection_refuses_what_cannot_be_masked_and_uses_the_fallback():
    layers = {"fc1": nn.Linear(12, 8), "fc2": nn.Linear(8, 6), "fc3": nn.Linear(6, 4)}
    # neither size: per-layer counts where given, the default compression over the rest (capped at 4)
    assert mpd.choose_layers(layers, fallback={"fc1": 2}, model_wide=False) == {"fc1": 2, "fc2": 6, "fc3": 4}
    # a given size wins over the fallback
    assert mpd.choose_layers(layers, blocks=3, fallback={"fc1": 2}, model_wide=False) == \
        {"fc1": 3, "fc2": 3, "fc3": 3}
    # a mapping: named layers, then the fallback; the others are left out
    assert mpd.choose_layers(layers, blocks={"fc3": 2}, fallback={"fc1": 4}, model_wide=False) == \
        {"fc1": 4, "fc3": 2}
    with pytest.raises(MPDError, match=r"^dw: Conv2d with groups=4 \(depthwise or grouped\)"):
        mpd.choose_layers({"dw": nn.Conv2d(4, 4, 3, groups=4)}, blocks=2, model_wide=False)
    assert mpd.choose_layers({}, compression=4.0, model_wide=False) == {}


def test_iter_layers_checks_a_per_layer_count_when_its_layer_is_reached():
    layers = {"big": nn.Linear(8, 8), "small": nn.Linear(8, 1), "late": nn.Linear(1, 8)}
    counts = mpd.iter_layers(layers, blocks=2, model_wide=False)  # no error yet
    assert next(counts) == ("big", 2)
    with pytest.raises(MPDError, match=r"^small: blocks=2 exceeds min\(out, in\) = min\(1, 8\) = 1"):
        next(counts)
    with pytest.raises(MPDError, match=r"compression must be a number >= 1, got 0.5"):
        mpd.iter_layers(layers, compression=0.5, model_wide=False)  # a whole-choice problem: at once


def test_plan_summary_counts_kept_weights_and_the_whole_model():
    net = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    plans = {"0": mpd.make_plan("0", net[0].weight, blocks=2)}
    summary = mpd.plan_summary(plans)
    assert summary == {"layers": {"0": {"blocks": 2, "dense": 24, "kept": 12, "compression": 2.0}},
                       "dense": 24, "kept": 12, "compression": 2.0}
    # the dense classifier (8 weights) counts as kept over the whole model: (24 + 8) / (12 + 8)
    assert mpd.plan_summary(plans, net)["model_compression"] == pytest.approx(32 / 20)
    assert mpd.plan_summary({})["compression"] == 1.0


def test_pruner_params_take_mpdparams_rules_and_a_mapping_apart():
    params, layer_blocks = mpd.pruner_params()
    assert params == MPDParams() and params.compression == 10.0 and layer_blocks is None
    mapping = {"fc1": 4}
    params, layer_blocks = mpd.pruner_params(blocks=mapping, seed=3)
    assert (params.compression, params.blocks, params.seed, layer_blocks) == (None, None, 3, {"fc1": 4})
    assert layer_blocks is not mapping
    with pytest.raises(MPDError, match=r"give compression or blocks, not both; .*permutation must be one of") as e:
        mpd.pruner_params(compression=2.0, blocks={"fc1": 4}, permutation="sorted")
    assert len(e.value.problems) == 2
    with pytest.raises(MPDError, match=r"seed must be an integer, got 'x'"):
        mpd.pruner_params(blocks=2, seed="x")


def test_checks_name_the_value():
    assert mpd.layer_shape("c", nn.Conv2d(3, 5, (3, 2))) == (5, 3, 6)
    assert mpd.unsupported(nn.Conv2d(4, 4, 3, groups=2)) == "groups=2"
    assert mpd.unsupported(nn.MultiheadAttention(8, 2).out_proj).startswith("the output projection")
    assert mpd.unsupported(nn.Linear(3, 3)) is None
    with pytest.raises(MPDError, match=r"fc: blocks must be an integer >= 1, got 0.5"):
        mpd.check_blocks("fc", 0.5, 4, 4)
    assert torch.equal(mpd.make_plan("x", torch.randn(4, 4), 1).mask(), torch.ones(4, 4))
