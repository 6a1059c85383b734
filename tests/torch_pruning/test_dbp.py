"""DBP: block discovery, probes, selection, targets, and the Torch-Pruning adapters."""

import copy

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
import torchvision

from pfgdf_plugin.errors import TargetError
from pfgdf_plugin.measure import count_macs, count_params
from pfgdf_plugin.meter import Timing
from pfgdf_plugin.methods import dbp
from pfgdf_plugin.methods.target import Target as SharedTarget
from pfgdf_plugin.models import build_model
from pfgdf_plugin.torch_pruning import GaussianImportance
from pfgdf_plugin.torch_pruning.dbp import DBPPruner, DiscriminationImportance

torch.set_num_threads(1)  # the cores are shared; small convolutions run faster on one thread

X32 = (3, 32, 32)


def _random_data(batches=4, batch=32, classes=10, seed=0, shape=X32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g), torch.randperm(batch, generator=g) % classes)
            for _ in range(batches)]


def _outputs_equal_shape(model, x):
    model.eval()
    with torch.no_grad():
        return tuple(model(x).shape)


# --------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("name,build,count,first", [
    # VGG-16: 64,64 | 128,128 | 256x3 | 512x3 | 512x3 -> equal-channel convs: 1 + 1 + 2 + 2 + 3
    ("vgg16_bn", lambda: build_model("vgg16_bn", width=0.25), 9, "features.3"),
    # ResNet-56: stage 1 keeps 16 channels at stride 1 (all 9 blocks); stages 2-3 lose their first
    ("resnet56", lambda: build_model("resnet56", width=0.25), 25, "layer1.0"),
    # ResNet-18: layer1 (2 blocks, 64->64) + the second block of layers 2-4
    ("resnet18", lambda: torchvision.models.resnet18(num_classes=10), 5, "layer1.0"),
    # ResNet-50: every stage's first Bottleneck has a downsample projection: 2 + 3 + 5 + 2
    ("resnet50", lambda: torchvision.models.resnet50(num_classes=10), 12, "layer1.1"),
])
def test_discovery_counts_and_removal_keeps_shapes(name, build, count, first):
    torch.manual_seed(0)
    model = build()
    x = torch.randn(2, *X32)
    shape = _outputs_equal_shape(model, x)
    blocks = dbp.find_blocks(model, x[:1], macs_fn=lambda m: count_macs(m, x[:1]))
    assert len(blocks) == count
    assert blocks[0].name == first
    assert [b.position for b in blocks] == list(range(count))
    modules = dict(model.named_modules())
    for b in blocks:
        assert b.macs > 0
        assert b.kind == ("conv" if name == "vgg16_bn" else "residual")
        if b.kind == "conv":
            assert [type(modules[m]) for m in b.members] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    chosen = blocks[::2]
    dbp.remove_blocks_(model, chosen)
    modules = dict(model.named_modules())
    for b in chosen:
        assert all(isinstance(modules[m], nn.Identity) for m in b.members)
    for b in blocks[1::2]:
        assert not isinstance(modules[b.members[0]], nn.Identity)
    assert _outputs_equal_shape(model, x) == shape
    # the shallower model has exactly the removed blocks' MACs fewer
    dense_macs = count_macs(build(), x[:1])
    assert count_macs(model, x[:1]) == dense_macs - sum(b.macs for b in chosen)


def test_vgg_block_members_are_consecutive_conv_bn_relu():
    model = build_model("vgg16_bn", width=0.25)
    blocks = dbp.find_blocks(model, torch.randn(1, *X32))
    assert [b.name for b in blocks] == ["features.3", "features.10", "features.17", "features.20", "features.27",
                                        "features.30", "features.34", "features.37", "features.40"]
    for b in blocks:
        i = int(b.name.split(".")[1])
        assert b.members == tuple(f"features.{j}" for j in (i, i + 1, i + 2))


def test_named_candidates_are_verified():
    model = build_model("vgg16_bn", width=0.25)
    x = torch.randn(1, *X32)
    blocks = dbp.find_blocks(model, x, candidates=["features.4", ["features.10", "features.11"]])
    assert [(b.name, b.members, b.kind) for b in blocks] == [
        ("features.4", ("features.4",), "named"), ("features.10", ("features.10", "features.11"), "named")]
    with pytest.raises(dbp.DBPError, match=r"candidate features\.0 changes the shape: input \(1, 3, 32, 32\) -> "
                                           r"output \(1, 16, 32, 32\)"):
        dbp.find_blocks(model, x, candidates=["features.0"])
    with pytest.raises(dbp.DBPError, match=r"candidate features\.6 changes the shape: input \(1, 16, 32, 32\) -> "
                                           r"output \(1, 16, 16, 16\)"):
        dbp.find_blocks(model, x, candidates=["features.6"])  # the max-pool
    with pytest.raises(dbp.DBPError, match="no module named 'features.99'"):
        dbp.find_blocks(model, x, candidates=["features.99"])
    with pytest.raises(dbp.DBPError, match="'features.3' lies inside 'features'"):
        dbp.find_blocks(model, x, candidates=["features", "features.3"])


def test_no_removable_block_is_an_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(dbp.DBPError, match="Sequential has no removable block"):
        dbp.find_blocks(model, torch.randn(1, *X32))
    with pytest.raises(dbp.DBPError, match="no removable block"):
        DBPPruner(model, torch.randn(1, *X32), data=_random_data(classes=2), target={"blocks": 1})


# --------------------------------------------------------------------------- probes and gains


def test_probe_and_fisher_ratio_on_hand_made_features():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    separable = torch.stack([y * 4.0 + 0.1 * torch.randn(200, generator=g), torch.randn(200, generator=g)], 1)
    noise = torch.randn(200, 2, generator=g)
    idx = torch.arange(200)
    (acc_s, loss_s), (acc_n, loss_n), (acc_s2, loss_s2) = dbp.probes(
        [separable, noise, separable.clone()], y, idx[:150], idx[150:], num_classes=2)
    assert acc_s == 1.0 and acc_n < 0.75 and loss_s < loss_n
    assert (acc_s2, loss_s2) == (acc_s, loss_s)  # equal features score exactly equal
    assert dbp.probe(separable[:150], y[:150], separable[150:], y[150:], 2) == pytest.approx((acc_s, loss_s))
    fisher = dbp.fisher_ratio(separable, y)
    assert fisher[0] > 100 * fisher[1]
    # between-class variance / within-class variance by hand: means 0 and 1, within variances 1/4
    f = torch.tensor([[0.0], [1.0], [1.0], [2.0]])
    assert dbp.fisher_ratio(f, torch.tensor([0, 0, 1, 1])).item() == pytest.approx(0.25 / 0.25)
    assert dbp.fisher_ratio(torch.ones(4, 1), torch.tensor([0, 0, 1, 1])).item() == 0.0


W = 20
DISTANCES = (2, 6, 10, 14)


def _dot_pairs(n, seed):
    """Images holding two bright dots on one row; the class is their distance (2, 6, 10 or 14)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, len(DISTANCES), (n,), generator=g)
    d = torch.tensor(DISTANCES)[y]
    row = torch.randint(0, W, (n,), generator=g)
    col = (torch.rand(n, generator=g) * (W - d)).long()
    x = 0.2 * torch.rand(n, 1, W, W, generator=g)
    i = torch.arange(n)
    x[i, 0, row, col] = 1.0
    x[i, 0, row, col + d] = 1.0
    return x, y


def _pair_detector(channels, distance, out_channel):
    """Conv-ReLU block: passes every channel through and, if ``out_channel`` is given, writes
    ``relu(x[c] + x[c + distance] - 1.5)`` of the image channel into it (fires only on a dot pair)."""
    conv = nn.Conv2d(channels, channels, (1, 3), dilation=(1, distance), padding=(0, distance))
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        for j in range(channels):
            conv.weight[j, j, 0, 1] = 1.0
        if out_channel is not None:
            conv.weight[out_channel, 0, 0, 1] = 1.0
            conv.weight[out_channel, 0, 0, 2] = 1.0
            conv.bias[out_channel] = -1.5
    return [conv, nn.ReLU()]


def _dot_net(planted):
    """Four Conv-ReLU blocks: three detect dot pairs at distance 2, 6 and 10 (a receptive field no
    earlier block has); the block at ``planted`` passes its input through unchanged."""
    c = 4
    stem = nn.Conv2d(1, c, 1, bias=False)
    with torch.no_grad():
        stem.weight.zero_()
        stem.weight[0, 0] = 1.0
    layers = [stem, nn.ReLU()]
    useful = iter([(2, 1), (6, 2), (10, 3)])
    for i in range(4):
        layers += _pair_detector(c, 1, None) if i == planted else _pair_detector(c, *next(useful))
    return nn.Sequential(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 4))


@pytest.mark.parametrize("planted", [0, 1, 3])
def test_planted_do_nothing_block_is_removed_first(planted):
    x, y = _dot_pairs(1024, seed=planted)
    data = [(x[i:i + 256], y[i:i + 256]) for i in range(0, 1024, 256)]
    model = _dot_net(planted)
    name = f"0.{2 + 2 * planted}"
    with torch.no_grad():  # precondition: the planted block is an exact identity on this data
        h = model[0][:2 + 2 * planted](x[:64])
        assert torch.equal(model[0][2 + 2 * planted:4 + 2 * planted](h), h)
        before = model(x[:64])
    pruner = DBPPruner(model, x[:1], data=data, target={"blocks": 1}, num_batches=None)
    assert [b.name for b in pruner.blocks] == ["0.2", "0.4", "0.6", "0.8"]
    pruner.step()
    assert pruner.removed == [name]
    report = pruner.report
    assert report[name]["gain"] == 0.0 and report[name]["loss_gain"] == 0.0 and report[name]["rank"] == 0
    for other, row in report.items():
        if other != name:
            # each detector separates one more class: about a quarter of the samples
            assert 0.1 < row["gain"] < 0.45, (other, row)
            assert not row["removed"]
    # the network ends perfectly discriminative; the probe before the blocks is near chance
    assert max(r["discrimination"] for r in report.values()) == 1.0
    assert pruner.result.info["baseline"] < 0.4
    assert isinstance(model[0][2 + 2 * planted], nn.Identity)
    with torch.no_grad():
        assert torch.equal(model(x[:64]), before)


def test_reference_input_scores_each_block_against_its_own_input():
    x, y = _dot_pairs(512, seed=5)
    data = [(x[:256], y[:256]), (x[256:], y[256:])]
    model = _dot_net(1)
    blocks = dbp.find_blocks(model, x[:1])
    prev, _ = dbp.score_blocks(model, blocks, data, None, reference="previous")
    own, info = dbp.score_blocks(model, blocks, data, None, reference="input")
    # consecutive blocks: the previous block's output is the next block's input
    assert [s.gain for s in own] == pytest.approx([s.gain for s in prev])
    assert own[0].reference == info["baseline"]
    assert dbp.removal_order(own)[0] == "0.4"


# --------------------------------------------------------------------------- targets


def test_target_parsing():
    assert dbp.Target.parse({"blocks": 3}) == dbp.Target("blocks", 3)
    assert dbp.Target.parse({"latency": 1}).value == 1.0
    assert dbp.Target.parse({"params": 2}) == dbp.Target("params", 2.0)
    assert dbp.Target.parse(SharedTarget("macs", 3.0)) == dbp.Target("macs", 3.0)
    assert dbp.Target("macs", 3.0).shared() == SharedTarget("macs", 3.0)
    for spec, match in [({"blocks": -1}, "'blocks' must be an int >= 0, got -1"),
                        ({"blocks": 1.5}, "'blocks' must be an int >= 0, got 1.5"),
                        ({"macs": 0.5}, r"target: macs must be a finite ratio >= 1 \(dense / pruned\), got 0.5"),
                        ({"params": float("nan")}, "params must be a finite ratio >= 1"),
                        ({"latency": True}, "latency must be a finite ratio >= 1"),
                        ({"macs": 2, "blocks": 1}, "give one target at a time, got macs and blocks"),
                        ({}, "give one target at a time, got none"),
                        ({"speed": 2}, r"unknown kind 'speed'; give one of \{'blocks': n\}"),
                        ("3", "target must be a dict such as")]:
        with pytest.raises(TargetError, match=match):
            dbp.Target.parse(spec)
    assert issubclass(TargetError, ValueError)


def test_macs_target_is_met_with_fewest_blocks():
    model = build_model("resnet20", width=0.25)
    x = torch.randn(1, *X32)
    dense = count_macs(model, x)
    pruner = DBPPruner(model, x, data=_random_data(), target={"macs": 1.3})
    blocks = {b.name: b for b in pruner.blocks}
    pruner.step()
    plan = pruner.result.plan
    assert plan.macs_ratio >= 1.3
    assert dense / count_macs(model, x) == pytest.approx(plan.macs_ratio)  # Torch-Pruning's counter
    # blocks go in the reported rank order, and one block fewer would not have been enough
    ranked = sorted(pruner.report, key=lambda n: pruner.report[n]["rank"])
    assert ranked[:len(pruner.removed)] == pruner.removed
    fewer = build_model("resnet20", width=0.25)
    dbp.remove_blocks_(fewer, [blocks[n] for n in pruner.removed[:-1]])
    assert dense / count_macs(fewer, x) < 1.3


class _ConvStack(nn.Module):
    """A stem and six 8-channel Conv-BN-ReLU blocks."""

    def __init__(self):
        super().__init__()
        layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()]
        for _ in range(6):
            layers += [nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _conv_count_latency(dense, pruned):
    """A deterministic stand-in for a timer: one "millisecond" per convolution that runs."""
    def convs(m):
        return float(sum(isinstance(c, nn.Conv2d) for c in m.modules()))
    return convs(dense), convs(pruned)


def test_latency_target_removes_blocks_until_the_timed_ratio_is_met():
    torch.manual_seed(0)
    model = _ConvStack()
    x = torch.randn(1, *X32)
    calls = []

    def timer(dense, pruned):
        calls.append(pruned)
        return _conv_count_latency(dense, pruned)

    pruner = DBPPruner(model, x, data=_random_data(batches=2, batch=32, classes=4), target={"latency": 1.3},
                       latency_fn=timer)
    assert len(pruner.blocks) == 6
    pruner.step()
    plan = pruner.result.plan
    # 7 convolutions: removing one block gives 7/6 < 1.3, two give 7/5 >= 1.3
    assert len(pruner.removed) == 2 and plan.latency_ratio == pytest.approx(7 / 5)
    assert [m["removed"] for m in plan.measurements] == [1, 2]
    assert [m["ratio"] for m in plan.measurements] == pytest.approx([7 / 6, 7 / 5])
    assert plan.measurements[-1]["ratio"] == plan.latency_ratio
    assert [(m["dense_ms"], m["pruned_ms"]) for m in plan.measurements] == [(7.0, 6.0), (7.0, 5.0)]
    assert len(calls) == 3  # every block removed once (is the target reachable?), then after each removal
    assert all(c is not model for c in calls)
    ranked = sorted(pruner.report, key=lambda n: pruner.report[n]["rank"])
    assert ranked[:2] == pruner.removed


def test_latency_target_builds_the_timer_from_example_inputs():
    model = _ConvStack()
    with pytest.raises(dbp.DBPError, match=r"a latency target needs example_inputs to be one image batch tensor"):
        DBPPruner(model, {"x": torch.randn(1, *X32)}, data=_random_data(classes=4), target={"latency": 1.2})
    pruner = DBPPruner(model, torch.randn(1, *X32), data=_random_data(classes=4), target={"latency": 1.2},
                       timing={"repeats": 2, "warmup": 0})
    assert callable(pruner._options["latency_fn"])
    assert pruner.timing == Timing(repeats=2, warmup=0)  # PyTorch, 1 thread, batch 1
    with pytest.raises(TargetError, match="engine must be one of pytorch, onnxruntime; got 'tvm'"):
        DBPPruner(model, torch.randn(1, *X32), data=_random_data(classes=4), target={"latency": 1.2},
                  timing={"engine": "tvm"})


# --------------------------------------------------------------------------- errors leave the model alone


def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    mods, state = snap
    now = model.state_dict()
    return [(n, type(m)) for n, m in model.named_modules()] == mods and set(now) == set(state) and all(
        torch.equal(now[k], state[k]) for k in state)


@pytest.mark.parametrize("target,match", [
    ({"blocks": 8}, r"target 8 block\(s\) cannot be met: only 7 removable block\(s\)"),
    ({"macs": 50.0}, r"target macs ratio 50 cannot be met: removing all 7 candidate block\(s\) reaches a MACs "
                     r"ratio of"),
    ({"latency": 1000.0}, r"target latency ratio 1000 cannot be met: removing all 7 candidate block\(s\) "
                          r"measured"),
])
def test_unreachable_target_leaves_model_untouched(target, match):
    model = build_model("resnet20", width=0.25)
    snap = _snapshot(model)
    pruner = DBPPruner(model, torch.randn(1, *X32), data=_random_data(batches=2), target=target,
                       latency_fn=_conv_count_latency, width_importance="none")
    with pytest.raises(dbp.DBPTargetError, match=match):
        pruner.step()
    assert _same(model, snap)
    assert pruner.removed == [] and pruner.result is None


@pytest.mark.parametrize("labels,match", [
    (lambda n: torch.arange(n) % 12, r"labels must lie in \[0, 9\] \(10 classes, the model's output size\); "
                                     r"the data holds labels from 0 to 11"),
    (lambda n: torch.arange(n) % 10 - 1, r"labels must lie in \[0, 9\].*from -1 to 8"),
    (lambda n: torch.arange(n) % 5, r"the probe expects 10 classes \(the model's output size\) but the data holds "
                                    r"only 5 \(missing: 5, 6, 7, 8, 9\)"),
    (lambda n: torch.zeros(n, dtype=torch.long), "holds only class 0"),
    (lambda n: torch.zeros(n), "labels must be a 1-D tensor of integer class indices, got dtype torch.float32"),
])
def test_bad_labels_are_refused_and_model_untouched(labels, match):
    model = build_model("resnet20", width=0.25)
    snap = _snapshot(model)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(20, *X32, generator=g), labels(20)) for _ in range(2)]
    with pytest.raises(dbp.DBPError, match=match):
        DBPPruner(model, torch.randn(1, *X32), data=data, target={"blocks": 1}).step()
    assert _same(model, snap)


def test_num_classes_overrides_the_output_size():
    model = build_model("resnet20", width=0.25)
    data = [(torch.randn(20, *X32), torch.arange(20) % 5) for _ in range(2)]
    pruner = DBPPruner(model, torch.randn(1, *X32), data=data, target={"blocks": 1}, num_classes=5)
    pruner.step()
    assert pruner.result.info["classes"] == 5 and len(pruner.removed) == 1


def test_bad_arguments_fail_at_construction():
    model = build_model("resnet20", width=0.25)
    x = torch.randn(1, *X32)
    with pytest.raises(ValueError, match="holdout must be in"):
        DBPPruner(model, x, data=_random_data(), target=1, holdout=1.0)
    with pytest.raises(ValueError, match="reference must be one of previous, input; got 'next'"):
        DBPPruner(model, x, data=_random_data(), target=1, reference="next")
    with pytest.raises(TypeError, match="needs data="):
        DBPPruner(model, x, data=None, target=1)
    pruner = DBPPruner(model, x, data=_random_data(batches=1), target=1)
    pruner.step()
    with pytest.raises(RuntimeError, match="already removed 1 block"):
        pruner.step()


# --------------------------------------------------------------------------- the pruned model is ordinary


def test_pruned_model_deepcopies_round_trips_traces_and_exports(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from pfgdf_plugin.measure import export_onnx

    torch.manual_seed(0)
    model = build_model("resnet20", width=0.25)
    x = torch.randn(3, *X32)
    pruner = DBPPruner(model, x[:1], data=_random_data(batches=2), target={"blocks": 3})
    pruner.step()
    model.eval()
    with torch.no_grad():
        y = model(x)
    removed = [b for b in pruner.blocks if b.name in pruner.removed]
    assert all(k.split(".")[0] + "." + k.split(".")[1] not in pruner.removed
               for k in model.state_dict() if k.startswith("layer"))

    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(x), y)

    fresh = build_model("resnet20", width=0.25)
    dbp.remove_blocks_(fresh, removed)
    fresh.load_state_dict(model.state_dict())  # strict: the same names remain
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), y)

    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        assert torch.allclose(gm(x), y)

    path = str(tmp_path / "dbp.onnx")
    export_onnx(model, x[:1], path)
    sess = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"input": x.numpy()})
    assert torch.allclose(torch.from_numpy(out), y, atol=1e-4)


# --------------------------------------------------------------------------- depth, then width


@pytest.mark.parametrize("name", ["vgg16_bn", "resnet56"])
def test_depth_then_width_with_gaussian_importance(name):
    torch.manual_seed(0)
    model = build_model(name, width=0.25)
    x = torch.randn(2, *X32)
    shape = _outputs_equal_shape(model, x)
    dense_params = count_params(model)
    pruner = DBPPruner(model, x[:1], data=_random_data(batches=2), target={"blocks": 3})
    pruner.step()
    depth_params = count_params(model)
    assert depth_params < dense_params
    last = model.classifier if name == "vgg16_bn" else model.fc
    width = tp.pruner.MetaPruner(model, x[:1], importance=GaussianImportance(), pruning_ratio=0.5,
                                 ignored_layers=[last])
    width.step()
    assert count_params(model) < 0.5 * depth_params
    assert _outputs_equal_shape(model, x) == shape
    assert sum(isinstance(m, nn.Identity) for m in model.modules()) >= 3


# --------------------------------------------------------------------------- DiscriminationImportance


@pytest.mark.parametrize("name", ["vgg16_bn", "resnet20"])
def test_discrimination_importance_in_meta_pruner(name):
    torch.manual_seed(0)
    model = build_model(name, width=0.5)
    x = torch.randn(2, *X32)
    shape = _outputs_equal_shape(model, x)
    dense_params = count_params(model)
    imp = DiscriminationImportance(_random_data(batches=2), num_batches=2)
    last = model.classifier if name == "vgg16_bn" else model.fc
    pruner = tp.pruner.MetaPruner(model, x[:1], importance=imp, pruning_ratio=0.5, ignored_layers=[last],
                                  iterative_steps=2)
    pruner.step()
    assert imp.passes == 1  # one feature pass for every group of the step
    pruner.step()
    assert imp.passes == 2  # the model changed: a fresh pass
    assert count_params(model) < 0.4 * dense_params
    assert _outputs_equal_shape(model, x) == shape


def test_discrimination_importance_ranks_a_separating_channel_first():
    g = torch.Generator().manual_seed(0)
    n = 128
    y = torch.arange(n) % 4
    x = torch.randn(n, 3, 8, 8, generator=g)
    x[:, 0] = 0.5 * torch.randn(n, 8, 8, generator=g) + y.view(n, 1, 1).float()  # channel 0 carries the label
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    with torch.no_grad():  # out channel 4 of the first conv looks only at the label channel
        model[0].weight[4].zero_()
        model[0].weight[4, 0, 1, 1] = 1.0
    imp = DiscriminationImportance([(x[:64], y[:64]), (x[64:], y[64:])], num_batches=None)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    group = DG.get_pruning_group(model[0], tp.prune_conv_out_channels, list(range(6)))
    scores = imp(group)
    assert scores.shape == (6,) and int(scores.argmax()) == 4
    assert float(scores[4]) > 2 * float(scores[torch.arange(6) != 4].max())
    # the same channels, asked in another order, get the same scores in that order
    order = [5, 4, 3, 2, 1, 0]
    sub = DG.get_pruning_group(model[0], tp.prune_conv_out_channels, order)
    assert torch.equal(imp(sub), scores[order])
    with pytest.raises(ValueError, match="group_reduction must be one of mean, max, first"):
        DiscriminationImportance([(x, y)], group_reduction="median")
