"""GaussianImportance and PFGDFPruner inside Torch-Pruning's dependency graph."""

import copy

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
import torchvision

from pfgdf_plugin import GaussianImportance, PFGDFError, PFGDFPruner
from pfgdf_plugin.measure import conv_params, count_params
from pfgdf_plugin.methods import pfgdf
from pfgdf_plugin.models import build_model


def _classifier(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("resnet50", 64), ("mobilenet_v2", 64),
                                       ("vgg16_bn", 32), ("cifar_vgg16_bn", 32)])
def test_metapruner_half_ratio_runs(name, size):
    torch.manual_seed(0)
    if name == "cifar_vgg16_bn":
        model = build_model("vgg16_bn", width=0.5)
    else:
        model = getattr(torchvision.models, name)(num_classes=10)
    x = torch.randn(2, 3, size, size)
    params = count_params(model)
    tp.pruner.MetaPruner(model, x, importance=GaussianImportance(), pruning_ratio=0.5,
                         ignored_layers=_classifier(model)).step()
    model.eval()
    assert model(x).shape == (2, 10)
    assert count_params(model) < 0.45 * params  # about a quarter of the weights of each conv stay


def test_scores_are_the_layers_gaussian_distance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 5, 3))
    dg = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 8, 8))
    group = dg.get_pruning_group(model[0], tp.prune_conv_out_channels, list(range(12)))
    got = GaussianImportance()(group)
    want = pfgdf.importance(model[0].weight)
    assert torch.allclose(got, want, atol=1e-6)
    # a group over a subset of channels returns one score per requested channel
    sub = dg.get_pruning_group(model[0], tp.prune_conv_out_channels, [2, 6, 9])
    assert torch.allclose(GaussianImportance()(sub), want[[2, 6, 9]], atol=1e-6)


def test_depthwise_and_coupled_layers_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 1))
    x = torch.randn(1, 3, 8, 8)
    dg = tp.DependencyGraph().build_dependency(model, x)
    group = dg.get_pruning_group(model[0], tp.prune_conv_out_channels, list(range(8)))
    before = GaussianImportance()(group)
    with torch.no_grad():
        model[3].weight[5] *= 100.0  # only the depthwise filter of channel 5 changes
    after = GaussianImportance()(group)
    assert not torch.allclose(before, after)
    pruned = copy.deepcopy(model)
    tp.pruner.MetaPruner(pruned, x, importance=GaussianImportance(), pruning_ratio=0.5,
                         ignored_layers=[pruned[6]]).step()
    assert pruned[3].groups == pruned[3].in_channels == pruned[0].out_channels == 4
    assert pruned(x).shape == (1, 4, 8, 8)


def test_grouped_conv_and_global_pruning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    x = torch.randn(2, 3, 8, 8)
    tp.pruner.MetaPruner(model, x, importance=GaussianImportance(), pruning_ratio=0.5, global_pruning=True,
                         ignored_layers=[model[9]]).step()
    assert model(x).shape == (2, 3)
    assert model[3].out_channels % 4 == 0


def test_norm_only_group_is_scored_on_the_scale():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 2.0, 6.0]))
    dg = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 6, 6))
    group = dg.get_pruning_group(model[0], tp.prune_batchnorm_out_channels, [0, 1, 2])
    scores = GaussianImportance()(group)
    assert scores.shape == (3,) and int(scores.argmax()) == 2


def _vgg(width=0.5, seed=0):
    torch.manual_seed(seed)
    return build_model("vgg16_bn", width=width)


def test_pfgdf_pruner_removes_the_band_share_on_vgg16():
    model = _vgg()
    x = torch.randn(1, 3, 32, 32)
    filters = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    cp = conv_params(model)
    pruner = PFGDFPruner(model, x, k=1.0, ignored_layers=[model.classifier])
    pruner.step()
    after = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    assert 0.60 <= 1 - after / filters <= 0.75
    assert 1 - conv_params(model) / cp > 0.85
    assert model.eval()(x).shape == (1, 10)
    assert all(e["channels"] - e["pruned"] >= 1 for e in pruner.report.values())
    assert set(pruner.report) >= {"features.0", "features.40"}


def test_pruned_model_equals_the_masked_model():
    model = _vgg(width=0.25).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    masked = copy.deepcopy(model)
    pruner = PFGDFPruner(model, x, k=1.0, ignored_layers=[model.classifier])
    pruner.step()
    mods = dict(masked.named_modules())
    with torch.no_grad():
        for name, entry in pruner.report.items():
            idx = entry["pruned_idxs"]
            conv = mods[name]
            conv.weight[idx] = 0
            if conv.bias is not None:
                conv.bias[idx] = 0
            bn = mods[name.rsplit(".", 1)[0] + "." + str(int(name.rsplit(".", 1)[1]) + 1)]
            bn.weight[idx] = 0
            bn.bias[idx] = 0
        assert torch.allclose(model.eval()(x), masked(x), atol=1e-5)


def test_pfgdf_pruner_rejects_a_ratio_and_bad_k():
    model = _vgg(width=0.25)
    with pytest.raises(TypeError, match="chooses per-layer ratios"):
        PFGDFPruner(model, torch.randn(1, 3, 32, 32), pruning_ratio=0.5)
    with pytest.raises(ValueError, match="k must be > 0"):
        PFGDFPruner(model, torch.randn(1, 3, 32, 32), k=0)
    with pytest.raises(ValueError, match="k must be > 0"):
        GaussianImportance(k=-2)


def test_zero_variance_layer_is_left_alone_and_nan_is_named():
    model = _vgg(width=0.25)
    with torch.no_grad():
        model.features[3].weight.fill_(0.01)
    before = model.features[3].out_channels
    with pytest.warns(UserWarning, match="zero variance"):
        PFGDFPruner(model, torch.randn(1, 3, 32, 32), ignored_layers=[model.classifier]).step()
    assert model.features[3].out_channels == before
    bad = _vgg(width=0.25)
    with torch.no_grad():
        bad.features[7].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(PFGDFError, match="features.7"):
        PFGDFPruner(bad, torch.randn(1, 3, 32, 32), ignored_layers=[bad.classifier]).step()


def test_min_channels_is_kept():
    model = _vgg(width=0.25)
    pruner = PFGDFPruner(model, torch.randn(1, 3, 32, 32), k=3.0, min_channels=6, ignored_layers=[model.classifier])
    pruner.step()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert min(c.out_channels for c in convs) == 6


def test_auto_k_widens_until_the_evaluation_breaks_and_leaves_the_input_alone():
    from pfgdf_plugin import auto_k_prune

    model = _vgg(width=0.25)
    x = torch.randn(1, 3, 32, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = []
    # a stand-in evaluation: the more parameters survive, the better (breaks past ~90% removed)
    full = count_params(model)
    best, k, hist = auto_k_prune(model, x, finetune=lambda m: tuned.append(m),
                                 evaluate=lambda m: count_params(m) / full, baseline=0.13, tolerance=0.0,
                                 k_values=(0.25, 0.5, 1.0, 2.0), ignored_layers=[model.classifier])
    assert [h.k for h in hist][: len(tuned)] == [0.25, 0.5, 1.0, 2.0][: len(tuned)]
    assert k is not None and hist[-1].accepted is False and all(h.accepted for h in hist[:-1])
    assert count_params(best) == hist[-2].info["params"]
    assert all(torch.equal(state[n], v) for n, v in model.state_dict().items())
