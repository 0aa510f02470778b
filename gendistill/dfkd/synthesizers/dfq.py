"""DFQ: Data-Free Network Quantization with Adversarial Knowledge Distillation (Y. Choi et al., CVPRW 2020,
arXiv 2005.04136), as Fast-Datafree's ``GenerativeSynthesizer`` benchmarks it.

A generator makes images that (1) reproduce the teacher's BatchNorm statistics (``bn``), (2) the teacher classifies
confidently (``oh``: cross-entropy against its own argmax, since the generator is unconditional), (3) cover every
class (``balance``: natural-log information entropy of the batch-mean teacher prediction) and (4) the student gets
wrong (``adv``: minus ``KL(T || S)``). Each iteration runs one generator step, then the student's steps (5) on
the last generator batches (``memory_batches``), with the teacher's logits stored when the generator step computed
them; the first ``student_start`` iterations run the generator step alone (while its images are still noise, the
student's steps would cost half of each iteration and teach it nothing).

DFQ is the recommended method (the ``gendistill dfkd`` default): it is the fastest and steadiest method of the CPU
MNIST benchmark (``benchmarks/dfkd_mnist.py``).

Defaults, and each change from the reference with its reason and measurement: docs/dfkd.md, "DFQ".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ...errors import UsageError
from ..generators import augment
from ..losses import (
    BN_LOSS_KINDS,
    BNStatsLoss,
    adversarial_loss,
    information_entropy_loss,
    logit_mse_loss,
    one_hot_loss,
)
from .base import GeneratorConfig, GeneratorSynthesizer

STUDENT_LOSSES = ("kd", "mse")


@dataclass
class DFQConfig(GeneratorConfig):
    adv: float = 1.0  # weight of the adversarial term: minus adv_tau^2 KL(T || S) at temperature adv_tau
    adv_tau: float = 1.0  # temperature of the adversarial KL (the reference's KLDiv() default)
    ngf: int = 8  # generator width (the reference's 64 costs about 20x more per step on a CPU; see above)
    profile: str = "auto"  # where the options left at None come from: shallow | deep | auto (PROFILES; auto: deep
    # for a teacher with more than DEEP_TEACHER_BN_LAYERS BatchNorm layers, such as the zoo's ResNets, else shallow)
    bn: float | None = None  # weight of the BatchNorm statistics matching (sum over the teacher's BN layers)
    bn_kind: str | None = None  # BN statistics loss: "norm" (Fast-Datafree's) or "kl" (the paper's Gaussian KL)
    oh: float = 1.0  # weight of the teacher's cross-entropy against its own argmax
    balance: float = 20.0  # weight of the information entropy (natural log) of the batch-mean teacher prediction
    padding: int = 4  # random shift (pixels, no flip) of the generator's images before the networks (0: none)
    student_steps: int = 5  # student steps per generator step
    memory_batches: int | None = None  # the student learns on the last N generator batches (shifted) + teacher logits
    memory_balance: float | None = None  # the student's draws from the memory, class-balanced at 1 (see the base)
    student_start: int | None = None  # iterations of generator steps alone (its first images are noise to learn on)
    generator_lr: float | None = None  # Adam learning rate of the generator (the reference's lr_g: 1e-3)
    generator_beta1: float | None = 0.5  # the generator's Adam beta1: the reference's (Adam betas (0.5, 0.999))
    student_lr: float | None = None  # the student's AdamW learning rate when the recipe gives none
    tau: float = 4.0  # temperature of the student's KD loss (the reference's: 20)
    student_loss: str | None = None  # kd: tau^2 KL at tau | mse: mean squared difference of the logits | None:
    # mse for a student that starts from its teacher's whole tensors (its logits are on the teacher's scale), else kd
    batch_size: int | None = None  # images per generator and student step when the recipe gives none
    max_steps: int | None = None  # iterations of a run when the recipe gives none (the learning rates anneal over
    # them: a cheap iteration needs more of them)
    AT_LEAST = {**GeneratorConfig.AT_LEAST, "padding": 0, "bn": 0}
    POSITIVE = ("generator_lr", "student_lr", "batch_size", "max_steps")  # the base checks skip options left at None

    def __post_init__(self):
        super().__post_init__()
        if self.profile not in (*PROFILES, "auto"):
            raise UsageError(f"profile {self.profile!r} is not valid; valid: {', '.join(PROFILES)}, auto")
        if self.student_loss is not None and self.student_loss not in STUDENT_LOSSES:
            raise UsageError(f"student_loss {self.student_loss!r} is not valid; valid: {', '.join(STUDENT_LOSSES)}")
        if self.bn_kind is not None and self.bn_kind not in BN_LOSS_KINDS:
            raise UsageError(f"bn_kind {self.bn_kind!r} is not valid; valid: {', '.join(BN_LOSS_KINDS)}")


# The defaults of the options left at None, per profile: "shallow" measured on LeNet-5-BN (3 BatchNorm layers),
# "deep" on ResNet-20 (21), both on the CPU MNIST benchmark; docs/dfkd.md, "DFQ", has the measurements.
PROFILES = {
    "shallow": dict(
        bn_kind="norm",
        bn=5.0,
        generator_lr=3e-3,
        student_lr=5e-3,
        batch_size=128,
        memory_batches=30,
        memory_balance=0.0,
        student_start=60,
        max_steps=2500,
    ),
    "deep": dict(
        bn_kind="kl",
        bn=1.0,
        generator_lr=3e-2,
        student_lr=3e-3,
        batch_size=32,
        memory_batches=40,
        memory_balance=1.0,
        student_start=50,
        max_steps=1000,
    ),
}
DEEP_TEACHER_BN_LAYERS = 4  # profile "auto": deep above this many BatchNorm layers (LeNet-5-BN 3, ResNet-8 9)


class DFQ(GeneratorSynthesizer):
    name = "dfq"
    Config = DFQConfig
    needs_batchnorm = True

    @classmethod
    def config_for_teacher(cls, config: DFQConfig, teacher_bn_layers: int | None) -> DFQConfig:
        """``config`` with the options left at None taken from its profile; profile "auto" is "deep" for a teacher
        with more than ``DEEP_TEACHER_BN_LAYERS`` BatchNorm layers, else (and for an unknown teacher) "shallow"."""
        profile = config.profile
        if profile == "auto":
            deep = teacher_bn_layers is not None and teacher_bn_layers > DEEP_TEACHER_BN_LAYERS
            profile = "deep" if deep else "shallow"
        unset = {k: v for k, v in PROFILES[profile].items() if getattr(config, k) is None}
        return dataclasses.replace(config, profile=profile, **unset)

    def adapt_to_student(self, student):
        """Resolve ``student_loss`` left at None: ``"mse"`` for a student initialized from its teacher's whole
        tensors (``Classifier.initialized_from == "teacher"``: a shallower model of its family), else ``"kd"`` (also
        for a narrower student initialized from slices, whose logits are not on the teacher's scale)."""
        if self.config.student_loss is None:
            from_teacher = getattr(student, "initialized_from", None) == "teacher"
            self.config = dataclasses.replace(self.config, student_loss="mse" if from_teacher else "kd")

    def student_loss(self, student_logits, teacher_logits):
        """``tau^2 KL`` at ``tau`` (``student_loss="kd"``) or the mean squared difference of the logits (``"mse"``)."""
        if self.config.student_loss == "mse":
            return logit_mse_loss(student_logits, teacher_logits)
        return super().student_loss(student_logits, teacher_logits)

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
