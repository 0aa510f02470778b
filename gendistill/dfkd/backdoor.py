"""Backdoor triggers and data poisoning: plant a backdoor in a teacher to test whether distillation passes it on
(docs/evaluation.md, "Classifier quality").

A trigger maps clean images (B, C, H, W) in [0, 1] to triggered images of the same shape, for any channel count and
size, deterministically (the same settings always give the same trigger). Patch-style triggers stamp a pattern
through a mask: ``x' = (1 - m) * x + m * p`` (m, p of shape (C, H, W)); the blended trigger mixes the whole image
with a pattern.

    badnets    BadNets (Gu et al. 2017): a white or checkerboard square near the bottom-right corner
    blend      Blended injection (Chen et al. 2017): ``(1 - alpha) x + alpha * pattern``, a seeded random pattern
    trojan     Trojan-style (Liu et al., NDSS 2018): a watermark-like ring-and-dot mask in the corner stamped with a
               fixed seeded pattern, without the paper's trigger-optimization step

``poison`` stamps a trigger on a fraction of the non-target images and relabels them to the target class: training
a classifier on the result plants the backdoor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError

PATTERNS = ("white", "checkerboard")


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise UsageError(f"images must be a float tensor (B, C, H, W) in [0, 1], got {shape}")


def _side(size: float, height: int, width: int) -> int:
    """A square's side in pixels: ``size`` < 1 is a fraction of the shorter image side, ``size`` >= 1 pixels."""
    short = min(height, width)
    side = round(size * short) if size < 1 else int(size)
    return max(1, min(side, short))


def _check_size(size: float) -> None:
    if isinstance(size, bool) or not isinstance(size, int | float) or size <= 0:
        raise UsageError(f"size must be a fraction of the image side in (0, 1) or a pixel count >= 1, got {size!r}")
    if size >= 1 and size != int(size):
        raise UsageError(f"size >= 1 counts pixels and must be a whole number, got {size!r}")


def _seeded_pattern(seed: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Uniform [0, 1] values (C, H, W) that depend only on the seed and the shape (drawn on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(channels, height, width, generator=gen)


def _stamp(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``(1 - m) x + m p`` with mask (H, W) and pattern (C or 1, H, W), in the dtype and device of ``images``."""
    mask = mask.to(device=images.device, dtype=images.dtype)
    pattern = pattern.to(device=images.device, dtype=images.dtype)
    return images * (1 - mask) + pattern * mask


@dataclass(frozen=True)
class BadNets:
    """BadNets (Gu et al., 2017, "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply
    Chain"): a small square patch near the bottom-right corner.

    ``size``: the square's side, a fraction of the image side if < 1 (0.125: 4 px of 32) or pixels if >= 1.
    ``pattern``: "white" (all ones) or "checkerboard" (ones on the corner pixel, alternating with zeros).
    ``margin``: pixels between the square and the bottom and right edges.
    """

    size: float = 0.125
    pattern: str = "white"
    margin: int = 1

    def __post_init__(self) -> None:
        _check_size(self.size)
        if self.pattern not in PATTERNS:
            raise UsageError(f"unknown BadNets pattern {self.pattern!r}; valid: {', '.join(PATTERNS)}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, int) or self.margin < 0:
            raise UsageError(f"margin must be an integer >= 0, got {self.margin!r}")

    def _box(self, height: int, width: int) -> tuple[int, int, int]:
        """(top, left, side) of the square, shifted into the image when the margin does not fit."""
        side = _side(self.size, height, width)
        top = max(0, height - self.margin - side)
        left = max(0, width - self.margin - side)
        return top, left, side

    def mask(self, height: int, width: int) -> torch.Tensor:
        """(H, W) float: 1 on the pixels the trigger replaces."""
        top, left, side = self._box(height, width)
        mask = torch.zeros(height, width)
        mask[top : top + side, left : left + side] = 1
        return mask

    def pattern_image(self, channels: int, height: int, width: int) -> torch.Tensor:
        """(C, H, W): the values stamped inside the mask (the same on every channel)."""
        if self.pattern == "white":
            return torch.ones(channels, height, width)
        top, left, side = self._box(height, width)
        rows = torch.arange(height)[:, None] - (top + side - 1)
        cols = torch.arange(width)[None, :] - (left + side - 1)
        board = ((rows + cols) % 2 == 0).float()  # the corner pixel of the square is white
        return board.expand(channels, height, width)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> triggered images (B, C, H, W)."""
        _check_images(images)
        _, channels, height, width = images.shape
        return _stamp(images, self.mask(height, width), self.pattern_image(channels, height, width))


@dataclass(frozen=True)
class Blend:
    """Blended injection (Chen et al., 2017, "Targeted Backdoor Attacks on Deep Learning Systems Using Data
    Poisoning", Sec. 4): ``x' = (1 - alpha) * x + alpha * pattern`` over the whole image.

    ``pattern`` is uniform random noise (C, H, W) drawn from ``seed`` (the paper's random-pattern key), so it is
    fixed for a given seed, channel count and size. ``alpha``: the blend ratio (0.2 in the paper's training).
    """

    alpha: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not 0 < self.alpha <= 1:
            raise UsageError(f"alpha must be in (0, 1], got {self.alpha!r}")

    def pattern_image(self, channels: int, height: int, width: int) -> torch.Tensor:
        """(C, H, W) in [0, 1]: the seeded noise pattern."""
        return _seeded_pattern(self.seed, channels, height, width)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> (1 - alpha) images + alpha pattern, (B, C, H, W)."""
        _check_images(images)
        _, channels, height, width = images.shape
        pattern = self.pattern_image(channels, height, width).to(device=images.device, dtype=images.dtype)
        return (1 - self.alpha) * images + self.alpha * pattern


@dataclass(frozen=True)
class Trojan:
    """Trojan-style trigger (Liu et al., NDSS 2018, "Trojaning Attack on Neural Networks"): a fixed pattern stamped
    through a watermark-like mask in the bottom-right corner, ``x' = (1 - m) x + m p``.

    The mask is a square ring of ``thickness`` pixels with a dot in its centre (a small logo) of side ``size``
    (a fraction of the image side if < 1, pixels if >= 1). The pattern ``p`` is seeded uniform noise standing in
    for the paper's trigger values: this implementation does NOT run the trigger-optimization step that tunes the
    values to excite chosen neurons of the model; the trigger is model-independent, and the backdoor is planted by
    poisoning instead of the paper's retraining on reverse-engineered data.
    """

    size: float = 0.25
    thickness: int = 1
    margin: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _check_size(self.size)
        for name in ("thickness", "margin"):
            value = getattr(self, name)
            minimum = 1 if name == "thickness" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")

    def mask(self, height: int, width: int) -> torch.Tensor:
        """(H, W) float: 1 on the ring and the centre dot."""
        side = _side(self.size, height, width)
        top, left = max(0, height - self.margin - side), max(0, width - self.margin - side)
        square = torch.zeros(side, side)
        t = min(self.thickness, (side + 1) // 2)
        square[:t], square[-t:], square[:, :t], square[:, -t:] = 1, 1, 1, 1  # the ring
        dot = max(1, side // 4)
        dot += (side - dot) % 2  # centred: same parity as the side
        start = (side - dot) // 2
        square[start : start + dot, start : start + dot] = 1  # the logo's centre
        mask = torch.zeros(height, width)
        mask[top : top + side, left : left + side] = square
        return mask

    def pattern_image(self, channels: int, height: int, width: int) -> torch.Tensor:
        """(C, H, W) in [0, 1]: seeded noise, bright (in [0.5, 1]) so that it stands out on dark backgrounds too."""
        return 0.5 + 0.5 * _seeded_pattern(self.seed, channels, height, width)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> triggered images (B, C, H, W)."""
        _check_images(images)
        _, channels, height, width = images.shape
        return _stamp(images, self.mask(height, width), self.pattern_image(channels, height, width))


Trigger = BadNets | Blend | Trojan
TRIGGERS: dict[str, type[BadNets] | type[Blend] | type[Trojan]] = {
    "badnets": BadNets,
    "blend": Blend,
    "trojan": Trojan,
}


def make_trigger(name: str, **options) -> Trigger:
    """The trigger called ``name`` (a key of ``TRIGGERS``) with its dataclass ``options``."""
    if name not in TRIGGERS:
        raise UsageError(f"unknown backdoor trigger {name!r}; valid: {', '.join(TRIGGERS)}")
    return TRIGGERS[name](**options)


def _resolve(trigger: Trigger | str) -> Trigger:
    if isinstance(trigger, str):
        return make_trigger(trigger)
    if not hasattr(trigger, "apply"):
        raise UsageError(f"trigger must be a name ({', '.join(TRIGGERS)}) or a trigger object, got {trigger!r}")
    return trigger


def poison(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    trigger: Trigger | str,
    target: int,
    rate: float,
    seed: int = 0,
    num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stamp ``trigger`` on ``rate`` of the non-target images and relabel them to ``target`` (BadNets-style poisoning).

    Args:
        images: (N, C, H, W) in [0, 1]. labels: (N,) int class indices.
        trigger: a trigger object or a name of ``TRIGGERS`` (default settings).
        target: the class the triggered images are relabelled to, in ``[0, num_classes)``.
        rate: fraction in (0, 1] of the images whose label is not ``target`` to poison (rounded, at least one).
        seed: which images are chosen (a CPU generator; the global RNG is untouched).
        num_classes: K (default: ``labels.max() + 1``).

    Returns:
        (images, labels, poisoned): new tensors with the chosen images triggered and relabelled, and the (N,) bool
        mask of the poisoned rows. The inputs are not changed.
    """
    trigger = _resolve(trigger)
    _check_images(images)
    if labels.dim() != 1 or len(labels) != len(images):
        raise UsageError(f"labels must be (N,) with N = {len(images)} images, got shape {tuple(labels.shape)}")
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1:
        raise UsageError(f"poison rate must be in (0, 1], got {rate!r}")
    classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < classes:
        raise UsageError(f"backdoor target {target!r} is not a class index; valid: 0 to {classes - 1}")
    candidates = torch.nonzero(labels.cpu() != target).flatten()
    if len(candidates) == 0:
        raise UsageError(f"every image has label {target}: there are no non-target images to poison")
    count = max(1, round(rate * len(candidates)))
    gen = torch.Generator().manual_seed(seed)
    chosen = candidates[torch.randperm(len(candidates), generator=gen)[:count]].to(images.device)
    poisoned = torch.zeros(len(images), dtype=torch.bool, device=images.device)
    poisoned[chosen] = True
    images, labels = images.clone(), labels.clone()
    images[chosen] = trigger.apply(images[chosen])
    labels[chosen.to(labels.device)] = target
    return images, labels, poisoned
