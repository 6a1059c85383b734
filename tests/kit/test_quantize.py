"""Quantization after pruning (QAT, PTQ, LSQ) and fused prune+QAT, through the API and recipes."""

import copy
import os

import pytest
import torch
import torch.nn as nn

from pfgdf_plugin import measure
from pfgdf_plugin.config import ConfigError
from pfgdf_plugin.data import build_dataset, make_loaders
from pfgdf_plugin.models import build_model
from pfgdf_plugin.persist import load_pruned
from pfgdf_plugin.pruning import prune
from pfgdf_plugin.quantize import QuantizeConfig, QuantizeError, check_calibration, quantize
from pfgdf_plugin.recipe import load_recipe
from pfgdf_plugin.runner import run_recipe
from pfgdf_plugin.train import TrainConfig, train

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def digits():
    spec = build_dataset("digits", image_size=32, limit_train=512, limit_test=256)
    return make_loaders(spec, 64), spec


@pytest.fixture(scope="module")
def pruned(digits):
    (train_loader, _), spec = digits
    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=spec.num_classes, in_channels=spec.in_channels)
    train(model, train_loader, TrainConfig(epochs=5, lr=0.003, optimizer="adam"), progress=False)
    small = prune(model, torch.randn(1, spec.in_channels, 32, 32), "l1", ratio=0.3).model
    train(small, train_loader, TrainConfig(epochs=1, lr=0.001, optimizer="adam"), progress=False)
    return small


def _layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("method", ["qat", "ptq", "lsq"])
def test_prune_then_quantize_calibrates_every_layer_and_runs(method, digits, pruned):
    (train_loader, test_loader), _ = digits
    model = copy.deepcopy(pruned)
    float_acc = measure.evaluate(model, test_loader, "cpu", "", False)["accuracy"]
    epochs = 3 if method == "lsq" else 1  # LSQ learns its step sizes: give it a few epochs
    res = quantize(model, QuantizeConfig(method=method, epochs=epochs), train_loader)
    assert sorted(res.calibration) == sorted(_layers(pruned))
    for name, targets in res.calibration.items():
        assert set(targets) == {"_input_0", "weight", "_output_0"}, name
        for info in targets.values():
            assert info["quant_bits"] == 8
            assert bool(torch.isfinite(info["scale"]).all()) and bool((info["scale"] > 0).all())
    with torch.no_grad():
        x = next(iter(test_loader))[0]
        y_q = model(x)
    assert y_q.shape == (x.shape[0], 10) and bool(torch.isfinite(y_q).all())
    acc = measure.evaluate(model, test_loader, "cpu", "", False)["accuracy"]
    assert float_acc > 0.8  # the pruned, fine-tuned LeNet has learnt digits
    if method in ("qat", "ptq"):  # 8-bit affine keeps a trained LeNet's accuracy
        assert acc >= float_acc - 0.05, (acc, float_acc)
    else:  # 8-bit symmetric LSQ, with a learnt step size, too
        assert acc >= float_acc - 0.1, (acc, float_acc)
    res.quantizer.unwrap_model()
    assert not any(hasattr(m, "_nni_wrapper") for m in model.modules())


def test_quantization_simulates_integer_weights(digits, pruned):
    """With 2-bit weights every wrapped layer really computes with at most 4 weight levels."""
    (train_loader, _), _ = digits
    model = copy.deepcopy(pruned)
    quantize(model, QuantizeConfig(method="ptq", bits=2, targets=["weight"], calibration_batches=2), train_loader)
    wrappers = [m for m in model.modules() if type(m).__name__ == "ModuleWrapper"]
    assert len(wrappers) == len(_layers(pruned))
    for w in wrappers:
        qw = w.patch_params({"weight": w.module.weight})["weight"]
        assert qw.unique().numel() <= 4 < w.module.weight.unique().numel(), w.name


def test_bad_quantize_settings_name_the_key(digits, pruned):
    (train_loader, _), _ = digits
    with pytest.raises(QuantizeError, match=r"quantize.method must be one of qat, ptq, lsq or null; got 'int8'"):
        quantize(copy.deepcopy(pruned), QuantizeConfig(method="int8"), train_loader)
    with pytest.raises(QuantizeError, match=r"quantize.bits must be in 2..8, got 16"):
        quantize(copy.deepcopy(pruned), QuantizeConfig(method="qat", bits=16), train_loader)
    with pytest.raises(QuantizeError, match=r"LsqQuantizer supports only 'symmetric'"):
        quantize(copy.deepcopy(pruned), QuantizeConfig(method="lsq", scheme="affine"), train_loader)
    with pytest.raises(QuantizeError, match="layer 'fc1', target 'weight': no usable scale"):
        check_calibration({"fc1": {"weight": {"scale": torch.tensor([float("nan")])}}}, ["fc1"])
    with pytest.raises(QuantizeError, match="without calibration: conv1"):
        check_calibration({}, ["conv1"])


def test_recipe_rejects_fusion_without_a_training_loop():
    with pytest.raises(ConfigError) as e:
        load_recipe(os.path.join(ROOT, "recipes", "pfgdf_vgg16.yaml"), ["quantize.method=qat", "quantize.fused=true"])
    assert "quantize.fused: method 'pfgdf' via 'torch_pruning' has no training loop to share" in str(e.value)
    expected = r"quantize.fused needs a training quantizer \(qat or lsq\), got method 'ptq'"
    with pytest.raises(ConfigError, match=expected):
        load_recipe(os.path.join(ROOT, "recipes", "spp_resnet56_nni.yaml"),
                    ["quantize.method=ptq", "quantize.fused=true"])


TINY = ["data.name=digits", "model.width=0.25", "data.limit_train=256", "data.limit_test=128", "data.batch_size=64",
        "train.epochs=1", "finetune.epochs=1", "report.repeats=2", "report.warmup=1", "progress=false"]


def test_fused_spp_and_qat_recipe_reports_both_calibrations(tmp_path):
    recipe = load_recipe(os.path.join(ROOT, "recipes", "spp_resnet56_nni.yaml"), TINY + [
        "model.name=resnet20", "prune.params.A=0.5", "prune.params.interval=1", "prune.params.max_epochs=5",
        "quantize.method=qat", "quantize.fused=true", "quantize.epochs=0.5", "report.latency=false",
        f"output_dir={tmp_path}"])
    metrics = run_recipe(recipe, quiet=True)
    q = metrics["quantized"]
    model, _ = load_pruned(os.path.join(metrics["run_dir"], "pruned.pt"))
    assert q["fused"] and q["fused_layers"] == q["layers"] == len(_layers(model)) == 22  # 21 convs + fc
    assert metrics["spp"]["finished"] and metrics["after"]["params"] < metrics["before"]["params"]
    # the tiny budget does not train resnet20 far; the quantized model must still score like the float one
    assert abs(q["accuracy"] - metrics["after"]["accuracy"]) <= 0.1, (q["accuracy"], metrics["after"]["accuracy"])
    report = open(os.path.join(metrics["run_dir"], "report.md")).read()
    assert "fused with pruning" in report and "8-bit QAT" in report
