"""DBP through NNI's conventions: config_list selection, evaluator data, quantizing the result."""

import nni
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from nni.compression.quantization import PtqQuantizer, QATQuantizer
from nni.compression.utils import TorchEvaluator

from pfgdf_plugin.measure import count_macs
from pfgdf_plugin.methods import dbp
from pfgdf_plugin.models import build_model
from pfgdf_plugin.nni.dbp import DBPPruner, capture_batches

torch.set_num_threads(1)  # the cores are shared; small convolutions run faster on one thread

X32 = (3, 32, 32)
QCFG = [{"op_types": ["Conv2d", "Linear"], "target_names": ["_input_", "weight", "_output_"],
         "quant_dtype": "int8", "quant_scheme": "affine"}]


def _batches(n=6, batch=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, batch, *X32, generator=g), torch.stack([torch.randperm(batch, generator=g) % 10
                                                                   for _ in range(n)])


def training_step(batch, model):
    return F.cross_entropy(model(batch[0]), batch[1])


def _evaluator(model, log=None):
    xs, ys = _batches()

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        model.train()
        for step in range(max_steps or len(xs)):
            optimizers.zero_grad()
            training_step((xs[step % len(xs)], ys[step % len(xs)]), model).backward()
            optimizers.step()
            if log is not None:
                log.append(step)

    def evaluating_func(model):
        model.eval()
        with torch.no_grad():
            return float((model(xs[0]).argmax(1) == ys[0]).float().mean())

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.1, momentum=0.9)
    return TorchEvaluator(training_func, optimizer, training_step, dummy_input=torch.randn(1, *X32),
                          evaluating_func=evaluating_func)


def _data():
    xs, ys = _batches()
    return list(zip(xs, ys))


@pytest.mark.parametrize("entry,count", [
    ({"op_types": ["Conv2d"], "sparse_ratio": 0.5}, 4),        # floor(0.5 * 9)
    ({"op_types": ["BatchNorm2d"], "sparse_ratio": 1}, 9),     # int ratio cast to float
    ({"op_names": ["features.3", "features.10", "features.40"], "sparse_ratio": 0.7}, 2),
    ({"op_names_re": [r"features\.[34]\d"], "exclude_op_names": ["features.40"], "sparse_ratio": 1.0}, 3),
])
def test_sparse_ratio_removes_that_share_of_the_selected_blocks(entry, count):
    model = build_model("vgg16_bn", width=0.25)
    pruner = DBPPruner(model, [entry], data=_data(), num_batches=3)
    selected = {b.name for b in pruner.blocks}
    out, masks = pruner.compress()
    assert out is model and masks == {}
    assert len(pruner.removed) == count
    assert set(pruner.removed) <= selected
    modules = dict(model.named_modules())
    for name, row in pruner.report.items():
        assert row["removed"] == (name in pruner.removed)
        assert all(isinstance(modules[m], nn.Identity) == row["removed"] for m in row["members"])
    # the least discriminative of the selected blocks go
    ranks = sorted(row["rank"] for row in pruner.report.values())
    assert sorted(pruner.report[n]["rank"] for n in pruner.removed) == ranks[:count]
    assert model(torch.randn(2, *X32)).shape == (2, 10)


def test_entries_have_their_own_quota_and_exclude_entries_apply():
    model = build_model("resnet56", width=0.25)
    cfg = [{"op_names_re": [r"layer1\.\d"], "sparse_ratio": 0.5},
           {"op_names_re": [r"layer3\.\d"], "sparse_ratio": 0.25},
           {"exclude": True, "op_names": ["layer3.8"]}]
    pruner = DBPPruner(model, cfg, data=_data(), num_batches=2)
    assert len(pruner.blocks) == 9 + 7  # layer3.0 downsamples, layer3.8 is excluded
    pruner.compress()
    assert sum(n.startswith("layer1.") for n in pruner.removed) == 4
    assert sum(n.startswith("layer3.") for n in pruner.removed) == 1
    assert "layer3.8" not in pruner.removed


def test_named_op_outside_the_discovered_blocks_is_a_verified_candidate():
    model = build_model("resnet20", width=0.25)
    pruner = DBPPruner(model, [{"op_names": ["layer1.0.bn1"], "sparse_ratio": 1.0}], data=_data(), num_batches=2)
    assert [(b.name, b.kind) for b in pruner.blocks] == [("layer1.0.bn1", "named")]
    pruner.compress()
    assert isinstance(model.layer1[0].bn1, nn.Identity)
    with pytest.raises(dbp.DBPError, match=r"candidate layer2.0 changes the shape"):
        DBPPruner(build_model("resnet20", width=0.25), [{"op_names": ["layer2.0"], "sparse_ratio": 1.0}],
                  data=_data())


def test_global_target_instead_of_ratios():
    model = build_model("resnet20", width=0.25)
    pruner = DBPPruner(model, [{"op_types": ["BasicBlock"]}], data=_data(), target={"macs": 1.2}, num_batches=2)
    pruner.compress()
    assert pruner.result.plan.macs_ratio >= 1.2
    # the same counter as the Torch-Pruning DBPPruner (Torch-Pruning's), so targets agree across frameworks
    assert count_macs(build_model("resnet20", width=0.25), torch.randn(1, *X32)) / count_macs(
        model, torch.randn(1, *X32)) == pytest.approx(pruner.result.plan.macs_ratio)


@pytest.mark.parametrize("cfg,kwargs,error,match", [
    ([{"op_types": ["BasicBlock"], "sparse_ratio": 0.5, "k": 1.0}], {}, ValueError, "unknown key"),
    ([{"op_types": ["BasicBlock"], "sparse_ratio": 0.5, "target": {"blocks": 1}}], {}, ValueError,
     "constructor arguments"),
    ([{"op_types": ["BasicBlock"]}], {}, ValueError, r"needs 'sparse_ratio'"),
    ([{"op_types": ["BasicBlock"], "sparse_ratio": 1.5}], {}, ValueError,
     r"'sparse_ratio' must be in \[0, 1\], got 1.5"),
    ([{"op_types": ["BasicBlock"], "sparse_ratio": 0.5}], {"target": {"blocks": 1}}, ValueError,
     "has 'sparse_ratio' but target= is given"),
    ([{"sparse_ratio": 0.5}], {}, ValueError, "selects no blocks"),
    ([{"op_types": ["Bottleneck"], "sparse_ratio": 0.5}], {}, dbp.DBPError, "selects none of the removable blocks"),
])
def test_bad_config_names_the_problem(cfg, kwargs, error, match):
    with pytest.raises(error, match=match):
        DBPPruner(build_model("resnet20", width=0.25), cfg, data=_data(), **kwargs)


def test_evaluator_supplies_the_data_without_training_the_model():
    model = build_model("resnet20", width=0.25)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    steps = []
    evaluator = _evaluator(model, steps)
    pruner = DBPPruner(model, [{"op_types": ["BasicBlock"], "sparse_ratio": 0.5}], evaluator, num_batches=4)
    model, masks = pruner.compress()
    assert masks == {} and len(pruner.removed) == 3
    assert steps == [0, 1, 2]  # the fourth batch stopped the loop before its optimizer step
    assert pruner.result.info["samples"] == 4 * 20
    now = model.state_dict()
    assert now and all(torch.equal(now[k], state[k]) for k in now)  # kept weights untouched: no training

    # the same probes from the same batches given directly
    direct = build_model("resnet20", width=0.25)
    direct.load_state_dict(state)
    other = DBPPruner(direct, [{"op_types": ["BasicBlock"], "sparse_ratio": 0.5}], data=_data(), num_batches=4)
    other.compress()
    assert other.removed == pruner.removed
    assert other.report == pruner.report


def test_capture_batches_refuses_unlabelled_batches():
    model = build_model("resnet20", width=0.25)

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        training_step(torch.randn(4, *X32), model)

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.1)
    evaluator = TorchEvaluator(training_func, optimizer, lambda batch, model: model(batch).sum())
    with pytest.raises(dbp.DBPError, match="must be \\(inputs, labels\\) tuples"):
        capture_batches(evaluator, model, 2)


@pytest.mark.parametrize("quantizer", ["qat", "ptq"])
def test_pruned_model_quantizes_with_nni(quantizer):
    torch.manual_seed(0)
    model = build_model("resnet20", width=0.25)
    evaluator = _evaluator(model)
    pruner = DBPPruner(model, [{"op_types": ["BasicBlock"], "sparse_ratio": 0.5}], evaluator, num_batches=3)
    model, _ = pruner.compress()
    if quantizer == "qat":
        q = QATQuantizer(model, QCFG, evaluator)
        _, calibration = q.compress(max_steps=3, max_epochs=None)
    else:
        q = PtqQuantizer(model, QCFG, evaluator)
        _, calibration = q.compress(max_steps=2, max_epochs=None)
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(calibration) == convs | {"fc"}
    for name in pruner.removed:
        assert not any(n.startswith(name + ".") for n in calibration)
    for targets in calibration.values():
        for info in targets.values():
            assert float(info["scale"]) > 0 and bool(torch.isfinite(info["scale"]).all())
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(4, *X32))
    assert y.shape == (4, 10) and bool(torch.isfinite(y).all())


def test_overlapping_selection_is_refused():
    with pytest.raises(dbp.DBPError, match="selects block 'layer1.0' and 'layer1.0.bn1', which overlap"):
        DBPPruner(build_model("resnet20", width=0.25),
                  [{"op_types": ["BasicBlock"], "sparse_ratio": 0.5},
                   {"op_names": ["layer1.0.bn1"], "sparse_ratio": 1.0}],
                  data=_data())
