"""CIFAR-100 as uint8 tensors in memory, fixed stratified subsets, and fastai DataLoaders.

Batches are cut from one tensor by index, and augmentation runs on whole batches on the
DataLoader's device, so the GPU never waits on per-image PIL work.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from fastai.data.core import DataLoaders, TfmdDL
from fastai.data.transforms import Category
from fastai.torch_core import TensorCategory, TensorImage, default_device
from fasttransform import Transform

from .files import N_CLASSES, Cifar100, RawSplit, load_cifar100

# Per-channel statistics of the 50,000 training images, in [0, 1] units.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
HOLDOUT_SIZE = 5000
# Subsets and the holdout split are fixed, whatever the run's --seed, so runs stay comparable.
SPLIT_SEED = 20260101


def stratified_indices(labels: np.ndarray, fraction: float, seed: int = SPLIT_SEED) -> np.ndarray:
    """Sorted indices of a fixed `fraction` of each class (at least one image per class)."""
    if fraction >= 1:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picks = []
    for label in range(N_CLASSES):
        members = np.flatnonzero(labels == label)
        if len(members):
            picks.append(rng.permutation(members)[: max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(picks))


def holdout_indices(labels: np.ndarray, size: int = HOLDOUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """A fixed stratified split of `labels` into (train, holdout) indices."""
    holdout = stratified_indices(labels, size / len(labels), seed=SPLIT_SEED + 1)
    return np.setdiff1d(np.arange(len(labels)), holdout), holdout


def select_splits(
    data: Cifar100, subset: float = 1.0, valid: str = "test"
) -> tuple[RawSplit, RawSplit]:
    """The (train, valid) splits for a run: validate on test or a train holdout, then subset."""
    train, test = data.train, data.test
    if valid == "holdout":
        train_idx, valid_idx = holdout_indices(train.labels)
        train, test = _take(train, train_idx), _take(train, valid_idx)
    elif valid != "test":
        raise ValueError(f"valid={valid!r} is not accepted; choose test or holdout")
    train = _take(train, stratified_indices(train.labels, subset))
    test = _take(test, stratified_indices(test.labels, subset))
    return train, test


def _take(split: RawSplit, indices: np.ndarray) -> RawSplit:
    return RawSplit(split.pixels[indices], split.labels[indices])


def crop_flip(
    images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, pad: int = 4
) -> torch.Tensor:
    """Zero-pad a (N, C, H, W) batch by `pad`, crop each image at (top, left), mirror where `flip`.

    One gather does the whole batch; the result has channels-last strides.
    """
    n, _, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = top[:, None] + torch.arange(height, device=images.device)
    cols = left[:, None] + torch.arange(width, device=images.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class RandomCropFlip(Transform):
    """Random crop with `pad`-pixel zero padding and horizontal flip, on whole training batches."""

    split_idx, order = 0, 5  # training batches only; before ByteNormalize (order 10)

    def __init__(self, pad: int = 4):
        super().__init__()
        self.pad = pad

    def encodes(self, x: TensorImage) -> TensorImage:
        images = x.as_subclass(torch.Tensor)
        n, device = len(images), images.device
        top, left = torch.randint(0, 2 * self.pad + 1, (2, n), device=device)
        flip = torch.rand(n, device=device) < 0.5
        return TensorImage(crop_flip(images, top, left, flip, self.pad))


class ByteNormalize(Transform):
    """uint8 images to normalised floats in one step on plain tensors; decodes back to uint8.

    fastai's IntToFloatTensor + Normalize do the same in four operations on `TensorImage`, each
    dispatched through Python; this is one fused expression.
    """

    order = 10

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.mean, self.std = mean, std
        # (x / 255 - mean) / std  ==  shift + x * scale
        self.shift, self.scale = -mean / std, 1 / (255 * std)

    def encodes(self, x: TensorImage) -> TensorImage:
        return TensorImage(torch.addcmul(self.shift, x.as_subclass(torch.Tensor), self.scale))

    def decodes(self, x: TensorImage) -> TensorImage:
        images = x.as_subclass(torch.Tensor)
        pixels = ((images * self.std + self.mean).clamp(0, 1) * 255).round()
        return TensorImage(pixels.to(torch.uint8))


class ImageSet:
    """Images (N, 3, 32, 32) uint8 and labels as tensors on one device, indexable like a dataset."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, vocab: list[str], split_idx: int
    ):
        self.images, self.labels, self.vocab, self.split_idx = images, labels, vocab, split_idx

    @classmethod
    def from_raw(cls, split: RawSplit, vocab: list[str], split_idx: int, device=None) -> ImageSet:
        """Wrap a split read from disk, moving it to `device` once."""
        images = torch.from_numpy(split.pixels).view(-1, 3, 32, 32).to(device)
        return cls(images, torch.from_numpy(split.labels).to(device), vocab, split_idx)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[TensorImage, TensorCategory]:
        return TensorImage(self.images[index]), TensorCategory(self.labels[index])

    def batch(self, indices: torch.Tensor) -> tuple[TensorImage, TensorCategory]:
        """The images and labels at `indices`, gathered on the device."""
        return TensorImage(self.images[indices]), TensorCategory(self.labels[indices])

    def decode(self, sample: tuple, full: bool = True) -> tuple:
        """Turn a label index into its class name, for `show_batch` and `show_results`."""
        image, label = sample
        return image, Category(self.vocab[int(label)])

    def new_empty(self) -> ImageSet:
        return ImageSet(self.images[:0], self.labels[:0], self.vocab, self.split_idx)


class TensorDL(TfmdDL):
    """A fastai DataLoader that cuts batches from an `ImageSet` by index, with no per-item work."""

    def get_idxs(self) -> torch.Tensor:
        # one torch permutation on the data's device (seeded by torch, like the model): fastai's
        # own shuffles a Python list of all 50,000 indices every epoch, while the GPU waits
        n, device = len(self.dataset), self.dataset.images.device
        return torch.randperm(n, device=device) if self.shuffle else torch.arange(n, device=device)

    def sample(self) -> torch.Tensor:
        return self._DataLoader__idxs  # the order get_idxs made for this epoch (num_workers=0)

    def create_batches(self, samps):
        if not isinstance(samps, torch.Tensor):  # fastai's DistributedDL hands over a generator
            samps = [int(index) for index in samps]
        order = torch.as_tensor(samps, dtype=torch.long, device=self.dataset.images.device)
        for start in range(0, len(order), self.bs):
            indices = order[start : start + self.bs]
            if self.drop_last and len(indices) < self.bs:
                return
            yield self.dataset.batch(indices)


def batch_tfms(device: torch.device, augment: bool) -> list:
    """Training-batch transforms: optional crop/flip, then scaling to [0, 1] and normalisation."""
    mean, std = (
        torch.tensor(s, device=device).view(1, 3, 1, 1) for s in (CIFAR100_MEAN, CIFAR100_STD)
    )
    return ([RandomCropFlip()] if augment else []) + [ByteNormalize(mean, std)]


def cifar100_dls(
    bs: int = 256,
    subset: float = 1.0,
    valid: str = "test",
    aug: str = "crop_flip",
    data: str | os.PathLike | Cifar100 | None = None,
    device: str | torch.device | None = None,
) -> DataLoaders:
    """fastai `DataLoaders` over CIFAR-100 held in memory on `device` (default: the GPU if any).

    `data` is a folder (see `files.data_folder`) or an already loaded `Cifar100`.
    """
    if not isinstance(data, Cifar100):
        data = load_cifar100(data)
    device = torch.device(device) if device is not None else default_device()
    train, test = select_splits(data, subset, valid)
    train_set = ImageSet.from_raw(train, data.classes, split_idx=0, device=device)
    valid_set = ImageSet.from_raw(test, data.classes, split_idx=1, device=device)
    common = dict(device=device, num_workers=0, after_batch=batch_tfms(device, aug == "crop_flip"))
    # drop_last keeps every step's batch statistics and lr/bs ratio the same
    train_dl = TensorDL(train_set, bs=bs, shuffle=True, drop_last=len(train_set) > bs, **common)
    # evaluation needs no gradients, so twice the batch fits in the same memory
    valid_dl = TensorDL(valid_set, bs=2 * bs, shuffle=False, **common)
    return DataLoaders(train_dl, valid_dl, device=device)
