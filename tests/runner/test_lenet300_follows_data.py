"""recipes/mpd_lenet300.yaml at LeNet-300-100's own 28x28 (784 inputs) runs end to end and reloads."""

import os

import torch

from pfgdf_plugin.persist import load_pruned
from pfgdf_plugin.recipe import load_recipe
from pfgdf_plugin.runner import run_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "recipes", "mpd_lenet300.yaml")
TINY = ["data.name=digits", "data.limit_train=256", "data.limit_test=64", "data.batch_size=64", "train.epochs=1",
        "finetune.epochs=0.25", "prune.params.max_epochs=0.25", "report.repeats=2", "report.warmup=1",
        "report.latency=false", "report.plots=false", "export.onnx=false", "progress=false"]


def test_mpd_lenet300_runs_at_28x28(tmp_path):
    recipe = load_recipe(RECIPE, ["data.image_size=28", *TINY, f"output_dir={tmp_path}"])
    metrics = run_recipe(recipe, quiet=True)
    assert metrics["before"]["params"] == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert metrics["mpd"]["compression"] > 2
    model, _ = load_pruned(os.path.join(metrics["run_dir"], "pruned.pt"))
    assert model.fc1.in_features == 784
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
