"""Distillation on real unlabeled images: no synthesis, the student learns the teacher's outputs on a folder of
images whose labels are never read (FAQD's "label-free data" setting: Li et al., "Feature Affinity Assisted
Knowledge Distillation and Quantization of Deep Neural Networks on Label-Free Data", 2023).

``data`` is a folder of images (searched recursively; class subfolders, if any, are ignored), an ``.npz`` with
``images`` (its ``labels`` are ignored too) or ``mnist5k`` (the offline digits' training split). The images are
loaded once, resized to the teacher's input size and channel count, and each student step draws a batch uniformly
with replacement from the global RNG (so a resumed run draws the same batches). With ``crop`` the batch gets the
usual random translation (1/8 of the width) and, with ``flip``, mirror images. Combine with ``--student-quant-bits``
and ``--plugins faqd`` for FAQD's quantized students.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import UsageError
from ..generators import augment
from .base import Synthesizer, SynthesizerConfig


@dataclass
class UnlabeledConfig(SynthesizerConfig):
    data: str = ""  # the images: a folder, an .npz, or mnist5k (required)
    tau: float = 4.0  # KD temperature (Hinton et al.'s usual range for real data; not tuned here)
    crop: bool = False  # random translation by up to 1/8 of the width
    flip: bool = False  # random mirror images (off: digits and text are not mirror-symmetric)


class Unlabeled(Synthesizer):
    name = "unlabeled"
    Config = UnlabeledConfig
    data_free = False  # needs ``data``

    def __init__(self, *, num_classes, image_shape, config=None, **overrides):
        super().__init__(num_classes=num_classes, image_shape=image_shape, config=config, **overrides)
        from ...data.classification import load_classification_data

        if not self.config.data:
            raise UsageError("method 'unlabeled' needs its images: --method-options data=FOLDER (or an .npz, mnist5k)")
        channels, size, _ = self.image_shape
        split = "train" if self.config.data == "mnist5k" else "all"
        images, _, _ = load_classification_data(self.config.data, split=split, image_size=size, channels=channels)
        self.images = images

    def student_images(self, batch_size, device, *, teacher, student, generator):
        index = torch.randint(0, len(self.images), (batch_size,))
        x = self.images[index].to(device)
        if self.config.crop or self.config.flip:
            x = augment(x, padding=max(1, x.shape[-1] // 8) if self.config.crop else 0, flip=self.config.flip)
        return x

    @torch.no_grad()
    def preview(self, num_images, device, *, generator, teacher=None, student=None):
        index = torch.linspace(0, len(self.images) - 1, num_images).long()
        return self.images[index].to(device)
