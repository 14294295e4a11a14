"""Image classification data for the experiments, held as tensors; torchvision sets only from disk.

Offline: ``digits`` (scikit-learn) and ``synthetic``. torchvision ``mnist`` / ``cifar10`` / ``imagefolder`` are read
only when they are already on disk under ``data_dir`` (``download=False``; nothing is ever downloaded).

Every dataset is an :class:`ImageData`: integer ``targets`` plus a ``batch(index)`` that returns normalised images
``[B, C, H, W]``. :meth:`ImageData.indexed` wraps it as a ``torch.utils.data.Dataset`` returning ``(x, y, index)``
with the training labels of your choice (e.g. after label noise).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

__all__ = ["DATASETS", "DatasetNotFoundError", "ImageData", "IndexedDataset", "load_dataset"]

DATASETS = ("digits", "synthetic", "mnist", "cifar10", "imagefolder")

DIGITS_TRAIN = 1500
"""Size of the fixed ``digits`` training split (the other 297 of the 1797 images form the test split)."""

DIGITS_SPLIT_SEED = 0
"""The ``digits`` split is one fixed permutation, independent of the experiment seed."""


class DatasetNotFoundError(FileNotFoundError):
    """A torchvision dataset is not on disk where it was looked for (gradcoh never downloads data)."""


@dataclass(frozen=True)
class ImageData:
    """A labelled image set in memory (or, for ``imagefolder``, images loaded on demand).

    Attributes:
        name: Dataset name.
        images: ``[N, C, H, W]`` raw images (any dtype) or a Dataset whose items are ``(image tensor, label)``.
        targets: ``[N]`` int64 true labels.
        num_classes: Number of classes.
        mean: ``[C]`` per-channel mean subtracted after scaling.
        std: ``[C]`` per-channel standard deviation divided by after scaling.
        scale: Raw values are divided by this first (255 for uint8 images).

    """

    name: str
    images: torch.Tensor | Dataset
    targets: torch.Tensor
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor
    scale: float = 1.0

    def __len__(self) -> int:
        return int(self.targets.numel())

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.batch(torch.zeros(1, dtype=torch.long)).shape[1:])

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        """Normalised float32 images ``[B, C, H, W]`` for dataset positions ``index`` ``[B]``."""
        if isinstance(self.images, torch.Tensor):
            raw = self.images[index]
        else:
            raw = torch.stack([self.images[int(i)][0] for i in index])
        x = raw.to(torch.float32) / self.scale
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def indexed(self, labels: torch.Tensor | None = None) -> IndexedDataset:
        """A Dataset returning ``(x, y, index)`` with ``labels`` (default: the true targets)."""
        return IndexedDataset(self, self.targets if labels is None else labels)


class IndexedDataset(Dataset):
    """``(x [C, H, W], y, index)`` items of an :class:`ImageData` with given training labels."""

    def __init__(self, data: ImageData, labels: torch.Tensor) -> None:
        if len(labels) != len(data):
            raise ValueError(f"{len(labels)} labels for {len(data)} examples")
        self.data = data
        self.labels = torch.as_tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.data.batch(torch.tensor([i]))[0], self.labels[i], i


def load_dataset(name: str, data_dir: str | Path | None = None, *, train: bool = True, image_size: int = 32,
                 synthetic_size: int = 256, synthetic_shape: tuple[int, int, int] = (1, 8, 8),
                 synthetic_classes: int = 4, seed: int = 0) -> ImageData:
    """Load a dataset by name.

    Args:
        name: One of :data:`DATASETS`.
        data_dir: Root folder of the torchvision datasets (``mnist``, ``cifar10``, ``imagefolder``); unused otherwise.
        train: Training split (True) or test split.
        image_size: ``imagefolder`` images are resized to ``image_size × image_size``.
        synthetic_size: Examples of the ``synthetic`` set.
        synthetic_shape: ``(C, H, W)`` of the ``synthetic`` images.
        synthetic_classes: Classes of the ``synthetic`` set.
        seed: Seed of the ``synthetic`` set (the test split uses a different stream of the same seed).

    Returns:
        The dataset.

    Raises:
        ValueError: Unknown name, or a torchvision dataset without ``data_dir``.
        DatasetNotFoundError: The files of a torchvision dataset are not where they were looked for.

    """
    if name == "digits":
        return _digits(train)
    if name == "synthetic":
        return _synthetic(synthetic_size, synthetic_shape, synthetic_classes, seed, train)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
    if data_dir is None:
        raise ValueError(f"dataset {name!r} is read from disk: pass data_dir (--data-dir); nothing is downloaded")
    root = Path(data_dir).expanduser()
    if name == "mnist":
        return _mnist(root, train)
    if name == "cifar10":
        return _cifar10(root, train)
    return _imagefolder(root, train, image_size)


def _digits(train: bool) -> ImageData:
    from sklearn.datasets import load_digits

    bunch = load_digits()  # shipped with scikit-learn: no network
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(bunch.target))
    part = order[:DIGITS_TRAIN] if train else order[DIGITS_TRAIN:]
    images = torch.from_numpy(bunch.images[part].astype(np.float32) / 16.0).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    reference = torch.from_numpy(bunch.images[order[:DIGITS_TRAIN]].astype(np.float32) / 16.0)
    return ImageData("digits", images, torch.from_numpy(bunch.target[part]).long(), 10,
                     reference.mean().reshape(1), reference.std().reshape(1))


def _synthetic(n: int, shape: tuple[int, int, int], classes: int, seed: int, train: bool) -> ImageData:
    if n < 1 or classes < 2 or len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"synthetic data needs n >= 1, >= 2 classes and a (C, H, W) shape; got {n}, {classes}, "
                         f"{shape}")
    seeds = np.random.SeedSequence(seed).spawn(2)
    prototypes = torch.from_numpy(np.random.default_rng(seeds[0]).standard_normal((classes, *shape)))
    rng = np.random.default_rng(seeds[1].spawn(2)[0 if train else 1])
    targets = torch.from_numpy(rng.integers(0, classes, n))
    noise = torch.from_numpy(rng.standard_normal((n, *shape)))
    images = (prototypes[targets] + noise).to(torch.float32)  # class prototype + unit noise: learnable, not trivial
    return ImageData("synthetic", images, targets.long(), classes, torch.zeros(shape[0]), torch.ones(shape[0]))


_TORCHVISION_CLASS = {"mnist": "MNIST", "cifar10": "CIFAR10", "imagefolder": "ImageFolder"}


def _missing(name: str, expected: Path, what: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name} not found: expected {what} at {expected}. gradcoh never downloads data; put the dataset there "
        f"(e.g. with torchvision.datasets.{_TORCHVISION_CLASS[name]}(..., download=True) on a machine with network "
        "access) or pass another --data-dir"
    )


def _torchvision(factory: Any, root: Path, name: str, expected: Path, **kwargs: Any) -> Any:
    try:
        return factory(root=str(root), download=False, **kwargs)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        raise _missing(name, expected, "its files") from err


def _mnist(root: Path, train: bool) -> ImageData:
    from torchvision.datasets import MNIST

    expected = root / "MNIST" / "raw"
    if not expected.is_dir():
        raise _missing("mnist", expected, "the raw MNIST files (train-images-idx3-ubyte, ...)")
    ds = _torchvision(MNIST, root, "mnist", expected, train=train)
    images = ds.data.unsqueeze(1)  # [N, 1, 28, 28] uint8
    return ImageData("mnist", images, ds.targets.long(), 10, torch.tensor([0.1307]), torch.tensor([0.3081]), 255.0)


def _cifar10(root: Path, train: bool) -> ImageData:
    from torchvision.datasets import CIFAR10

    expected = root / "cifar-10-batches-py"
    if not expected.is_dir():
        raise _missing("cifar10", expected, "the extracted python batches (data_batch_1, ..., test_batch)")
    ds = _torchvision(CIFAR10, root, "cifar10", expected, train=train)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # [N, 3, 32, 32] uint8
    return ImageData("cifar10", images, torch.tensor(ds.targets).long(), 10,
                     torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616]), 255.0)


def _imagefolder(root: Path, train: bool, image_size: int) -> ImageData:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    split = root / ("train" if train else "test")
    folder = split if split.is_dir() else root
    if not folder.is_dir():
        raise _missing("imagefolder", folder, "one sub-folder of images per class")
    transform = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor()])
    try:
        ds = ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise _missing("imagefolder", folder, "one sub-folder of images per class") from err
    channels = ds[0][0].shape[0]
    return ImageData("imagefolder", ds, torch.tensor(ds.targets).long(), len(ds.classes),
                     torch.full((channels,), 0.5), torch.full((channels,), 0.5))
