"""Labelled images for classifiers, as float tensors in [0, 1]: the offline MNIST subset, a folder of images per
class, numpy arrays in an ``.npz`` file, or CIFAR-10/100 through torchvision when the user has the files (never
downloaded here).

Every source gives a train split and a held-out split: MNIST's per-class split, CIFAR's official test set, and a
seeded per-class split (``eval_fraction``) for folders and arrays.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..files import open_npz
from .images import load_image_folder
from .mnist import load_mnist5k

BUILTIN = ("mnist5k", "cifar10", "cifar100")
SPLITS = ("train", "test", "all")


def _resize(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] to ``image_size``: 28x28 digits are zero-padded to 32 (LeNet-5's input), anything
    else is resized bilinearly."""
    size = images.shape[-1]
    if size == image_size:
        return images
    if size == 28 and image_size == 32:
        return F.pad(images, (2, 2, 2, 2))
    return F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)


def _channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    if images.shape[1] == channels:
        return images
    if channels == 1:
        return images.mean(1, keepdim=True)
    if images.shape[1] == 1:
        return images.expand(-1, channels, -1, -1).contiguous()
    raise UsageError(f"cannot turn {images.shape[1]}-channel images into {channels} channels")


def _per_class_split(labels: torch.Tensor, split: str, eval_fraction: float, seed: int) -> torch.Tensor:
    """Indices of ``split``: a seeded ``eval_fraction`` of every class is held out."""
    if not 0.0 < eval_fraction < 1.0:
        raise UsageError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    gen = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        rows = torch.nonzero(labels == c).flatten()
        rows = rows[torch.randperm(len(rows), generator=gen)]
        held[rows[: max(1, round(len(rows) * eval_fraction))]] = True
    return torch.nonzero(held if split == "test" else ~held).flatten()


def _load_npz(path: Path, *, labelled: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``images`` (and ``labels``; without ``labelled`` they are optional and not read) of an .npz."""
    with open_npz(path, what="data file") as data:
        missing = [k for k in (("images", "labels") if labelled else ("images",)) if k not in data.files]
        if missing:
            expected = "'images' (N, H, W[, C]) and 'labels' (N,)" if labelled else "'images' (N, H, W[, C])"
            raise UsageError(f"{path} has no {', '.join(missing)} array; expected {expected}")
        images, labels = data["images"], data["labels"] if labelled else None
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or (labels is not None and len(images) != len(labels)):
        got = f"{images.shape}" if labels is None else f"{images.shape} and {labels.shape}"
        raise UsageError(f"{path}: images must be (N, H, W[, C]){' with one label each' * labelled}, got {got}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    x = x.float() / 255.0 if not x.is_floating_point() else x.float()
    return x, None if labels is None else torch.from_numpy(labels.astype(np.int64))


def load_unlabeled_images(data: str, *, image_size: int = 32, channels: int | None = None) -> torch.Tensor:
    """Images (N, C, S, S) float in [0, 1] of an unlabeled pool: a folder of images (searched recursively; class
    subfolders, if any, are ignored), an ``.npz`` with ``images`` (N, H, W[, C]) (``labels`` need not be there and
    are never read) or ``mnist5k`` (its training split). Resized and converted like :func:`load_classification_data`.
    """
    if data in ("cifar10", "cifar100"):
        raise UsageError(f"{data!r} is labelled data; give an image pool: a folder, an .npz or mnist5k")
    path = Path(data).expanduser()
    if data != "mnist5k" and path.suffix == ".npz" and path.is_file():
        images, _ = _load_npz(path, labelled=False)
        return convert_images(images, image_size=image_size, channels=channels)
    return load_classification_data(data, split="train" if data == "mnist5k" else "all", image_size=image_size,
                                    channels=channels)[0]  # fmt: skip


def _load_cifar(name: str, split: str, root: str | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    root = root or os.environ.get("GENDISTILL_DATA")
    if not root:
        raise UsageError(f"{name} needs --data-root DIR (or GENDISTILL_DATA) holding torchvision's {name} files")
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    trains = {"train": [True], "test": [False], "all": [True, False]}[split]
    try:
        parts = [cls(root, train=train, download=False) for train in trains]
    except RuntimeError as err:
        raise FileNotFoundError(f"{name} is not under {root!r} ({err}); gendistill never downloads it") from None
    images = torch.cat([torch.from_numpy(d.data).permute(0, 3, 1, 2) for d in parts]).float() / 255.0
    return images, torch.cat([torch.tensor(d.targets) for d in parts]), list(parts[0].classes)


def load_classification_data(
    data: str,
    *,
    split: str = "train",
    image_size: int = 32,
    channels: int | None = None,
    eval_fraction: float = 0.1,
    seed: int = 0,
    data_root: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images (N, C, S, S) float in [0, 1], labels (N,) int64 and class names of one split of ``data``.

    ``data``: "mnist5k" (offline, 1 channel), "cifar10"/"cifar100" (torchvision files under ``data_root``), a folder
    of images in class subfolders, or an ``.npz`` with ``images`` (N, H, W[, C]) and ``labels`` (N,).
    ``split``: ``"train"``, ``"test"`` (the builtin test split; a seeded ``eval_fraction`` of every class of a folder
    or ``.npz``) or ``"all"`` (every image: a folder or file that is already a held-out set).
    ``channels``: convert to 1 (grey) or 3 channels (None keeps the source's).
    """
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if data == "mnist5k":
        images, labels = load_mnist5k(split)
        images, names = images.float() / 255.0, [str(i) for i in range(10)]
    elif data in ("cifar10", "cifar100"):
        images, labels, names = _load_cifar(data, split, data_root)
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data {data!r} is neither one of {', '.join(BUILTIN)} nor an existing path")
        if path.is_dir():
            uint8, labels, names = load_image_folder(path, image_size=image_size)
            images = uint8.float() / 255.0
        elif path.suffix == ".npz":
            images, labels = _load_npz(path)
            names = [str(i) for i in range(int(labels.max()) + 1)]
        else:
            raise UsageError(f"data file {data!r} is not an .npz; give a folder of images or an .npz of arrays")
        if split != "all":
            index = _per_class_split(labels, split, eval_fraction, seed)
            images, labels = images[index], labels[index]
    return convert_images(images, image_size=image_size, channels=channels), labels, names


def convert_images(images: torch.Tensor, *, image_size: int, channels: int | None = None) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] resized to ``image_size`` and converted to ``channels`` (None: as they are),
    as :func:`load_classification_data` does for every source."""
    images = _resize(images, image_size)
    if channels is not None:
        images = _channels(images, channels)
    return images.contiguous()
