"""MPDCompress: plans and masks, conversion to block-diagonal layers, and the Torch-Pruning MPDPruner."""

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pfgdf_plugin.methods import mpd
from pfgdf_plugin.methods.mpd import BlockPlan, MPDError
from pfgdf_plugin.models import build_model
from pfgdf_plugin.modules import BlockDiagonalLinear, ChannelPermute, PermutedGroupConv2d
from pfgdf_plugin.torch_pruning.mpd import MPDPruner, find_fold_links

torch.set_num_threads(1)

LENET_X = (1, 32, 32)  # lenet300 on 1x32x32 images: in_features 1024
VGG_X = (3, 32, 32)


def _lenet(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return build_model("lenet300", in_channels=1, image_size=32).to(dtype)


def _vgg(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("vgg16_bn", width=0.25).to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # BatchNorms that do something, so a mispermuted one shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.randn(n, generator=g, dtype=dtype))
                m.bias.copy_(torch.randn(n, generator=g, dtype=dtype))
                m.running_mean.copy_(torch.randn(n, generator=g, dtype=dtype))
                m.running_var.copy_(torch.rand(n, generator=g, dtype=dtype) + 0.5)
    return model


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max().detach() / ref.abs().max().detach())


class SmallNet(nn.Module):
    """Conv-BN-ReLU, conv-ReLU, two Linear layers: every kind of layer MPD converts."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 8, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x)).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


# --------------------------------------------------------------------------- plans and masks


def test_balanced_plan_is_block_diagonal_after_sorting_its_labels():
    plan = mpd.make_plan("fc", torch.randn(10, 7), blocks=3, seed=4)
    assert plan.out_sizes().tolist() == [4, 3, 3] and plan.in_sizes().tolist() == [3, 2, 2]
    m = plan.mask()
    assert m.shape == (10, 7) and set(m.unique().tolist()) == {0.0, 1.0}
    p, q = torch.argsort(plan.out_labels, stable=True), torch.argsort(plan.in_labels, stable=True)
    expected = torch.block_diag(torch.ones(4, 3), torch.ones(3, 2), torch.ones(3, 2))
    assert torch.equal(m[p][:, q], expected)
    assert plan.kept_weights() == int(m.sum()) == 4 * 3 + 3 * 2 + 3 * 2
    # a convolution's mask is the same over the kernel
    conv_plan = mpd.make_plan("conv", torch.randn(6, 4, 3, 3), blocks=2, seed=0)
    cm = conv_plan.mask()
    assert cm.shape == (6, 4, 3, 3) and torch.equal(cm, cm[:, :, :1, :1].expand_as(cm))
    assert conv_plan.kept_weights() == int(cm.sum()) == 6 * 4 * 9 // 2


def test_random_plans_are_seeded_per_layer():
    w = torch.randn(12, 16)
    a, b = mpd.make_plan("fc1", w, 4, seed=0), mpd.make_plan("fc1", w, 4, seed=0)
    assert torch.equal(a.out_labels, b.out_labels) and torch.equal(a.in_labels, b.in_labels)
    c, d = mpd.make_plan("fc1", w, 4, seed=1), mpd.make_plan("fc2", w, 4, seed=0)
    assert not torch.equal(a.mask(), c.mask()) and not torch.equal(a.mask(), d.mask())


def test_plan_from_mask_recovers_the_blocks_and_refuses_other_masks():
    plan = mpd.make_plan("layer", torch.randn(9, 5, 3, 3), blocks=3, seed=2)
    back = mpd.plan_from_mask("layer", plan.mask())
    assert back.blocks == 3 and torch.equal(back.mask(), plan.mask())
    tampered = plan.mask()
    tampered[0, int(torch.nonzero(plan.mask2d()[0] == 0)[0])] = 1.0
    with pytest.raises(MPDError, match=r"layer: the mask is not block-diagonal after any permutation"):
        mpd.plan_from_mask("layer", tampered)
    uneven = plan.mask()
    uneven[0, 0, 0, 0] = 1 - uneven[0, 0, 0, 0]
    with pytest.raises(MPDError, match="layer: the mask differs between kernel positions"):
        mpd.plan_from_mask("layer", uneven)


def test_choose_blocks_reaches_the_target_and_caps_small_layers():
    assert mpd.choose_blocks({"fc1": (300, 1024, 1), "fc2": (100, 300, 1)}, 10.0) == {"fc1": 10, "fc2": 10}
    shapes = {"first": (16, 3, 9), "a": (32, 16, 9), "b": (64, 32, 9), "tiny": (1, 8, 1)}
    chosen = mpd.choose_blocks(shapes, 6.0)
    assert chosen["first"] == 3 and chosen["tiny"] == 1  # capped by min(out, in)
    dense = sum(o * i * k for o, i, k in shapes.values())
    kept = sum(mpd.make_plan(n, torch.zeros(o, i), chosen[n]).kept_weights() * k for n, (o, i, k) in shapes.items())
    assert dense / kept >= 6.0
    assert dense / kept < 6.0 * 1.3  # not far past the target either


def test_round_to_deals_channels_in_units():
    plan = mpd.make_plan("fc", torch.randn(16, 24), blocks=2, round_to=8)
    assert plan.out_sizes().tolist() == [8, 8] and plan.in_sizes().tolist() == [16, 8]
    with pytest.raises(MPDError, match=r"fc: blocks=3 exceeds min\(out, in\) // round_to=8"):
        mpd.make_plan("fc", torch.randn(16, 24), blocks=3, round_to=8)


# --------------------------------------------------------------------------- magnitude permutations


def _planted(out_n: int, in_n: int, c: int, seed: int = 0, noise: float = 0.05, kernel=()):
    """A weight whose mass sits in c balanced blocks, hidden by random permutations."""
    g = torch.Generator().manual_seed(seed)
    outs, ins = mpd.balanced_sizes(out_n, c), mpd.balanced_sizes(in_n, c)
    block = torch.block_diag(*[torch.ones(o, i) for o, i in zip(outs, ins)])
    w = (block + noise * torch.rand(out_n, in_n, generator=g)) * torch.randn(out_n, in_n, generator=g).sign()
    p, q = torch.randperm(out_n, generator=g), torch.randperm(in_n, generator=g)
    w, block = w[p][:, q], block[p][:, q]
    if kernel:
        w = w.reshape(out_n, in_n, 1, 1) * (1 + torch.rand(out_n, in_n, *kernel, generator=g))
        block = block.reshape(out_n, in_n, 1, 1).expand_as(w)
    return w, block


@pytest.mark.parametrize("shape,c,kernel", [((64, 48), 4, ()), ((30, 45), 7, ()), ((24, 18), 3, (3, 3))])
def test_magnitude_permutation_recovers_a_planted_block_structure(shape, c, kernel):
    w, planted = _planted(*shape, c, kernel=kernel)
    mag = mpd.make_plan("layer", w, c, permutation="magnitude", seed=0)
    rnd = mpd.make_plan("layer", w, c, permutation="random", seed=0)
    share_mag, share_rnd, best = mpd.kept_share(w, mag), mpd.kept_share(w, rnd), mpd.kept_share(w, planted)
    assert best > 0.8 and share_mag >= 0.98 * best  # the hidden blocks are found (noise aside)
    assert share_rnd < 0.5 * best
    # balanced like the random plan, and deterministic
    assert torch.equal(mag.out_sizes(), rnd.out_sizes()) and torch.equal(mag.in_sizes(), rnd.in_sizes())
    again = mpd.make_plan("layer", w, c, permutation="magnitude", seed=0)
    assert torch.equal(again.mask(), mag.mask())


def test_magnitude_keeps_more_than_random_on_a_trained_layer():
    torch.manual_seed(0)
    x = torch.randn(256, 20)
    teacher = torch.zeros(12, 20)
    teacher[:6, :10] = torch.randn(6, 10)
    teacher[6:, 10:] = torch.randn(6, 10)
    y = x @ teacher.t()
    layer = nn.Linear(20, 12)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        F.mse_loss(layer(x), y).backward()
        opt.step()
    shares = {p: mpd.kept_share(layer.weight, mpd.make_plan("fc", layer.weight, 2, permutation=p, seed=3))
              for p in mpd.PERMUTATIONS}
    assert shares["magnitude"] >= shares["random"]
    assert shares["magnitude"] > 0.9


# --------------------------------------------------------------------------- single-layer conversion


def _masked(module: nn.Module, plan: BlockPlan) -> nn.Module:
    with torch.no_grad():
        module.weight.mul_(plan.mask(module.weight.dtype))
    return module


@pytest.mark.parametrize("permutation", ["random", "magnitude"])
@pytest.mark.parametrize("out_n,in_n,c", [(8, 12, 4), (7, 13, 3), (10, 10, 10)])
def test_block_diagonal_linear_matches_the_masked_linear(out_n, in_n, c, permutation):
    torch.manual_seed(0)
    lin = nn.Linear(in_n, out_n).double()
    plan = mpd.make_plan("lin", lin.weight, c, permutation=permutation)
    _masked(lin, plan)
    new = mpd.convert_layer(plan, lin)
    assert isinstance(new, BlockDiagonalLinear) and new.blocks == c
    x = torch.randn(5, 3, in_n, dtype=torch.float64)  # any leading dimensions
    assert _rel(new(x), lin(x)) <= 1e-12
    # effective weights exclude padding; stored ones include it
    assert new.effective_weights() == plan.kept_weights() == int((lin.weight != 0).sum())
    assert int((new.weight != 0).sum()) == plan.kept_weights()
    assert new.stored_weights() == c * max(plan.out_sizes()) * max(plan.in_sizes())
    assert (new.stored_weights() == new.effective_weights()) == (out_n % c == 0 and in_n % c == 0)


@pytest.mark.parametrize("out_n,in_n,c,kw", [(12, 8, 4, {"padding": 1}), (10, 7, 3, {"stride": 2, "bias": False}),
                                             (9, 6, 2, {"padding": 2, "dilation": 2})])
def test_permuted_group_conv_matches_the_masked_conv(out_n, in_n, c, kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(in_n, out_n, 3, **kw).double()
    plan = mpd.make_plan("conv", conv.weight, c)
    _masked(conv, plan)
    new = mpd.convert_layer(plan, conv)
    assert isinstance(new, PermutedGroupConv2d) and new.conv.groups == c
    x = torch.randn(2, in_n, 9, 9, dtype=torch.float64)
    assert _rel(new(x), conv(x)) <= 1e-12
    assert new.effective_weights() == plan.kept_weights() == int((conv.weight != 0).sum())
    assert int((new.conv.weight != 0).sum()) == plan.kept_weights()


def test_padding_weights_cannot_leak_into_outputs():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5).double()
    plan = mpd.make_plan("lin", lin.weight, 3)
    new = mpd.convert_layer(plan, _masked(lin, plan))
    x = torch.randn(4, 7, dtype=torch.float64)
    ref = new(x)
    pad = torch.ones_like(new.block_weight(), dtype=torch.bool)  # [c, O, I], whatever the stored layout
    for b, (o, i) in enumerate(zip(new.out_sizes, new.in_sizes)):
        pad[b, :o, :i] = False
    assert pad.any()
    with torch.no_grad():
        new.block_weight()[pad] = 123.0  # what fine-tuning could write into padded slots
    assert torch.equal(new(x), ref)
    assert torch.equal(ChannelPermute(torch.tensor([1, 2]), 2)(torch.tensor([[5.0, 6.0]])), torch.tensor([[6.0, 0.0]]))


# --------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("permutation", ["random", "magnitude"])
@pytest.mark.parametrize("fold", [True, False])
def test_lenet300_converts_to_10x_and_computes_the_same(permutation, fold):
    model = _lenet()
    x = torch.randn(6, *LENET_X, dtype=torch.float64)
    pruner = MPDPruner(model, x, compression=10.0, permutation=permutation, fold=fold)
    plan = pruner.summary()
    assert {n: s["blocks"] for n, s in plan["layers"].items()} == {"fc1": 10, "fc2": 10}  # fc3 stays dense
    assert plan["compression"] == pytest.approx(10.0)
    masked = model(x)
    report = pruner.step()
    out = model(x)
    assert _rel(out, masked) <= 1e-5
    assert isinstance(model.fc1, BlockDiagonalLinear) and isinstance(model.fc3, nn.Linear)
    layers = report["layers"]
    assert layers["fc1"]["dense"] == 1024 * 300 and layers["fc1"]["kept"] == 1024 * 300 // 10
    assert layers["fc2"]["kept"] == 300 * 100 // 10
    assert layers["fc1"]["stored"] == 10 * 30 * 103  # 1024 inputs: blocks of 103 and 102, padded
    assert int((model.fc1.weight != 0).sum()) == layers["fc1"]["kept"]
    assert report["compression"] == pytest.approx(10.0)
    assert report["folded"] == (["fc1 -> fc2"] if fold else [])
    assert model.fc1.scatter is not fold


@pytest.mark.parametrize("permutation", ["random", "magnitude"])
@pytest.mark.parametrize("fold", [True, False])
def test_vgg_with_batchnorm_converts_and_computes_the_same(permutation, fold):
    model = _vgg()
    x = torch.randn(4, *VGG_X, dtype=torch.float64)
    pruner = MPDPruner(model, x, blocks={"features.0": 3, **{f"features.{i}": 4 for i in (3, 7, 10, 14, 17, 20)},
                                         "features.24": 5},
                       permutation=permutation, fold=fold)
    model.eval()
    masked = model(x)
    twin = copy.deepcopy(model).train()
    masked_train = twin(x)
    report = pruner.step()
    assert _rel(model(x), masked) <= 1e-5
    assert _rel(model.train()(x), masked_train) <= 1e-5  # batch statistics too: BatchNorms permuted exactly
    assert isinstance(model.features[24], PermutedGroupConv2d)
    assert model.features[3].conv.groups == 4 and model.features[0].raw_channels == 18  # 16 outputs: 6 + 5 + 5, padded
    if fold:  # conv -> BN -> ReLU (-> pool) -> conv chains between divisible layers fold; the padded first does not
        assert "features.3 -> features.7" in report["folded"] and "features.0 -> features.3" not in report["folded"]
        assert "features.20 -> features.24" in report["folded"]
        assert isinstance(model.features[3].permute_out, nn.Identity)
    else:
        assert report["folded"] == []


def test_folds_never_cross_a_residual_addition():
    torch.manual_seed(0)
    model = build_model("resnet20", width=0.5).double()
    x = torch.randn(2, *VGG_X, dtype=torch.float64)
    links = find_fold_links(model, x)
    assert links and all(link.producer.endswith("conv1") and link.consumer.endswith("conv2") for link in links)
    pruner = MPDPruner(model, x, blocks=2, ignored_layers=["conv1"])
    model.eval()
    masked = model(x)
    report = pruner.step()
    assert len(report["folded"]) == 9
    assert _rel(model(x), masked) <= 1e-5


# --------------------------------------------------------------------------- training keeps the zeros


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("reapply", [False, True])
def test_masked_weights_stay_exactly_zero_while_training(opt_name, reapply):
    torch.manual_seed(0)
    model = SmallNet()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    pruner = MPDPruner(model, x, blocks=2, permutation="random")
    assert set(pruner.plans) == {"conv1", "conv2", "fc1"}  # the classifier stays dense
    params = model.parameters()
    opt = {"sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2),
           "adam": lambda: torch.optim.Adam(params, lr=0.01, weight_decay=1e-2),
           "adamw": lambda: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)}[opt_name]()
    if reapply:
        pruner.attach(opt)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in pruner.plans}
    masks = pruner.masks()
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for name, mask in masks.items():  # gradients are masked too
            assert float(model.get_submodule(name).weight.grad[mask == 0].abs().sum()) == 0.0
        opt.step()
    for name, mask in masks.items():
        w = model.get_submodule(name).weight.detach()
        assert bool((w[mask == 0] == 0).all()), name
        assert not torch.equal(w[mask == 1], before[name][mask == 1])  # the kept weights did train
    model.eval()
    ref = model(x)
    pruner.step()
    assert _rel(model(x), ref) <= 1e-5


# --------------------------------------------------------------------------- save, reload, export


@pytest.mark.parametrize("which", ["lenet", "vgg"])
def test_converted_model_reloads_from_a_description_and_exports_to_onnx(which, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from pfgdf_plugin.measure import export_onnx

    build = (lambda: _lenet(torch.float32)) if which == "lenet" else (lambda: _vgg(torch.float32))
    shape = LENET_X if which == "lenet" else VGG_X
    model = build()
    x = torch.randn(3, *shape)
    blocks = 4 if which == "lenet" else {"features.3": 4, "features.7": 4, "features.10": 3}
    MPDPruner(model, x, blocks=blocks).step()
    model.eval()
    ref = model(x).detach()

    (tmp_path / "mpd.json").write_text(json.dumps(mpd.describe_model(model)))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    fresh = mpd.restore_model(build(), json.loads((tmp_path / "mpd.json").read_text()))
    fresh.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    assert torch.equal(fresh.eval()(x), ref)

    traced = torch.fx.symbolic_trace(model)
    assert torch.allclose(traced(x), ref, atol=1e-6, rtol=0)
    assert torch.equal(copy.deepcopy(model)(x), ref)

    export_onnx(model, x, str(tmp_path / "m.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    x5 = torch.randn(5, *shape)
    out = session.run(None, {"input": x5.numpy()})[0]
    assert abs(out - model(x5).detach().numpy()).max() <= 1e-4


def test_pruner_state_dict_restores_the_masks():
    model, twin = SmallNet(), SmallNet()
    x = torch.randn(2, 3, 8, 8)
    a = MPDPruner(model, x, blocks=2, seed=7)
    b = MPDPruner(twin, x, blocks=2, seed=8)
    assert any(not torch.equal(a.masks()[n], b.masks()[n]) for n in a.plans)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert all(torch.equal(a.masks()[n], b.masks()[n]) for n in a.plans)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,match", [
    ({"blocks": 0}, r"blocks must be an integer >= 1, got 0"),
    ({"blocks": {"fc1": 0.5}}, r"fc1: blocks must be an integer >= 1, got 0.5"),
    ({"blocks": {"conv2": 9}}, r"conv2: blocks=9 exceeds min\(out, in\) = min\(8, 12\) = 8"),
    ({"blocks": 4}, r"conv1: blocks=4 exceeds min\(out, in\) = min\(12, 3\) = 3"),
    ({"blocks": {"nope": 2}}, r"blocks names 'nope', which is not a layer of the model"),
    ({"compression": 0.5}, r"compression must be a number >= 1, got 0.5"),
    ({"compression": 4.0, "blocks": 2}, r"give compression or blocks, not both; got compression=4.0, blocks=2"),
    ({"compression": 4.0, "blocks": {"fc1": 2}}, r"give compression or blocks, not both"),
    ({"blocks": 2, "ignored_layers": ["nope"]}, r"ignored_layers names 'nope', which is not a layer of the model"),
    ({"blocks": 2, "seed": 1.5, "fold": 1}, r"seed must be an integer, got 1.5; fold must be true or false, got 1"),
    ({"blocks": 2, "permutation": "sorted"}, r"permutation must be one of random, magnitude; got 'sorted'"),
    ({"blocks": 2, "round_to": 0}, r"round_to must be None or an integer >= 1, got 0"),
])
def test_bad_arguments_name_the_layer_and_value(kwargs, match):
    model = SmallNet()
    with pytest.raises(MPDError, match=match):
        MPDPruner(model, torch.randn(2, 3, 8, 8), **kwargs)


def test_without_a_size_the_pruner_takes_mpdparams_default_compression():
    model = build_model("lenet300", in_channels=1, image_size=32)
    pruner = MPDPruner(model, torch.randn(1, 1, 32, 32))
    assert pruner.compression == mpd.MPDParams().compression == 10.0
    assert {n: p.blocks for n, p in pruner.plans.items()} == {"fc1": 10, "fc2": 10}


def test_grouped_convolutions_are_refused_by_name_and_skipped_model_wide():
    net = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 4, 6, 6)
    with pytest.raises(MPDError, match=r"2: Conv2d with groups=8 \(depthwise or grouped\) cannot take an MPD mask"):
        MPDPruner(net, x, blocks={"2": 2})
    with pytest.warns(UserWarning, match=r"leaves these layers dense: 2 \(groups=8\)"):
        pruner = MPDPruner(net, x, blocks=2)
    assert set(pruner.plans) == {"0"}  # "4" produces the output


def test_conversion_refuses_a_tampered_layer_and_leaves_the_model_alone():
    model = SmallNet()
    x = torch.randn(2, 3, 8, 8)
    pruner = MPDPruner(model, x, blocks=2)
    masked_at = torch.nonzero(pruner.masks()["fc1"] == 0)[0]
    with torch.no_grad():
        model.fc1.weight[tuple(masked_at)] = 0.5
    with pytest.raises(MPDError, match=r"fc1: 1 weights outside the block-diagonal mask are non-zero"):
        pruner.step()
    assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.fc1, nn.Linear) and not pruner.converted
    pruner.apply_masks()
    pruner.step()
    assert isinstance(model.fc1, BlockDiagonalLinear)


def test_plan_level_errors():
    with pytest.raises(MPDError, match=r"fc: blocks=3 exceeds min\(out, in\) = min\(2, 5\) = 2"):
        mpd.make_plan("fc", torch.randn(2, 5), 3)
    with pytest.raises(MPDError, match="bn: MPD masks nn.Linear and nn.Conv2d layers, got BatchNorm2d"):
        mpd.check_layer("bn", nn.BatchNorm2d(3))
    plan = mpd.make_plan("fc", torch.randn(4, 6), 2)
    with pytest.raises(MPDError, match=r"fc: the layer's weight shape \(4, 5\) does not match"):
        mpd.convert_layer(plan, nn.Linear(5, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mpd.make_plan("tiny", torch.randn(1, 1), 1).blocks == 1
