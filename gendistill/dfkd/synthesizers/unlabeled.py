"""Distillation on real unlabeled images: no synthesis, the student learns the teacher's outputs on a folder of
images whose labels are never read (FAQD's "label-free data" setting: Li et al., "Feature Affinity Assisted
Knowledge Distillation and Quantization of Deep Neural Networks on Label-Free Data", 2023).

``data`` (``gendistill dfkd --pool``) is a folder of images (searched recursively; class subfolders, if any, are
ignored), an ``.npz`` with ``images`` (``labels`` need not be there), ``mnist5k`` (the offline digits' train split) or
``generated:PIPELINE_FOLDER``: ``generated_images`` images drawn from a diffusion teacher or a one-step BOOT/SiD
student at the start of the run (a transfer set; the library never samples pipelines itself, so the caller passes
them as ``images``: ``gendistill dfkd`` does, with ``generated_steps`` DDIM steps for a teacher). The images are
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
    generated_images: int = 2000  # data=generated:FOLDER: images drawn from the pipeline folder
    generated_steps: int = 20  # data=generated:FOLDER of a teacher: its DDIM steps per image (a student takes one)
    AT_LEAST = {"generated_images": 1, "generated_steps": 1}


class Unlabeled(Synthesizer):
    name = "unlabeled"
    Config = UnlabeledConfig
    data_free = False  # needs ``data``

    def __init__(self, *, num_classes, image_shape, config=None, images: torch.Tensor | None = None, **overrides):
        """``images``: the (N, C, H, W) images in [0, 1] of a ``generated:`` source (any size and channel count:
        resized and converted like the other sources); the other sources are loaded here."""
        super().__init__(num_classes=num_classes, image_shape=image_shape, config=config, **overrides)
        from ...data.classification import convert_images, load_unlabeled_images

        self.source_info: dict | None = None  # what a generated set was (set by its caller, for the run's records)

        data = self.config.data
        if not data:
            raise UsageError(
                f"method {self.name!r} needs its images: --pool FOLDER (or an .npz, mnist5k, "
                "generated:PIPELINE_FOLDER; also --method-options data=...)"
            )
        channels, size, _ = self.image_shape
        if data.startswith("generated:"):
            if images is None or images.ndim != 4 or len(images) == 0:
                raise UsageError(
                    f"data {data!r}: the images drawn from the pipeline must be passed as images=(N, C, H, W) "
                    "(gendistill dfkd draws them; the library does not sample pipelines)"
                )
            self.images = convert_images(images.float(), image_size=size, channels=channels)
            return
        if images is not None:
            raise UsageError(f"images= is for data='generated:...'; data {data!r} is loaded from where it names")
        self.images = load_unlabeled_images(data, image_size=size, channels=channels)

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
