"""The in-memory image sets give torchvision's images, batch by batch, and augment like its transforms."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pfgdf_plugin.data import DataNotFoundError, build_dataset, make_loaders
from pfgdf_plugin.images import TensorImages, prepare_images

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
MNIST_STATS = ((0.1307,), (0.3081,))


@pytest.fixture(autouse=True)
def _isolated_data_env(tmp_path, monkeypatch):
    monkeypatch.delenv("PFGDF_DATA", raising=False)
    monkeypatch.setenv("PFGDF_CACHE", str(tmp_path / "cache"))


def _write_idx(folder: Path, n_train: int = 12, n_test: int = 5) -> None:
    """The four IDX files of an MNIST-style set with random images."""
    folder.mkdir(parents=True)
    g = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = g.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = g.integers(0, 10, size=(n,), dtype=np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def _reference(cls_name: str, root: Path, train: bool, steps: list, stats=MNIST_STATS):
    """torchvision's data set with the per-image PIL pipeline."""
    import torchvision.datasets as tvd
    from torchvision import transforms as T

    return getattr(tvd, cls_name)(str(root), train=train, download=False,
                                  transform=T.Compose(steps + [T.ToTensor(), T.Normalize(*stats)]))


def test_mnist_images_equal_torchvision_for_every_index(tmp_path):
    from torchvision import transforms as T

    _write_idx(tmp_path / "MNIST" / "raw")
    spec = build_dataset("mnist", root=tmp_path)
    assert isinstance(spec.train, TensorImages) and len(spec.train) == 12 and len(spec.test) == 5
    for split, train in ((spec.train, True), (spec.test, False)):
        ref = _reference("MNIST", tmp_path, train, [T.Pad(2)])
        for i in range(len(ref)):
            x, y = split[i]
            rx, ry = ref[i]
            assert torch.equal(x, rx) and y == ry and isinstance(y, int)
    # a batch read at once is the stack of the samples, in the loader's order
    _, test = make_loaders(spec, batch_size=4)
    xb, yb = next(iter(test))
    ref = _reference("MNIST", tmp_path, False, [T.Pad(2)])
    assert torch.equal(xb, torch.stack([ref[i][0] for i in range(4)]))
    assert yb.tolist() == [ref[i][1] for i in range(4)]


def test_mnist_channels_and_sizes_follow_torchvision(tmp_path):
    from torchvision import transforms as T

    _write_idx(tmp_path / "MNIST" / "raw")
    rgb = build_dataset("mnist", root=tmp_path, in_channels=3)
    ref = _reference("MNIST", tmp_path, True, [T.Grayscale(3), T.Pad(2)], ((0.1307,) * 3, (0.3081,) * 3))
    assert all(torch.equal(rgb.train[i][0], ref[i][0]) for i in range(len(ref)))
    same = build_dataset("mnist", root=tmp_path, image_size=28)
    ref = _reference("MNIST", tmp_path, True, [])
    assert all(torch.equal(same.train[i][0], ref[i][0]) for i in range(len(ref)))
    # other sizes are resized; tensor and PIL bilinear resizing agree within a grey level or two
    big = build_dataset("mnist", root=tmp_path, image_size=40)
    ref = _reference("MNIST", tmp_path, True, [T.Resize((40, 40))])
    for i in range(len(ref)):
        assert big.train[i][0].shape == (1, 40, 40)
        assert (big.train[i][0] - ref[i][0]).abs().max() * 0.3081 <= 2.5 / 255


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_equals_torchvision(tmp_path):
    from torchvision import transforms as T

    spec = build_dataset("fashion_mnist")
    root = tmp_path / "cache"  # where the Debian files were decompressed
    stats = ((0.2860,), (0.3530,))
    for split, train, idx in ((spec.train, True, [0, 1, 31337, 59999]), (spec.test, False, [0, 9999])):
        ref = _reference("FashionMNIST", root, train, [T.Pad(2)], stats)
        for i in idx:
            assert torch.equal(split[i][0], ref[i][0]) and split[i][1] == ref[i][1]
        xb, yb = split[idx]
        assert torch.equal(xb, torch.stack([ref[i][0] for i in idx]))


def test_digits_match_scikit_learn_and_keep_the_loader_order():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    spec = build_dataset("digits", image_size=8, seed=4)
    d = load_digits()
    idx, _ = train_test_split(list(range(len(d.target))), test_size=0.2, random_state=4, stratify=d.target)
    expect = (torch.tensor(d.images[idx[:5]], dtype=torch.float32).unsqueeze(1) / 16.0 - 0.3053) / 0.3236
    assert torch.equal(torch.stack([spec.train[i][0] for i in range(5)]), expect)
    # the batch loader gives the batches a per-sample DataLoader gives, from the same generator
    spec = build_dataset("digits", image_size=32, limit_train=256, limit_test=64)
    fast, _ = make_loaders(spec, 64)
    plain = DataLoader(spec.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # two epochs: the generator moves on the same way
        pairs = list(zip(list(fast), list(plain)))
        assert all(torch.equal(a, b) and torch.equal(ya, yb) for (a, ya), (b, yb) in pairs)
    assert len(fast) == len(plain) == 4


def _crops(padded: torch.Tensor, size: int):
    n = padded.shape[-1] - size + 1
    for i in range(n):
        for j in range(n):
            yield padded[..., i:i + size, j:j + size]


@pytest.mark.parametrize("flip", [False, True])
def test_batched_augmentation_is_a_seeded_per_sample_crop_and_flip(flip):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 1, 12, 12), dtype=torch.uint8, generator=g)
    ds = TensorImages(images, torch.arange(16), [0.0], [1.0], crop_padding=2, flip=flip)
    torch.manual_seed(5)
    x, y = ds[list(range(16))]
    torch.manual_seed(5)
    again, _ = ds[list(range(16))]
    assert torch.equal(x, again) and y.tolist() == list(range(16))
    seen_flip = seen_moved = False
    for k in range(16):
        padded = torch.nn.functional.pad(images[k].float() / 255, (2, 2, 2, 2))
        options = [(c, False) for c in _crops(padded, 12)]
        if flip:
            options += [(c.flip(-1), True) for c in _crops(padded, 12)]
        hits = [(m, f) for m, (c, f) in enumerate(options) if torch.equal(c, x[k])]
        assert hits, f"sample {k} is no crop{' or flip' if flip else ''} of its padded image"
        seen_flip |= any(f for _, f in hits)
        seen_moved |= all(m % 25 != 12 for m, _ in hits)  # 12: the centred crop
    assert seen_moved and seen_flip == flip


def test_gray_conversion_is_pils():
    from PIL import Image

    rgb = torch.randint(0, 256, (3, 3, 10, 10), dtype=torch.uint8)
    gray = prepare_images(rgb, 1, 10)
    for k in range(3):
        pil = Image.fromarray(rgb[k].permute(1, 2, 0).numpy(), "RGB").convert("L")
        assert torch.equal(gray[k, 0], torch.from_numpy(np.array(pil)))


def test_bad_tensor_images_name_the_argument():
    with pytest.raises(ValueError, match="uint8"):
        TensorImages(torch.zeros(2, 1, 4, 4), torch.zeros(2), [0.5], [0.5])
    with pytest.raises(ValueError, match="one label per image"):
        TensorImages(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3), [0.5], [0.5])
    with pytest.raises(ValueError, match="crop_padding must be an int >= 0, got -1"):
        TensorImages(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2), [0.5], [0.5], crop_padding=-1)


def test_imagefolder_without_train_and_val_says_the_layout(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs").mkdir()
    with pytest.raises(DataNotFoundError, match=r"no train/ and val/ under .*found: cats/, dogs/.*"
                                                r"train/<class>/<image> and val/<class>/<image>"):
        build_dataset("imagefolder", root=tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataNotFoundError, match=r"no val/ \(or test/\) under"):
        build_dataset("imagefolder", root=tmp_path)


def test_imagefolder_uses_the_imagenet_pipeline(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (60, 40), color=(80 * c, 30, 200)).save(tmp_path / split / cls / "0.png")
    spec = build_dataset("imagefolder", root=tmp_path, image_size=32)
    train_tf, test_tf = spec.train.transform.transforms, spec.test.transform.transforms
    assert [type(t).__name__ for t in train_tf] == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor",
                                                   "Normalize"]
    assert [type(t).__name__ for t in test_tf] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert test_tf[0].size == 37 and list(test_tf[3].mean) == [0.485, 0.456, 0.406]
    assert tuple(spec.train[0][0].shape) == tuple(spec.test[0][0].shape) == (3, 32, 32)
    plain = build_dataset("imagefolder", root=tmp_path, image_size=32, augment=False)
    assert [type(t).__name__ for t in plain.train.transform.transforms][:2] == ["Resize", "CenterCrop"]
