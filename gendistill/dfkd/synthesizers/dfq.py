"""DFQ: Data-Free Network Quantization with Adversarial Knowledge Distillation (Y. Choi et al., CVPRW 2020,
arXiv 2005.04136), as Fast-Datafree's ``GenerativeSynthesizer`` benchmarks it.

A generator makes images that (1) reproduce the teacher's BatchNorm statistics (``bn``), (2) the teacher classifies
confidently (``oh``: cross-entropy against its own argmax, since the generator is unconditional), (3) cover every
class (``balance``: natural-log information entropy of the batch-mean teacher prediction) and (4) the student gets
wrong (``adv``: minus ``KL(T || S)``). Each iteration runs one generator step, then the student's steps (5) on
the last generator batches (``memory_batches``), with the teacher's logits stored when the generator step computed
them.

DFQ is the recommended method (the ``gendistill dfkd`` default): it is the fastest and steadiest method of the CPU
MNIST benchmark (``benchmarks/dfkd_mnist.py``).

Defaults, and each change from the reference with its reason and measurement: docs/dfkd.md, "DFQ".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import UsageError
from ..generators import augment
from ..losses import BN_LOSS_KINDS, BNStatsLoss, adversarial_loss, information_entropy_loss, one_hot_loss
from .base import GeneratorConfig, GeneratorSynthesizer


@dataclass
class DFQConfig(GeneratorConfig):
    adv: float = 1.0  # weight of the adversarial term: minus adv_tau^2 KL(T || S) at temperature adv_tau
    adv_tau: float = 1.0  # temperature of the adversarial KL (the reference's KLDiv() default)
    ngf: int = 8  # generator width (the reference's 64 costs about 20x more per step on a CPU; see above)
    bn: float = 5.0  # weight of the teacher's BatchNorm statistics matching (sum over its BN layers)
    bn_kind: str = "norm"  # BN statistics loss: "norm" (Fast-Datafree's) or "kl" (the paper's Gaussian KL)
    oh: float = 1.0  # weight of the teacher's cross-entropy against its own argmax
    balance: float = 20.0  # weight of the information entropy (natural log) of the batch-mean teacher prediction
    padding: int = 4  # random shift (pixels, no flip) of the generator's images before the networks (0: none)
    student_steps: int = 5  # student steps per generator step
    memory_batches: int = 10  # the student learns on the last 10 generator batches (shifted) and teacher logits
    generator_lr: float = 3e-3  # Adam learning rate of the generator (the reference's lr_g: 1e-3)
    student_lr: float = 5e-3  # the student's AdamW learning rate when the recipe gives none
    tau: float = 4.0  # temperature of the student's KD loss (the reference's: 20)
    batch_size: int = 128  # images per generator and student step when the recipe gives none
    AT_LEAST = {**GeneratorConfig.AT_LEAST, "padding": 0}

    def __post_init__(self):
        super().__post_init__()
        if self.bn_kind not in BN_LOSS_KINDS:
            raise UsageError(f"bn_kind {self.bn_kind!r} is not valid; valid: {', '.join(BN_LOSS_KINDS)}")


class DFQ(GeneratorSynthesizer):
    name = "dfq"
    Config = DFQConfig
    needs_batchnorm = True

    def generator_loss(self, batch, *, generator, teacher, student):
        """Loss of one generator step on noise ``batch["z"]`` (B, nz), on the shifted generator images x:
        ``adv * -KL(T(x) || S(x)) + bn * BN-statistics + oh * CE(T(x), argmax T(x)) + balance * sum p ln p``."""
        cfg = self.config
        x = generator(batch["z"])  # (B, C, H, W) in [0, 1]
        if cfg.padding:
            x = augment(x, padding=cfg.padding, flip=False)
        with BNStatsLoss(teacher, kind=cfg.bn_kind, backend=self.kernel_backend) as bn_stats:
            teacher_logits = teacher(x)
            loss_bn = bn_stats.loss()
        student_logits = student(x)
        self.remember(x, teacher_logits, student_logits)
        loss_adv = adversarial_loss(student_logits, teacher_logits, kind="kl", tau=cfg.adv_tau)
        loss_oh = one_hot_loss(teacher_logits)
        loss_balance = information_entropy_loss(teacher_logits, base=math.e)
        loss = cfg.adv * loss_adv + cfg.bn * loss_bn + cfg.oh * loss_oh + cfg.balance * loss_balance
        return {
            "loss": loss,
            "loss_adv": loss_adv.detach(),
            "loss_bn": loss_bn.detach(),
            "loss_oh": loss_oh.detach(),
            "loss_balance": loss_balance.detach(),
        }
