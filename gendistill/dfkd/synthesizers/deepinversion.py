"""DeepInversion: Dreaming to Distill (H. Yin et al., CVPR 2020, arXiv 1912.08795), with Adaptive DeepInversion's
competition term.

No generator: every synthesis round optimizes a batch of pixels x (B, C, H, W) directly, for ``inversion_steps``
Adam steps, towards random target labels. Each step jitters and flips x (``augment``), then minimizes

    bn * BN-statistics(T) + oh * CE(T(aug x), labels) + adv * (1 - JS(S, T)) + tv * TV(x) + l2 * ||x||

with the student in eval mode (ADI: images the student gets wrong are preferred) and clamps x to [0, 1]. Finished
batches go to an :class:`ImagePool`; the student samples its batches from the pool and a new round runs every
``synthesis_every`` student batches (the reference synthesizes once per 400 student steps).

Defaults, and each change from the reference with its reason and measurement: docs/dfkd.md, "DeepInversion".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import UsageError
from ..losses import BN_LOSS_KINDS, image_prior_loss
from .base import PoolConfig, PoolSynthesizer, detached, inner_optimize

INIT_STD = 0.25  # pixel noise of the initial batch: one normalized unit (a dataset std) of [0, 1] pixels
ADAM_BETAS = (0.5, 0.99)  # Fast-Datafree's DeepInversion optimizer


@dataclass
class DeepInversionConfig(PoolConfig):
    tau: float = 4.0  # temperature of the student's KD loss (4, the usual one of pixel-inversion KD)
    bn: float = 10.0  # weight of the teacher's BatchNorm statistics matching (sum over its BN layers)
    bn_kind: str = "norm"  # its form: "norm" (DeepInversion's) or "kl" (per-channel Gaussian KL; scale-free)
    oh: float = 1.0  # weight of the teacher's cross-entropy against the batch's random target labels
    adv: float = 1.0  # weight of ADI's competition term 1 - JS(student, teacher) (0: plain DeepInversion)
    adv_tau: float = 3.0  # temperature of the Jensen-Shannon competition term (DeepInversion's T = 3)
    tv: float = 0.1  # weight of the total variation prior (mean |neighbour difference| of [0, 1] pixels)
    l2: float = 1e-5  # weight of the l2 prior (per-image norm of [0, 1] pixels, batch mean)
    inversion_steps: int = 2000  # Adam steps per synthesized batch
    inversion_lr: float = 0.025  # Adam learning rate of the pixels (the reference's 0.1 on normalized pixels)
    AT_LEAST = {**PoolConfig.AT_LEAST, "inversion_steps": 0}
    POSITIVE = ("inversion_lr",)

    def __post_init__(self):
        super().__post_init__()
        if self.bn_kind not in BN_LOSS_KINDS:
            raise UsageError(f"bn_kind {self.bn_kind!r} is not valid; valid: {', '.join(BN_LOSS_KINDS)}")


class DeepInversion(PoolSynthesizer):
    """Batches of pixels optimized against the teacher's BN statistics; the student samples from their pool.

    State: :class:`PoolSynthesizer`'s (``pool``, ``calls``; checkpointed), ``last_losses`` (the detached loss terms
    of the latest inversion step) and the teacher/student of the latest call (so ``preview`` can synthesize when the
    pool is empty).
    """

    name = "deepinversion"
    Config = DeepInversionConfig
    needs_batchnorm = True

    def synthesis_loss(self, x, labels, *, teacher, student) -> dict[str, torch.Tensor]:
        """Losses of pixels ``x`` (B, C, H, W) in [0, 1] with target ``labels`` (B,); ``"loss"`` is minimized.

        One random jitter + flip of the batch (global RNG) goes through the teacher and the student."""
        cfg = self.config
        inv = self.inversion(
            x, labels, teacher=teacher, student=student, adv_kind="js", adv_tau=cfg.adv_tau, bn_kind=cfg.bn_kind
        )
        loss_tv, loss_l2 = image_prior_loss(x)
        loss = inv.loss + cfg.tv * loss_tv + cfg.l2 * loss_l2
        return {"loss": loss, **detached(inv.terms), "loss_tv": loss_tv.detach(), "loss_l2": loss_l2.detach()}

    def synthesize(self, batch_size: int, device: torch.device, *, teacher, student) -> torch.Tensor:
        """One inversion round: ``inversion_steps`` Adam steps on fresh pixels. Returns (B, C, H, W) in [0, 1],
        detached. Gradients are taken w.r.t. the pixels only; the student is in eval mode meanwhile."""
        cfg = self.config
        x = (0.5 + INIT_STD * torch.randn(batch_size, *self.image_shape, device=device)).clamp_(0, 1)
        x.requires_grad_(True)
        labels = torch.randint(0, self.num_classes, (batch_size,), device=device)
        optimizer = torch.optim.Adam([x], lr=cfg.inversion_lr, betas=ADAM_BETAS)

        def clamp():
            with torch.no_grad():
                x.clamp_(0, 1)

        def step():
            return self.synthesis_loss(x, labels, teacher=teacher, student=student)

        losses = inner_optimize(step, [x], optimizer, steps=cfg.inversion_steps, student=student, after_step=clamp)
        if losses is not None:
            self.last_losses = detached(losses)
        return x.detach()
