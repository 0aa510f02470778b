"""ZSKT: Zero-shot Knowledge Transfer via Adversarial Belief Matching (P. Micaelli and A. Storkey, NeurIPS 2019,
arXiv 1905.09768).

A generator seeks images on which the student's beliefs differ most from the teacher's: it maximizes
``KL(T || S)`` (``adversarial_loss(..., kind="kl")``); the student then takes several steps matching the teacher on
the generator's images. Each iteration runs ``generator_steps`` generator steps (the paper's n_G = 1), then
``student_steps`` student steps (n_S = 10). No augmentation, as in the paper.

Defaults, and each change from the reference with its reason and measurement: docs/dfkd.md, "ZSKT".
"""

from __future__ import annotations

from dataclasses import dataclass

from ..losses import adversarial_loss
from .base import GeneratorConfig, GeneratorSynthesizer


@dataclass
class ZSKTConfig(GeneratorConfig):
    adv: float = 1.0  # weight of the adversarial term: minus adv_tau^2 KL(T || S) at temperature adv_tau
    adv_tau: float = 20.0  # temperature of the adversarial KL (the student's tau; the paper uses 1)
    generator_steps: int = 1  # generator steps per iteration (the paper's n_G)
    student_steps: int = 10  # student steps per iteration, after the generator's (the paper's n_S)
    generator_lr: float = 1e-3  # Adam learning rate of the generator (the paper's; Fast-Datafree's lr_g)


class ZSKT(GeneratorSynthesizer):
    name = "zskt"
    Config = ZSKTConfig
    needs_batchnorm = False

    def generator_loss(self, batch, *, generator, teacher, student):
        """Loss of one generator step on noise ``batch["z"]`` (B, nz): ``adv * -KL(T(x) || S(x))``."""
        x = generator(batch["z"])  # (B, C, H, W) in [0, 1]
        student_logits, teacher_logits = student(x), teacher(x)
        self.remember(x, teacher_logits, student_logits)
        loss_adv = adversarial_loss(student_logits, teacher_logits, kind="kl", tau=self.config.adv_tau)
        return {"loss": self.config.adv * loss_adv, "loss_adv": loss_adv.detach()}
