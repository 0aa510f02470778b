"""A biased dataset from the MNIST subset: the label is ``digit >= 5``, the sensitive attribute is an inverted
image (white background, black digit), and in the biased split the attribute agrees with the label at ``rate``
(0.95: 95% of the "high" digits are inverted and 5% of the "low" ones). A balanced split draws the attribute
independently of the label (rate 0.5), which is how a fair classifier is judged.
"""

from __future__ import annotations

import torch

from ..data.classification import convert_images
from ..data.mnist import load_mnist5k
from ..errors import UsageError


def biased_digits(split: str = "train", *, rate: float = 0.95, seed: int = 0):
    """Images (N, 1, 32, 32) in [0, 1], digits (N,), labels ``digit >= 5`` (N,) and sensitive attributes (N,)
    (1: inverted) of the MNIST subset's ``split``; the attribute equals the label with probability ``rate``."""
    if not 0.0 <= rate <= 1.0:
        raise UsageError(f"rate must be in [0, 1], got {rate}")
    images, digits = load_mnist5k(split)
    images = convert_images(images.float() / 255.0, image_size=32)
    labels = (digits >= 5).long()
    agree = torch.rand(len(labels), generator=torch.Generator().manual_seed(seed)) < rate
    sensitive = torch.where(agree, labels, 1 - labels)
    images = torch.where(sensitive.view(-1, 1, 1, 1).bool(), 1 - images, images)
    return images, digits, labels, sensitive
