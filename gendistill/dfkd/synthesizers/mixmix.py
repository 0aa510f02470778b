"""MixMix: All You Need for Data-Free Compression Are Feature and Data Mixing (Y. Li et al., ICCV 2021, arXiv
2011.09899).

Synthesis as DeepInversion's (pixels optimized by Adam, finished batches in a pool the student samples from), with
the paper's two changes:

- **Feature mixing**: the pixels are inverted against several pretrained classifiers at once, the teacher being
  distilled plus ``extra_teachers`` (other architectures welcome; ``gendistill dfkd --extra-teachers DIR,DIR``). The
  BatchNorm-statistics term sums over every BatchNorm layer of every teacher (a "universal" feature space instead
  of one model's); the class and competition terms read the teachers' mean logits. A teacher that takes another
  number of channels gets the images repeated to RGB or averaged to gray.
- **Data mixing**: at each inversion step, with probability ``mix_prob``, the batch is CutMixed: one random box,
  the same for the whole batch, of every image is replaced by that box of another image of the batch (a random
  permutation), and the class target becomes area-weighted, ``lam * onehot(y) + (1 - lam) * onehot(y_perm)`` with
  ``lam`` the kept fraction of the image. The image priors (TV, l2) and the pool see the unmixed pixels.

The student learns from the distilled teacher alone (the model being compressed); the extra teachers only shape the
images. Without extra teachers this is DeepInversion with data mixing. Choices of this implementation, not taken
from the paper's code: the class term is the cross-entropy of the teachers' mean logits (not one term per teacher),
every BN layer of every teacher counts once, one box per batch, and DeepInversion's schedule and weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...data.images import to_channels
from ...errors import UsageError
from ..losses import image_prior_loss
from .base import detached
from .deepinversion import DeepInversion, DeepInversionConfig


@dataclass
class MixMixConfig(DeepInversionConfig):
    mix_prob: float = 0.5  # probability that an inversion step CutMixes its batch (0: feature mixing only)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.mix_prob <= 1.0:
            raise UsageError(f"mix_prob must be in [0, 1], got {self.mix_prob}")


class TeacherEnsemble(nn.Module):
    """Several classifiers as one: ``forward`` is the mean of their logits (each fed its own channel count), and
    every BatchNorm layer of every member is a module of the ensemble (so a BN-statistics loss installed on it sums
    over all of them)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = [m(to_channels(images, m.config.in_channels)) for m in self.members]
        return torch.stack(logits).mean(0)


def cutmix(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix of a batch (Yun et al., ICCV 2019), from the global RNG: ``lam ~ U(0, 1)``, a box of area ``1 - lam``
    (clipped at the borders) at a uniform centre, a random pairing. Returns the mixed images (gradients flow to both
    sources) and the soft targets (B, K), weighted by the area each source keeps."""
    b, _, h, w = images.shape
    lam = float(torch.rand(()))
    cut_h, cut_w = int(h * math.sqrt(1.0 - lam)), int(w * math.sqrt(1.0 - lam))
    cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    perm = torch.randperm(b, device=images.device)
    mask = torch.zeros(1, 1, h, w, device=images.device, dtype=images.dtype)
    mask[..., top:bottom, left:right] = 1.0
    mixed = images * (1 - mask) + images[perm] * mask
    kept = 1.0 - (bottom - top) * (right - left) / (h * w)
    onehot = F.one_hot(labels, num_classes).to(images.dtype)
    return mixed, kept * onehot + (1.0 - kept) * onehot[perm]


class MixMix(DeepInversion):
    """DeepInversion against an ensemble of teachers, with CutMix of the batch during inversion (module docstring).

    State: DeepInversion's (pool, calls; checkpointed); the extra teachers are frozen and belong to the DFKD task.
    """

    name = "mixmix"
    Config = MixMixConfig
    uses_extra_teachers = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.extra_teachers: list[nn.Module] = []

    def set_extra_teachers(self, teachers: list[nn.Module]) -> None:
        """The other pretrained classifiers whose BN statistics and classes join the inversion (the DFKD task's)."""
        self.extra_teachers = list(teachers)

    def synthesis_loss(self, x, labels, *, teacher, student) -> dict[str, torch.Tensor]:
        """DeepInversion's losses of pixels ``x`` against the ensemble of teachers, on a CutMix of the batch with
        probability ``mix_prob`` (then against area-weighted soft targets)."""
        cfg = self.config
        ensemble = TeacherEnsemble([teacher, *self.extra_teachers]) if self.extra_teachers else teacher
        images, targets = x, labels
        if cfg.mix_prob > 0 and float(torch.rand(())) < cfg.mix_prob:
            images, targets = cutmix(x, labels, self.num_classes)
        inv = self.inversion(images, targets, teacher=ensemble, student=student, adv_kind="js", adv_tau=cfg.adv_tau)
        loss_tv, loss_l2 = image_prior_loss(x)
        loss = inv.loss + cfg.tv * loss_tv + cfg.l2 * loss_l2
        return {"loss": loss, **detached(inv.terms), "loss_tv": loss_tv.detach(), "loss_l2": loss_l2.detach()}
