"""Killed runs: checkpoints stay intact and `--resume` reaches the uninterrupted result."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pfgdf_plugin.recipe import load_recipe
from pfgdf_plugin.runner import RunError, run_recipe
from pfgdf_plugin.train import Checkpointing, TrainConfig, read_checkpoint, train

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "recipes", "pfgdf_vgg16.yaml")
SETTINGS = ["data.name=digits", "model.width=0.25", "data.limit_train=1024", "data.limit_test=128",
            "data.batch_size=32", "train.epochs=1", "finetune.epochs=4", "checkpoint_every=4",
            "report.latency=false", "export.onnx=false", "report.plots=false", "progress=false"]


def _state(run_dir):
    return torch.load(os.path.join(run_dir, "pruned.pt"), weights_only=True)["state_dict"]


def _kill_when(cmd, path):
    """Start ``cmd``, SIGKILL it as soon as ``path`` exists; return its exit code."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    deadline = time.monotonic() + 240
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.returncode


def test_train_resumes_mid_epoch_to_the_same_weights(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    def setup():
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(40, 6), torch.randint(0, 3, (40,)))
        net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3))
        return net, DataLoader(data, batch_size=8, shuffle=True, generator=g)

    cfg = TrainConfig(epochs=3, lr=0.1)
    ref, loader = setup()
    train(ref, loader, cfg, progress=False)

    net, loader = setup()
    path = str(tmp_path / "c.pt")
    stop_at = 7  # mid second epoch (5 steps an epoch)
    train(net, loader, cfg, progress=False, checkpoint=Checkpointing(path, every=1),
          on_step=lambda step, loss: step >= stop_at)
    assert read_checkpoint(path)["step"] == stop_at
    again, loader = setup()
    train(again, loader, cfg, progress=False, checkpoint=Checkpointing(path, every=1))
    for a, b in zip(ref.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_sigkill_during_finetuning_then_resume_matches_uninterrupted(tmp_path):
    ref = run_recipe(load_recipe(RECIPE, SETTINGS + [f"output_dir={tmp_path / 'ref'}"]), quiet=True)

    out = tmp_path / "killed"
    stage = out / ".pfgdf_vgg16.partial"
    ckpt = stage / "finetune.ckpt.pt"
    cmd = [sys.executable, "-m", "pfgdf_plugin", "run", RECIPE, "--quiet"]
    cmd += [w for s in SETTINGS + [f"output_dir={out}"] for w in ("--set", s)]
    assert _kill_when(cmd, ckpt) == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "pfgdf_vgg16").exists()

    # the last checkpoint is intact and mid-way
    state = read_checkpoint(str(ckpt))
    total = 4 * 32
    assert 0 < state["step"] < total
    assert (stage / "dense.pt").exists() and (stage / "pruned-init.pt").exists()

    recipe = load_recipe(RECIPE, SETTINGS + [f"output_dir={out}"])
    with pytest.raises(RunError, match="an interrupted run of 'pfgdf_vgg16' is waiting in .*--resume"):
        run_recipe(recipe, quiet=True)
    changed = load_recipe(RECIPE, SETTINGS + [f"output_dir={out}", "finetune.lr=0.5"])
    with pytest.raises(RunError, match="recipe differs from the interrupted run's at finetune.lr"):
        run_recipe(changed, quiet=True, resume=True)

    resumed = run_recipe(recipe, quiet=True, resume=True)
    assert not stage.exists()
    assert [e["epoch"] for e in resumed["finetune_log"]] == [1, 2, 3, 4]
    a, b = _state(ref["run_dir"]), _state(resumed["run_dir"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    assert resumed["after"]["accuracy"] == pytest.approx(ref["after"]["accuracy"], abs=1e-9)
    assert not any(f.endswith(".ckpt.pt") for f in os.listdir(resumed["run_dir"]))


SPP_RECIPE = os.path.join(ROOT, "recipes", "spp_resnet56.yaml")
SPP_SETTINGS = ["data.name=digits", "model.name=resnet20", "model.width=0.5", "data.limit_train=1024",
                "data.limit_test=128", "data.batch_size=32", "train.epochs=1", "finetune.epochs=1",
                "prune.params.A=0.1", "prune.params.interval=1", "prune.params.max_epochs=3", "checkpoint_every=2",
                "report.latency=false", "export.onnx=false", "report.plots=false", "progress=false"]


def test_sigkill_during_spp_pruning_resumes_its_probabilities_and_generator(tmp_path):
    ref = run_recipe(load_recipe(SPP_RECIPE, SPP_SETTINGS + [f"output_dir={tmp_path / 'ref'}"]), quiet=True)

    out = tmp_path / "killed"
    stage = out / ".spp_resnet56.partial"
    cmd = [sys.executable, "-m", "pfgdf_plugin", "run", SPP_RECIPE, "--quiet"]
    cmd += [w for s in SPP_SETTINGS + [f"output_dir={out}"] for w in ("--set", s)]
    assert _kill_when(cmd, stage / "prune.ckpt.pt") == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (stage / "pruned-init.pt").exists(), "killed after the pruning phase, not during it"
    state = read_checkpoint(str(stage / "prune.ckpt.pt"))
    assert 0 < state["extra"]["spp"]["steps"] < ref["spp"]["steps"]

    resumed = run_recipe(load_recipe(SPP_RECIPE, SPP_SETTINGS + [f"output_dir={out}"]), quiet=True, resume=True)
    assert resumed["spp"] == ref["spp"]
    assert resumed["after"]["filters_per_layer"] == ref["after"]["filters_per_layer"]
    a, b = _state(ref["run_dir"]), _state(resumed["run_dir"])
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k


def test_resume_without_an_interrupted_run_is_an_error(tmp_path):
    with pytest.raises(RunError, match="--resume: no interrupted run of 'pfgdf_vgg16'"):
        run_recipe(load_recipe(RECIPE, SETTINGS + [f"output_dir={tmp_path}"]), quiet=True, resume=True)
