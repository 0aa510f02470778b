"""CAE-DFKD: Category-Aware Embedding Data-Free Knowledge Distillation (Z. Zhang et al., DAC 2025; "Bridging the
Transferability Gap in Data-Free Knowledge Distillation").

One persistent, class-aware generator trained at the *embedding* level rather than re-learned per batch: its input
is a learned class embedding (``EmbeddingGenerator``) concatenated with multi-source noise (half Gaussian N(0, 1),
half uniform U(-1, 1)), and besides the usual teacher-side terms it is trained so that the teacher's penultimate
features (the embeddings the student learns to imitate) of same-class samples gather around their class prototype
and away from the other classes' (``prototype_contrastive_loss``). Each iteration runs one generator step on

    bn * BN-statistics(T) + oh * CE(T(aug x), labels) + adv * -KL(T || S)[argmaxes agree] + cr * proto-contrast

(a random crop + flip of x, the student in eval mode, the adversarial term comparing the *student* with the
teacher), then ``student_steps`` student steps on fresh generator images of random classes (no pool: the generator
is never reset, so there is nothing to re-learn).

Defaults, and each change from the reference with its reason and measurement: docs/dfkd.md, "CAE-DFKD".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..generators import EmbeddingGenerator
from ..losses import prototype_contrastive_loss
from .base import GeneratorConfig, GeneratorSynthesizer, detached


@dataclass
class CAEConfig(GeneratorConfig):
    tau: float = 20.0  # temperature of the student's KD loss
    bn: float = 10.0  # weight of the teacher's BatchNorm statistics matching (sum over its BN layers)
    oh: float = 0.4  # weight of the teacher's cross-entropy against the generator's class labels
    adv: float = 1.1  # weight of the masked adversarial term: minus KL(T || S) where the argmaxes agree
    cr: float = 0.5  # weight of the category-aware prototype contrast on the teacher's penultimate features
    cr_tau: float = 0.1  # temperature of the prototype contrast's cosine logits
    embed_dim: int = 64  # size of the learned class embeddings
    student_steps: int = 5  # student steps per generator step
    generator_lr: float = 1e-3  # learning rate of the generator (the training core's AdamW)
    AT_LEAST = {**GeneratorConfig.AT_LEAST, "embed_dim": 1, "nz": 2}  # nz: a Gaussian and a uniform half
    POSITIVE = ("cr_tau",)


class CAE(GeneratorSynthesizer):
    name = "cae"
    Config = CAEConfig
    needs_batchnorm = True

    def build_generator(self) -> EmbeddingGenerator:
        c, h, _ = self.image_shape
        cfg = self.config
        return EmbeddingGenerator(
            self.num_classes, embed_dim=cfg.embed_dim, nz=cfg.nz, ngf=cfg.ngf, img_size=h, channels=c
        )

    def noise(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Multi-source noise (B, nz): the first nz // 2 entries N(0, 1), the rest U(-1, 1) (global RNG)."""
        gaussian = torch.randn(batch_size, self.config.nz // 2, device=device)
        uniform = 2 * torch.rand(batch_size, self.config.nz - self.config.nz // 2, device=device) - 1
        return torch.cat([gaussian, uniform], dim=1)

    def generator_batch(self, batch_size, device):
        return {
            "z": self.noise(batch_size, device),
            "labels": torch.randint(0, self.num_classes, (batch_size,), device=device),
        }

    def generator_loss(self, batch, *, generator, teacher, student):
        cfg = self.config
        labels = batch["labels"]
        images = generator(batch["z"], labels)
        layer = teacher.feature_layer
        inv = self.inversion(images, labels, teacher=teacher, student=student, mask_agreement=True, features=[layer])
        loss_cr = torch.zeros((), device=images.device)
        if cfg.cr:
            loss_cr = prototype_contrastive_loss(inv.features[layer], labels, tau=cfg.cr_tau)
        self.remember(inv.views, inv.teacher_logits, inv.student_logits, keep=False)
        if cfg.memory_batches:  # the memory keeps the generator's images, not their augmented views
            with torch.no_grad():
                self.add_to_memory(images, teacher(images))
        return {"loss": inv.loss + cfg.cr * loss_cr, **detached(inv.terms), "loss_cr": loss_cr.detach()}

    @torch.no_grad()
    def student_images(self, batch_size, device, *, teacher, student, generator):
        labels = torch.randint(0, self.num_classes, (batch_size,), device=device)
        return generator(self.noise(batch_size, device), labels)

    @torch.no_grad()
    def preview(self, num_images, device, *, generator, teacher=None, student=None):
        """One image per class in turn (labels 0, 1, ..., K - 1, 0, ...)."""
        labels = torch.arange(num_images, device=device) % self.num_classes
        return generator(self.noise(num_images, device), labels)
