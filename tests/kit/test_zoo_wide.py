"""The wide models of pfgdf_plugin/zoo_wide.py: registered, the promised shapes, and MPD converts them exactly."""

import pytest
import torch
import torch.nn as nn

from pfgdf_plugin import MPDPruner
from pfgdf_plugin.models import MODELS, build_model
from pfgdf_plugin.modules import BlockDiagonalLinear


def test_wide_models_are_registered_with_the_promised_layers():
    assert {"wide_mlp", "vgg16_bn_wide"} <= set(MODELS.names())
    mlp = build_model("wide_mlp", in_channels=1, image_size=32)
    assert [(m.in_features, m.out_features) for m in mlp.modules() if isinstance(m, nn.Linear)] == \
        [(1024, 2048), (2048, 2048), (2048, 10)]
    assert build_model("wide_mlp", in_channels=1, image_size=28).fc1.in_features == 784
    vgg = build_model("vgg16_bn_wide", width=0.125)
    assert [(m.in_features, m.out_features) for m in vgg.classifier if isinstance(m, nn.Linear)] == \
        [(64, 512), (512, 512), (512, 10)]
    assert vgg.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("kwargs,match", [({"width": 0}, "width must be a number > 0, got 0"),
                                          ({"image_size": 0}, "image_size must be a positive int, got 0"),
                                          ({"num_classes": 1.5}, "num_classes must be a positive int")])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model("wide_mlp", **kwargs)


@pytest.mark.parametrize("kernel", ["bmm", "grouped", "dense"])
def test_mpd_converts_the_wide_mlp_exactly(kernel):
    torch.manual_seed(0)
    model = build_model("wide_mlp", in_channels=1, image_size=16, width=1 / 32).eval()
    x = torch.randn(4, 1, 16, 16)
    pruner = MPDPruner(model, x, blocks=8, kernel=kernel)
    ref = model(x).detach()
    report = pruner.step()
    assert sorted(report["layers"]) == ["fc1", "fc2"]
    # dense-kernel layers keep the original order: nothing to fold
    assert report["folded"] == ([] if kernel == "dense" else ["fc1 -> fc2", "fc2 -> fc3"])
    assert all(e["kernel"] == kernel for e in report["layers"].values())
    assert isinstance(model.fc1, BlockDiagonalLinear) == (kernel != "dense")
    out = model(x)
    assert float((out - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))
