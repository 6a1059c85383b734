"""Run tracking (curves.csv, TensorBoard when installed) and `pfgdf-plugin compare`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess

import pytest
import torch

from pfgdf_plugin.compare import compare_runs
from pfgdf_plugin.errors import RunError
from pfgdf_plugin.recipe import load_recipe
from pfgdf_plugin.runner import run_recipe
from pfgdf_plugin.tracking import CURVE_COLUMNS, CurveWriter, read_curves
from pfgdf_plugin.train import recording

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_RECIPE = os.path.join(ROOT, "recipes", "pfgdf_vgg16.yaml")
TINY = ["data.name=digits", "model.width=0.25", "data.limit_train=256", "data.limit_test=128", "data.batch_size=64",
        "train.epochs=1", "finetune.epochs=1", "report.repeats=2", "report.warmup=1", "progress=false"]
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    dirs = []
    for name, k, epochs in (("pfgdf_k1", "1.0", "2"), ("pfgdf_k15", "1.5", "1")):
        recipe = load_recipe(DEFAULT_RECIPE, TINY + [f"output_dir={out}", f"name={name}", f"prune.params.k={k}",
                                                     f"finetune.epochs={epochs}", "export.onnx=false",
                                                     "report.batch_sizes=[1]", "report.plots=false"])
        dirs.append(run_recipe(recipe, quiet=True)["run_dir"])
    return dirs


def test_every_run_writes_its_curves(two_runs):
    run = two_runs[0]
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert metrics["curves"] == "curves.csv"
    with open(os.path.join(run, "curves.csv")) as f:
        assert f.readline().strip() == ",".join(CURVE_COLUMNS)
    rows = read_curves(os.path.join(run, "curves.csv"))
    assert [(r["phase"], r["epoch"], r["step"]) for r in rows] == [
        ("train", 1.0, 4.0), ("fine-tune", 1.0, 4.0), ("fine-tune", 2.0, 8.0)]
    for r in rows:
        assert r["loss"] > 0 and 0 <= r["train_accuracy"] <= 1 and r["lr"] > 0
        assert r["pruned_channels"] == 0 and r["masked_weights"] == 0
    assert rows[0]["test_accuracy"] is None  # the dense training is not evaluated every epoch
    assert [r["test_accuracy"] for r in rows[1:]] == pytest.approx([e["accuracy"] for e in metrics["finetune_log"]])
    assert rows[2]["lr"] < rows[1]["lr"]  # the cosine schedule
    tb = os.path.join(run, "tensorboard")
    assert os.path.isdir(tb) == HAS_TENSORBOARD


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_tensorboard_event_files(tmp_path):
    w = CurveWriter(str(tmp_path))
    w({"phase": "fine-tune", "epoch": 1.0, "step": 3, "loss": 0.5, "lr": 0.1, "train_accuracy": 0.5},
      torch.nn.Linear(2, 2))
    w.close()
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "tensorboard"))


def _digits():
    from pfgdf_plugin.data import build_dataset, make_loaders

    spec = build_dataset("digits", image_size=32, limit_train=256, limit_test=64)
    train, test = make_loaders(spec, 64)
    return spec, train, next(iter(test))[0][:1]


@pytest.mark.parametrize("name,method,params,ratio,phase", [
    ("resnet20", "spp", {"A": 0.5, "interval": 1, "max_epochs": 5.0}, 0.5, "spp (pruning)"),
    ("lenet300", "mpd", {"compression": 10.0, "max_epochs": 0.5}, None, "mpd (masked training)"),
])
def test_pruning_progress_is_in_the_curves(tmp_path, name, method, params, ratio, phase):
    from pfgdf_plugin.models import build_model
    from pfgdf_plugin.pruning import PruneContext, prune
    from pfgdf_plugin.train import TrainConfig

    spec, train, x = _digits()
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=1, width=0.25)
    writer = CurveWriter(str(tmp_path), tensorboard=False)
    with recording(writer):
        prune(model, x, method, "torch_pruning", params, ratio,
              ctx=PruneContext(train_loader=train, train_cfg=TrainConfig(epochs=1, lr=0.01)))
    rows = read_curves(writer.path)
    assert rows and {r["phase"] for r in rows} == {phase}
    if method == "spp":  # channels reach p = 1 and are zeroed as training goes on
        shares = [r["pruned_channels"] for r in rows]
        assert shares == sorted(shares) and 0 < shares[-1] < 1 and rows[-1]["masked_weights"] >= shares[-1] * 0.5
    else:  # the weights outside MPD's blocks are masked during its training
        assert rows[-1]["epoch"] == 0.5 and rows[-1]["masked_weights"] > 0.8


def _cli(capsys, *args):
    """The command line's ``main`` in this process: ``(exit code, stdout, stderr)`` (an exception it lets
    escape fails the test, as a traceback would)."""
    from pfgdf_plugin.cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_compare_prints_a_table_and_writes_the_plot(two_runs, tmp_path, capsys):
    plot = tmp_path / "plots" / "runs.png"
    r = _cli(capsys, "compare", *two_runs, "--out", str(plot))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["run", "method", "framework", "model"] and "latency" in lines[0]
    body = [line for line in lines[2:] if line.startswith("pfgdf_k")]
    assert [line.split()[0] for line in body] == ["pfgdf_k1", "pfgdf_k15"]
    assert all("pfgdf" in line and "torch_pruning" in line and "(b1)" in line for line in body)
    assert "k=1.0" in body[0] and "k=1.5" in body[1] and "ft=2" in body[0]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run, line in zip(two_runs, body):
        m = json.load(open(os.path.join(run, "metrics.json")))
        assert f"{100 * m['before']['accuracy']:.2f}" in line and f"{100 * m['after']['accuracy']:.2f}" in line
    table, path = compare_runs(two_runs, None)
    assert path is None and table.splitlines()[2:] == lines[2:4]


def test_compare_refuses_a_folder_that_is_not_a_run(two_runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    plot = tmp_path / "runs.png"
    r = _cli(capsys, "compare", two_runs[0], str(tmp_path / "empty"), "--out", str(plot))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "empty is not a run folder (no metrics.json)" in r.stderr
    assert not plot.exists()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{\"method\": \"pfgdf\"}")
    with pytest.raises(RunError, match=r"broken is not a run folder \(metrics.json has no 'framework', 'before'"):
        compare_runs([str(tmp_path / "broken")], str(plot))
    with pytest.raises(RunError, match="no such folder"):
        compare_runs([str(tmp_path / "missing")], str(plot))
    assert not plot.exists()
