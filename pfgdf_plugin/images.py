"""Image sets held in memory as uint8 tensors, augmented and normalised a whole batch at a time.

A data loader that reads one PIL image at a time spends most of a small model's epoch in
Python; here a batch is one indexing of a tensor, one random crop and flip drawn per sample
with torch's random generator (seeded like everything else by
:func:`pfgdf_plugin.train.seed_everything`), and one normalisation. The images are the ones
torchvision's classes give for the same indices, through the same steps: channel conversion
(PIL's integer gray formula), zero padding or resizing to the requested size, random crop with
zero padding and horizontal flip (training only), division by 255 and normalisation.

:func:`batch_loader` gives a ``DataLoader`` whose sampler yields whole batches of indices, so a
data set that accepts a list of indices (these sets, ``TensorDataset`` and ``Subset`` of
either) is read one batch per call, in the order a plain ``DataLoader`` with the same
generator would give.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
)

__all__ = ["TensorImages", "batch_loader", "fetches_batches", "prepare_images"]

Index = Union[int, Sequence[int], torch.Tensor]


def _to_gray(images: torch.Tensor) -> torch.Tensor:
    """RGB uint8 ``(N, 3, H, W)`` to gray ``(N, 1, H, W)`` with PIL's integer formula of ``convert("L")``."""
    r, g, b = (images[:, i].to(torch.int32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(1)


def prepare_images(images: torch.Tensor, channels: int, image_size: int) -> torch.Tensor:
    """uint8 images ``(N, C, H, W)`` with ``channels`` channels at ``image_size`` x ``image_size``.

    Gray to RGB repeats the channel, RGB to gray uses PIL's formula. Square images 4 pixels
    smaller than ``image_size`` are zero padded by 2 on each side (28x28 digits to 32x32), other
    sizes are resized (bilinear, antialiased, as torchvision's ``Resize`` on tensors).

    Args:
        images: uint8 tensor ``(N, C, H, W)``, ``C`` 1 or 3.
        channels: 1 or 3.
        image_size: side of the result.

    Returns:
        A new uint8 tensor ``(N, channels, image_size, image_size)``.

    Example:
        >>> x = torch.full((2, 1, 28, 28), 7, dtype=torch.uint8)
        >>> y = prepare_images(x, 3, 32)
        >>> tuple(y.shape), int(y[0, 0, 0, 0]), int(y[0, 2, 2, 2])
        ((2, 3, 32, 32), 0, 7)
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if images.shape[1] == 3 and channels == 1:
        images = _to_gray(images)
    h, w = images.shape[-2:]
    if h == w == image_size - 4:
        images = F.pad(images, (2, 2, 2, 2))
    elif (h, w) != (image_size, image_size):
        from torchvision.transforms.v2.functional import resize

        images = resize(images, [image_size, image_size], antialias=True)
    if images.shape[1] == 1 and channels == 3:
        images = images.repeat(1, 3, 1, 1)
    return images.contiguous()


class TensorImages(Dataset):
    """Labelled uint8 images in memory, returned as normalised float tensors.

    Indexing with an int gives ``(image, label)`` like torchvision's data sets (a ``(C, H, W)``
    float tensor and an int); indexing with a list or tensor of indices gives a batch
    ``(images, labels)`` (``(B, C, H, W)`` float, ``(B,)`` long), augmented per sample.

    Args:
        images: uint8 ``(N, C, H, W)`` at the final size (see :func:`prepare_images`).
        targets: labels ``(N,)``.
        mean: per-channel mean of the normalisation (on the 0..1 scale).
        std: per-channel standard deviation.
        crop_padding: training augmentation: zero pad by this many pixels and crop back at a
            random place (0: no crop).
        flip: training augmentation: flip horizontally with probability 1/2.

    Example:
        >>> ds = TensorImages(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.arange(4), [0.5], [0.5])
        >>> x, y = ds[[0, 3]]
        >>> tuple(x.shape), y.tolist(), float(x[0, 0, 0, 0])
        ((2, 1, 8, 8), [0, 3], -1.0)
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 crop_padding: int = 0, flip: bool = False) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(targets) != len(images):
            raise ValueError(f"targets must have one label per image: {len(targets)} labels, {len(images)} images")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f"mean and std must have {images.shape[1]} values, got {list(mean)} and {list(std)}")
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"crop_padding must be an int >= 0, got {crop_padding!r}")
        self.images = images
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.mean = torch.tensor(list(mean), dtype=torch.get_default_dtype()).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.get_default_dtype()).view(-1, 1, 1)
        self.crop_padding = crop_padding
        self.flip = bool(flip)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: Index) -> Tuple[torch.Tensor, Union[int, torch.Tensor]]:
        if isinstance(index, int) or (isinstance(index, torch.Tensor) and index.dim() == 0):
            i = int(index)
            x, _ = self[[i]]
            return x[0], int(self.targets[i])
        idx = torch.as_tensor(index, dtype=torch.long)
        return self._float(self._augment(self.images[idx])), self.targets[idx]

    def _augment(self, batch: torch.Tensor) -> torch.Tensor:
        """Random crop (zero padded) and flip, drawn per sample."""
        n, _, h, w = batch.shape
        p = self.crop_padding
        if p == 0 and not self.flip:
            return batch
        rows = torch.arange(h).expand(n, h)
        cols = torch.arange(w).expand(n, w)
        if p:
            batch = F.pad(batch, (p, p, p, p))
            rows = rows + torch.randint(0, 2 * p + 1, (n, 1))
            cols = cols + torch.randint(0, 2 * p + 1, (n, 1))
        if self.flip:
            flipped = torch.rand(n) < 0.5
            cols = torch.where(flipped[:, None], cols.flip(1), cols)
        picked = batch[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
        return picked.permute(0, 3, 1, 2).contiguous()

    def _float(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 to the 0..1 scale, then normalised (the arithmetic of ``ToTensor`` and ``Normalize``)."""
        return batch.to(torch.get_default_dtype()).div(255).sub_(self.mean).div_(self.std)


def fetches_batches(ds: Dataset) -> bool:
    """Whether ``ds[list_of_indices]`` returns a whole batch (so a loader can skip collation).

    Example:
        >>> fetches_batches(TensorDataset(torch.zeros(3, 2))), fetches_batches(Subset(list(range(3)), [0]))
        (True, False)
    """
    if isinstance(ds, Subset):
        return fetches_batches(ds.dataset)
    return isinstance(ds, (TensorImages, TensorDataset))


def batch_loader(ds: Dataset, batch_size: int, shuffle: bool, generator: Optional[torch.Generator],
                 workers: int = 0, **kwargs) -> DataLoader:
    """A ``DataLoader`` reading ``ds`` one batch of indices at a time.

    It draws the same order from ``generator`` as ``DataLoader(ds, batch_size, shuffle=shuffle,
    generator=generator)`` and yields ``[inputs, targets]`` batches like it.

    Example:
        >>> ds = TensorDataset(torch.arange(10.0), torch.arange(10))
        >>> plain = DataLoader(ds, 4, shuffle=True, generator=torch.Generator().manual_seed(0))
        >>> fast = batch_loader(ds, 4, True, torch.Generator().manual_seed(0))
        >>> [b[1].tolist() for b in plain] == [b[1].tolist() for b in fast], len(fast)
        (True, 3)
    """
    sampler = RandomSampler(ds, generator=generator) if shuffle else SequentialSampler(ds)
    return DataLoader(ds, batch_size=None, sampler=BatchSampler(sampler, batch_size, drop_last=False),
                      num_workers=workers, generator=generator, collate_fn=_as_list, **kwargs)


def _as_list(batch: tuple) -> List[torch.Tensor]:
    return list(batch)
