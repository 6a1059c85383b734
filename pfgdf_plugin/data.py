"""Data sets and loaders for the pruning recipes.

Every data set is built by name through :func:`build_dataset`, which returns a
:class:`DataSpec` holding the train and test sets together with what a model
needs to know about them (classes, channels, image size).

Registered names:

* ``fashion_mnist`` and ``mnist``: the images of torchvision's ``FashionMNIST`` /
  ``MNIST`` held in memory (:class:`~pfgdf_plugin.images.TensorImages`).
  With no ``root`` the gzipped IDX files installed by Debian's package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) are found
  automatically and decompressed once into a cache folder
  (``$PFGDF_CACHE`` or ``~/.cache/pfgdf_plugin/data``).
* ``cifar10``: the images of torchvision's ``CIFAR10`` (read from
  ``root/cifar-10-batches-py``) held in memory.
* ``imagefolder``: torchvision's ``ImageFolder`` over ``root/train`` and
  ``root/val`` (or ``root/test``) with the standard ImageNet pipeline:
  random-resized crop and flip for training, resize to ``image_size * 256 / 224``
  and centre crop for evaluation, ImageNet normalisation.
* ``digits``: scikit-learn's bundled 8x8 digits, always available offline.
* ``synthetic``: seeded random tensors with a learnable class signal.

The in-memory sets are read a batch at a time by :func:`make_loaders` and
augmented on the whole batch, so the data never dominates a small model's
epoch. Nothing is ever downloaded. When ``root`` is None the environment variable
``PFGDF_DATA`` is used as the root, if set. Missing data raises
:class:`DataNotFoundError` with a one-line hint on how to get it.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .errors import DataNotFoundError
from .images import TensorImages, batch_loader, fetches_batches, prepare_images
from .registry import Registry

__all__ = [
    "DATASETS",
    "DataNotFoundError",
    "DataSpec",
    "build_dataset",
    "cache_dir",
    "calibration_batches",
    "make_loaders",
]

DATASETS: Registry = Registry("dataset")

PathLike = Union[str, "os.PathLike[str]"]

#: Where Debian's data set packages install their files.
DEBIAN_DATASETS = Path("/usr/share/datasets")

# Per-dataset normalisation constants: (mean, std) per natural channel, and the
# single-channel values used when an RGB set is converted to gray.
_STATS: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # digits: pixels scaled from 0..16 to 0..1; std measured after the bilinear
    # upsampling to 32x32 (the default size).
    "digits": ((0.3053,), (0.3236,)),
}
_GRAY_STATS: Dict[str, Tuple[float, float]] = {
    "cifar10": (0.4809, 0.2392),
    "imagefolder": (0.449, 0.226),
}

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass
class DataSpec:
    """A built data set: train/test splits and what a model needs to know.

    Attributes:
        train: Training split.
        test: Test split.
        num_classes: Number of classes.
        in_channels: Channels of each input image.
        image_size: Height and width of each (square) input image.
        name: Registered name of the data set.
    """

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    name: str


# --------------------------------------------------------------------------- helpers


def cache_dir() -> Path:
    """Return the folder where decompressed data is cached.

    ``$PFGDF_CACHE`` if set, else ``~/.cache/pfgdf_plugin/data``.

    Example:
        >>> isinstance(cache_dir(), Path)
        True
    """
    env = os.environ.get("PFGDF_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "pfgdf_plugin" / "data"


def _env_root() -> Optional[Path]:
    env = os.environ.get("PFGDF_DATA")
    return Path(env).expanduser() if env else None


def _check_positive_int(name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _subset(ds: Dataset, limit: Optional[int], seed: int) -> Dataset:
    """A seeded random subset of ``limit`` samples (all of them if fewer)."""
    if limit is None:
        return ds
    n = len(ds)  # type: ignore[arg-type]
    if limit >= n:
        return ds
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[:limit].sort().values.tolist()
    return Subset(ds, idx)


def _norm_stats(name: str, natural: int, channels: int) -> Tuple[List[float], List[float]]:
    mean, std = _STATS[name]
    if channels == natural:
        return list(mean), list(std)
    if natural == 1:  # gray repeated into `channels`
        return list(mean) * channels, list(std) * channels
    gm, gs = _GRAY_STATS[name]  # RGB converted to gray
    return [gm], [gs]


def _tensor_images(name: str, images: torch.Tensor, targets: Any, natural_channels: int, image_size: int,
                   channels: int, crop: bool, flip: bool) -> TensorImages:
    """uint8 images ``(N, C, H, W)`` prepared once, augmented per batch when ``crop``/``flip``."""
    mean, std = _norm_stats(name, natural_channels, channels)
    prepared = prepare_images(images, channels, image_size)
    return TensorImages(prepared, torch.as_tensor(targets, dtype=torch.long), mean, std,
                        crop_padding=max(1, image_size // 8) if crop else 0, flip=flip and crop)


#: The evaluation resize of the ImageNet pipeline: resize to 256 before a 224 centre crop.
IMAGENET_RESIZE = 256 / 224


def _imagenet_transform(image_size: int, channels: int, train: bool) -> Callable:
    """The standard ImageNet pipeline for PIL images at ``image_size``.

    Training: ``RandomResizedCrop(image_size)`` and a horizontal flip; evaluation: resize the
    shorter side to ``round(image_size * 256 / 224)`` and crop the centre. Then ImageNet's
    normalisation (its gray mean and std when ``channels`` is 1).
    """
    from torchvision import transforms as T

    steps: List[Callable] = [T.Grayscale(num_output_channels=1)] if channels == 1 else []
    if train:
        steps += [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        steps += [T.Resize(int(round(image_size * IMAGENET_RESIZE))), T.CenterCrop(image_size)]
    mean, std = _norm_stats("imagefolder", 3, channels)
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def _resolve_channels(name: str, in_channels: Optional[int], natural: int) -> int:
    if in_channels is None:
        return natural
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be None, 1 or 3 for {name}, got {in_channels!r}")
    return in_channels


def _atomic_gunzip(src: Path, dst: Path) -> None:
    """Decompress ``src`` into ``dst`` through a temp file and a rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".part", dir=str(dst.parent))
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, length=1 << 20)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _has_files(folder: Path, names: Sequence[str]) -> bool:
    return all((folder / n).is_file() for n in names)


def _find_idx_root(key: str, cls_name: str, root: Optional[PathLike], debian_name: str, hint: str) -> Path:
    """Find a root that torchvision's ``cls_name`` class can read, decompressing if needed.

    Looks for uncompressed IDX files under ``ROOT/cls_name/raw``; else for
    gzipped ones there, decompressed once beside them (into the cache folder
    when that is not writable), or directly in ``ROOT`` (Debian's flat
    layout), decompressed once into the cache folder. With ``root`` None,
    ROOT is ``$PFGDF_DATA`` if set, then the cache folder, and
    ``/usr/share/datasets/<debian_name>`` is a source of gzipped files.
    """
    gz = [n + ".gz" for n in _IDX_FILES]
    roots: List[Path] = []
    if root is not None:
        roots.append(Path(root).expanduser())
    else:
        env = _env_root()
        if env is not None:
            roots.append(env)
        roots.append(cache_dir())
    for r in roots:
        if _has_files(r / cls_name / "raw", _IDX_FILES):
            return r
    sources: List[Tuple[Path, Path]] = []  # (folder with .gz files, root to fill)
    for r in roots:
        sources += [(r / cls_name / "raw", r), (r, cache_dir())]
    if root is None:
        sources.append((DEBIAN_DATASETS / debian_name, cache_dir()))
    for src, target in sources:
        if not _has_files(src, gz):
            continue
        raw = target / cls_name / "raw"
        try:
            raw.mkdir(parents=True, exist_ok=True)
            writable = os.access(raw, os.W_OK)
        except OSError:
            writable = False
        if not writable:
            target = cache_dir()
            raw = target / cls_name / "raw"
        for n in _IDX_FILES:
            if not (raw / n).is_file():
                _atomic_gunzip(src / (n + ".gz"), raw / n)
        return target
    searched = ", ".join(str(r) for r in roots)
    if root is None:
        searched += f", {DEBIAN_DATASETS / debian_name}"
    raise DataNotFoundError(f"{key}: no data under {searched}; {hint}")


# --------------------------------------------------------------------------- builders


def _idx_dataset(
    key: str,
    cls_name: str,
    debian_name: str,
    hint: str,
    flip: bool,
    root: Optional[PathLike],
    image_size: int,
    in_channels: Optional[int],
    augment: bool,
) -> DataSpec:
    import torchvision.datasets as tvd

    found = _find_idx_root(key, cls_name, root, debian_name, hint)
    channels = _resolve_channels(key, in_channels, 1)
    cls = getattr(tvd, cls_name)
    splits = []
    for train in (True, False):
        ds = cls(str(found), train=train, download=False)  # reads the IDX files into uint8 tensors
        splits.append(_tensor_images(key, ds.data.unsqueeze(1), ds.targets, 1, image_size, channels,
                                     crop=augment and train, flip=flip))
    return DataSpec(splits[0], splits[1], 10, channels, image_size, key)


@DATASETS.register("fashion_mnist")
def _fashion_mnist(root: Optional[PathLike], image_size: int, in_channels: Optional[int],
                   augment: bool, **_: object) -> DataSpec:
    hint = ("install Debian's package (apt-get install dataset-fashion-mnist) or pass data.root "
            "pointing at a folder with FashionMNIST/raw/")
    return _idx_dataset("fashion_mnist", "FashionMNIST", "fashion-mnist", hint, True,
                        root, image_size, in_channels, augment)


@DATASETS.register("mnist")
def _mnist(root: Optional[PathLike], image_size: int, in_channels: Optional[int],
           augment: bool, **_: object) -> DataSpec:
    hint = ("pass data.root pointing at a folder with MNIST/raw/ holding the four IDX files "
            "(train/t10k images/labels, gzipped or not), or put them under /usr/share/datasets/mnist")
    return _idx_dataset("mnist", "MNIST", "mnist", hint, False, root, image_size, in_channels, augment)


@DATASETS.register("cifar10")
def _cifar10(root: Optional[PathLike], image_size: int, in_channels: Optional[int],
             augment: bool, **_: object) -> DataSpec:
    import torchvision.datasets as tvd

    r = Path(root).expanduser() if root is not None else _env_root()
    if r is not None and r.name == "cifar-10-batches-py":
        r = r.parent
    needed = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if r is None or not _has_files(r / "cifar-10-batches-py", needed):
        where = str(r) if r is not None else "(no root given and PFGDF_DATA unset)"
        raise DataNotFoundError(
            f"cifar10: no data under {where}; put the python version of CIFAR-10 "
            f"(cifar-10-batches-py) under ROOT and pass data.root"
        )
    channels = _resolve_channels("cifar10", in_channels, 3)
    try:
        splits = []
        for train in (True, False):
            ds = tvd.CIFAR10(str(r), train=train, download=False)  # (N, 32, 32, 3) uint8 in memory
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)
            splits.append(_tensor_images("cifar10", images, ds.targets, 3, image_size, channels,
                                         crop=augment and train, flip=True))
    except RuntimeError as exc:  # torchvision's checksum test failed
        raise DataNotFoundError(
            f"cifar10: files under {r / 'cifar-10-batches-py'} are incomplete or corrupt ({exc}); "
            f"put the python version of CIFAR-10 (cifar-10-batches-py) under ROOT and pass data.root"
        ) from None
    return DataSpec(splits[0], splits[1], 10, channels, image_size, "cifar10")


IMAGEFOLDER_LAYOUT = ("expected data.root to hold train/<class>/<image> and val/<class>/<image> (or test/), "
                      "one folder per class with the same class folders in both")


def _listing(folder: Path, most: int = 6) -> str:
    """The first entries of ``folder`` for an error message."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError:
        return "nothing readable" if folder.exists() else "no such folder"
    if not names:
        return "an empty folder"
    return ", ".join(names[:most]) + (f", ... ({len(names)} entries)" if len(names) > most else "")


@DATASETS.register("imagefolder")
def _imagefolder(root: Optional[PathLike], image_size: int, in_channels: Optional[int],
                 augment: bool, **_: object) -> DataSpec:
    import torchvision.datasets as tvd

    r = Path(root).expanduser() if root is not None else _env_root()
    if r is None:
        raise DataNotFoundError(f"imagefolder: no root given and PFGDF_DATA unset; {IMAGEFOLDER_LAYOUT}")
    test_dir = next((r / s for s in ("val", "test") if (r / s).is_dir()), None)
    if not (r / "train").is_dir() or test_dir is None:
        missing = "train/ and val/" if test_dir is None and not (r / "train").is_dir() else (
            "train/" if test_dir is not None else "val/ (or test/)")
        raise DataNotFoundError(f"imagefolder: no {missing} under {r} (found: {_listing(r)}); {IMAGEFOLDER_LAYOUT}")
    channels = _resolve_channels("imagefolder", in_channels, 3)
    try:
        train = tvd.ImageFolder(str(r / "train"), transform=_imagenet_transform(image_size, channels, augment))
        test = tvd.ImageFolder(str(test_dir), transform=_imagenet_transform(image_size, channels, False))
    except FileNotFoundError as exc:  # a split with no class folders / no images
        raise DataNotFoundError(f"imagefolder: {exc}; {IMAGEFOLDER_LAYOUT}") from None
    if train.classes != test.classes:
        raise ValueError(
            f"imagefolder: train/ and {test_dir.name}/ have different class folders "
            f"({len(train.classes)} vs {len(test.classes)})"
        )
    return DataSpec(train, test, len(train.classes), channels, image_size, "imagefolder")


@DATASETS.register("digits")
def _digits(image_size: int, in_channels: Optional[int], seed: int, **_: object) -> DataSpec:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    channels = _resolve_channels("digits", in_channels, 1)
    d = load_digits()
    idx_train, idx_test = train_test_split(
        list(range(len(d.target))), test_size=0.2, random_state=seed, stratify=d.target
    )
    images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    (mean,), (std,) = _STATS["digits"]
    images = (images - mean) / std
    if channels != 1:
        images = images.repeat(1, channels, 1, 1)
    labels = torch.tensor(d.target, dtype=torch.long)
    tr, te = torch.tensor(idx_train), torch.tensor(idx_test)
    return DataSpec(TensorDataset(images[tr], labels[tr]), TensorDataset(images[te], labels[te]),
                    10, channels, image_size, "digits")


@DATASETS.register("synthetic")
def _synthetic(image_size: int, in_channels: Optional[int], seed: int, n_train: int, n_test: int,
               **_: object) -> DataSpec:
    channels = 3 if in_channels is None else in_channels
    _check_positive_int("in_channels", channels)
    num_classes = 10
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, channels, image_size, image_size, generator=g)

    def make(n: int) -> TensorDataset:
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = 0.5 * prototypes[y] + torch.randn(n, channels, image_size, image_size, generator=g)
        return TensorDataset(x, y)

    return DataSpec(make(n_train), make(n_test), num_classes, channels, image_size, "synthetic")


# --------------------------------------------------------------------------- public API


def build_dataset(
    name: str,
    root: Optional[PathLike] = None,
    image_size: int = 32,
    in_channels: Optional[int] = None,
    limit_train: Optional[int] = None,
    limit_test: Optional[int] = None,
    seed: int = 0,
    augment: Optional[bool] = None,
) -> DataSpec:
    """Build a registered data set.

    Args:
        name: Registered name (see ``DATASETS.names()``).
        root: Data folder; None uses ``$PFGDF_DATA`` and, for the MNIST-like
            sets, Debian's files decompressed into :func:`cache_dir`.
        image_size: Side of the square images returned. 28x28 images are
            zero padded by 2 on each side when ``image_size`` is 32 (a
            difference of 4); any other change of size uses
            ``transforms.Resize`` (bilinear interpolation for ``digits``).
        in_channels: None keeps the set's own channels; 3 on a grayscale set
            repeats the channel, 1 on an RGB set converts it to gray.
        limit_train: Keep a seeded random subset of this many training
            samples (for ``synthetic``: the number of samples, default 512).
        limit_test: Same for the test split (``synthetic`` default 128).
        seed: Seed of the subsets, the ``digits`` split and ``synthetic``.
        augment: Augment the training split: random crop with zero padding of
            ``image_size // 8`` (and a horizontal flip where it keeps the label)
            for the in-memory image sets, drawn per sample on whole batches;
            the ImageNet training pipeline (random-resized crop and flip) for
            ``imagefolder``, whose evaluation pipeline (resize and centre
            crop) is used for both splits when False. None (the default)
            augments ``imagefolder`` only. Ignored by ``digits`` and
            ``synthetic``.

    Returns:
        The :class:`DataSpec`.

    Raises:
        DataNotFoundError: The files are missing; the message says how to get them.
        UnknownNameError: ``name`` is not registered; the message lists the names.
        ValueError: An argument is out of range.

    Example:
        >>> spec = build_dataset("digits", in_channels=3)
        >>> spec.num_classes, tuple(spec.train[0][0].shape)
        (10, (3, 32, 32))
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    builder = DATASETS.get(name)
    _check_positive_int("image_size", image_size)
    _check_positive_int("in_channels", in_channels, allow_none=True)
    _check_positive_int("limit_train", limit_train, allow_none=True)
    _check_positive_int("limit_test", limit_test, allow_none=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if name == "synthetic":
        return builder(
            image_size=image_size, in_channels=in_channels, seed=seed,
            n_train=limit_train or 512, n_test=limit_test or 128,
        )
    if augment is None:
        augment = name == "imagefolder"
    spec = builder(root=root, image_size=image_size, in_channels=in_channels, seed=seed, augment=bool(augment))
    spec.train = _subset(spec.train, limit_train, seed)
    spec.test = _subset(spec.test, limit_test, seed + 1)
    return spec


def make_loaders(
    spec: DataSpec,
    batch_size: int,
    workers: int = 0,
    seed: int = 0,
    shuffle_train: bool = True,
) -> Tuple[DataLoader, DataLoader]:
    """Make the train and test loaders of a data set.

    The training order is drawn from a ``torch.Generator`` seeded with
    ``seed``, so two runs with the same seed see the same batches. Sets held
    in memory (and their subsets) are read a whole batch per index list, in
    the same order a per-sample loader would give.

    Args:
        spec: A built data set.
        batch_size: Samples per batch (both loaders).
        workers: Loader worker processes (0 loads in the main process).
        seed: Seed of the shuffling.
        shuffle_train: Shuffle the training split each epoch.

    Returns:
        ``(train_loader, test_loader)``; the test loader never shuffles.

    Example:
        >>> train, test = make_loaders(build_dataset("synthetic"), batch_size=64)
        >>> next(iter(train))[0].shape[0]
        64
    """
    if not isinstance(spec, DataSpec):
        raise TypeError(f"spec must be a DataSpec, got {type(spec).__name__}")
    _check_positive_int("batch_size", batch_size)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    g = torch.Generator().manual_seed(seed)
    extra = dict(persistent_workers=True) if workers > 0 else {}

    def loader(ds: Dataset, shuffle: bool, gen: Optional[torch.Generator]) -> DataLoader:
        if fetches_batches(ds):
            return batch_loader(ds, batch_size, shuffle, gen, workers, **extra)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=gen, **extra)

    return loader(spec.train, shuffle_train, g), loader(spec.test, False, None)


def calibration_batches(loader: Any, n: int) -> List[torch.Tensor]:
    """Return the input tensors of the first ``n`` batches of a loader.

    Batches given as ``(inputs, targets, ...)`` contribute their first item;
    a loader with fewer than ``n`` batches gives all it has.

    Args:
        loader: Any iterable of batches (a ``DataLoader`` usually).
        n: Number of batches to take.

    Returns:
        A list of at most ``n`` input tensors.

    Example:
        >>> _, test = make_loaders(build_dataset("synthetic"), batch_size=32)
        >>> [tuple(x.shape) for x in calibration_batches(test, 2)]
        [(32, 3, 32, 32), (32, 3, 32, 32)]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    out: List[torch.Tensor] = []
    if n == 0:
        return out
    for batch in loader:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"loader must yield tensors or (tensor, ...) batches, got {type(x).__name__}")
        out.append(x)
        if len(out) >= n:
            break
    return out
