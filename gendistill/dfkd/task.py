"""The DFKD task: a frozen teacher, a student and a synthesizer that makes the student's images from nothing.

The student always learns ``tau^2 KL(softmax(T(x)/tau) || softmax(S(x)/tau))`` on synthesized images ``x``
(spec/DFKD.md); what differs between methods is how ``x`` is made, which the synthesizer decides (one file per
method in ``gendistill/dfkd/synthesizers``). Methods with a generator train it as a phase of its own ("generator"),
before or after the student's steps of the same iteration; pure inversion methods have only the student phase and
synthesize inside it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..task import Phase
from .losses import kd_loss
from .models import Classifier


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (calls through it would sync gradients)."""
    return getattr(module, "module", module)


class DFKDTask(nn.Module):
    """Frozen teacher + trainable student (+ the synthesizer's generator, when it has one).

    Args:
        teacher: the classifier to distill (kept frozen, in eval mode: its BatchNorm statistics are the data's memory).
        student: the classifier to train; same number of classes and input shape.
        synthesizer: a ``Synthesizer`` from ``gendistill.dfkd.synthesizers``.
        eval_data: optional held-out real images (N, C, H, W) in [0, 1] and labels (N,): accuracy and agreement.
    """

    def __init__(
        self,
        teacher: Classifier,
        student: Classifier,
        synthesizer,
        *,
        eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        t, s = teacher.config, student.config
        if t.num_classes != s.num_classes:
            raise ValueError(
                f"the teacher has {t.num_classes} classes but the student {s.num_classes}; they must agree"
            )
        if (t.in_channels, t.image_size) != (s.in_channels, s.image_size):
            raise ValueError(
                f"the teacher takes {t.in_channels}x{t.image_size}x{t.image_size} images but the student "
                f"{s.in_channels}x{s.image_size}x{s.image_size}; they must agree"
            )
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student.train().requires_grad_(True)
        self.synthesizer = synthesizer
        generator = synthesizer.build_generator()
        if generator is not None:
            self.generator = generator
        if eval_data is not None:
            images, labels = eval_data
            if images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
                raise ValueError(f"eval_data must be images (N, C, H, W) and labels (N,), got {tuple(images.shape)}")
            self.register_buffer("eval_images", images.float(), persistent=False)
            self.register_buffer("eval_labels", labels.long(), persistent=False)
        self._teacher_eval: dict[str, torch.Tensor] | None = None

    @property
    def num_classes(self) -> int:
        return self.teacher.config.num_classes

    def phases(self) -> list[Phase]:
        return self.synthesizer.phases()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.train(False)
        return self

    # --- the training core's interface ----------------------------------------------------------------------
    def sample_batch(self, phase: str, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Student phase: synthesized images (B, C, H, W) in [0, 1]; generator phase: the synthesizer's inputs."""
        generator = getattr(self, "generator", None)
        if phase == "student":
            images = self.synthesizer.student_images(
                batch_size, device, teacher=self.teacher, student=unwrap(self.student), generator=generator
            )
            return {"images": images.detach()}
        return self.synthesizer.generator_batch(batch_size, device)

    def forward(self, phase: str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if phase == "student":
            x = batch["images"]
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            loss = kd_loss(self.student(x), teacher_logits, tau=self.synthesizer.tau)
            return {"loss": loss}
        # The student is called unwrapped and in eval mode: its gradients from this phase are never used (each
        # phase starts from zeroed gradients), must not trigger a DDP all-reduce, and synthetic batches must not move
        # its BatchNorm statistics.
        student = unwrap(self.student)
        was_training = student.training
        student.eval()
        try:
            return self.synthesizer.generator_loss(
                batch, generator=self.generator, teacher=self.teacher, student=student
            )
        finally:
            student.train(was_training)

    # --- quality signals ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, student: nn.Module | None = None, **_) -> dict[str, float]:
        """Held-out accuracy of the student (and once of the teacher) and the student-teacher agreement."""
        if not hasattr(self, "eval_images"):
            return {}
        student = self.student if student is None else student
        was_training = student.training
        student.eval()
        predictions = []
        for chunk in self.eval_images.split(256):
            predictions.append(student(chunk).argmax(1))
        student.train(was_training)
        pred = torch.cat(predictions)
        if self._teacher_eval is None or self._teacher_eval["pred"].device != pred.device:
            t_pred = torch.cat([self.teacher(chunk).argmax(1) for chunk in self.eval_images.split(256)])
            self._teacher_eval = {"pred": t_pred}
        t_pred = self._teacher_eval["pred"]
        return {
            "student_accuracy": (pred == self.eval_labels).float().mean().item(),
            "teacher_accuracy": (t_pred == self.eval_labels).float().mean().item(),
            "teacher_agreement": (pred == t_pred).float().mean().item(),
        }

    @torch.no_grad()
    def sample_images(self, **modules) -> torch.Tensor:
        """A grid's worth of synthesized images (B, C, H, W) in [0, 1]."""
        generator = modules.get("generator", getattr(self, "generator", None))
        student = modules.get("student", unwrap(self.student))
        device = next(self.teacher.parameters()).device
        # Grids draw from a fixed seed inside a forked RNG: every grid uses the same noise (the grids show the
        # generator's progress), and writing one never shifts the training's random stream (so a run resumed
        # from a checkpoint written after a grid continues exactly as an uninterrupted run).
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            images = self.synthesizer.preview(16, device, generator=generator, teacher=self.teacher, student=student)
        return images.float().clamp(0, 1)
