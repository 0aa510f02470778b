"""Image generators of data-free distillation, batch augmentation and the synthetic image pool (docs/dfkd.md,
"Generators"). Generators end with a sigmoid (images in [0, 1], the classifiers' input range), or with DFAD's
standardized output."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError

GENERATOR_OUTPUTS = ("sigmoid", "standardized")


class Generator(nn.Module):
    """The DAFL / Fast generator: ``Linear(nz -> 2 ngf (S/4)^2) -> BN -> [Upsample x2, Conv3x3, BN, LeakyReLU(0.2)]
    x2 -> Conv3x3 -> sigmoid`` for images of size S = ``img_size``.

    Submodule names and layout (``l1``, ``conv_blocks``) follow Fast-Datafree's ``Generator`` so its generator
    weights load unchanged. With ``num_classes`` the generator is class-conditional: a learned label embedding
    (num_classes, nz) is multiplied into the noise.

    ``output``: ``"sigmoid"`` (images in [0, 1]) or ``"standardized"`` (DFAD's output: tanh, then per-channel batch
    standardization in the classifier's normalized space, mapped to pixels with ``normalization`` = (mean, std) of
    the classifier's input normalization; such images are not confined to [0, 1]).

    forward(z (B, nz), labels (B,) or None) -> images (B, channels, img_size, img_size).
    """

    def __init__(
        self,
        nz: int = 256,
        ngf: int = 64,
        img_size: int = 32,
        channels: int = 3,
        num_classes: int | None = None,
        *,
        output: str = "sigmoid",
        normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    ):
        super().__init__()
        if img_size % 4 != 0 or img_size <= 0:
            raise UsageError(f"img_size must be a positive multiple of 4 (two x2 upsamplings), got {img_size}")
        if num_classes is not None and num_classes < 1:
            raise UsageError(f"num_classes must be positive or None (unconditional), got {num_classes}")
        if output not in GENERATOR_OUTPUTS:
            raise UsageError(f"generator output {output!r} is not valid; valid: {', '.join(GENERATOR_OUTPUTS)}")
        self.nz, self.ngf, self.img_size, self.channels, self.num_classes = nz, ngf, img_size, channels, num_classes
        self.output = output
        self.init_size = img_size // 4
        self.label_embedding = nn.Embedding(num_classes, nz) if num_classes is not None else None
        self.l1 = nn.Sequential(nn.Linear(nz, ngf * 2 * self.init_size**2))
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(ngf * 2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf * 2, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, channels, 3, stride=1, padding=1),
            nn.Sigmoid() if output == "sigmoid" else nn.Tanh(),
        )
        if output == "standardized":
            # DFAD's GeneratorA: tanh, then a BatchNorm without affine parameters, so every batch has zero mean and
            # unit variance per channel in the classifier's normalized input space; mapped back to pixels with the
            # classifier's normalization, so that the classifier sees exactly that batch.
            self.output_norm = nn.BatchNorm2d(channels, affine=False)
            mean, std = normalization if normalization is not None else ((0.0,) * channels, (1.0,) * channels)
            if len(mean) != channels or len(std) != channels:
                raise UsageError(f"normalization needs {channels} means and stds, got {mean} and {std}")
            self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), False)
            self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), False)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.nz:
            raise UsageError(f"z must be (B, nz={self.nz}), got shape {tuple(z.shape)}")
        if self.label_embedding is None:
            if labels is not None:
                raise UsageError("labels given to an unconditional Generator (built with num_classes=None)")
        else:
            if labels is None:
                raise UsageError(f"this Generator is class-conditional (num_classes={self.num_classes}): pass labels")
            z = z * self.label_embedding(labels)
        out = self.conv_blocks(self.l1(z).view(z.shape[0], self.ngf * 2, self.init_size, self.init_size))
        if self.output == "standardized":
            return self.output_norm(out) * self.pixel_std + self.pixel_mean
        return out


class EmbeddingGenerator(nn.Module):
    """Embedding-input generator (NAYER, CAE-DFKD): the input is a class embedding (embed_dim,) concatenated with
    noise (nz,), through the :class:`Generator` body (``self.body``, with input size ``embed_dim + nz``).

    The class embeddings (num_classes, embed_dim) start as a random orthogonal matrix
    (``torch.nn.init.orthogonal_``, global RNG): orthonormal rows when num_classes <= embed_dim, else orthonormal
    columns. With ``learn_embedding`` they are a parameter trained with the generator, else a fixed buffer (saved in
    the state dict either way).

    forward(z (B, nz), labels (B,)) -> images (B, channels, img_size, img_size) in [0, 1].
    """

    def __init__(
        self,
        num_classes: int,
        embed_dim: int = 64,
        nz: int = 256,
        ngf: int = 64,
        img_size: int = 32,
        channels: int = 3,
        learn_embedding: bool = True,
    ):
        super().__init__()
        if num_classes < 1 or embed_dim < 1:
            raise UsageError(f"num_classes and embed_dim must be positive, got {num_classes} and {embed_dim}")
        self.num_classes, self.embed_dim, self.nz = num_classes, embed_dim, nz
        weight = nn.init.orthogonal_(torch.empty(num_classes, embed_dim))
        if learn_embedding:
            self.class_embeddings = nn.Parameter(weight)
        else:
            self.register_buffer("class_embeddings", weight)
        self.body = Generator(nz=embed_dim + nz, ngf=ngf, img_size=img_size, channels=channels)

    def embedding(self, labels: torch.Tensor) -> torch.Tensor:
        """The class embeddings (B, embed_dim) of ``labels`` (B,)."""
        return self.class_embeddings[labels]

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.nz:
            raise UsageError(f"z must be (B, nz={self.nz}), got shape {tuple(z.shape)}")
        if labels is None or labels.shape != (z.shape[0],):
            got = None if labels is None else tuple(labels.shape)
            raise UsageError(f"labels must be (B,) = ({z.shape[0]},) class indices, got {got}")
        return self.body(torch.cat([self.embedding(labels), z], dim=1))


def augment(x: torch.Tensor, *, padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Random translation and horizontal flip, independently per sample, in one gather (no loop over the batch).

    Each image of ``x`` (B, C, H, W) is zero-padded by ``padding`` pixels on every side and cropped back to H x W at
    an offset drawn uniformly from ``{0, ..., 2 padding}`` in each direction (the usual CIFAR random crop), then
    mirrored left-right with probability 1/2 when ``flip``. Offsets and flips come from the global RNG of ``x``'s
    device. Differentiable with respect to ``x``. Returns (B, C, H, W).
    """
    if x.dim() != 4:
        raise UsageError(f"augment expects images (B, C, H, W), got shape {tuple(x.shape)}")
    if padding < 0:
        raise UsageError(f"padding must be >= 0, got {padding}")
    batch, _, height, width = x.shape
    device = x.device
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    offset_y = torch.randint(0, 2 * padding + 1, (batch, 1), device=device)
    offset_x = torch.randint(0, 2 * padding + 1, (batch, 1), device=device)
    cols = torch.arange(width, device=device).expand(batch, width)
    if flip:
        flipped = torch.rand(batch, 1, device=device) < 0.5
        cols = torch.where(flipped, width - 1 - cols, cols)  # read the crop's columns right to left
    rows = offset_y + torch.arange(height, device=device)  # (B, H) rows of the padded image
    cols = offset_x + cols  # (B, W)
    index = torch.arange(batch, device=device)[:, None, None]
    # Advanced indices on dims 0, 2, 3 with a slice on dim 1: the result is (B, H, W, C).
    return padded[index, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class ImagePool:
    """A ring buffer of synthesized images (and optional per-image labels) that a student samples from (Fast).

    Stored detached on the device (and with the dtype) of the first :meth:`add`; later batches are moved there.
    When full, the oldest entries are overwritten. Either every :meth:`add` has labels or none does. Labels are
    anything with one row per image: class indices (B,), or the teacher's logits (B, K) (a student memory).
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise UsageError(f"capacity must be a positive number of images, got {capacity}")
        self.capacity = capacity
        self.images: torch.Tensor | None = None  # (capacity, C, H, W) once the first batch arrives
        self.labels: torch.Tensor | None = None  # (capacity, ...) when the pool stores labels
        self._size = 0
        self._next = 0  # index the next image is written to

    def __len__(self) -> int:
        return self._size

    def to(self, device: torch.device) -> None:
        """Move the storage to ``device`` (a run resumed on another device, a preview on the CPU)."""
        if self.images is not None and self.images.device != device:
            self.images = self.images.to(device)
            self.labels = None if self.labels is None else self.labels.to(device)

    def add(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Store ``images`` (B, C, H, W) and ``labels`` (B, ...) if given."""
        if labels is not None and labels.shape[:1] != images.shape[:1]:
            raise UsageError(
                f"labels must have one row per image ({images.shape[0]}), got shape {tuple(labels.shape)}"
            )
        if self.images is None:
            self.images = images.new_empty((self.capacity, *images.shape[1:]))
            if labels is not None:
                self.labels = torch.empty((self.capacity, *labels.shape[1:]), dtype=labels.dtype, device=images.device)
        else:
            if images.shape[1:] != self.images.shape[1:]:
                raise UsageError(
                    f"images of shape {tuple(images.shape[1:])} added to a pool of {tuple(self.images.shape[1:])}"
                )
            if (labels is None) != (self.labels is None):
                has = "has" if self.labels is not None else "has no"
                raise UsageError(f"this pool {has} labels: pass labels to every add() or to none")
        count = images.shape[0]
        if count > self.capacity:  # only the newest `capacity` survive, as if written one by one
            self._next = (self._next + count - self.capacity) % self.capacity
            images = images[-self.capacity :]
            labels = labels[-self.capacity :] if labels is not None else None
            count = self.capacity
        slots = (self._next + torch.arange(count, device=self.images.device)) % self.capacity
        self.images[slots] = images.detach().to(self.images.device, self.images.dtype)
        if labels is not None:
            self.labels[slots] = labels.detach().to(self.labels.device, self.labels.dtype)
        self._next = (self._next + count) % self.capacity
        self._size = min(self._size + count, self.capacity)

    def sample(
        self, batch_size: int, *, replace: bool = True, weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``batch_size`` entries drawn uniformly (global RNG of the pool's device), with replacement
        (``torch.randint``) or without (``torch.randperm``; then at most ``len(self)``): (images (batch_size, C, H,
        W), labels (batch_size, ...) or None). ``weights`` (``len(self)``,), non-negative, one per stored entry in
        storage order: drawn with probability proportional to them instead (``torch.multinomial``)."""
        if self._size == 0:
            raise UsageError("cannot sample from an empty ImagePool: add() images first")
        if weights is not None:
            if weights.shape != (self._size,) or bool((weights < 0).any()) or not bool(weights.isfinite().all()):
                raise UsageError(
                    f"weights must be {self._size} finite non-negative values (one per stored entry), got shape "
                    f"{tuple(weights.shape)}"
                )
            positive = int((weights > 0).sum())
            if positive == 0 or (not replace and batch_size > positive):
                raise UsageError(f"cannot draw {batch_size} entries from {positive} of non-zero weight")
            index = torch.multinomial(weights.to(self.images.device, torch.float32), batch_size, replacement=replace)
        elif replace:
            index = torch.randint(0, self._size, (batch_size,), device=self.images.device)
        elif batch_size > self._size:
            raise UsageError(f"cannot draw {batch_size} distinct entries from a pool holding {self._size}")
        else:
            index = torch.randperm(self._size, device=self.images.device)[:batch_size]
        return self.images[index], self.labels[index] if self.labels is not None else None

    def state_dict(self) -> dict:
        """The filled slots (the first ``len(self)``: a pool wraps only once full), write position and capacity."""
        images, labels, size = self.images, self.labels, self._size
        return {
            "images": None if images is None else images[:size],
            "labels": None if labels is None else labels[:size],
            "size": size,
            "next": self._next,
            "capacity": self.capacity,
        }

    def load_state_dict(self, state: dict) -> None:
        size, next_slot, capacity = int(state["size"]), int(state["next"]), int(state["capacity"])
        images, labels = state["images"], state["labels"]
        filled = images is not None and len(images) == size and (size == capacity or next_slot == size)
        if capacity != self.capacity or not 0 <= next_slot < capacity or not (filled or (images is None and not size)):
            raise UsageError(
                f"a pool state of capacity {capacity} (size {size}, next slot {next_slot}) does not fit this pool of "
                f"capacity {self.capacity}"
            )
        self._size, self._next = size, next_slot
        self.images, self.labels = (
            None if t is None else torch.cat([t, t.new_empty((capacity - size, *t.shape[1:]))])
            for t in (images, labels)
        )
