"""model.weights offline: torchvision's weights read from a temporary TORCH_HOME laid out as its cache."""

import os

import pytest
import torch
import torchvision

from pfgdf_plugin.errors import ConfigError, DataNotFoundError
from pfgdf_plugin.models import build_model, build_pretrained
from pfgdf_plugin.weights import fit_state_dict, resolve_weights, weights_cache_file


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME; any download attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"a download was attempted: {url}")

    monkeypatch.setitem(torch.hub.load_state_dict_from_url.__globals__, "download_url_to_file", no_download)
    return tmp_path / "torch"


def _cached_resnet18(torch_home):
    """A resnet18 state dict (1000 classes, distinct from a fresh init) put where torchvision looks for it."""
    torch.manual_seed(123)
    reference = torchvision.models.resnet18(weights=None).state_dict()
    reference = {k: (v + 0.5 if v.is_floating_point() else v) for k, v in reference.items()}
    url_name = os.path.basename(torchvision.models.ResNet18_Weights.DEFAULT.url)
    assert url_name == "resnet18-f37072fd.pth"
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(reference, folder / url_name)
    return reference


def test_default_weights_load_exactly_the_cached_tensors(torch_home):
    reference = _cached_resnet18(torch_home)
    assert weights_cache_file(resolve_weights("resnet18", "DEFAULT")) == str(
        torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model, notes = build_pretrained("resnet18", "DEFAULT", num_classes=1000)
    assert notes == []
    loaded = model.state_dict()
    assert loaded.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(loaded[key], value), key
    # the same through build_model(weights=...) and the full enum name
    again = build_model("tv:resnet18", num_classes=1000, weights="ResNet18_Weights.IMAGENET1K_V1")
    assert torch.equal(again.fc.weight, reference["fc.weight"])


def test_head_replaced_for_ten_classes_backbone_kept(torch_home):
    reference = _cached_resnet18(torch_home)
    model, notes = build_pretrained("resnet18", "DEFAULT", num_classes=10)
    assert len(notes) == 1 and "classifier head fc replaced" in notes[0] and "(1000, 512)" in notes[0]
    assert model.fc.weight.shape == (10, 512)
    loaded = model.state_dict()
    for key, value in reference.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_one_channel_data_replaces_the_first_conv_too(torch_home):
    reference = _cached_resnet18(torch_home)
    model, notes = build_pretrained("resnet18", "DEFAULT", num_classes=10, in_channels=1)
    assert any("first convolution conv1 replaced" in n for n in notes)
    assert model.conv1.weight.shape[1] == 1
    assert torch.equal(model.layer1[0].conv1.weight, reference["layer1.0.conv1.weight"])


def test_missing_cache_file_is_one_line_saying_what_to_put_where(torch_home):
    with pytest.raises(DataNotFoundError) as info:
        build_pretrained("resnet18", "DEFAULT", num_classes=10)
    message = str(info.value)
    folder = os.path.join(str(torch_home), "hub", "checkpoints")
    assert "\n" not in message
    assert f"put resnet18-f37072fd.pth into {folder}{os.sep} (TORCH_HOME" in message
    assert not os.path.exists(os.path.join(folder, "resnet18-f37072fd.pth"))


def test_unknown_weights_name_lists_the_known_ones(torch_home):
    with pytest.raises(ConfigError, match=r"'IMAGENET1K_V9' is not a weights name of resnet18; "
                                          r"known: IMAGENET1K_V1, DEFAULT"):
        build_pretrained("resnet18", "IMAGENET1K_V9", num_classes=10)
    with pytest.raises(ConfigError, match="weights names are for torchvision models"):
        build_pretrained("lenet300", "DEFAULT", num_classes=10)


def test_a_weights_file_for_another_architecture_names_the_keys(tmp_path):
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ConfigError, match=r"does not fit model mobilenet_v3_small: missing keys: "
                                          r"features\.0\.0\.weight.*\(\+\d+ more\); unexpected keys: conv1\.weight"):
        build_pretrained("mobilenet_v3_small", str(path), num_classes=10)


def test_fit_state_dict_leaves_the_model_untouched_on_a_mismatch():
    model = build_model("lenet300", num_classes=10, image_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = build_model("lenet300", num_classes=10, image_size=8, width=0.5).state_dict()
    with pytest.raises(ConfigError, match=r"shape mismatches: fc1\.weight \(150, 192\) in the file vs "
                                          r"\(300, 192\) in the model"):
        fit_state_dict(model, other, "w.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
