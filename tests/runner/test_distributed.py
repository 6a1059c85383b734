"""torchrun with two CPU processes (gloo): data-parallel fine-tuning keeps every rank identical.

Each rank writes digests of its own pruned and fine-tuned weights (the driver below wraps the
runner's pruning and fine-tuning steps); the test compares those files itself, independently of
the equality flags the run computes about itself.
"""

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

DRIVER = '''
import hashlib, os, sys
from pfgdf_plugin.cli import main
from pfgdf_plugin.runner import stages

out, rank = sys.argv[1], os.environ["RANK"]


def write(what, model):
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    with open(os.path.join(out, f"{what}-rank{rank}.sha256"), "w") as f:
        f.write(h.hexdigest())


prune_and_score, finetune = stages.prune_and_score, stages.finetune


def prune_and_score_and_write(*args, **kwargs):
    result = prune_and_score(*args, **kwargs)
    write("pruned", result[0].model)
    return result


def finetune_and_write(model, *args, **kwargs):
    finetune(model, *args, **kwargs)
    write("finetuned", model)


stages.prune_and_score, stages.finetune = prune_and_score_and_write, finetune_and_write
sys.exit(main(sys.argv[2:]))
'''


def test_torchrun_two_ranks_prune_and_finetune_identically(tmp_path):
    digests = tmp_path / "digests"
    digests.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(driver), str(digests), "run", RECIPE]
    cmd += [w for s in SETTINGS + [f"output_dir={tmp_path / 'runs'}"] for w in ("--set", s)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # what each rank wrote, compared here
    assert sorted(os.listdir(digests)) == ["finetuned-rank0.sha256", "finetuned-rank1.sha256",
                                           "pruned-rank0.sha256", "pruned-rank1.sha256"]
    for what in ("pruned", "finetuned"):
        ranks = [(digests / f"{what}-rank{r}.sha256").read_text() for r in (0, 1)]
        assert len(ranks[0]) == 64 and ranks[0] == ranks[1], what
    assert (digests / "pruned-rank0.sha256").read_text() != (digests / "finetuned-rank0.sha256").read_text()
    runs = os.listdir(tmp_path / "runs")
    assert runs == ["spp_resnet56"], runs  # one run folder, written by rank 0 only
    metrics = json.load(open(tmp_path / "runs" / "spp_resnet56" / "metrics.json"))
    assert metrics["distributed"]["world_size"] == 2
    assert metrics["spp"]["finished"] and metrics["after"]["params"] < metrics["before"]["params"]
    assert [e["epoch"] for e in metrics["finetune_log"]] == [1, 2]
    state = torch.load(tmp_path / "runs" / "spp_resnet56" / "pruned.pt", weights_only=True)
    assert "state_dict" in state
