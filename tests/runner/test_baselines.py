"""The stronger baselines (taylor, lamp, slim): recipes with a ratio, Taylor's dependence on the data,
slimming's sparsity phase, and their named errors. (Their ``prune.target`` recipes run in
tests/runner/test_recipes.py::test_every_method_meets_a_recipe_target, found through the registry.)"""

import os

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from pfgdf_plugin.config import set_by_path
from pfgdf_plugin.data import build_dataset
from pfgdf_plugin.errors import BaselineError, ConfigError
from pfgdf_plugin.models import build_model
from pfgdf_plugin.pruning import METHODS, PruneContext, parse_params, prune
from pfgdf_plugin.pruning.baselines import mean_abs_gamma
from pfgdf_plugin.recipe import recipe_from_dict
from pfgdf_plugin.runner import run_recipe
from pfgdf_plugin.train import TrainConfig

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PFGDF_RECIPE = os.path.join(ROOT, "recipes", "pfgdf_vgg16.yaml")
TINY = ["data.name=digits", "model.width=0.25", "data.limit_train=256", "data.limit_test=64", "data.batch_size=64",
        "train.epochs=1", "finetune.epochs=0.5", "progress=false", "export.onnx=false", "report.latency=false",
        "report.plots=false"]


@pytest.fixture(scope="module")
def digits():
    spec = build_dataset("digits", image_size=32, limit_train=128, limit_test=16)
    x = torch.stack([spec.train[i][0] for i in range(128)])
    y = torch.tensor([int(spec.train[i][1]) for i in range(128)])
    return spec, x, y


def _ctx(x, y, epochs=1.0):
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)  # the same batches on every pass
    return PruneContext(train_loader=loader, train_cfg=TrainConfig(epochs=epochs, lr=0.01))


def _vgg(spec):
    torch.manual_seed(0)
    return build_model("vgg16_bn", width=0.25, num_classes=spec.num_classes, in_channels=spec.in_channels).eval()


@pytest.mark.parametrize("method,params", [("taylor", {"batches": 2}), ("lamp", {}),
                                           ("slim", {"sparsity_epochs": 0.5})])
def test_recipe_with_a_ratio_prunes_and_reports_its_training(method, params, tmp_path):
    data = yaml.safe_load(open(PFGDF_RECIPE))
    for item in TINY + [f"output_dir={tmp_path}"]:
        set_by_path(data, item)
    data["prune"] = {"framework": "torch_pruning", "method": method, "params": params, "ratio": 0.4}
    metrics = run_recipe(recipe_from_dict(data), quiet=True)
    assert metrics["after"]["params"] < 0.8 * metrics["before"]["params"]
    assert metrics["after"]["macs"] < metrics["before"]["macs"]
    assert metrics["prune_train_epochs"] == params.get("sparsity_epochs", 0.0)


def test_taylor_scores_depend_on_the_data(digits):
    spec, x, y = digits
    dense = _vgg(spec)

    def first_conv(ctx):
        return prune(dense, x[:1], "taylor", params={"batches": 2}, ratio=0.5, ctx=ctx).model.features[0].weight

    true_labels = first_conv(_ctx(x, y))
    assert torch.equal(first_conv(_ctx(x, y)), true_labels)  # the same batches choose the same channels
    shuffled = first_conv(_ctx(x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]))
    assert true_labels.shape == shuffled.shape and not torch.equal(true_labels, shuffled)
    assert all(p.grad is None for p in dense.parameters())


def test_taylor_target_search_sees_the_gradients_on_every_copy(digits):
    spec, x, y = digits
    res = prune(_vgg(spec), x[:1], "taylor", params={"batches": 2}, target={"macs": 1.5}, ctx=_ctx(x, y))
    assert res.extra["target"]["reached"] >= 1.5 and res.extra["train_epochs"] == 0.0
    assert all(p.grad is None for p in res.model.parameters())


@pytest.mark.parametrize("framework", ["torch_pruning", "nni"])
def test_taylor_names_a_layer_without_gradient_and_leaves_the_model_alone(framework, digits):
    spec, x, y = digits
    dense = _vgg(spec)
    with torch.no_grad():
        dense.classifier.weight.zero_()  # nothing before the classifier gets a gradient
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    with pytest.raises(BaselineError, match=r"taylor: layer 'features.0' has an all-zero loss gradient over 2 "):
        prune(dense, x[:1], "taylor", framework, {"batches": 2}, ratio=0.5, ctx=_ctx(x, y))
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("method", ["taylor", "slim"])
def test_methods_that_need_data_say_so(method, digits):
    spec, x, _ = digits
    with pytest.raises(ConfigError, match=rf"method '{method}': it .*: it needs training data"):
        prune(_vgg(spec), x[:1], method, ratio=0.5)


def test_slim_sparsity_phase_shrinks_batchnorm_scales(digits):
    spec, x, y = digits
    dense = _vgg(spec)

    def slim(reg):
        torch.manual_seed(0)
        return prune(dense, x[:1], "slim", params={"reg": reg, "sparsity_epochs": 0.5}, ratio=0.3,
                     ctx=_ctx(x, y))

    penalised, plain = slim(1e-2), slim(0.0)
    gamma = penalised.extra["slim_mean_abs_gamma"]
    assert gamma["before"] == pytest.approx(mean_abs_gamma(dense))
    assert gamma["after_sparsity"] < gamma["before"]
    assert gamma["after_sparsity"] < plain.extra["slim_mean_abs_gamma"]["after_sparsity"]  # the penalty, not SGD
    assert penalised.extra["train_epochs"] == 0.5  # 2 of the loader's 4 batches
    assert METHODS.get("slim").report(penalised, None)[0]["slim"]["mean_abs_gamma"] == gamma


def test_slim_refuses_a_model_without_batchnorm(digits):
    spec, x, y = digits
    net = build_model("lenet5", num_classes=spec.num_classes, in_channels=spec.in_channels)
    with pytest.raises(BaselineError, match=r"slim: LeNet5 has no affine BatchNorm layer"):
        prune(net, x[:1], "slim", ratio=0.3, ctx=_ctx(x, y))


def test_baseline_params_list_every_problem():
    _, errors = parse_params(METHODS.get("slim"), {"reg": -1, "sparsity_epochs": -2, "normalizer": "max"})
    assert sorted(errors) == sorted(["prune.params.reg must be >= 0, got -1.0",
                                     "prune.params.sparsity_epochs must be >= 0, got -2.0",
                                     "prune.params.normalizer must be one of mean, none; got 'max'"])
    assert parse_params(METHODS.get("taylor"), {"batches": 0})[1] == ["prune.params.batches must be >= 1, got 0"]
    assert parse_params(METHODS.get("lamp"), {"p": 2})[1] == [
        "unknown key 'prune.params.p' for method 'lamp' (known: none)"]
    with pytest.raises(ConfigError, match=r"prune.method 'lamp' is not available for framework 'nni'"):
        prune(torch.nn.Linear(2, 2), torch.randn(1, 2), "lamp", "nni", ratio=0.5)
