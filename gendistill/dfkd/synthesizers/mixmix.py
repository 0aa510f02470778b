"""MixMix: All You Need for Data-Free Compression Are Feature and Data Mixing (Y. Li et al., ICCV 2021, arXiv
2011.09899).

Synthesis as DeepInversion's (pixels optimized by Adam, finished batches in a pool the student samples from), with
the paper's two changes:

- **Feature mixing**: the pixels are inverted against several pretrained classifiers at once, the teacher being
  distilled plus ``extra_teachers`` (other architectures welcome; ``gendistill dfkd --extra-teachers DIR,DIR``). Each
  teacher adds its own BatchNorm-statistics term (over all its BN layers) and its own class term on the same
  augmented view (a "universal" feature space instead of one model's). A teacher that takes another number of
  channels gets the images repeated to RGB or averaged to gray. With ``bn_balance`` (the default) each extra
  teacher's BN term is rescaled, at every step, to the distilled teacher's current BN term (the factor is a
  constant of the step: no gradient flows through it), so every teacher has the same say whatever its depth and
  activation scale. Without it the terms are summed raw, and a deep teacher drowns a shallow one: on MNIST a
  ResNet-20's term is ~60x a LeNet-5's, the pixels follow the ResNet alone and the LeNet-5 being distilled labels
  them 0 or 8, so its student learns nothing (10-13% at 200 s where DeepInversion reaches 55-69%).
- **Data mixing**: at each inversion step, with probability ``mix_prob``, the batch is CutMixed: one random box,
  the same for the whole batch, of every image is replaced by that box of another image of the batch (a random
  permutation), and the class target becomes area-weighted, ``lam * onehot(y) + (1 - lam) * onehot(y_perm)`` with
  ``lam`` the kept fraction of the image. The image priors (TV, l2) and the pool see the unmixed pixels.

The student learns from the distilled teacher alone (the model being compressed); the extra teachers only shape the
images, and the adversarial (student-teacher disagreement) term reads the distilled teacher alone. Without extra
teachers this is DeepInversion with data mixing. Choices of this implementation, not taken from the paper's code:
the BN balance above, one box per batch, and DeepInversion's schedule and weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...data.images import to_channels
from ...errors import UsageError
from ..losses import BNStatsLoss, image_prior_loss, one_hot_loss
from .base import detached
from .deepinversion import DeepInversion, DeepInversionConfig


@dataclass
class MixMixConfig(DeepInversionConfig):
    mix_prob: float = 0.5  # probability that an inversion step CutMixes its batch (0: feature mixing only)
    bn_balance: bool = True  # rescale each extra teacher's BN term to the distilled teacher's (module docstring)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.mix_prob <= 1.0:
            raise UsageError(f"mix_prob must be in [0, 1], got {self.mix_prob}")


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
        """DeepInversion's losses of pixels ``x`` against the distilled teacher, plus each extra teacher's BN and
        class terms on the same view, on a CutMix of the batch with probability ``mix_prob`` (then against
        area-weighted soft targets). ``loss_bn`` / ``loss_oh`` are the distilled teacher's terms,
        ``loss_bn_extra`` / ``loss_oh_extra`` the extra teachers' (summed, after the balance)."""
        cfg = self.config
        images, targets = x, labels
        if cfg.mix_prob > 0 and float(torch.rand(())) < cfg.mix_prob:
            images, targets = cutmix(x, labels, self.num_classes)
        inv = self.inversion(
            images, targets, teacher=teacher, student=student, adv_kind="js", adv_tau=cfg.adv_tau, bn_kind=cfg.bn_kind
        )
        loss = inv.loss
        terms = detached(inv.terms)
        if self.extra_teachers:
            extra_bn, extra_oh = teacher_terms(
                inv.views, targets, self.extra_teachers, bn_kind=cfg.bn_kind, kernel_backend=self.kernel_backend
            )
            if cfg.bn_balance:
                reference = inv.terms["loss_bn"].detach()
                extra_bn = [term * (reference / term.detach().clamp_min(1e-12)) for term in extra_bn]
            loss_bn_extra, loss_oh_extra = sum(extra_bn), sum(extra_oh)
            loss = loss + cfg.bn * loss_bn_extra + cfg.oh * loss_oh_extra
            terms.update(loss_bn_extra=loss_bn_extra.detach(), loss_oh_extra=loss_oh_extra.detach())
        loss_tv, loss_l2 = image_prior_loss(x)
        loss = loss + cfg.tv * loss_tv + cfg.l2 * loss_l2
        return {"loss": loss, **terms, "loss_tv": loss_tv.detach(), "loss_l2": loss_l2.detach()}


def teacher_terms(
    views: torch.Tensor,
    targets: torch.Tensor,
    teachers: list[nn.Module],
    *,
    bn_kind: str = "norm",
    kernel_backend: str | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each teacher's BatchNorm-statistics term (:class:`BNStatsLoss` of ``bn_kind``, summed over its layers) and
    class term (cross-entropy of its logits against ``targets``: labels (B,) or soft targets (B, K)) on ``views``,
    each fed its own channel count."""
    bn_terms, class_terms = [], []
    for member in teachers:
        with BNStatsLoss(member, kind=bn_kind, backend=kernel_backend) as bn:
            logits = member(to_channels(views, member.config.in_channels))
            bn_terms.append(bn.loss())
        class_terms.append(one_hot_loss(logits, targets))
    return bn_terms, class_terms
