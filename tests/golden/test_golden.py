"""Golden tests: for a fixed seed and model, every method keeps selecting the same channels, blocks
and masks. The fingerprints in ``golden.json`` were recorded from the code as it stood before a
restructuring; a change of behaviour shows up here as a changed weight tensor.

Regenerate (only for an intended change of behaviour, and say so in the commit):
``python tests/golden/test_golden.py --write``.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden.json")

# (model, method, framework, params, ratio)
CASES = [
    ("vgg16_bn", "pfgdf", "torch_pruning", {}, None),
    ("resnet20", "pfgdf", "torch_pruning", {"k": 1.5, "statistic": "l2", "min_channels": 3}, None),
    ("vgg16_bn", "pfgdf", "torch_pruning", {"mode": "tail", "group_reduction": "max"}, None),
    ("vgg16_bn", "pfgdf", "nni", {}, None),
    ("resnet20", "pfgdf", "nni", {"k": 0.8, "statistic": "abs_mean"}, None),
    ("resnet20", "spp", "torch_pruning", {"A": 0.5, "interval": 1, "max_epochs": 5.0}, 0.5),
    ("resnet20", "spp", "nni", {"A": 0.5, "interval": 1, "max_epochs": 5.0}, 0.5),
    ("vgg16_bn", "dbp", "torch_pruning", {"blocks": 3, "num_batches": 2}, None),
    ("resnet20", "dbp", "torch_pruning", {"macs": 1.3, "num_batches": 2, "reference": "input"}, None),
    ("resnet20", "dbp", "nni", {"blocks": 2, "num_batches": 2}, None),
    ("lenet300", "mpd", "torch_pruning", {"compression": 10.0, "max_epochs": 0.25}, None),
    ("lenet300", "mpd", "torch_pruning", {"compression": 4.0, "permutation": "magnitude", "max_epochs": 0.0}, None),
    ("vgg16_bn", "mpd", "torch_pruning", {"compression": 4.0, "max_epochs": 0.0}, None),
    ("resnet20", "mpd", "nni", {"compression": 2.0, "max_epochs": 0.25}, None),
    ("lenet300", "mpd", "nni", {"blocks": 4, "permutation": "magnitude", "max_epochs": 0.0}, None),
    ("vgg16_bn", "l1", "torch_pruning", {}, 0.4),
    ("resnet20", "l1", "nni", {}, 0.4),
]


def case_id(case) -> str:
    name, method, framework, params, ratio = case
    extra = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
    return f"{method}-{framework}-{name}[{extra}]" + (f"@{ratio}" if ratio is not None else "")


def fingerprint(model: torch.nn.Module) -> dict:
    """Shape, sum and sum of squares of every tensor of the state dict."""
    out = {}
    for key, t in model.state_dict().items():
        d = t.detach().double()
        out[key] = [list(t.shape), float(d.sum()), float(d.pow(2).sum())]
    return out


def _data():
    from pfgdf_plugin.data import build_dataset, make_loaders

    spec = build_dataset("digits", image_size=32, limit_train=256, limit_test=64)
    _, test = make_loaders(spec, 64)
    return spec, next(iter(test))[0]


def run_case(case, data) -> dict:
    from pfgdf_plugin.data import make_loaders
    from pfgdf_plugin.models import build_model
    from pfgdf_plugin.pruning import PruneContext, prune
    from pfgdf_plugin.train import TrainConfig

    name, method, framework, params, ratio = case
    spec, x = data
    train_loader, _ = make_loaders(spec, 64)  # fresh per case: no case depends on which ran before
    torch.manual_seed(0)
    dense = build_model(name, num_classes=spec.num_classes, in_channels=spec.in_channels, width=0.25)
    ctx = PruneContext(train_loader=train_loader, train_cfg=TrainConfig(epochs=1, lr=0.01))
    torch.manual_seed(1)
    pruned = prune(dense, x[:1], method, framework, dict(params), ratio, ctx=ctx).model.eval()
    with torch.no_grad():
        logits = pruned(x[:4]).double()
    return {"state": fingerprint(pruned), "logits_sum": float(logits.sum()), "logits_sq": float(logits.pow(2).sum())}


def direct_cases() -> dict:
    """The classes users call directly, outside the recipe registry."""
    import torch_pruning as tp
    import torchvision

    from pfgdf_plugin import GaussianImportance, PFGDFPruner

    out = {}
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    tp.pruner.MetaPruner(model, torch.randn(1, 3, 32, 32), importance=GaussianImportance(), pruning_ratio=0.5,
                         ignored_layers=[model.fc]).step()
    out["metapruner-gaussian-resnet18"] = {"state": fingerprint(model)}
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10)
    pruner = PFGDFPruner(model, torch.randn(1, 3, 32, 32), k=1.0, ignored_layers=[model.classifier])
    pruner.step()
    out["pfgdfpruner-mobilenet_v2"] = {"state": fingerprint(model),
                                       "report": {n: r["pruned_idxs"] for n, r in pruner.report.items()}}
    return out


def compute_all() -> dict:
    torch.set_num_threads(1)
    data = _data()
    out = {case_id(c): run_case(c, data) for c in CASES}
    out.update(direct_cases())
    return out


def _close(a, b, path="") -> list:
    """Differences between two fingerprints (relative tolerance 1e-4 on numbers)."""
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = [f"{path}: keys differ: {sorted(set(a) ^ set(b))[:5]}"] if set(a) != set(b) else []
        for k in set(a) & set(b):
            diffs += _close(a[k], b[k], f"{path}/{k}")
        return diffs
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {a} != {b}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _close(x, y, f"{path}[{i}]")]
    if isinstance(a, float) or isinstance(b, float):
        ok = abs(float(a) - float(b)) <= 1e-4 * max(1.0, abs(float(a)), abs(float(b)))
        return [] if ok else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.fixture(scope="module")
def golden():
    with open(GOLDEN, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    return _data()


# SPP ranks channels anew at every step of its 5 epochs of training, so a rounding difference
# between CPUs (matmul and convolution kernels differ with the vector instructions) can flip a rank
# and send training elsewhere: its trained values differ across machines by several percent, while
# what it keeps per layer does not. Its cases compare the structure: every tensor's shape.
TRAINED = ("spp",)


def _shapes(fingerprint_: dict) -> dict:
    return {key: value[0] for key, value in fingerprint_["state"].items()}


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_method_selects_what_it_selected_before(case, data, golden):
    got = run_case(case, data)
    if case[1] in TRAINED:
        diffs = _close(_shapes(golden[case_id(case)]), _shapes(got))
    else:
        diffs = _close(golden[case_id(case)], got)
    assert not diffs, "\n".join(sorted(diffs)[:10])


def test_direct_api_selects_what_it_selected_before(golden):
    got = direct_cases()
    diffs = []
    for key, value in got.items():
        diffs += _close(golden[key], value, key)
    assert not diffs, "\n".join(sorted(diffs)[:10])


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit("usage: python tests/golden/test_golden.py --write")
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    result = compute_all()
    with open(GOLDEN, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=0, sort_keys=True)
    print(f"wrote {len(result)} fingerprints to {GOLDEN}")
