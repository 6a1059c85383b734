"""Both MPD adapters choose their layers with the same function, and share the graph helpers without importing
each other."""

import torch
import torch.nn as nn

import pfgdf_plugin.graph as graph
from pfgdf_plugin.methods import mpd
from pfgdf_plugin.models import build_model
from pfgdf_plugin.nni import mpd as nni_mpd
from pfgdf_plugin.torch_pruning import mpd as tp_mpd


def _vgg():
    torch.manual_seed(0)
    return build_model("vgg16_bn", width=0.25)


def test_both_pruners_choose_the_same_blocks_for_the_same_layers():
    x = torch.randn(1, 3, 32, 32)
    tp_pruner = tp_mpd.MPDPruner(_vgg(), x, compression=4.0, dense_output=False)
    model = _vgg()
    nni_pruner = nni_mpd.MPDPruner(model, [{"op_types": ["Linear", "Conv2d"]}], compression=4.0)
    nni_pruner.unwrap_model()
    assert {n: p.blocks for n, p in tp_pruner.plans.items()} == \
        {n: p.blocks for n, p in nni_pruner.plans.items() if p.blocks > 1}
    for name, plan in tp_pruner.plans.items():
        assert torch.equal(plan.mask(), nni_pruner.plans[name].mask()), name
    tp_summary, nni_summary = tp_pruner.summary(), nni_pruner.summary()
    assert tp_summary["compression"] == nni_summary["compression"] == mpd.plan_summary(tp_pruner.plans)["compression"]


def test_both_pruners_default_to_mpdparams_compression():
    x = torch.randn(1, 1, 32, 32)
    tp_pruner = tp_mpd.MPDPruner(build_model("lenet300", in_channels=1, image_size=32), x)
    model = build_model("lenet300", in_channels=1, image_size=32)
    nni_pruner = nni_mpd.MPDPruner(model, [{"op_names": ["fc1", "fc2"]}])
    nni_pruner.unwrap_model()
    assert tp_pruner.compression == mpd.MPDParams().compression
    assert {n: p.blocks for n, p in tp_pruner.plans.items()} == {n: p.blocks for n, p in nni_pruner.plans.items()} \
        == {"fc1": 10, "fc2": 10}


def test_the_graph_helpers_live_in_one_neutral_module():
    assert tp_mpd.find_fold_links is graph.find_fold_links and tp_mpd.build_graph is graph.build_graph
    assert nni_mpd.find_fold_links is graph.find_fold_links
    net = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    net.train()
    g = graph.build_graph(net, torch.randn(2, 8))
    assert net.training  # the graph leaves the modes as they were
    assert graph.find_fold_links(net, graph=g, names=["0", "3"]) == [mpd.FoldLink("0", "3", ["1"])]
    assert graph.output_layers(net, g) == {"5"}
