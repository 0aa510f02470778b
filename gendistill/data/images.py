"""A folder of images as an in-memory uint8 tensor, labelled by class subfolder."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageOps

from ..errors import UsageError
from ..files import open_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_image_files(folder: str | Path) -> list[Path]:
    """Every image file under ``folder`` (recursively, sorted, hidden files and folders skipped)."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data folder {str(folder)!r} does not exist; expected a folder of images")
    if not root.is_dir():
        raise UsageError(f"data {str(folder)!r} is not a folder; expected a folder of images")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise UsageError(f"data folder {str(folder)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def load_image_folder(folder: str | Path, *, image_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every image under ``folder`` (recursively) as RGB uint8 (N, 3, S, S), resized and center-cropped to
    ``image_size``, with labels (N,) int64 and the class names.

    Images in subfolders are labelled by their top-level subfolder, classes sorted by name; a folder holding
    images only at its top level is one class. Hidden files and folders are skipped.
    """
    root = Path(folder).expanduser()
    files = list_image_files(root)
    top_level = [p for p in files if p.parent == root]
    class_names = sorted({p.relative_to(root).parts[0] for p in files if p.parent != root})
    if top_level and class_names:
        raise UsageError(
            f"data folder {str(folder)!r} mixes images at its top level (e.g. {top_level[0].name!r}) with class "
            f"subfolders ({', '.join(class_names[:5])}); put every image in a class subfolder or none"
        )
    class_index = {name: i for i, name in enumerate(class_names)}
    images, labels = [], []
    for path in files:
        img = ImageOps.fit(open_image(path), (image_size, image_size), Image.Resampling.BICUBIC)
        images.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(image_size, image_size, 3))
        labels.append(class_index[path.relative_to(root).parts[0]] if class_names else 0)
    return torch.stack(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels), class_names or [root.name]


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, C, H, W) images as ``channels`` channels: gray repeated to RGB, RGB averaged to gray, else unchanged."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1:
        return images.expand(-1, channels, -1, -1)
    if channels == 1:
        return images.mean(1, keepdim=True)
    raise UsageError(f"cannot feed {images.shape[1]}-channel images to a {channels}-channel classifier")
