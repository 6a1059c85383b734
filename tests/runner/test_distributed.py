"""torchrun with two CPU processes (gloo): data-parallel fine-tuning keeps every rank identical."""

import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "recipes", "spp_resnet56.yaml")
SETTINGS = ["data.name=digits", "model.name=resnet20", "model.width=0.25", "data.limit_train=256",
            "data.limit_test=128", "data.batch_size=64", "train.epochs=1", "finetune.epochs=2",
            "prune.params.A=0.5", "prune.params.interval=1", "prune.params.max_epochs=5",
            "report.latency=false", "export.onnx=false", "report.plots=false", "progress=false"]


def test_torchrun_two_ranks_prune_and_finetune_identically(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pfgdf_plugin", "run", RECIPE]
    cmd += [w for s in SETTINGS + [f"output_dir={tmp_path}"] for w in ("--set", s)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [d for d in os.listdir(tmp_path)]
    assert runs == ["spp_resnet56"], runs  # one run folder, written by rank 0 only
    metrics = json.load(open(tmp_path / "spp_resnet56" / "metrics.json"))
    d = metrics["distributed"]
    assert d == {"world_size": 2, "pruned_identical": True, "spp_probabilities_identical": True,
                 "finetuned_identical": True}
    assert metrics["spp"]["finished"] and metrics["after"]["params"] < metrics["before"]["params"]
    assert [e["epoch"] for e in metrics["finetune_log"]] == [1, 2]
    state = torch.load(tmp_path / "spp_resnet56" / "pruned.pt", weights_only=True)
    assert "state_dict" in state
