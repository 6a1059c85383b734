"""MPD with ``prune.params.start: scratch``: no dense training, masks from the first step, the train
section's budget spent masked; its checks; block initialisation; the bench's scratch entries."""

import os
import sys

import pytest
import torch
import yaml

from pfgdf_plugin.config import ConfigError
from pfgdf_plugin.methods import mpd
from pfgdf_plugin.recipe import load_recipe
from pfgdf_plugin.runner import run_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "recipes", "mpd_lenet300_scratch.yaml")
TINY = ["data.name=digits", "data.image_size=8", "data.limit_train=512", "data.limit_test=128", "data.batch_size=32",
        "train.epochs=2", "finetune.epochs=0", "prune.params.max_epochs=0", "prune.params.compression=4.0",
        "report.latency=false", "report.plots=false", "export.onnx=false", "progress=false"]
SCRATCH_DESC = "mpd (masked training from scratch)"


def _record_training(monkeypatch):
    """Wrap every ``train`` a run can reach (the dense stage's and the pruning stage's); for each call
    record its description, epochs, and the masked layers' non-zero counts before and after."""
    calls = []
    dense_stage = run_recipe.__globals__["STAGES"][1]
    train_module = sys.modules["pfgdf_plugin.train"]
    real = train_module.train

    def nonzero(model):
        return {n: int((m.weight != 0).sum()) for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and n in ("fc1", "fc2")}

    def wrapper(model, loader, cfg, *args, **kwargs):
        entry = {"desc": kwargs.get("desc", "train"), "epochs": cfg.epochs, "before": nonzero(model),
                 "start": {n: model.get_submodule(n).weight.detach().clone() for n in ("fc1", "fc2", "fc3")}}
        if cfg.epochs > 0:  # a fine-tuning of 0 epochs trains nothing
            calls.append(entry)
        out = real(model, loader, cfg, *args, **kwargs)
        entry["after"] = nonzero(model)
        entry["weights"] = {n: model.get_submodule(n).weight.detach().clone() for n in ("fc1", "fc2", "fc3")}
        return out

    monkeypatch.setitem(dense_stage.__globals__, "train", wrapper)
    for module in list(sys.modules.values()):  # every pfgdf_plugin module holding train (bench, quantize, ...)
        if getattr(module, "__name__", "").startswith("pfgdf_plugin") and getattr(module, "train", None) is real:
            monkeypatch.setattr(module, "train", wrapper)
    return calls


def _record_conversion(monkeypatch, batch):
    """Wrap the Torch-Pruning MPDPruner's step(): the model's outputs on ``batch`` before and after conversion."""
    cls = sys.modules["pfgdf_plugin.torch_pruning.mpd"].MPDPruner
    real = cls.step
    seen = {}

    def step(self):
        self.model.eval()
        with torch.no_grad():
            seen["masked"] = self.model(batch)
        report = real(self)
        with torch.no_grad():
            seen["converted"] = self.model(batch)
        seen["types"] = {n: type(self.model.get_submodule(n)).__name__ for n in ("fc1", "fc2")}
        return report

    monkeypatch.setattr(cls, "step", step)
    return seen


def test_scratch_recipe_trains_masked_from_the_first_step_and_never_dense(tmp_path, monkeypatch):
    calls = _record_training(monkeypatch)
    seen = _record_conversion(monkeypatch, torch.randn(16, 1, 8, 8))
    recipe = load_recipe(RECIPE, TINY + [f"output_dir={tmp_path}"])
    assert recipe.prune.params["start"] == "scratch" and recipe.train.epochs == 2
    metrics = run_recipe(recipe, quiet=True)

    # no dense training: the one training is the pruning stage's, masked, with the train section's budget
    assert [c["desc"] for c in calls] == [SCRATCH_DESC]
    call = calls[0]
    assert call["epochs"] == 2
    # the masks were on before the first step: each layer kept about 1/4 of its weights already
    for name, before in call["before"].items():
        dense = metrics["layers"][name]["dense"]
        assert before <= metrics["layers"][name]["kept"] < dense / 3
    # after training every weight outside the blocks is still exactly zero, and the pattern is the plan's
    for name in ("fc1", "fc2"):
        w = call["weights"][name]
        assert call["after"][name] == metrics["layers"][name]["kept"]  # every kept weight trained, none outside
        assert mpd.plan_from_mask(name, (w != 0).float()).blocks == metrics["layers"][name]["blocks"] == 4
    # converted outputs equal the masked model's
    assert seen["types"] == {"fc1": "BlockDiagonalLinear", "fc2": "BlockDiagonalLinear"}
    torch.testing.assert_close(seen["converted"], seen["masked"], rtol=1e-5, atol=1e-5)
    assert metrics["mpd"]["start"] == "scratch" and metrics["mpd"]["block_init"] is True
    # the untrained "dense" model is what the run reports as before; the masked one learned
    assert metrics["after"]["accuracy"] > metrics["before"]["accuracy"] + 0.15


def test_start_dense_still_trains_the_dense_model_first(tmp_path, monkeypatch):
    calls = _record_training(monkeypatch)
    recipe = load_recipe(RECIPE, TINY + ["prune.params.start=dense", "prune.params.block_init=false",
                                         "prune.params.max_epochs=0.5", f"output_dir={tmp_path}"])
    run_recipe(recipe, quiet=True)
    assert [c["desc"] for c in calls] == ["train", "mpd (masked training)"]
    assert calls[0]["before"]["fc1"] == 64 * 300  # dense: nothing masked yet


@pytest.mark.parametrize("params,message", [
    ({"start": "later"}, r"prune.params.start must be one of dense, scratch; got 'later'"),
    ({"start": "dense", "block_init": True}, r"block_init rescales an initialisation: it needs start: scratch"),
    ({"start": "scratch", "permutation": "magnitude"}, r"permutation magnitude chooses blocks from trained weights"),
    ({"block_init": "maybe"}, r"prune.params.block_init"),
])
def test_bad_start_settings_are_named(params, message, tmp_path):
    sets = [f"prune.params.{k}={'true' if v is True else v}" for k, v in params.items()]
    with pytest.raises(ConfigError, match=message):
        load_recipe(RECIPE, TINY + sets + [f"output_dir={tmp_path}"])


def test_nni_scratch_trains_one_masked_phase_and_refuses_a_second(tmp_path, monkeypatch):
    base = TINY + ["prune.framework=nni", f"output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match=r"max_epochs must be 0 with start: scratch via nni \(got 0.5\)"):
        run_recipe(load_recipe(RECIPE, base + ["prune.params.max_epochs=0.5"]), quiet=True)
    calls = _record_training(monkeypatch)
    metrics = run_recipe(load_recipe(RECIPE, base + ["name=nni_scratch"]), quiet=True)
    assert [c["desc"] for c in calls] == ["mpd (masked training from scratch, NNI)"]
    assert calls[0]["epochs"] == 2
    assert metrics["mpd"]["start"] == "scratch" and metrics["mpd"]["compression"] >= 4.0
    assert metrics["after"]["accuracy"] > metrics["before"]["accuracy"] + 0.15


def test_block_init_scales_each_row_by_its_kept_fan_in():
    w = torch.arange(1.0, 13.0).reshape(3, 4)
    mask = torch.tensor([[1., 1., 1., 1.], [1., 0., 0., 0.], [0., 0., 1., 1.]])
    scale = mpd.block_init_(w, mask)
    assert scale.tolist() == pytest.approx([1.0, 2.0, 2 ** 0.5])
    assert w[1].tolist() == pytest.approx([10.0, 12.0, 14.0, 16.0])
    conv = torch.ones(2, 3, 2, 2)
    cmask = torch.zeros(2, 3, 2, 2)
    cmask[0, :1], cmask[1, 1:] = 1, 1  # fan-in 12; kept 4 and 8
    assert mpd.block_init_(conv, cmask).tolist() == pytest.approx([3 ** 0.5, 1.5 ** 0.5])
    with pytest.raises(ValueError, match=r"mask shape \(2, 2\) differs from weight shape \(3, 4\)"):
        mpd.block_init_(w, torch.ones(2, 2))


def test_pruner_init_blocks_restores_the_dense_activation_scale():
    from pfgdf_plugin.models import build_model
    from pfgdf_plugin.torch_pruning.mpd import MPDPruner

    torch.manual_seed(0)
    x = torch.randn(512, 1, 28, 28)
    dense = build_model("lenet300", in_channels=1, image_size=28)
    ref = dense.fc1(x.flatten(1)).std()
    masked = build_model("lenet300", in_channels=1, image_size=28)
    masked.load_state_dict(dense.state_dict())
    pruner = MPDPruner(masked, x[:1], blocks=10)
    low = masked.fc1(x.flatten(1)).std()
    pruner.init_blocks()
    fixed = masked.fc1(x.flatten(1)).std()
    assert low < 0.5 * ref  # 1/sqrt(10) of the weights' contribution, plus the bias
    assert 0.8 * ref < fixed < 1.25 * ref
    assert int((masked.fc1.weight != 0).sum()) == pruner.summary()["layers"]["fc1"]["kept"]


def test_bench_scratch_entry_starts_from_a_fresh_model(tmp_path, monkeypatch):
    from pfgdf_plugin.bench import run_bench

    calls = _record_training(monkeypatch)
    cfg = {
        "name": "scratch", "work_dir": str(tmp_path / "work"), "threads": [1], "repeats": 1, "warmup": 1,
        "progress": False, "onnxruntime": False, "batch_sizes": [1],
        "model": {"name": "lenet300"}, "data": {"name": "digits", "image_size": 8, "limit_train": 512,
                                                "limit_test": 128, "batch_size": 32},
        "train": {"epochs": 2, "lr": 0.05}, "finetune": {"epochs": 0},
        "entries": [{"label": "mpd scratch", "method": "mpd",
                     "params": {"compression": 4.0, "start": "scratch", "block_init": True, "max_epochs": 0}}],
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = run_bench(str(path), out_dir=str(tmp_path / "docs"))
    assert [(c["desc"], c["epochs"]) for c in calls] == [("train dense", 2), (SCRATCH_DESC, 2)]
    assert calls[1]["before"]["fc1"] <= res["rows"]["mpd scratch"]["layers"]["fc1"]["kept"]
    # a fresh start: the masked run did not begin from the trained dense weights (fc3 is neither masked nor rescaled)
    assert not torch.allclose(calls[1]["start"]["fc3"], calls[0]["weights"]["fc3"])
    assert res["rows"]["mpd scratch"]["summary"]["accuracy"] > 0.3
