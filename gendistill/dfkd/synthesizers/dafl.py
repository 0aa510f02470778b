"""DAFL: Data-Free Learning of Student Networks (H. Chen et al., ICCV 2019, arXiv 1904.01186).

A generator is trained so the teacher is confident (one-hot loss on its own argmax), its penultimate features are
strongly activated, and the batch covers all classes (information entropy of the batch-mean prediction); the
student learns from the teacher on the generator's images in the same iteration. Defaults: the reference MNIST
script (oh 1, act 0.1, ie 5, generator Adam lr 0.2).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..losses import activation_loss, information_entropy_loss, one_hot_loss
from ..models import FeatureHooks
from .base import GeneratorConfig, GeneratorSynthesizer


@dataclass
class DAFLConfig(GeneratorConfig):
    oh: float = 1.0  # weight of the teacher's cross-entropy against its own argmax
    act: float = 0.1  # weight of the activation loss (-mean |teacher penultimate features|)
    ie: float = 5.0  # weight of the information entropy (log10) of the batch-mean teacher prediction
    generator_lr: float = 0.2  # the reference's MNIST generator learning rate


class DAFL(GeneratorSynthesizer):
    name = "dafl"
    Config = DAFLConfig
    needs_batchnorm = False

    def generator_loss(self, batch, *, generator, teacher, student):
        x = generator(batch["z"])
        with FeatureHooks(teacher, [teacher.feature_layer], inputs=True) as features:
            logits = teacher(x)
        self.remember(x, logits)
        loss_oh = one_hot_loss(logits)
        loss_act = activation_loss(features[teacher.feature_layer])
        loss_ie = information_entropy_loss(logits, base=10.0)
        loss = self.config.oh * loss_oh + self.config.act * loss_act + self.config.ie * loss_ie
        return {"loss": loss, "loss_oh": loss_oh.detach(), "loss_act": loss_act.detach(), "loss_ie": loss_ie.detach()}
