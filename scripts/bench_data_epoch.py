"""Wall time of one training epoch of LeNet-300-100 on the 60,000 Fashion-MNIST training images.

What it measures: ``pfgdf_plugin.train.train`` for exactly one epoch (SGD, lr 0.05, batch 128,
469 steps) of ``lenet300`` at 32x32 (the images padded as the recipes do), reading the data
through ``build_dataset("fashion_mnist")`` and ``make_loaders`` (in memory, a batch at a time),
with and without the training augmentation (random crop and flip). With ``--pil`` it also times
the same epoch through torchvision's ``FashionMNIST`` with its per-image PIL transforms, the
pipeline the in-memory sets replace. Needs Debian's ``dataset-fashion-mnist``.

    PYTHONPATH=. python scripts/bench_data_epoch.py [--pil] [--threads N]

Prints one line per pipeline: seconds for the epoch, and the share of it spent reading batches.
"""

from __future__ import annotations

import argparse
import time

import torch


class _Timed:
    """Wraps a loader and adds up the time spent waiting for its batches."""

    def __init__(self, loader) -> None:
        self.loader, self.seconds = loader, 0.0
        self.generator = getattr(loader, "generator", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.seconds += time.perf_counter() - t
            yield batch


def _epoch(train_set, label: str) -> None:
    from pfgdf_plugin.data import DataSpec, make_loaders
    from pfgdf_plugin.models import build_model
    from pfgdf_plugin.train import TrainConfig, seed_everything, train

    seed_everything(0)
    spec = DataSpec(train_set, train_set, 10, 1, 32, "fashion_mnist")
    loader = _Timed(make_loaders(spec, 128)[0])
    model = build_model("lenet300", num_classes=10, in_channels=1)
    t = time.perf_counter()
    stats = train(model, loader, TrainConfig(epochs=1.0, lr=0.05), progress=False)
    seconds = time.perf_counter() - t
    print(f"{label:40s} {seconds:6.2f} s for {stats['steps']} steps, {100 * loader.seconds / seconds:4.1f}% reading "
          f"data, loss {stats['loss']:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pil", action="store_true", help="also time torchvision's per-image PIL pipeline")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from pfgdf_plugin.data import build_dataset

    print(f"torch threads: {torch.get_num_threads()}")
    _epoch(build_dataset("fashion_mnist").train, "in memory")
    _epoch(build_dataset("fashion_mnist", augment=True).train, "in memory, crop + flip")
    if args.pil:
        import torchvision.datasets as tvd
        from torchvision import transforms as T

        from pfgdf_plugin.data import cache_dir

        tf = T.Compose([T.Pad(2), T.ToTensor(), T.Normalize((0.2860,), (0.3530,))])
        _epoch(tvd.FashionMNIST(str(cache_dir()), train=True, transform=tf), "torchvision, per-image PIL")


if __name__ == "__main__":
    main()
