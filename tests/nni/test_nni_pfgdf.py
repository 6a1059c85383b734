"""The NNI adapter of PFGDF: same selection as the Torch-Pruning pruner, speedup equals masking."""

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import pfgdf_plugin
from pfgdf_plugin.measure import model_bytes
from pfgdf_plugin.methods import pfgdf
from pfgdf_plugin.models import build_model
from pfgdf_plugin.nni import PFGDFPruner, apply_masks, dependency_config_list, speedup

X32 = (3, 32, 32)


def _filter_pruned(mask: torch.Tensor) -> set:
    return set((mask.reshape(mask.shape[0], -1).abs().sum(1) == 0).nonzero().flatten().tolist())


def _conv_params(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))


def _randomise_bn(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial BatchNorm statistics and affine terms, so eval-mode outputs test them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)


def test_same_filters_as_torch_pruning_on_vgg16_bn():
    torch.manual_seed(0)
    model_a = build_model("vgg16_bn", width=0.5)
    model_b = copy.deepcopy(model_a)
    conv_before = _conv_params(model_a)

    tp_pruner = pfgdf_plugin.PFGDFPruner(model_a, torch.randn(1, *X32), k=1.0,
                                         ignored_layers=[model_a.classifier])
    nni_pruner = PFGDFPruner(model_b, [{"op_types": ["Conv2d"]}], k=1.0)
    _, masks = nni_pruner.compress()
    tp_pruner.step()

    conv_names = [n for n, m in model_b.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(conv_names) == 13 and set(nni_pruner.decisions) == set(conv_names)
    total = pruned = 0
    for name in conv_names:
        nni_idxs = _filter_pruned(masks[name]["weight"])
        assert set(tp_pruner.report[name]["pruned_idxs"]) == nni_idxs, name
        d = nni_pruner.decisions[name]
        assert d["pruned"] == len(nni_idxs) and d["rule"] == "band" and d["sigma"] > 0
        total += d["channels"]
        pruned += d["pruned"]
    assert 0.60 <= pruned / total <= 0.75, pruned / total
    assert 1 - _conv_params(model_a) / conv_before > 0.85


def test_sparse_ratio_uses_nni_ranking_by_gaussian_score_and_band_caps():
    torch.manual_seed(0)
    model = build_model("vgg16_bn", width=0.25)
    pruner = PFGDFPruner(copy.deepcopy(model), [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}])
    _, masks = pruner.compress()
    conv = model.features[3]
    scores = pfgdf.importance(conv.weight, 1.0)
    expected = set(torch.argsort(scores)[: conv.out_channels // 2].tolist())
    assert _filter_pruned(masks["features.3"]["weight"]) == expected
    assert all(d["rule"] == "nni" and d["ratio"] == 0.5 for d in pruner.decisions.values())

    capped = PFGDFPruner(copy.deepcopy(model), [{"op_types": ["Conv2d"], "max_sparse_ratio": 0.25}],
                         min_channels=4)
    capped.compress()
    assert all(0 < d["ratio"] <= 0.25 for d in capped.decisions.values())


def test_speedup_of_residual_model_matches_masked_model():
    torch.manual_seed(0)
    model = build_model("resnet20", width=0.5)
    _randomise_bn(model)
    params_before = sum(p.numel() for p in model.parameters())
    model_tp = copy.deepcopy(model)
    cfg = dependency_config_list(model, torch.randn(2, *X32), [{"op_types": ["Conv2d"]}])
    pruner = PFGDFPruner(model, cfg, k=1.0)
    _, masks = pruner.compress()
    pruner.unwrap_model()  # NNI's order: compress, unwrap, then speedup
    # residual-coupled convs (the stage's conv2s, the stem, the shortcut) share one mask, decided
    # on their mean score: the same channels Torch-Pruning's dependency groups remove
    assert _filter_pruned(masks["conv1"]["weight"]) == _filter_pruned(masks["layer1.2.conv2"]["weight"])
    tp_pruner = pfgdf_plugin.PFGDFPruner(model_tp, torch.randn(1, *X32), k=1.0, ignored_layers=[model_tp.fc])
    tp_pruner.step()
    assert len(tp_pruner.report) == 12
    for name, entry in tp_pruner.report.items():
        assert set(entry["pruned_idxs"]) == _filter_pruned(masks[name]["weight"]), name

    # NNI's speedup drops a channel that is constant over the batch, so the BatchNorm shift after
    # a masked filter disappears with it: the model it reproduces is the one with that BatchNorm
    # channel zeroed too (batchnorm=True), not the one with only the conv filters masked.
    masked = apply_masks(copy.deepcopy(model), masks, batchnorm=True).eval()
    conv_only = apply_masks(copy.deepcopy(model), masks).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no coupled-mask conflict
        small = speedup(model, masks, torch.randn(8, *X32))

    assert not small.training
    assert sum(p.numel() for p in small.parameters()) < 0.5 * params_before
    x = torch.randn(16, *X32)
    with torch.no_grad():
        out, ref = small(x), masked(x)
        assert (out - ref).abs().max().item() <= 1e-4
        assert ref.abs().max().item() > 1e-2
        assert (conv_only(x) - ref).abs().max().item() > 1e-3  # the comparison can fail


def test_speedup_warns_when_coupled_masks_differ():
    torch.manual_seed(0)
    model = build_model("resnet20", width=0.25)
    pruner = PFGDFPruner(model, [{"op_types": ["Conv2d"]}], k=1.0)  # per-layer bands, no groups
    _, masks = pruner.compress()
    pruner.unwrap_model()
    with pytest.warns(RuntimeWarning, match="coupled"):
        speedup(model, masks, torch.randn(4, *X32))


def test_speedup_needs_unwrapped_traceable_model():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else -self.conv(x)

    model = Branchy()
    pruner = PFGDFPruner(model, [{"op_types": ["Conv2d"]}])
    _, masks = pruner.compress()
    with pytest.raises(RuntimeError, match="unwrap_model"):
        speedup(model, masks, torch.randn(2, 3, 8, 8))
    pruner.unwrap_model()
    with pytest.raises(RuntimeError, match="torch.fx could not trace Branchy"):
        speedup(model, masks, torch.randn(2, 3, 8, 8))


def test_bad_arguments():
    model = build_model("vgg16_bn", width=0.125)
    with pytest.raises(ValueError, match="k must be > 0"):
        PFGDFPruner(model, [{"op_types": ["Conv2d"]}], k=0)
    with pytest.raises(ValueError, match="constructor arguments"):
        PFGDFPruner(model, [{"op_types": ["Conv2d"], "k": 2.0}])
    with pytest.raises(ValueError, match="granularity"):
        PFGDFPruner(model, [{"op_types": ["Conv2d"], "granularity": "in_channel"}])
    assert not any(hasattr(m, "_nni_wrapper") for m in model.modules())  # left unwrapped


def test_import_does_not_import_nni():
    code = "import sys, pfgdf_plugin; assert 'nni' not in sys.modules, 'nni imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_speedup_refuses_a_model_that_would_not_fit_and_leaves_it_untouched(monkeypatch):
    import importlib

    speedup_module = importlib.import_module("pfgdf_plugin.nni.speedup")

    torch.manual_seed(0)
    model = build_model("vgg16_bn", width=0.125).train()
    pruner = PFGDFPruner(model, [{"op_types": ["Conv2d"]}], k=1.0)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    size = model_bytes(model)
    monkeypatch.setattr(speedup_module, "available_memory", lambda: int(3 * size))  # less than 4x
    with pytest.raises(pfgdf_plugin.MemoryBudgetError, match=r"needs about .* GB for VGG.*can allocate") as info:
        speedup(model, masks, torch.randn(2, *X32))
    assert isinstance(info.value, MemoryError)
    assert model.training  # the mode too
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # enough memory (or the check turned off): the same call prunes
    small = speedup(model, masks, torch.randn(2, *X32), check_memory=False)
    assert model_bytes(small) < size


def test_available_memory_follows_an_address_space_limit():
    code = ("import resource; from pfgdf_plugin.measure import available_memory; "
            "free = available_memory(); cap = 24 * 2 ** 30; resource.setrlimit(resource.RLIMIT_AS, (cap, cap)); "
            "capped = available_memory(); "
            "size = int([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmSize')][0]) * 1024; "
            "assert capped <= cap - size + 2 ** 20 and capped <= free + 2 ** 26, (free, capped, size); print('ok')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(pfgdf_plugin.__file__)))
    env = dict(os.environ, PYTHONPATH=root)  # this checkout's package
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
