"""MPDCompress 10x on LeNet-300-100 / Fashion-MNIST: masked training from scratch against dense,
at equal total epochs.

Each setting is a line of ``--runs`` (``key=value`` pairs separated by commas), e.g.
``mode=scratch,epochs=20,lr=0.05,block_init=1``. Keys:

- ``mode``: ``dense`` (the baseline), ``scratch`` (masks from initialisation, every epoch
  masked), ``after`` (``dense_epochs`` dense, then the masks, then the rest masked);
- ``epochs`` (total), ``dense_epochs`` (``after`` only), ``lr``, ``wd``, ``batch``, ``schedule``,
  ``optimizer``, ``momentum``, ``ls`` (label smoothing);
- ``perm``: ``random`` or ``magnitude`` (``after`` only: it needs trained weights);
- ``block_init``: 1 rescales every masked row for its kept fan-in (:func:`block_init_`);
- ``ft_lr``: the masked phase's lr in ``after`` mode (default ``lr``; own cosine schedule).

Data: all 60,000 training and 10,000 test images at 28x28 (784 inputs), through
``pfgdf_plugin.data`` (in memory), the training order seeded by the seed. The seed also fixes
the initialisation and the permutations. One CPU thread. Prints and appends one JSON line per
(setting, seed) to ``--out``.

Usage::

    .venv/bin/python scripts/mpd_scratch_study.py --seeds 0 1 --out runs/mpd_scratch.jsonl \\
        --runs "mode=dense,epochs=20" "mode=scratch,epochs=20,block_init=1"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pfgdf_plugin.data import build_dataset, make_loaders  # noqa: E402
from pfgdf_plugin.measure import evaluate  # noqa: E402
from pfgdf_plugin.methods.mpd.init import block_init_  # noqa: E402
from pfgdf_plugin.models import build_model  # noqa: E402
from pfgdf_plugin.torch_pruning.mpd import MPDPruner  # noqa: E402
from pfgdf_plugin.train import TrainConfig, seed_everything, train  # noqa: E402

DEFAULTS = {"mode": "scratch", "epochs": 20.0, "dense_epochs": 0.0, "lr": 0.05, "wd": 5e-4, "batch": 128,
            "schedule": "cosine", "optimizer": "sgd", "momentum": 0.9, "ls": 0.0, "perm": "random",
            "block_init": 0, "ft_lr": None, "compression": 10.0}


def parse(line: str) -> Dict[str, Any]:
    out = dict(DEFAULTS)
    for item in filter(None, line.split(",")):
        k, v = item.split("=")
        if k not in out:
            raise SystemExit(f"unknown key {k!r}; known: {', '.join(out)}")
        out[k] = v if k in ("mode", "schedule", "optimizer", "perm") else float(v)
    out["batch"] = int(out["batch"])
    return out


def cfg_of(s: Dict[str, Any], epochs: float, lr: float) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=lr, optimizer=s["optimizer"], momentum=s["momentum"],
                       weight_decay=s["wd"], schedule=s["schedule"], label_smoothing=s["ls"])


def one(s: Dict[str, Any], seed: int, spec) -> Dict[str, Any]:
    seed_everything(seed)
    train_loader, test_loader = make_loaders(spec, s["batch"], seed=seed)
    model = build_model("lenet300", num_classes=10, in_channels=1, image_size=28)
    example = torch.randn(1, 1, 28, 28)
    t = time.perf_counter()
    pruner = None
    if s["mode"] == "dense":
        train(model, train_loader, cfg_of(s, s["epochs"], s["lr"]), progress=False)
    elif s["mode"] == "scratch":
        pruner = MPDPruner(model, example, compression=s["compression"], permutation="random", seed=seed)
        if s["block_init"]:
            for name, mask in pruner.masks().items():
                block_init_(model.get_submodule(name).weight, mask)
        train(model, train_loader, cfg_of(s, s["epochs"], s["lr"]), progress=False,
              on_step=lambda step, loss: pruner.update())
    else:  # after
        d = s["dense_epochs"]
        train(model, train_loader, cfg_of(s, d, s["lr"]), progress=False)
        pruner = MPDPruner(model, example, compression=s["compression"], permutation=s["perm"], seed=seed)
        train(model, train_loader, cfg_of(s, s["epochs"] - d, s["ft_lr"] or s["lr"]), progress=False,
              on_step=lambda step, loss: pruner.update())
    acc = evaluate(model, test_loader, progress=False)["accuracy"]
    out = {"setting": {k: v for k, v in s.items()}, "seed": seed, "accuracy": acc,
           "train_s": time.perf_counter() - t}
    if pruner is not None:
        masked = evaluate(model, test_loader, progress=False)["accuracy"]
        report = pruner.step()
        out["converted_accuracy"] = evaluate(model, test_loader, progress=False)["accuracy"]
        out["masked_accuracy"] = masked
        out["compression"] = report["compression"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "mpd_scratch_study.jsonl"))
    args = p.parse_args()
    torch.set_num_threads(1)
    spec = build_dataset("fashion_mnist", image_size=28, in_channels=1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for line in args.runs:
        s = parse(line)
        for seed in args.seeds:
            r = one(s, seed, spec)
            r["run"] = line
            print(json.dumps({"run": line, "seed": seed, "accuracy": round(100 * r["accuracy"], 2),
                              "converted": round(100 * r.get("converted_accuracy", r["accuracy"]), 2),
                              "s": round(r["train_s"], 1)}), flush=True)
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
