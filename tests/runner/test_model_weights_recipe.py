"""model.weights and model.checkpoint in recipes: validated when loaded, read offline in a run."""

import os
from types import SimpleNamespace

import pytest
import torch
import torchvision

from pfgdf_plugin.config import ConfigError
from pfgdf_plugin.errors import DataNotFoundError
from pfgdf_plugin.recipe import ModelSection, load_recipe, recipe_from_dict
from pfgdf_plugin.runner import RunError, load_checkpoint, run_recipe
from pfgdf_plugin.runner.steps import Data, new_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PFGDF_RECIPE = os.path.join(ROOT, "recipes", "pfgdf_vgg16.yaml")


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """A TORCH_HOME holding resnet18's DEFAULT weights (random tensors) where torchvision's cache keeps them."""
    home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"a download was attempted: {url}")

    monkeypatch.setitem(torch.hub.load_state_dict_from_url.__globals__, "download_url_to_file", no_download)
    torch.manual_seed(7)
    state = {k: (v - 0.25 if v.is_floating_point() else v)
             for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, home / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    return SimpleNamespace(home=home, state=state)


def _data(num_classes=10, in_channels=3, image_size=32):
    spec = SimpleNamespace(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    return Data(spec, None, None, torch.zeros(1, in_channels, image_size, image_size))


def _recipe(**model):
    return {"model": {"name": "resnet18", **model}, "data": {"name": "digits"}}


@pytest.mark.parametrize("model, match", [
    ({"weights": "IMAGENET1K_V7"}, r"model.weights 'IMAGENET1K_V7' is not a weights name of resnet18; "
                                   r"known: IMAGENET1K_V1, DEFAULT"),
    ({"name": "lenet300", "weights": "DEFAULT"}, r"weights names are for torchvision models, not 'lenet300'"),
    ({"weights": "DEFAULT", "checkpoint": "a.pt"}, r"set one of them"),
])
def test_bad_model_weights_are_named_when_the_recipe_is_loaded(model, match):
    with pytest.raises(ConfigError, match=match):
        recipe_from_dict(_recipe(**model))


def test_weights_names_and_paths_are_accepted():
    assert recipe_from_dict(_recipe(weights="DEFAULT")).model.weights == "DEFAULT"
    assert recipe_from_dict(_recipe(name="tv:resnet18", weights="ResNet18_Weights.IMAGENET1K_V1")).model.weights
    assert recipe_from_dict(_recipe(name="lenet300", weights="w/dense.pt")).model.weights == "w/dense.pt"


def test_new_model_loads_the_cached_weights_and_logs_the_new_head(torch_home):
    notes = []
    model = new_model(ModelSection(name="resnet18", weights="DEFAULT"), _data(), log=notes.append)
    assert len(notes) == 1 and "classifier head fc replaced" in notes[0]
    for key, value in torch_home.state.items():
        if not key.startswith("fc."):
            assert torch.equal(model.state_dict()[key], value), key


def test_new_model_without_the_cache_file_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(DataNotFoundError, match=r"put resnet18-f37072fd\.pth into .*hub.checkpoints"):
        new_model(ModelSection(name="resnet18", weights="DEFAULT"), _data())


def test_checkpoint_for_another_architecture_names_keys_and_leaves_the_model(tmp_path):
    path = str(tmp_path / "resnet18.pt")
    torch.save({"state_dict": torchvision.models.resnet18(weights=None).state_dict()}, path)
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RunError, match=r"model.checkpoint .*resnet18\.pt does not fit model MobileNetV3: "
                                       r"missing keys: features\.0\.0\.weight"):
        load_checkpoint(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_checkpoint_with_another_class_count_keeps_the_backbone(tmp_path):
    path = str(tmp_path / "resnet18-1000.pt")
    source = torchvision.models.resnet18(weights=None)
    torch.save({"state_dict": source.state_dict()}, path)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    notes = []
    load_checkpoint(model, path, log=notes.append)
    assert "classifier head fc replaced" in notes[0]
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    with pytest.raises(RunError, match="no such file"):
        load_checkpoint(model, str(tmp_path / "absent.pt"))


def test_a_run_starts_from_the_cached_weights(torch_home, tmp_path, capsys):
    recipe = load_recipe(PFGDF_RECIPE, [
        "data.name=digits", "data.limit_train=64", "data.limit_test=32", "data.batch_size=32",
        "data.in_channels=3", "model.name=resnet18", "model.width=1.0", "model.weights=DEFAULT",
        "prune.ignored_layers=[fc]", "train.epochs=0",
        "finetune.epochs=0", "export.onnx=false", "report.latency=false", "report.plots=false",
        "progress=false", f"output_dir={tmp_path / 'runs'}"])
    run_recipe(recipe)
    (run_dir,) = [d for d in (tmp_path / "runs").iterdir() if d.is_dir()]
    out = capsys.readouterr().out
    assert "classifier head fc replaced" in out and "first convolution" not in out
    dense = torch.load(os.path.join(run_dir, "dense.pt"), weights_only=True)["state_dict"]
    assert torch.equal(dense["layer3.0.conv1.weight"], torch_home.state["layer3.0.conv1.weight"])
