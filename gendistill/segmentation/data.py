"""Segmentation data: images (N, C, H, W) in [0, 1] with masks (N, H, W) of class indices (0: background).

``mnist5k`` is the offline MNIST subset with digit masks made from its pixels: every pixel of at least
``threshold`` (half the white level by default) is labelled with its digit's class, ``digit + 1``; all others are
background, 0 (11 classes). An ``.npz`` with ``images`` (N, H, W[, C]) and ``masks`` (N, H, W) gives any other set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.classification import convert_images
from ..data.mnist import load_mnist5k
from ..errors import UsageError
from ..files import open_npz

DIGIT_CLASSES = 11  # background + the ten digits


def digit_masks(images: torch.Tensor, labels: torch.Tensor, *, threshold: float = 0.5) -> torch.Tensor:
    """Masks (N, H, W) int64 of digit images (N, 1, H, W) in [0, 1] with labels (N,): ``labels + 1`` where the
    pixel is >= ``threshold``, 0 elsewhere."""
    if images.dim() != 4 or images.shape[1] != 1 or len(images) != len(labels):
        raise UsageError(f"digit_masks needs (N, 1, H, W) images and N labels, got {tuple(images.shape)}")
    foreground = images[:, 0] >= threshold
    return torch.where(foreground, labels.view(-1, 1, 1).long() + 1, torch.zeros((), dtype=torch.long))


def load_segmentation_data(data: str, *, split: str = "train", image_size: int = 32, threshold: float = 0.5):
    """Images (N, 1 or 3, S, S) in [0, 1], masks (N, S, S) int64 and the number of classes of ``data``:
    ``mnist5k`` (its ``split``: train, test or all; 28x28 zero-padded to 32) or an ``.npz`` (every image; masks
    resized with nearest neighbours)."""
    if data == "mnist5k":
        images, labels = load_mnist5k(split)
        images = convert_images(images.float() / 255.0, image_size=image_size)
        return images, digit_masks(images, labels, threshold=threshold), DIGIT_CLASSES
    path = Path(data).expanduser()
    if path.suffix != ".npz" or not path.is_file():
        raise UsageError(f"segmentation data {data!r} is neither mnist5k nor an existing .npz of images and masks")
    with open_npz(path, what="segmentation data") as arrays:
        missing = [k for k in ("images", "masks") if k not in arrays.files]
        if missing:
            raise UsageError(
                f"{path} has no {', '.join(missing)} array; expected images (N, H, W[, C]), masks (N, H, W)"
            )
        images, masks = arrays["images"], arrays["masks"]
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or masks.shape != images.shape[:3]:
        raise UsageError(
            f"{path}: images (N, H, W[, C]) and masks (N, H, W) must agree, got {images.shape}, {masks.shape}"
        )
    if masks.min() < 0:
        raise UsageError(f"{path}: masks hold class indices >= 0, got {masks.min()}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    x = convert_images(x.float() / 255.0 if not x.is_floating_point() else x.float(), image_size=image_size)
    m = torch.from_numpy(masks.astype(np.int64))[:, None].float()
    m = F.interpolate(m, size=(image_size, image_size), mode="nearest")[:, 0].long()
    return x, m, int(m.max()) + 1
