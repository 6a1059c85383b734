"""target= of the NNI PFGDFPruner, SPPPruner and MPDPruner: searched on copies, named errors."""

import warnings

import nni
import pytest
import torch
from nni.compression.utils import TorchEvaluator

from pfgdf_plugin import TargetError
from pfgdf_plugin.measure import count_macs, count_params
from pfgdf_plugin.models import build_model
from pfgdf_plugin.nni import MPDPruner, PFGDFPruner, SPPPruner, convert, speedup

torch.set_num_threads(1)
X = torch.randn(2, 3, 32, 32)
CONV = [{"op_types": ["Conv2d"]}]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_pfgdf_searches_k_and_the_pruned_model_meets_the_target():
    model = build_model("vgg16_bn", width=0.25)
    dense = count_macs(model, X[:1])
    pruner = PFGDFPruner(model, CONV, target={"macs": 2.0}, example_inputs=X)
    assert pruner.k == pruner.target_report["knob"]
    _, masks = pruner.compress()
    pruner.unwrap_model()
    speedup(model, masks, X)
    assert dense / count_macs(model, X[:1]) == pytest.approx(pruner.target_report["reached"])
    assert pruner.target_report["reached"] >= 2.0


def test_mpd_searches_its_block_count():
    model = build_model("lenet300", in_channels=1, image_size=32)
    x = torch.randn(2, 1, 32, 32)
    dense = count_params(model)
    config = [{"op_names": ["fc1", "fc2"]}]
    pruner = MPDPruner(model, config, target={"params": 3.0}, example_inputs=x)
    assert pruner.target_report["knob"] >= 2
    pruner.compress()
    pruner.unwrap_model()
    convert(model, pruner, x)
    assert dense / count_params(model) == pytest.approx(pruner.target_report["reached"])
    assert pruner.target_report["reached"] >= 3.0


def test_spp_chooses_its_ratio_before_training():
    model = build_model("lenet5")
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        model.train()
        for _ in range(max_steps):
            optimizers.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizers.step()

    opt = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01)
    evaluator = TorchEvaluator(training_func, opt, lambda batch, m: None)
    dense = count_params(model)
    pruner = SPPPruner(model, [{"op_names": ["conv1", "conv2"]}], evaluator, training_steps=12, interval=1, A=0.5,
                       target={"params": 1.2}, example_inputs=x[:2])
    _, masks = pruner.compress()
    pruner.unwrap_model()
    speedup(model, masks, x[:2])
    assert pruner.finished and dense / count_params(model) >= 1.2


@pytest.mark.parametrize("make,knob", [
    (lambda m, t, **kw: PFGDFPruner(m, CONV, target=t, example_inputs=X, **kw), {"k": 1.0}),
    (lambda m, t, **kw: MPDPruner(m, CONV, target=t, example_inputs=X, **kw), {"blocks": 2}),
])
def test_bad_targets_are_named_and_leave_the_model_untouched(make, knob):
    model = build_model("vgg16_bn", width=0.25)
    before = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for spec, match in [({"params": 1e6}, "cannot be reached"), ({"macs": 2, "params": 2}, "one target"),
                            ({"macs": 0.5}, ">= 1"), ({"macs": 2.0}, "not both")]:
            with pytest.raises(TargetError, match=match):
                make(model, spec, **(knob if match == "not both" else {}))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any("wrapper" in type(m).__name__.lower() for m in model.modules())


def test_a_target_needs_example_inputs():
    with pytest.raises(TargetError, match="example_inputs"):
        PFGDFPruner(build_model("lenet5"), CONV, target={"macs": 1.5})
