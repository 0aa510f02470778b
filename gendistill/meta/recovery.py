"""Label-conditional images recovered from a black-box API by zero-order inversion (BiDf-MKD's data recovery).

An API (:class:`gendistill.dfkd.blackbox.BlackBoxTeacher`, probabilities only) is inverted class by class: for each
of its N classes, ``per_class`` images start from noise and descend the cross-entropy of the API's answer to their
class. The API gives no gradient, so the gradient of that loss in the pixels comes from
:func:`gendistill.dfkd.blackbox.zero_order_grad` (antithetic Gaussian directions drawn at ``resolution`` x
``resolution`` and upsampled: the digits' structure is low-frequency, and fewer dimensions make the estimate
sharper per query). What we add on our side, where gradients are free: images are ``sigmoid`` of free logits (so
they stay in [0, 1]), each step queries them shifted by a random jitter of up to ``jitter`` pixels (the image must
work wherever it sits, as DeepInversion's jitter), and two priors pull them towards dark, smooth images (``l1`` x
mean pixel, ``tv`` x total variation): without them the recovered images are high-contrast noise (measured:
docs/meta.md). The pixel logits are updated by Adam (torch's, its moments checkpointed by :meth:`state_dict`).

Cost: ``2 * directions`` queries per image per step (plus none for the priors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dfkd.blackbox import BlackBoxTeacher, zero_order_grad
from ..errors import UsageError


@dataclass
class RecoveryConfig:
    per_class: int = 10  # images recovered per class of each API
    steps: int = 30  # zero-order steps from noise to a recovered set
    directions: int = 32  # random directions per image of each zero-order estimate (2 queries each)
    resolution: int = 16  # the directions' resolution (upsampled to the image size; 0: full size)
    sigma: float = 1e-2  # step along each direction
    lr: float = 0.1  # Adam learning rate of the pixel logits
    jitter: int = 2  # random shift (pixels) of the queried images at each step
    l1: float = 0.5  # weight of the mean pixel (dark background)
    tv: float = 0.05  # weight of the total variation (smooth strokes)
    init_mean: float = -2.0  # the pixel logits start at N(init_mean, init_std^2): sigmoid(-2) = 0.12, a dark image
    init_std: float = 0.5

    def validate(self) -> None:
        for name in ("per_class", "steps", "directions"):
            if getattr(self, name) < 1:
                raise UsageError(f"recovery {name} must be >= 1, got {getattr(self, name)}")
        for name in ("sigma", "lr", "init_std"):
            if not getattr(self, name) > 0:
                raise UsageError(f"recovery {name} must be > 0, got {getattr(self, name)}")
        for name in ("resolution", "jitter", "l1", "tv"):
            if getattr(self, name) < 0:
                raise UsageError(f"recovery {name} must be >= 0, got {getattr(self, name)}")


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of vertically and of horizontally adjacent pixels, summed."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., 1:] - x[..., :-1]).abs().mean()


class Recovery:
    """``per_class`` images of each of ``num_classes`` classes, recovered from ``api`` (module docstring). Labels
    are ``labels`` (class c's images are rows ``c * per_class .. (c + 1) * per_class - 1``)."""

    def __init__(
        self, api: BlackBoxTeacher, *, num_classes: int, image_shape: tuple[int, int, int], config: RecoveryConfig
    ):
        config.validate()
        if config.resolution and config.resolution > min(image_shape[1:]):
            raise UsageError(f"recovery resolution {config.resolution} exceeds the image size {image_shape[1:]}")
        self.api, self.config = api, config
        self.labels = torch.arange(num_classes).repeat_interleave(config.per_class)
        self.logits = torch.zeros(len(self.labels), *image_shape, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.logits], lr=config.lr)

    @property
    def images(self) -> torch.Tensor:
        return torch.sigmoid(self.logits).detach()

    def reset(self, device: torch.device | str | None = None) -> None:
        """Fresh noise (global RNG) and fresh Adam moments (on ``device``, e.g. the API's; None: where they are)."""
        if device is not None and self.logits.device != torch.device(device):
            self.logits = torch.zeros_like(self.logits, device=device).requires_grad_()
        with torch.no_grad():
            self.logits.normal_(self.config.init_mean, self.config.init_std)
        self.optimizer = torch.optim.Adam([self.logits], lr=self.config.lr)

    def answer_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Per-image cross-entropy of the API's answers to the images' classes (images may repeat the set)."""
        probs = self.api(images)
        labels = self.labels.to(probs.device).repeat(len(images) // len(self.labels))
        return -probs.gather(1, labels[:, None]).squeeze(1).clamp_min(torch.finfo(probs.dtype).tiny).log()

    def step(self) -> None:
        """One zero-order step of every image (global RNG for the jitter and the directions)."""
        cfg = self.config
        x = torch.sigmoid(self.logits)
        shift = torch.randint(-cfg.jitter, cfg.jitter + 1, (2,)).tolist() if cfg.jitter else [0, 0]
        shifted = torch.roll(x, shift, dims=(2, 3))
        resolution = cfg.resolution if cfg.resolution and cfg.resolution < min(x.shape[-2:]) else None
        grad = zero_order_grad(self.answer_loss, shifted.detach(), directions=cfg.directions, sigma=cfg.sigma,
                               resolution=resolution)  # fmt: skip
        # d/dx of the mean cross-entropy enters through (shifted * grad).sum() / n; the priors by autograd.
        loss = (shifted * grad).sum() / len(x) + cfg.l1 * x.mean() + cfg.tv * total_variation(x)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def recover(self, device: torch.device | str | None = None) -> None:
        """A fresh set: :meth:`reset` then ``steps`` zero-order steps."""
        self.reset(device)
        for _ in range(self.config.steps):
            self.step()

    def state_dict(self) -> dict:
        state = self.optimizer.state.get(self.logits, {})
        adam = {k: state[k].clone() for k in ("step", "exp_avg", "exp_avg_sq") if k in state}
        return {"logits": self.logits.detach().clone(), "adam": adam}

    def load_state_dict(self, state: dict) -> None:
        self.logits = state["logits"].clone().to(self.logits.device).requires_grad_()
        self.optimizer = torch.optim.Adam([self.logits], lr=self.config.lr)
        if state["adam"]:
            self.optimizer.state[self.logits] = {k: v.clone() for k, v in state["adam"].items()}
