"""Tests of data sets, models and measurements (fast: small data, tiny widths)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pfgdf_plugin.data import (
    DATASETS,
    DataNotFoundError,
    DataSpec,
    build_dataset,
    calibration_batches,
    make_loaders,
)
from pfgdf_plugin.measure import (
    conv_params,
    count_macs,
    count_params,
    evaluate,
    filters_per_layer,
    measure_latency,
    summarize,
)
from pfgdf_plugin.models import MODELS, build_model
from pfgdf_plugin.registry import UnknownNameError
from pfgdf_plugin.train import TrainConfig, train

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated_data_env(tmp_path, monkeypatch):
    monkeypatch.delenv("PFGDF_DATA", raising=False)
    monkeypatch.setenv("PFGDF_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- data


def test_digits_gray_and_rgb():
    spec = build_dataset("digits")
    assert isinstance(spec, DataSpec)
    assert spec.num_classes == 10 and spec.in_channels == 1 and spec.image_size == 32
    assert len(spec.train) + len(spec.test) == 1797
    assert abs(len(spec.test) - 0.2 * 1797) < 2
    x, y = spec.train[0]
    assert tuple(x.shape) == (1, 32, 32) and 0 <= int(y) < 10
    assert sorted({int(t) for _, t in spec.test}) == list(range(10))

    rgb = build_dataset("digits", in_channels=3, limit_train=50, limit_test=20)
    assert rgb.in_channels == 3
    assert len(rgb.train) == 50 and len(rgb.test) == 20
    assert tuple(rgb.train[0][0].shape) == (3, 32, 32)


def test_digits_is_seeded():
    a = build_dataset("digits", limit_train=10, seed=3)
    b = build_dataset("digits", limit_train=10, seed=3)
    assert torch.equal(a.train[0][0], b.train[0][0])


def test_synthetic_sizes_and_loaders():
    spec = build_dataset("synthetic", image_size=16, in_channels=1, limit_train=40, limit_test=8)
    assert len(spec.train) == 40 and len(spec.test) == 8 and spec.num_classes == 10
    train, test = make_loaders(spec, batch_size=16, seed=1)
    xb, yb = next(iter(train))
    assert tuple(xb.shape) == (16, 1, 16, 16) and yb.dtype == torch.long
    again, _ = make_loaders(spec, batch_size=16, seed=1)
    assert torch.equal(next(iter(again))[1], yb)
    batches = calibration_batches(train, 2)
    assert len(batches) == 2 and all(isinstance(b, torch.Tensor) for b in batches)
    assert len(calibration_batches(test, 10)) == 1
    with pytest.raises(ValueError, match="batch_size"):
        make_loaders(spec, batch_size=0)


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_files(tmp_path):
    spec = build_dataset("fashion_mnist")
    assert len(spec.train) == 60000 and len(spec.test) == 10000
    assert spec.num_classes == 10 and spec.in_channels == 1
    assert tuple(spec.train[0][0].shape) == (1, 32, 32)
    raw = tmp_path / "cache" / "FashionMNIST" / "raw"
    assert (raw / "train-images-idx3-ubyte").stat().st_size == 47040016
    assert not list(raw.glob("*.part"))
    # the cached files are reused, and limits/channels apply
    small = build_dataset("fashion_mnist", in_channels=3, limit_train=100, limit_test=10)
    assert len(small.train) == 100 and len(small.test) == 10
    assert tuple(small.test[0][0].shape) == (3, 32, 32)


def test_missing_cifar10_is_one_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py") as info:
        build_dataset("cifar10", root=tmp_path / "nowhere")
    assert isinstance(info.value, FileNotFoundError)
    assert "\n" not in str(info.value)


def test_missing_mnist_and_imagefolder(tmp_path):
    with pytest.raises(DataNotFoundError, match="MNIST/raw"):
        build_dataset("mnist", root=tmp_path)
    with pytest.raises(DataNotFoundError, match="train/"):
        build_dataset("imagefolder", root=tmp_path)


def test_unknown_dataset_lists_names():
    with pytest.raises(UnknownNameError) as info:
        build_dataset("no_such_set")
    assert {"digits", "fashion_mnist", "mnist", "cifar10", "imagefolder", "synthetic"} <= set(DATASETS.names())
    for name in DATASETS.names():
        assert name in str(info.value)
    assert isinstance(info.value, KeyError)


def test_bad_dataset_arguments():
    with pytest.raises(ValueError, match="limit_train"):
        build_dataset("digits", limit_train=0)
    with pytest.raises(ValueError, match="image_size"):
        build_dataset("digits", image_size=-1)


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", MODELS.names())
def test_registered_models_forward(name):
    model = build_model(name, num_classes=7, in_channels=3, width=0.25)
    out = model(torch.randn(2, 3, 32, 32))
    assert tuple(out.shape) == (2, 7)


@pytest.mark.parametrize("name", ["vgg16_bn", "resnet20", "lenet5"])
def test_models_trace_and_build_dependency_graph(name):
    import torch_pruning as tp

    model = build_model(name, width=0.25).eval()
    x = torch.randn(1, 3, 32, 32)
    traced = torch.fx.symbolic_trace(model)
    assert torch.allclose(traced(x), model(x), atol=1e-5)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0]).prune()
    assert tuple(model(x).shape) == (1, 10)


def test_vgg16_bn_size_and_layout():
    model = build_model("vgg16_bn")
    assert 14e6 < count_params(model) < 16e6
    assert isinstance(model.features, nn.Sequential)
    assert isinstance(model.classifier, nn.Linear)
    assert sum(isinstance(m, nn.Conv2d) for m in model.features) == 13


def test_resnet_depths():
    for name, blocks in (("resnet20", 3), ("resnet56", 9)):
        model = build_model(name, width=0.25)
        assert len(model.layer1) == len(model.layer2) == len(model.layer3) == blocks


def test_lenets_take_image_size_and_channels():
    assert tuple(build_model("lenet300", in_channels=1, image_size=28)(torch.randn(2, 1, 28, 28)).shape) == (2, 10)
    assert tuple(build_model("lenet5", in_channels=1)(torch.randn(2, 1, 32, 32)).shape) == (2, 10)


def test_torchvision_model_by_name():
    model = build_model("resnet18", num_classes=5).eval()
    assert tuple(model(torch.randn(1, 3, 32, 32)).shape) == (1, 5)
    gray = build_model("tv:resnet18", in_channels=1).eval()
    assert tuple(gray(torch.randn(1, 1, 32, 32)).shape) == (1, 10)


def test_unknown_model_lists_names():
    with pytest.raises(UnknownNameError) as info:
        build_model("no_such_model")
    msg = str(info.value)
    for name in MODELS.names():
        assert name in msg
    assert "torchvision" in msg


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="width"):
        build_model("resnet20", width=0)
    with pytest.raises(TypeError, match="foo"):
        build_model("resnet20", foo=1)


# --------------------------------------------------------------------------- measure


def test_count_macs_of_one_conv():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    # torch_pruning counts 8*3*9 MACs per output pixel plus one per bias add
    assert count_macs(conv, torch.randn(1, 3, 8, 8)) == 8 * 3 * 9 * 64 + 8 * 64
    assert count_macs(nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.randn(1, 3, 8, 8)) == 8 * 3 * 9 * 64


def test_counts_and_summary():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    assert count_params(model) == (8 * 27 + 8) + (4 * 8 + 4) + (144 * 2 + 2)
    assert conv_params(model) == (8 * 27 + 8) + (4 * 8 + 4)
    assert filters_per_layer(model) == {"0": 8, "2": 4, "4": 2}
    s = summarize(model, torch.randn(1, 3, 8, 8))
    assert s["filters"] == 12 and s["params"] == count_params(model)
    assert s["conv_params"] == conv_params(model) and s["macs"] > 0


def test_evaluate_restores_mode():
    spec = build_dataset("synthetic", image_size=8, in_channels=1, limit_train=16, limit_test=20)
    _, test = make_loaders(spec, batch_size=8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    model.train()
    res = evaluate(model, test, progress=False)
    assert model.training
    with torch.no_grad():
        model.eval()
        pairs = [(model(x).argmax(1), y) for x, y in test]
    assert res["accuracy"] == sum(int((p == y).sum()) for p, y in pairs) / 20 and res["loss"] > 0


def test_lenet_learns_digits_above_80_percent():
    torch.manual_seed(0)
    spec = build_dataset("digits", image_size=32, limit_train=512, limit_test=256)
    train_loader, test_loader = make_loaders(spec, 64)
    model = build_model("lenet5", num_classes=spec.num_classes, in_channels=spec.in_channels)
    before = evaluate(model, test_loader, progress=False)["accuracy"]
    train(model, train_loader, TrainConfig(epochs=5, lr=0.003, optimizer="adam"), progress=False)
    after = evaluate(model, test_loader, progress=False)["accuracy"]
    assert after > 0.8 and after > before + 0.5, (before, after)


def test_measure_latency_two_tiny_models():
    models = {"a": nn.Conv2d(3, 4, 3), "b": nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU())}
    models["a"].train()
    before = torch.get_num_threads()
    res = measure_latency(models, (3, 16, 16), batch_sizes=(1, 4), warmup=1, repeats=5, threads=1)
    assert torch.get_num_threads() == before
    assert models["a"].training
    for name in models:
        for b in (1, 4):
            r = res[name][b]
            assert r["median_ms"] > 0
            assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
    with pytest.raises(ValueError, match="input_shape"):
        measure_latency(models, (16, 16))


class _Counting(nn.Module):
    def __init__(self, log, name):
        super().__init__()
        self.log, self.name = log, name

    def forward(self, x):
        self.log.append(self.name)
        return x


def test_measure_latency_interleaves_models_and_rotates_the_first():
    log = []
    models = {"a": _Counting(log, "a"), "b": _Counting(log, "b"), "c": _Counting(log, "c")}
    measure_latency(models, (1, 2, 2), batch_sizes=(1, 2), warmup=1, repeats=3)
    one_size = ["a", "b", "c"] + ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # warmup, then rotated repeats
    assert log == one_size * 2


def test_imagefolder_from_tiny_pngs(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (20, 12), color=(40 * i, 100, 200)).save(folder / f"{i}.png")
    spec = build_dataset("imagefolder", root=tmp_path, image_size=16, in_channels=1)
    assert spec.num_classes == 2 and len(spec.train) == 4 and len(spec.test) == 4
    assert tuple(spec.train[0][0].shape) == (1, 16, 16)


def test_onnx_export_of_an_unexportable_pool_names_the_layer(tmp_path):
    """AlexNet at 64x64 pools a 1x1 map to 6x6, which ONNX cannot express: ExportError names the layer,
    and no file is left behind."""
    import torchvision

    from pfgdf_plugin.errors import ExportError
    from pfgdf_plugin.measure import export_onnx

    model = torchvision.models.alexnet(num_classes=10).eval()
    path = tmp_path / "a.onnx"
    with pytest.raises(ExportError, match=r"avgpool \(input \(1, 1\), output \(6, 6\)\)"):
        export_onnx(model, torch.randn(1, 3, 64, 64), str(path))
    assert not path.exists()
