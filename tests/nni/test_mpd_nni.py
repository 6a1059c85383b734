"""The NNI adapter of MPDCompress: masks from config lists, masked training, scheduling, QAT fusion, conversion."""

import copy

import nni
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from nni.compression.pruning import LinearPruner
from nni.compression.quantization import QATQuantizer
from nni.compression.utils import TorchEvaluator

from pfgdf_plugin.methods.mpd import MPDError, MPDParams
from pfgdf_plugin.models import build_model
from pfgdf_plugin.modules import BlockDiagonalLinear, PermutedGroupConv2d
from pfgdf_plugin.nni.mpd import MPDPruner, blocks_for_ratio, convert

torch.set_num_threads(1)

LENET_X = (1, 32, 32)
LENET_CFG = [{"op_names": ["fc1"], "sparse_ratio": 0.9}, {"op_names": ["fc2"], "sparse_ratio": 0.75}]


def _lenet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("lenet300", in_channels=1, image_size=32)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max().detach() / ref.abs().max().detach())


def training_step(batch, model):
    return F.cross_entropy(model(batch[0]), batch[1])


def _evaluator(model: nn.Module, shape=LENET_X, check=None, optimizer=None) -> TorchEvaluator:
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(4, 8, *shape, generator=g), torch.randint(0, 10, (4, 8), generator=g)

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        model.train()
        for step in range(max_steps):
            optimizers.zero_grad()
            training_step((xs[step % 4], ys[step % 4]), model).backward()
            if check is not None:
                check(model, step)
            optimizers.step()

    if optimizer is None:
        optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    return TorchEvaluator(training_func, optimizer, training_step)


def test_masks_have_the_configured_density_per_layer():
    model = _lenet()
    pruner = MPDPruner(model, LENET_CFG)
    _, masks = pruner.compress()
    assert set(masks) == {"fc1", "fc2"}
    assert pruner.plans["fc1"].blocks == 10 and pruner.plans["fc2"].blocks == 4
    assert float(masks["fc1"]["weight"].mean()) == pytest.approx(0.1)  # 1024 x 300 in 10 blocks
    assert float(masks["fc2"]["weight"].mean()) == pytest.approx(0.25)
    for name, plan in pruner.plans.items():
        assert masks[name]["weight"].shape == model.get_submodule(name).weight.shape  # fine-grained
        assert torch.equal(masks[name]["weight"], plan.mask())
        assert bool((masks[name]["bias"] == 1).all())
    # the wrapped model computes with the masked weights
    x = torch.randn(3, *LENET_X)
    ref = copy.deepcopy(model)
    pruner.unwrap_model()
    with torch.no_grad():
        for name, plan in pruner.plans.items():
            model.get_submodule(name).weight.mul_(plan.mask())
    assert torch.allclose(model(x), ref(x))
    assert [blocks_for_ratio(r) for r in (0.0, 0.5, 0.8, 0.9)] == [1, 2, 5, 10]


def test_blocks_and_compression_override_the_ratio():
    model = _lenet()
    pruner = MPDPruner(model, [{"op_names": ["fc1", "fc2"]}], blocks={"fc1": 4, "fc2": 5})
    assert {n: p.blocks for n, p in pruner.plans.items()} == {"fc1": 4, "fc2": 5}
    pruner.unwrap_model()
    pruner = MPDPruner(model, [{"op_names": ["fc1", "fc2"], "sparse_ratio": 0.5}], compression=10.0,
                       permutation="magnitude")
    assert {n: p.blocks for n, p in pruner.plans.items()} == {"fc1": 10, "fc2": 10}
    assert pruner.summary()["compression"] == pytest.approx(10.0)
    pruner.unwrap_model()


def test_masked_training_under_a_torch_evaluator_keeps_the_zeros():
    model = _lenet()
    seen = []

    def check(wrapped, step):
        for name in ("fc1", "fc2"):
            wrapper = wrapped.get_submodule(name)._nni_wrapper
            off = wrapper.weight_mask == 0
            assert float(wrapper.weight.grad[off].abs().sum()) == 0.0
            assert float(wrapper.weight.grad[~off].abs().sum()) > 0
            assert bool((wrapper.weight.detach()[off] == 0).all())  # stored weights too, every step
        seen.append(step)

    before = {n: model.get_submodule(n).weight.detach().clone() for n in ("fc1", "fc2")}
    pruner = MPDPruner(model, LENET_CFG, _evaluator(model, check=check))
    _, masks = pruner.compress(max_steps=6)
    assert seen == list(range(6))
    pruner.unwrap_model()
    for name in ("fc1", "fc2"):
        w, m = model.get_submodule(name).weight.detach(), masks[name]["weight"]
        assert bool((w[m == 0] == 0).all()), name
        assert not torch.equal(w[m == 1], before[name][m == 1])  # momentum + weight decay did move the rest
    # the trained masked model converts to the same function
    x = torch.randn(5, *LENET_X)
    model.eval()
    ref = model(x).detach()
    report = convert(model, pruner, x)
    assert isinstance(model.fc1, BlockDiagonalLinear) and report["folded"] == ["fc1 -> fc2"]
    assert _rel(model(x), ref) <= 1e-5
    assert report["layers"]["fc1"]["kept"] == 30720 and report["layers"]["fc2"]["kept"] == 7500


def test_adam_keeps_the_zeros_too():
    model = _lenet()
    opt = nni.trace(torch.optim.Adam)(model.parameters(), lr=0.01, weight_decay=1e-2)
    pruner = MPDPruner(model, LENET_CFG, _evaluator(model, optimizer=opt), permutation="magnitude")
    _, masks = pruner.compress(max_steps=4)
    pruner.unwrap_model()
    for name in ("fc1", "fc2"):
        w = model.get_submodule(name).weight.detach()
        assert bool((w[masks[name]["weight"] == 0] == 0).all())


def test_a_scheduled_pruner_grows_nested_masks_up_to_the_block_diagonal_one():
    model = _lenet()
    densities = []

    def check(wrapped, step):
        densities.append(float(wrapped.fc1._nni_wrapper.weight_mask.mean()))

    evaluator = _evaluator(model, check=check)
    pruner = MPDPruner(model, [{"op_names": ["fc1"], "sparse_ratio": 0.9}], evaluator)
    masks_seen = []
    scheduled = LinearPruner(pruner, interval_steps=2, total_times=3)
    original = pruner.update_masks

    def record(masks):
        original(masks)
        masks_seen.append(masks["fc1"]["weight"].clone())

    pruner.update_masks = record
    scheduled.compress(max_steps=8, max_epochs=None)
    assert densities[0] == 1.0  # the schedule starts dense
    assert densities == sorted(densities, reverse=True) and len(set(densities)) == 4
    final = pruner.get_masks()["fc1"]["weight"]
    assert torch.equal(final, pruner.plans["fc1"].mask())
    for earlier, later in zip(masks_seen, masks_seen[1:]):
        assert bool((later <= earlier).all())  # each mask contains the next


def test_fusion_with_qat_quantizer_and_conversion():
    model = _lenet()
    evaluator = _evaluator(model)
    pruner = MPDPruner(model, LENET_CFG, evaluator)
    qcfg = [{"op_types": ["Linear"], "target_names": ["_input_", "weight", "_output_"], "quant_dtype": "int8",
             "quant_scheme": "affine"}]
    quantizer = QATQuantizer.from_compressor(pruner, qcfg, evaluator=evaluator)
    _, calibration = quantizer.compress(max_steps=4, max_epochs=None)
    assert set(calibration) == {"fc1", "fc2", "fc3"}
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(4, *LENET_X))
    assert y.shape == (4, 10) and bool(torch.isfinite(y).all())
    masks = pruner.get_masks()
    with pytest.raises(RuntimeError, match=r"still wrapped by NNI: call pruner.unwrap_model\(\)"):
        convert(model, masks, torch.randn(2, *LENET_X))
    quantizer.unwrap_model()
    for name in ("fc1", "fc2"):
        w = model.get_submodule(name).weight.detach()
        assert bool((w[masks[name]["weight"] == 0] == 0).all())
    x = torch.randn(6, *LENET_X)
    ref = model(x).detach()
    convert(model, masks, x)
    assert _rel(model(x), ref) <= 1e-5


@pytest.mark.parametrize("fold", [True, False])
def test_convert_matches_the_masked_conv_net(fold):
    torch.manual_seed(0)
    model = build_model("vgg16_bn", width=0.25)
    cfg = [{"op_names": ["features.3", "features.7", "features.10", "features.14"], "sparse_ratio": 0.75},
           {"op_names": ["features.17"], "sparse_ratio": 0.5}]
    pruner = MPDPruner(model, cfg, permutation="magnitude")
    _, masks = pruner.compress()
    pruner.unwrap_model()
    model = model.double().eval()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name, targets in masks.items():
            masked.get_submodule(name).weight.mul_(targets["weight"].double())
    ref = masked(x)
    report = convert(model, masks, x, fold=fold)
    assert isinstance(model.features[3], PermutedGroupConv2d) and model.features[3].conv.groups == 4
    assert model.features[17].conv.groups == 2
    assert _rel(model(x), ref) <= 1e-5
    assert ("features.3 -> features.7" in report["folded"]) is fold


def test_without_a_size_the_layers_without_a_ratio_take_mpdparams_default_compression():
    model = _lenet()
    pruner = MPDPruner(model, [{"op_names": ["fc1"]}, {"op_names": ["fc2"], "sparse_ratio": 0.75}])
    assert {n: p.blocks for n, p in pruner.plans.items()} == {"fc1": 10, "fc2": 4}
    assert pruner.plans["fc1"].blocks == MPDParams().compression
    pruner.unwrap_model()


def test_bad_input_names_the_layer_and_leaves_the_model_alone():
    model = _lenet()
    with pytest.raises(MPDError, match=r"fc1: no block count; give the config entry a 'sparse_ratio'"):
        MPDPruner(model, [{"op_names": ["fc1", "fc2"]}], blocks={"fc2": 4})
    with pytest.raises(MPDError, match=r"fc3: blocks=20 exceeds min\(out, in\) = min\(10, 100\) = 10"):
        MPDPruner(model, [{"op_names": ["fc3"]}], blocks=20)
    with pytest.raises(ValueError, match=r"config_list\[0\] has 'blocks': NNI's config schema rejects unknown keys"):
        MPDPruner(model, [{"op_names": ["fc1"], "blocks": 4}])
    with pytest.raises(MPDError, match=r"blocks must be an integer >= 1, got 0"):
        MPDPruner(model, [{"op_names": ["fc1"]}], blocks=0)
    with pytest.raises(MPDError, match=r"give compression or blocks, not both; got compression=4.0, blocks=2"):
        MPDPruner(model, [{"op_names": ["fc1"]}], blocks=2, compression=4.0)
    with pytest.raises(MPDError, match=r"blocks names 'fc3', which is not a layer of the model among fc1"):
        MPDPruner(model, [{"op_names": ["fc1"]}], blocks={"fc3": 2})
    assert not any(hasattr(m, "_nni_wrapper") for m in model.modules())
    net = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(MPDError, match=r"2: Conv2d with groups=8 \(depthwise or grouped\)"):
        MPDPruner(net, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}])
    assert not any(hasattr(m, "_nni_wrapper") for m in net.modules())

    pruner = MPDPruner(model, LENET_CFG)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    tampered = {n: {k: v.clone() for k, v in t.items()} for n, t in masks.items()}
    tampered["fc2"]["weight"][0, :] = 1.0
    with pytest.raises(MPDError, match=r"fc2: the mask is not block-diagonal after any permutation"):
        convert(model, tampered, fold=False)
    assert isinstance(model.fc1, nn.Linear)
    with pytest.raises(ValueError, match="needs example_inputs"):
        convert(model, masks)
    assert isinstance(model.fc2, nn.Linear)
