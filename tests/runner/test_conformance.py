"""Conformance: every registered method x framework prunes the same small models, and the result runs,
keeps the output shape, is smaller, reports the epochs its pruning stage trained, and round-trips through
save_pruned/load_pruned.

Driven by the method registry: a newly registered method fails here until it has a budget below.
"""

from __future__ import annotations

import pytest
import torch

from pfgdf_plugin import load_pruned, save_pruned
from pfgdf_plugin.data import build_dataset, make_loaders
from pfgdf_plugin.models import build_model
from pfgdf_plugin.pruning import METHODS, PruneContext, prune
from pfgdf_plugin.train import TrainConfig

torch.set_num_threads(1)

MODELS = ("vgg16_bn", "resnet20")

# A small budget per method: (params, ratio). Training-aware methods train a few steps on digits.
BUDGETS = {
    "pfgdf": ({}, None),
    "spp": ({"A": 0.5, "interval": 1, "max_epochs": 5.0}, 0.5),
    "dbp": ({"blocks": 1, "num_batches": 2}, None),
    "mpd": ({"compression": 2.0, "max_epochs": 0.25}, None),
    "l1": ({}, 0.4),
    "l2": ({}, 0.4),
    "fpgm": ({}, 0.4),
    "random": ({}, 0.4),
    "taylor": ({"batches": 2}, 0.4),
    "lamp": ({}, 0.4),
    "slim": ({"sparsity_epochs": 0.5}, 0.4),
}

CASES = [(method, framework, model) for method in METHODS.names() for framework in METHODS.get(method).run
         for model in MODELS]


def test_every_registered_method_has_a_budget():
    assert set(METHODS.names()) <= set(BUDGETS), f"add a conformance budget for {set(METHODS.names()) - set(BUDGETS)}"


@pytest.fixture(scope="module")
def data():
    spec = build_dataset("digits", image_size=32, limit_train=256, limit_test=64)
    train, test = make_loaders(spec, 64)
    return spec, train, next(iter(test))[0][:8]


@pytest.mark.parametrize("method,framework,model_name", CASES, ids=["-".join(c) for c in CASES])
def test_method_prunes_runs_and_round_trips(method, framework, model_name, data, tmp_path):
    spec, train_loader, x = data
    arch = {"name": model_name, "width": 0.25, "num_classes": spec.num_classes, "in_channels": spec.in_channels}
    torch.manual_seed(0)
    dense = build_model(**arch).eval()
    with torch.no_grad():
        dense_out = dense(x)
    params, ratio = BUDGETS[method]
    ctx = PruneContext(train_loader=train_loader, train_cfg=TrainConfig(epochs=1, lr=0.01))
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    res = prune(dense, x[:1], method, framework, dict(params), ratio, ctx=ctx)
    pruned = res.model.eval()
    epochs = res.extra["train_epochs"]  # every method says how long its pruning stage trained
    assert isinstance(epochs, float) and 0.0 <= epochs <= params.get("max_epochs", 0) + params.get("sparsity_epochs", 0)

    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items()), "prune() changed its input model"
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == dense_out.shape and torch.isfinite(out).all()
    n_dense = sum(p.numel() for p in dense.parameters())
    n_pruned = sum(p.numel() for p in pruned.parameters())
    assert n_pruned < n_dense, f"{method} via {framework} removed nothing ({n_pruned} of {n_dense} parameters)"

    path = str(tmp_path / "pruned.pt")
    save_pruned(pruned, path, arch=arch)
    loaded, meta = load_pruned(path)
    assert meta["arch"] == arch
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), out)
