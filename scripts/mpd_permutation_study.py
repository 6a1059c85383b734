"""MPDCompress: random versus magnitude permutations on LeNet-300-100 / Fashion-MNIST.

What it measures. For each seed (0, 1, 2):

1. trains a dense LeNet-300-100 (784-300-100-10, 28x28 inputs, no padding) for 3 epochs on the
   full Fashion-MNIST training split (60,000 images; SGD, lr 0.05, Nesterov momentum 0.9,
   weight decay 5e-4, cosine schedule, batch 128), and scores it on the 10,000 test images;
2. as a reference, trains a copy of that dense model 2 more epochs (lr 0.01, otherwise the same);
3. for ``permutation`` in ``random`` and ``magnitude``, on a copy of the trained dense model:
   builds ``pfgdf_plugin.torch_pruning.mpd.MPDPruner(compression=10.0)`` (fc1 and fc2 get 10
   blocks each; fc3, the classifier, stays dense) and records the share of ``sum |W|`` of fc1
   and fc2 the masks keep, the test accuracy right after masking (no training), the test
   accuracy after each of 2 epochs of masked training (lr 0.01, otherwise as above), then
   converts the model to ``BlockDiagonalLinear`` layers and records its accuracy, the largest
   logit difference to the masked model over the test set, its parameter count and the wall
   time of each phase;
4. repeats the masked training of step 3 with 8 epochs instead of 2 (its own cosine schedule,
   again from the trained dense model), and trains the dense model 8 more epochs as its
   reference, to see whether the difference between the two modes shrinks with training.

Seeds fix the dense initialisation, the shuffling and MPD's permutations. Medians over the
three seeds, and each seed's figures, go to ``docs/bench/mpd_permutation_study.json``; the
weight matrices of one seed go to ``docs/bench/mpd_permutation_study.png``.

The images are read once through ``pfgdf_plugin.data.build_dataset`` and kept in memory as
tensors (the same normalised images; this only skips the per-item transforms).

Runs on one CPU thread (``torch.set_num_threads(1)``): about 6 minutes of CPU time; 10 minutes of
wall time when the two cores were shared with other work.

Usage::

    .venv/bin/python scripts/mpd_permutation_study.py [--seeds 0 1 2] [--out docs/bench/mpd_permutation_study.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List

import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pfgdf_plugin.data import build_dataset  # noqa: E402
from pfgdf_plugin.measure import count_params, evaluate  # noqa: E402
from pfgdf_plugin.methods import mpd  # noqa: E402
from pfgdf_plugin.models import build_model  # noqa: E402
from pfgdf_plugin.torch_pruning.mpd import MPDPruner  # noqa: E402
from pfgdf_plugin.train import TrainConfig, seed_everything, train  # noqa: E402

DENSE_EPOCHS = 3
MASKED_EPOCHS = 2
COMPRESSION = 10.0
BATCH = 128
DENSE_CFG = TrainConfig(epochs=DENSE_EPOCHS, lr=0.05)
MASKED_CFG = TrainConfig(epochs=MASKED_EPOCHS, lr=0.01)
LONG_EPOCHS = 8  # a second, longer masked training (its own cosine schedule): does the gap close?
LONG_CFG = TrainConfig(epochs=LONG_EPOCHS, lr=0.01)
MODES = ("random", "magnitude")


def as_tensors(ds) -> TensorDataset:
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return TensorDataset(torch.stack(xs), torch.as_tensor(ys, dtype=torch.long))


def loader(ds: TensorDataset, seed: int, shuffle: bool) -> DataLoader:
    return DataLoader(ds, batch_size=BATCH, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def acc(model, test) -> float:
    return evaluate(model, test, progress=False)["accuracy"]


@torch.no_grad()
def logits(model, test) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x) for x, _ in test])


def one_seed(seed: int, train_ds, test, example) -> Dict[str, Any]:
    seed_everything(seed)
    dense = build_model("lenet300", num_classes=10, in_channels=1, image_size=28)
    t = time.perf_counter()
    train(dense, loader(train_ds, seed, True), DENSE_CFG, progress=False)
    out: Dict[str, Any] = {"seed": seed, "dense": {"accuracy": acc(dense, test), "params": count_params(dense),
                                                   "train_s": time.perf_counter() - t}}

    ref = copy.deepcopy(dense)
    seed_everything(seed + 100)
    train(ref, loader(train_ds, seed + 100, True), MASKED_CFG, progress=False)
    out["dense_more_epochs"] = {"accuracy": acc(ref, test), "epochs": MASKED_EPOCHS}
    ref = copy.deepcopy(dense)
    seed_everything(seed + 100)
    train(ref, loader(train_ds, seed + 100, True), LONG_CFG, progress=False)
    out["dense_more_epochs_long"] = {"accuracy": acc(ref, test), "epochs": LONG_EPOCHS}

    for mode in MODES:
        model = copy.deepcopy(dense)
        weights = {n: model.get_submodule(n).weight.detach().clone() for n in ("fc1", "fc2")}
        t = time.perf_counter()
        pruner = MPDPruner(model, example, compression=COMPRESSION, permutation=mode, seed=seed)
        plan_s = time.perf_counter() - t
        kept = {n: mpd.kept_share(w, pruner.plans[n]) for n, w in weights.items()}
        total_abs = sum(float(w.abs().sum()) for w in weights.values())
        kept_all = sum(kept[n] * float(w.abs().sum()) for n, w in weights.items()) / total_abs
        r: Dict[str, Any] = {
            "blocks": {n: s["blocks"] for n, s in pruner.summary()["layers"].items()},
            "plan_s": plan_s,
            "kept_abs_share": {**kept, "fc1+fc2": kept_all},
            "acc_masked_no_training": acc(model, test),
        }
        per_epoch: List[float] = []
        seed_everything(seed + 100)  # same batches for both modes
        t = time.perf_counter()
        train(model, loader(train_ds, seed + 100, True), MASKED_CFG, progress=False,
              on_step=lambda step, loss: pruner.update(), on_epoch=lambda e: per_epoch.append(acc(model, test)))  # noqa: B023 (called inside the loop)
        r["train_s"] = time.perf_counter() - t
        r["acc_per_epoch"] = per_epoch
        r["acc_masked_trained"] = acc(model, test)
        masked_logits = logits(model, test)
        t = time.perf_counter()
        report = pruner.step()
        r["convert_s"] = time.perf_counter() - t
        r["acc_converted"] = acc(model, test)
        r["max_abs_logit_diff"] = float((logits(model, test) - masked_logits).abs().max())
        r["params_converted"] = count_params(model)
        r["weights"] = {"dense": report["dense"], "kept": report["kept"], "stored": report["stored"],
                        "compression": report["compression"]}
        r["folded"] = report["folded"]
        out[mode] = r

        model = copy.deepcopy(dense)
        pruner = MPDPruner(model, example, compression=COMPRESSION, permutation=mode, seed=seed)
        long_epochs: List[float] = []
        seed_everything(seed + 100)
        train(model, loader(train_ds, seed + 100, True), LONG_CFG, progress=False,
              on_step=lambda step, loss: pruner.update(), on_epoch=lambda e: long_epochs.append(acc(model, test)))  # noqa: B023 (called inside the loop)
        r["long"] = {"epochs": LONG_EPOCHS, "acc_per_epoch": long_epochs, "acc_masked_trained": acc(model, test)}
        if seed == 0:
            out.setdefault("_figure", {})[mode] = (weights["fc2"], pruner.plans["fc2"])
    return out


def median(values: List[float]) -> float:
    return float(statistics.median(values))


def figure(path: str, dense_w: torch.Tensor, plans: Dict[str, mpd.BlockPlan]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = dense_w.abs()
    fig, axes = plt.subplots(1, 1 + len(plans), figsize=(4.2 * (1 + len(plans)), 3.2))
    vmax = float(a.quantile(0.99))
    axes[0].imshow(a, aspect="auto", cmap="viridis", vmax=vmax)
    axes[0].set_title("fc2 |W| (trained dense)")
    for ax, (mode, plan) in zip(axes[1:], plans.items()):
        ro, ri = torch.argsort(plan.out_labels, stable=True), torch.argsort(plan.in_labels, stable=True)
        masked = (a * plan.mask2d())[ro][:, ri]
        ax.imshow(masked, aspect="auto", cmap="viridis", vmax=vmax)
        share = mpd.kept_share(dense_w, plan)
        ax.set_title(f"{mode}: kept, block order ({share:.1%} of |W|)")
    for ax in axes:
        ax.set_xlabel("input")
        ax.set_ylabel("output")
    fig.suptitle("LeNet-300-100 fc2 (100x300), 10 blocks, seed 0", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "bench", "mpd_permutation_study.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    spec = build_dataset("fashion_mnist", image_size=28, in_channels=1)
    train_ds, test_ds = as_tensors(spec.train), as_tensors(spec.test)
    test = loader(test_ds, 0, False)
    example = torch.randn(1, 1, 28, 28)
    runs = []
    fig_data = None
    for seed in args.seeds:
        r = one_seed(seed, train_ds, test, example)
        fig_data = r.pop("_figure", fig_data)
        runs.append(r)
        print(json.dumps({"seed": seed, "dense": r["dense"]["accuracy"],
                          **{m: [r[m]["kept_abs_share"]["fc1+fc2"], r[m]["acc_masked_no_training"],
                                 r[m]["acc_masked_trained"], r[m]["acc_converted"]] for m in MODES}}), flush=True)

    keys = ("acc_masked_no_training", "acc_masked_trained", "acc_converted", "plan_s", "train_s", "convert_s",
            "max_abs_logit_diff")
    summary: Dict[str, Any] = {"dense_accuracy": median([r["dense"]["accuracy"] for r in runs]),
                               "dense_more_epochs_accuracy": median([r["dense_more_epochs"]["accuracy"] for r in runs]),
                               "dense_more_epochs_long_accuracy": median(
                                   [r["dense_more_epochs_long"]["accuracy"] for r in runs]),
                               "dense_params": runs[0]["dense"]["params"]}
    for mode in MODES:
        s = {k: median([r[mode][k] for r in runs]) for k in keys}
        s["kept_abs_share"] = {k: median([r[mode]["kept_abs_share"][k] for r in runs])
                               for k in runs[0][mode]["kept_abs_share"]}
        s["acc_per_epoch"] = [median([r[mode]["acc_per_epoch"][e] for r in runs]) for e in range(MASKED_EPOCHS)]
        s["long_acc_masked_trained"] = median([r[mode]["long"]["acc_masked_trained"] for r in runs])
        s["long_acc_per_epoch"] = [median([r[mode]["long"]["acc_per_epoch"][e] for r in runs])
                                   for e in range(LONG_EPOCHS)]
        s["params_converted"] = runs[0][mode]["params_converted"]
        s["weights"] = runs[0][mode]["weights"]
        s["converted_equals_masked"] = all(r[mode]["acc_converted"] == r[mode]["acc_masked_trained"] for r in runs)
        summary[mode] = s
    diffs = {k: [r["magnitude"][k] - r["random"][k] for r in runs]
             for k in ("acc_masked_no_training", "acc_masked_trained")}
    diffs["long_acc_masked_trained"] = [r["magnitude"]["long"]["acc_masked_trained"]
                                        - r["random"]["long"]["acc_masked_trained"] for r in runs]
    summary["magnitude_minus_random"] = {k: {"per_seed": v, "median": median(v), "min": min(v), "max": max(v)}
                                         for k, v in diffs.items()}
    result = {
        "command": "python scripts/mpd_permutation_study.py" + ("" if args.seeds == [0, 1, 2] else
                                                                 " --seeds " + " ".join(map(str, args.seeds))),
        "setup": {
            "model": "lenet300 (784-300-100-10), 28x28 inputs",
            "data": f"fashion_mnist, {len(train_ds)} train / {len(test_ds)} test images",
            "dense_training": {"epochs": DENSE_EPOCHS, **vars(DENSE_CFG), "batch_size": BATCH},
            "masked_training": {"epochs": MASKED_EPOCHS, **vars(MASKED_CFG), "batch_size": BATCH},
            "long_masked_training": {"epochs": LONG_EPOCHS, **vars(LONG_CFG), "batch_size": BATCH},
            "mpd": {"compression": COMPRESSION, "targets": "fc1, fc2 (fc3 dense: dense_output=True)",
                    "fold": True, "round_to": None},
            "seeds": args.seeds,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        },
        "median": summary,
        "runs": runs,
        "wall_time_s": None,
    }
    if fig_data is not None:
        png = os.path.splitext(args.out)[0] + ".png"
        figure(png, fig_data["random"][0], {m: fig_data[m][1] for m in MODES})
        result["figure"] = os.path.relpath(png, ROOT)
    result["wall_time_s"] = time.perf_counter() - start
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out} in {result['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main()
