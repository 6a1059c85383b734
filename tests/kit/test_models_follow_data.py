"""Models follow the data: input layers sized from the data set; impossible sizes are ConfigErrors."""

from types import SimpleNamespace

import pytest
import torch

from pfgdf_plugin.errors import ConfigError
from pfgdf_plugin.models import MIN_IMAGE_SIZE, MODELS, build_model, check_input, input_size_problem
from pfgdf_plugin.recipe import recipe_from_dict
from pfgdf_plugin.runner.steps import Data, new_model

torch.set_num_threads(1)


def _data(image_size, in_channels=1, num_classes=10):
    spec = SimpleNamespace(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    return Data(spec, None, None, torch.zeros(1, in_channels, image_size, image_size))


def test_every_registered_model_has_a_minimum_size():
    assert set(MIN_IMAGE_SIZE) == set(MODELS.names())


def test_lenet300_at_28x28_has_784_inputs():
    model = new_model(SimpleNamespace(name="lenet300", width=1.0), _data(28))
    assert model.fc1.in_features == 784
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("name", sorted(MIN_IMAGE_SIZE))
@pytest.mark.parametrize("size", [28, 32, 40])
def test_registered_models_take_the_data_size(name, size):
    if size < MIN_IMAGE_SIZE[name]:
        pytest.skip("below the model's minimum (tested below)")
    model = new_model(SimpleNamespace(name=name, width=0.25), _data(size, in_channels=3, num_classes=7))
    assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


@pytest.mark.parametrize("name,size", [("vgg16_bn", 28), ("lenet5", 12)])
def test_a_size_a_registered_model_cannot_take_is_a_config_error(name, size):
    with pytest.raises(ConfigError, match=rf"model.name '{name}'.*\(1, {size}, {size}\).*>= {MIN_IMAGE_SIZE[name]}"):
        new_model(SimpleNamespace(name=name, width=0.25), _data(size))
    assert input_size_problem(name, size) == f"model {name} needs data.image_size >= {MIN_IMAGE_SIZE[name]}, got {size}"


def test_recipe_validation_names_the_model_and_the_size():
    with pytest.raises(ConfigError) as e:
        recipe_from_dict({"model": {"name": "vgg16_bn"}, "data": {"image_size": 20}, "train": {"lr": -1}})
    assert "data.image_size: model vgg16_bn needs data.image_size >= 32, got 20" in e.value.errors
    assert any(err.startswith("train.lr") for err in e.value.errors)
    recipe_from_dict({"model": {"name": "lenet300"}, "data": {"image_size": 28}})


def test_a_torchvision_model_too_deep_for_the_data_is_a_config_error_before_training():
    with pytest.raises(ConfigError, match=r"model.name 'squeezenet1_1' cannot take inputs of shape \(1, 8, 8\)"):
        new_model(SimpleNamespace(name="squeezenet1_1", width=1.0), _data(8))


def test_check_input_keeps_mode_and_running_statistics():
    model = build_model("resnet20", width=0.25, in_channels=1).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_input(model, "resnet20", torch.randn(1, 1, 28, 28))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    with pytest.raises(ConfigError):
        check_input(model, "resnet20", torch.randn(1, 3, 28, 28))  # 3 channels into a 1-channel stem
    assert not model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
