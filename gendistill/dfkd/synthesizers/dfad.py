"""DFAD: Data-Free Adversarial Distillation (G. Fang et al., 2019, arXiv 1912.11006).

A generator and the student play a min-max game: the student imitates the teacher on the generator's images, the
generator seeks images on which they disagree most, measured as the mean absolute difference of their logits
(``adversarial_loss(..., kind="l1")``, the reference's ``-F.l1_loss(s_logit, t_logit)``). Each iteration runs the
student's steps first, then one generator step, as the reference's ``train`` loop does (5 student steps per
generator step). No augmentation: the reference feeds the generator's images to both networks as they are.

Defaults, and each change from the reference with its reason and measurement: docs/dfkd.md, "DFAD".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from ...errors import UsageError
from ..losses import adversarial_loss, kd_loss
from .base import GeneratorConfig, GeneratorSynthesizer

STUDENT_LOSSES = ("l1", "kd")


@dataclass
class DFADConfig(GeneratorConfig):
    adv: float = 1.0  # weight of the adversarial term: minus the mean |student logits - teacher logits| (L1)
    student_steps: int = 5  # student steps per generator step (the reference's inner loop of 5)
    generator_lr: float = 1e-3  # Adam learning rate of the generator (the reference's lr_G)
    student_loss: str = "l1"  # l1: mean |student logits - teacher logits| (the reference) | kd: tau^2 KL at tau

    def __post_init__(self):
        super().__post_init__()
        if self.student_loss not in STUDENT_LOSSES:
            raise UsageError(f"student_loss must be one of {', '.join(STUDENT_LOSSES)}, got {self.student_loss!r}")


class DFAD(GeneratorSynthesizer):
    name = "dfad"
    Config = DFADConfig
    needs_batchnorm = False
    student_first = True  # the reference's order within one iteration
    generator_output = "standardized"  # the reference's tanh + BatchNorm(affine=False) output

    def student_loss(self, student_logits, teacher_logits):
        """The reference's ``F.l1_loss(s_logit, t_logit)`` (or the tau^2 KL with ``student_loss="kd"``)."""
        if self.config.student_loss == "l1":
            return F.l1_loss(student_logits, teacher_logits)
        return kd_loss(student_logits, teacher_logits, tau=self.tau)

    def generator_loss(self, batch, *, generator, teacher, student):
        """Loss of one generator step on noise ``batch["z"]`` (B, nz): ``adv * -mean |S(x) - T(x)|``."""
        x = generator(batch["z"])  # (B, C, H, W), standardized in the teacher's normalized space
        student_logits, teacher_logits = student(x), teacher(x)
        self.remember(x, teacher_logits, student_logits)
        loss_adv = adversarial_loss(student_logits, teacher_logits, kind="l1")
        return {"loss": self.config.adv * loss_adv, "loss_adv": loss_adv.detach()}
