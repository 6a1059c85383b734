"""A converted ``bmm`` layer applies the ReLU that alone follows it (``fuse_activations``): the same
values on every path, and no fusion where the ReLU, the layer or the model does not allow it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from pfgdf_plugin.methods import mpd
from pfgdf_plugin.modules import BlockDiagonalLinear, module_from_description


def _masked(model: nn.Module, names, blocks: int = 4):
    plans = {n: mpd.make_plan(n, model.get_submodule(n).weight, blocks, seed=1) for n in names}
    with torch.no_grad():
        for n, plan in plans.items():
            model.get_submodule(n).weight.mul_(plan.mask())
    return plans


def _chain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 36), nn.ReLU(), nn.Linear(36, 30), nn.ReLU(inplace=True), nn.Linear(30, 22),
                         nn.ReLU(), nn.Linear(22, 5))


def test_a_fused_chain_gives_the_masked_models_values_and_gradients(native_switch):
    model = _chain()
    plans = _masked(model, ["0", "2", "4"], blocks=3)  # 40/36/30/22 in 3 blocks: padded, unequal
    masked = copy.deepcopy(model)
    links = [mpd.FoldLink("0", "2"), mpd.FoldLink("2", "4"), mpd.FoldLink("4", "6")]
    report = mpd.convert_model(model, plans, links, kernel="bmm")
    assert report["fused"] == ["0 + 1", "2 + 3", "4 + 5"]
    assert [type(model[i]).__name__ for i in (1, 3, 5)] == ["Identity"] * 3
    assert all(model[i].activation == "relu" for i in (0, 2, 4)) and "activation=relu" in repr(model[0])
    x = torch.randn(40, 40)
    for batch in (x[:1], x[:7], x, x.t().contiguous().t()):  # batch 1, a tail of 7 columns, 40 = 2 tiles + 8
        with torch.no_grad():
            ref = masked(batch)
            for on in (True, False):
                with native_switch(on):
                    got = model(batch)
                assert torch.allclose(got, ref, atol=1e-5), (batch.shape, on)
    a, b = x[:6].clone().requires_grad_(), x[:6].clone().requires_grad_()
    model.train()(a).square().sum().backward()
    masked.train()(b).square().sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_the_legacy_block_kernel_fuses_nothing():
    model = _chain()
    plans = _masked(model, ["0", "2"])
    report = mpd.convert_model(model, plans, [mpd.FoldLink("0", "2")], kernel="block")
    assert report["fused"] == [] and isinstance(model[1], nn.ReLU) and model[0].activation is None


class _Shared(nn.Module):
    """One ReLU module called after two layers, and a layer whose output is read twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8)
        self.relu, self.own = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        h = self.relu(self.fc1(x))
        g = self.fc2(h)
        return self.fc3(self.relu(g) + self.own(g))


class _Branchy(nn.Module):
    """Control flow on the data: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.relu, self.fc2 = nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)

    def forward(self, x):
        h = self.relu(self.fc1(x))
        return self.fc2(h) if h.sum() > 0 else self.fc2(-h)


@pytest.mark.parametrize("build,names", [(_Shared, ["fc1", "fc2"]), (_Branchy, ["fc1"])])
def test_no_fusion_where_the_relu_is_shared_the_output_read_twice_or_the_model_untraceable(build, names):
    torch.manual_seed(0)
    model = build()
    plans = _masked(model, names)
    masked = copy.deepcopy(model)
    report = mpd.convert_model(model, plans, [], kernel="bmm")
    assert report["fused"] == []
    assert all(isinstance(m, nn.ReLU) for n, m in model.named_modules() if n in ("relu", "own"))
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), atol=1e-5)


def test_a_hooked_relu_is_not_fused():
    model = _chain()
    plans = _masked(model, ["0"])
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    report = mpd.convert_model(model, plans, [], kernel="bmm")
    assert report["fused"] == [] and isinstance(model[1], nn.ReLU)
    model(torch.randn(2, 40))
    assert seen == [torch.Size([2, 36])]


def test_the_activation_survives_a_description_and_a_bad_one_is_refused():
    layer = BlockDiagonalLinear(6, [3, 3], [3, 3])
    layer.activation = "relu"
    twin = module_from_description(layer.describe())
    assert twin.activation == "relu"
    with pytest.raises(ValueError, match="activation must be one of"):
        module_from_description(dict(layer.describe(), activation="gelu"))
