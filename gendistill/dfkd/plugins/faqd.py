"""FAQD's feature-affinity term as a plug-in: Z. Li et al., "Feature Affinity Assisted Knowledge Distillation and
Quantization of Deep Neural Networks on Label-Free Data" (IEEE Access 2023, arXiv 2302.10899).

The student learns, besides the method's logit loss, to relate the spatial positions of each synthesized image to
each other as the teacher does: ``fa * feature_affinity_loss(S_l(x), T_l(x))`` on one intermediate feature map of
each network (``gendistill.dfkd.losses``; with ``fast``, the randomized estimate ``fast_feature_affinity_loss`` from
``projections`` Gaussian vectors, drawn from the global RNG so that a resumed run draws the same). With a
quantization-aware student (``gendistill dfkd --student-quant-bits``) this is FAQD's setting: a low-bit student
taught by logits and feature affinity, on synthesized images instead of unlabeled real ones.

The feature maps: ``teacher_layer`` / ``student_layer`` name a module (as in ``model.named_modules()``) whose
output (B, C, H, W) is read; by default, for each network, the module whose 4-D output of more than one position
is produced last in a forward (the end of the feature extractor: LeNet-5's last pooling, a ResNet's last stage).
The two maps need the same H x W (the channel counts may differ). The teacher's map comes from the task's teacher
forward when it makes one and otherwise (a method whose student learns on stored teacher logits, e.g. DFQ's
memory) from an extra teacher forward without gradients.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ...errors import UsageError
from ..losses import fast_feature_affinity_loss, feature_affinity_loss
from ..models import FeatureHooks
from .base import Plugin, PluginConfig


@dataclass
class FAQDConfig(PluginConfig):
    fa: float = 1.0  # weight of the feature-affinity term in the student's loss
    fast: bool = False  # the randomized estimate (FFA) instead of the exact loss: for large feature maps
    projections: int = 15  # FFA's number of Gaussian vectors (the reference's)
    teacher_layer: str | None = None  # module whose output is the teacher's feature map (default: found, above)
    student_layer: str | None = None  # module whose output is the student's feature map (default: found, above)

    def __post_init__(self):
        if self.fa < 0:
            raise UsageError(f"faqd option fa must be >= 0, got {self.fa}")
        if self.projections < 1:
            raise UsageError(f"faqd option projections must be >= 1, got {self.projections}")


def last_feature_map(model: torch.nn.Module, image_shape: tuple[int, int, int]) -> str:
    """The name of the module of ``model`` whose output is 4-D with more than one position and is produced last in
    a forward of one image of ``image_shape`` (C, H, W) (zeros, no gradients; the model's mode is restored)."""
    finished: list[tuple[str, tuple[int, ...]]] = []
    handles = [
        module.register_forward_hook(
            lambda m, args, out, name=name: (
                finished.append((name, tuple(out.shape)))
                if torch.is_tensor(out) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1
                else None
            )
        )
        for name, module in model.named_modules()
        if name
    ]
    was_training = model.training
    parameter = next(model.parameters())
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *image_shape, device=parameter.device, dtype=parameter.dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if not finished:
        raise UsageError(
            f"{type(model).__name__} has no module with a (B, C, H, W) output of more than one position; "
            "FAQD needs an intermediate feature map (set teacher_layer / student_layer)"
        )
    return finished[-1][0]


class FAQD(Plugin):
    """The feature-affinity term on the student's loss (any method). Options: :class:`FAQDConfig`."""

    name = "faqd"
    Config = FAQDConfig

    def attach(self, task) -> None:
        config, teacher, student = self.config, task.teacher, task.student
        shape = (teacher.config.in_channels, teacher.config.image_size, teacher.config.image_size)
        self.teacher_layer = config.teacher_layer or last_feature_map(teacher, shape)
        self.student_layer = config.student_layer or last_feature_map(student, shape)
        sizes = {}
        for role, model, layer in (("teacher", teacher, self.teacher_layer), ("student", student, self.student_layer)):
            parameter = next(model.parameters())
            was_training = model.training
            with FeatureHooks(model, [layer]) as features, torch.no_grad():
                model.eval()(torch.zeros(1, *shape, device=parameter.device, dtype=parameter.dtype))
            model.train(was_training)
            output = features.get(layer)
            if not torch.is_tensor(output) or output.dim() != 4:
                got = tuple(output.shape) if torch.is_tensor(output) else type(output).__name__
                raise UsageError(f"faqd: the {role}'s module {layer!r} does not output (B, C, H, W) (got {got})")
            sizes[role] = tuple(output.shape[2:])
        if sizes["teacher"] != sizes["student"]:
            raise UsageError(
                f"faqd: the teacher's feature map {self.teacher_layer!r} is {sizes['teacher']} but the student's "
                f"{self.student_layer!r} is {sizes['student']}; they need the same H x W "
                "(set teacher_layer / student_layer)"
            )
        self._teacher_features: dict[str, torch.Tensor] = {}
        self._student_features: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def watch_student(self, *, teacher, student):
        self._teacher_features.clear()
        self._student_features.clear()
        with FeatureHooks(teacher, [self.teacher_layer]) as t, FeatureHooks(student, [self.student_layer]) as s:
            yield
        self._teacher_features.update(t)
        self._student_features.update(s)

    def student_terms(self, *, images, student_logits, teacher_logits, task) -> dict[str, torch.Tensor]:
        """``{"loss_fa": fa * FA(S_l(images), T_l(images))}``, scalar, with the student's graph."""
        student_map = self._student_features[self.student_layer]
        teacher_map = self._teacher_features.get(self.teacher_layer)
        if teacher_map is None:  # the task used stored teacher logits: one teacher forward for its features
            with FeatureHooks(task.teacher, [self.teacher_layer]) as features, torch.no_grad():
                task.teacher(images)
            teacher_map = features[self.teacher_layer]
        teacher_map = teacher_map.detach()
        if self.config.fast:
            loss = fast_feature_affinity_loss(student_map, teacher_map, num_projections=self.config.projections)
        else:
            loss = feature_affinity_loss(student_map, teacher_map)
        return {"loss_fa": self.config.fa * loss}
