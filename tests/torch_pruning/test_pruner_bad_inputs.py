"""The plugin's Torch-Pruning pruners refuse bad example_inputs / ignored_layers / candidates with their own
error, and leave the model as it was (weights and every module's train/eval mode)."""

import pytest
import torch
import torch.nn as nn

from pfgdf_plugin import DBPError, DBPPruner, MPDError, MPDPruner, PFGDFError, PFGDFPruner, SPPError, SPPPruner
from pfgdf_plugin.models import build_model

torch.set_num_threads(1)
X = torch.randn(1, 3, 32, 32)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: m.training for n, m in model.named_modules()}


def _unchanged(model, snap):
    state, modes = snap
    now = model.state_dict()
    return state.keys() == now.keys() and all(torch.equal(state[k], now[k]) for k in state) and \
        modes == {n: m.training for n, m in model.named_modules()}


CASES = [
    (PFGDFPruner, PFGDFError, {}),
    (SPPPruner, SPPError, {"pruning_ratio": 0.5}),
    (MPDPruner, MPDError, {"compression": 2.0}),
]


@pytest.mark.parametrize("cls,error,kwargs", CASES, ids=[c[0].__name__ for c in CASES])
@pytest.mark.parametrize("bad", [torch.randn(1, 5, 32, 32), "an image", torch.randn(3, 32, 32)],
                         ids=["wrong channels", "a string", "no batch dim"])
def test_bad_example_inputs_raise_the_plugin_error_and_leave_the_model(cls, error, kwargs, bad):
    model = build_model("resnet20", width=0.25).train()
    snap = _snapshot(model)
    with pytest.raises(error, match=cls.__name__):
        cls(model, bad, ignored_layers=[model.fc], **kwargs)
    assert _unchanged(model, snap)


@pytest.mark.parametrize("cls,error,kwargs", CASES[:2], ids=[c[0].__name__ for c in CASES[:2]])
def test_foreign_or_named_ignored_layers_are_refused(cls, error, kwargs):
    model = build_model("resnet20", width=0.25)
    for bad in ([nn.Linear(2, 2)], ["fc"]):
        with pytest.raises(error, match="ignored_layers"):
            cls(model, X, ignored_layers=bad, **kwargs)


def test_mpd_refuses_a_foreign_module_in_ignored_layers():
    model = build_model("lenet300")
    with pytest.raises(MPDError, match="ignored_layers holds a Linear that is not a module of the model"):
        MPDPruner(model, X, compression=2.0, ignored_layers=[nn.Linear(2, 2)])


def test_a_successful_pruner_keeps_the_train_mode():
    model = build_model("resnet20", width=0.25).train()
    PFGDFPruner(model, X, ignored_layers=[model.fc])
    assert all(m.training for m in model.modules())


def test_dbp_refuses_a_bare_string_of_candidates():
    model = build_model("vgg16_bn", width=0.25)
    data = [(torch.randn(8, 3, 32, 32), torch.arange(8) % 10)]
    with pytest.raises(DBPError, match="candidates must be a list of block names"):
        DBPPruner(model, X, data=data, target={"blocks": 1}, candidates="features.10")
