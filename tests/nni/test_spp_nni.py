"""The NNI adapter of SPP: training-aware masks, final masks, speedup, checkpoints, fusion with QAT."""

import copy
import warnings

import nni
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from nni.compression.quantization import QATQuantizer
from nni.compression.utils import TorchEvaluator

from pfgdf_plugin.methods import spp
from pfgdf_plugin.models import build_model
from pfgdf_plugin.nni import SPPPruner, apply_masks, dependency_config_list, speedup

X32 = (3, 32, 32)
COUPLED = [  # layers feeding one residual addition chain, per stage of resnet20
    ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"],
    ["layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2", "layer2.2.conv2"],
    ["layer3.0.conv2", "layer3.0.shortcut.0", "layer3.1.conv2", "layer3.2.conv2"],
]


@pytest.fixture(autouse=True)
def one_thread():
    """Small convolutions run far faster on one thread when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _kept(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape[0], -1).abs().sum(1) != 0


def _data(steps: int = 4, batch: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(steps, batch, *X32, generator=g), torch.randint(0, 10, (steps, batch), generator=g)


def training_step(batch, model):
    return F.cross_entropy(model(batch[0]), batch[1])


def _evaluator(model: nn.Module, check=None, lr: float = 0.01) -> TorchEvaluator:
    """A TorchEvaluator over fixed random batches; ``check(model, step)`` runs after each backward."""
    xs, ys = _data()

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        model.train()
        for step in range(max_steps):
            optimizers.zero_grad()
            training_step((xs[step % len(xs)], ys[step % len(ys)]), model).backward()
            if check is not None:
                check(model, step)
            optimizers.step()

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=lr, momentum=0.9)
    return TorchEvaluator(training_func, optimizer, training_step)


def _resnet20(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet20", width=0.25)


def _config(model: nn.Module, layer3_conv1_ratio: float = 0.5):
    cfg = dependency_config_list(model, torch.randn(2, *X32), [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}])
    for entry in cfg:  # a ratio whose ceil rule differs from rounding: ceil(0.3 * 16) = 5
        if entry["op_names"][0].startswith("layer3.") and entry["op_names"][0].endswith("conv1"):
            entry["sparse_ratio"] = layer3_conv1_ratio
    return cfg


def test_reaches_targets_and_speedup_equals_masked_model():
    model = _resnet20()
    params_before = sum(p.numel() for p in model.parameters())
    cfg = _config(model, layer3_conv1_ratio=0.3)
    ratios = {e["op_names"][0]: e["sparse_ratio"] for e in cfg}
    pruner = SPPPruner(model, cfg, _evaluator(model), training_steps=60, interval=1, A=0.5, seed=0)
    _, masks = pruner.compress()

    # every layer reached ceil(R * filters) well within the training steps, then SPP stopped
    assert pruner.finished and pruner.stopped and pruner.steps < 60
    assert all(s["removed"] == s["target"] and s["finished_at"] is not None for s in pruner.summary().values())
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(ratios) == set(convs) and len(convs) == 21
    for name, conv in convs.items():
        n = conv.out_channels
        kept = _kept(masks[name]["weight"])
        assert int((~kept).sum()) == spp.target_count(n, ratios[name]), name
        # the final masks hold exactly the removed filters: p = 1 there, 0 elsewhere
        p = pruner.probabilities()[name]
        assert torch.equal(p == 1.0, ~kept) and bool((p[kept] == 0).all())
    assert int((~_kept(masks["layer3.0.conv1"]["weight"])).sum()) == 5  # ceil(4.8)
    for names in COUPLED:  # one SPPState per dependency group: identical final masks
        ref = _kept(masks[names[0]]["weight"])
        assert all(torch.equal(_kept(masks[n]["weight"]), ref) for n in names[1:])
    assert int((~_kept(masks["layer2.0.conv1"]["weight"])).sum()) == 4

    pruner.unwrap_model()
    assert not any(hasattr(m, "_nni_wrapper") for m in model.modules())
    # unwrap_model restores the stored weights: the removed filters are not zero until masked
    assert float(model.conv1.weight.detach()[~_kept(masks["conv1"]["weight"])].abs().sum()) > 0
    masked = apply_masks(copy.deepcopy(model), masks, batchnorm=True).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # coupled layers carry equal masks
        small = speedup(model, masks, torch.randn(8, *X32))
    assert sum(p.numel() for p in small.parameters()) < 0.4 * params_before
    assert small.layer3[0].conv1.out_channels == 11 and small.conv1.out_channels == 2
    x = torch.randn(16, *X32)
    with torch.no_grad():
        out, ref = small(x), masked(x)
    assert ref.abs().max().item() > 1e-2
    assert (out - ref).abs().max().item() <= 1e-4


def test_random_drops_zero_forward_outputs_and_gradients_during_training():
    model = _resnet20(seed=1)
    seen = {"drops": 0, "checked": 0}
    box = {}
    watched = ["conv1", "layer1.1.conv2", "layer2.0.conv1", "layer3.0.shortcut.0"]
    outputs = {}
    for name in watched:
        model.get_submodule(name).register_forward_hook(
            lambda mod, inp, out, name=name: outputs.__setitem__(name, out.detach()))

    def check(wrapped, step):
        pruner = box["pruner"]
        groups = {m: g for g in pruner._groups for m, _ in g.members}
        for names in COUPLED:  # coupled layers get the same draw
            ref = _kept(wrapped.get_submodule(names[0])._nni_wrapper.weight_mask)
            assert all(torch.equal(_kept(wrapped.get_submodule(n)._nni_wrapper.weight_mask), ref) for n in names[1:])
        for name in watched:
            wrapper = wrapped.get_submodule(name)._nni_wrapper
            keep = _kept(wrapper.weight_mask)
            assert torch.equal(keep, groups[name].state.keep)  # the state's last draw is NNI's mask
            dropped = ~keep
            out = outputs[name]
            # NNI's 'mul' apply method: weight * mask, so a dropped filter outputs 0 (no bias here) ...
            assert float(out[:, dropped].abs().sum()) == 0.0
            assert float(out[:, keep].abs().sum()) > 0
            # ... and its stored weight gets a zero gradient
            grad = wrapper.weight.grad
            assert float(grad[dropped].abs().sum()) == 0.0
            assert float(grad[keep].abs().sum()) > 0
            seen["drops"] += int((dropped & ~groups[name].state.removed).sum())  # random, not removed
            seen["checked"] += 1

    box["pruner"] = SPPPruner(model, _config(model), _evaluator(model, check), training_steps=12, interval=1,
                              A=0.05, seed=3)
    assert all(g.state.keep.all() for g in box["pruner"]._groups)  # nothing dropped before the first step
    with pytest.warns(RuntimeWarning, match="stopped after 12 optimizer steps"):
        _, masks = box["pruner"].compress()
    assert seen["checked"] == 12 * len(watched) and seen["drops"] > 0
    # stopped early: the final masks hold only the filters at p = 1, no random drops
    pruner = box["pruner"]
    assert pruner.stopped and not pruner.finished
    for g in pruner._groups:
        for name, _ in g.members:
            assert torch.equal(_kept(masks[name]["weight"]), ~g.state.removed)
            assert g.state.closed and bool((g.state.probabilities[~g.state.removed] == 0).all())


def test_state_dict_round_trip_restores_probabilities_and_masks():
    model = _resnet20()
    twin = copy.deepcopy(model)
    pruner = SPPPruner(model, _config(model), _evaluator(model), training_steps=100, interval=1, A=0.3, seed=5)
    with pytest.warns(RuntimeWarning, match="stopped after 3"):
        pruner.compress(max_steps=3)  # a training loop shorter than training_steps
    state = pruner.state_dict()
    assert state["steps"] == 3 and state["stopped"]
    # keys name the member layers, not NNI's random dependency-group ids
    assert "conv1+layer1.0.conv2+layer1.1.conv2+layer1.2.conv2" in state["groups"]

    other = SPPPruner(twin, _config(twin), _evaluator(twin), training_steps=100, interval=1, A=0.3, seed=5)
    other.load_state_dict(state)
    assert other.steps == 3 and other.stopped
    for name, p in pruner.probabilities().items():
        assert torch.equal(other.probabilities()[name], p)
    for name, targets in pruner.get_masks().items():
        assert torch.equal(other.get_masks()[name]["weight"], targets["weight"])
    third = build_model("resnet20", width=0.25)
    with pytest.raises(ValueError, match="does not match"):
        SPPPruner(third, [{"op_names": ["conv1"], "sparse_ratio": 0.5}], _evaluator(third),
                  training_steps=5).load_state_dict(state)


@pytest.mark.parametrize("entry,kwargs,match", [
    ({"sparse_ratio": 1.5}, {}, r"config_list\[0\]: 'sparse_ratio' must be in \(0, 1\), got 1.5"),
    ({"sparse_ratio": 0}, {}, r"'sparse_ratio' must be in \(0, 1\), got 0.0"),
    ({}, {}, r"config_list\[0\] needs 'sparse_ratio'"),
    ({"sparse_ratio": 0.5}, {"interval": 0}, r"interval must be an integer >= 1, got 0"),
    ({"sparse_ratio": 0.5}, {"A": 0}, r"A must be > 0, got 0"),
    ({"sparse_ratio": 0.5}, {"u": 1}, r"u must be in \(0, 1\), got 1"),
    ({"sparse_ratio": 0.5}, {"training_steps": 0}, r"training_steps must be an integer >= 1, got 0"),
    ({"sparse_threshold": 0.1}, {}, r"has 'sparse_threshold'"),
])
def test_bad_arguments_name_the_culprit_and_leave_the_model_alone(entry, kwargs, match):
    model = build_model("resnet20", width=0.25)
    kwargs = {"training_steps": 5, **kwargs}
    training_steps = kwargs.pop("training_steps")
    with pytest.raises(ValueError, match=match):
        SPPPruner(model, [{"op_types": ["Conv2d"], **entry}], _evaluator(model), training_steps, **kwargs)
    assert not any(hasattr(m, "_nni_wrapper") for m in model.modules())


def test_dependency_group_with_two_ratios_is_refused_and_unwrapped():
    model = build_model("resnet20", width=0.25)
    cfg = [{"op_names": ["conv1"], "sparse_ratio": 0.5, "dependency_group_id": 1},
           {"op_names": ["layer1.0.conv2"], "sparse_ratio": 0.25, "dependency_group_id": 1}]
    with pytest.raises(ValueError, match=r"conv1, layer1.0.conv2 mixes sparse_ratio values \[0.25, 0.5\]"):
        SPPPruner(model, cfg, _evaluator(model), 5)
    assert not any(hasattr(m, "_nni_wrapper") for m in model.modules())


def test_fusion_with_qat_quantizer():
    model = _resnet20(seed=2)
    evaluator = _evaluator(model)
    pruner = SPPPruner(model, _config(model), evaluator, training_steps=30, interval=1, A=0.5)
    qcfg = [{"op_types": ["Conv2d", "Linear"], "target_names": ["_input_", "weight", "_output_"],
             "quant_dtype": "int8", "quant_scheme": "affine"}]
    quantizer = QATQuantizer.from_compressor(pruner, qcfg, evaluator=evaluator)
    _, calibration = quantizer.compress(max_steps=14, max_epochs=None)

    # SPP ran inside the QAT training loop and stopped with its final masks
    assert pruner.finished and pruner.stopped and pruner.steps <= 14
    masks = pruner.get_masks()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for name, conv in convs.items():
        assert int((~_kept(masks[name]["weight"])).sum()) == spp.target_count(conv.out_channels, 0.5)
    # calibration data for every quantized layer and target
    quantized = set(convs) | {"fc"}
    assert set(calibration) == quantized == set(quantizer.get_calibration_config())
    for name, targets in calibration.items():
        assert set(targets) == {"_input_0", "weight", "_output_0"}, name
        for target, info in targets.items():
            for key in ("scale", "zero_point", "tracked_min", "tracked_max"):
                assert isinstance(info[key], torch.Tensor) and bool(torch.isfinite(info[key]).all()), (name, target)
            assert info["quant_bits"] == 8 and float(info["scale"]) > 0

    # the fused model runs, quantized and masked: a removed filter's output is exactly 0
    outputs = {}
    model.layer2[1].conv1.register_forward_hook(lambda m, i, o: outputs.__setitem__("c", o.detach()))
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(4, *X32))
    assert y.shape == (4, 10) and bool(torch.isfinite(y).all())
    removed = ~_kept(masks["layer2.1.conv1"]["weight"])
    assert removed.any() and float(outputs["c"][:, removed].abs().sum()) == 0.0
    assert float(outputs["c"][:, ~removed].abs().sum()) > 0

    quantizer.unwrap_model()  # the last compressor holds the wrappers after fusion
    assert not any(hasattr(m, "_nni_wrapper") for m in model.modules())
    small = speedup(model, masks, torch.randn(8, *X32))
    with torch.no_grad():
        assert small(torch.randn(2, *X32)).shape == (2, 10)
