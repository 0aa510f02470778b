"""Training tasks of segmenters on the shared training core: supervised (a teacher on real masks) and distillation
(EchoDFKD's setting: a student that sees only pool images, generated or unlabeled, with the teacher's masks).

Distillation loss per pixel, averaged over pixels and images: ``soft`` (default) the teacher's class distribution,
``tau^2 KL(softmax(T / tau) || softmax(S / tau))`` over the K classes of each pixel; hard, cross-entropy with the
teacher's argmax mask. Evaluation: Dice and IoU against the reference masks of the held-out images
(``gendistill.segmentation.metrics``) and the label-free score against the judge (default: the teacher) on the
same images without their masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..task import Phase
from .metrics import dice_iou, predict_masks

# Distinct colours for class maps in pictures (background black); cycled for more classes.
PALETTE = torch.tensor(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 190], [0, 128, 128]], dtype=torch.float32
) / 255.0  # fmt: skip


def colorize(masks: torch.Tensor) -> torch.Tensor:
    """Class maps (N, H, W) as RGB images (N, 3, H, W) in [0, 1]."""
    return PALETTE.to(masks.device)[masks % len(PALETTE)].permute(0, 3, 1, 2)


def _shift(images: torch.Tensor, masks: torch.Tensor | None, padding: int):
    """The same random translation (up to ``padding`` pixels, zero / background fill) of images and masks."""
    if padding <= 0:
        return images, masks
    n, _, h, w = images.shape
    dy, dx = torch.randint(-padding, padding + 1, (2,)).tolist()
    images = torch.roll(F.pad(images, [padding] * 4), shifts=(dy, dx), dims=(2, 3))
    images = images[:, :, padding : padding + h, padding : padding + w]
    if masks is not None:
        masks = torch.roll(F.pad(masks, [padding] * 4), shifts=(dy, dx), dims=(1, 2))
        masks = masks[:, padding : padding + h, padding : padding + w]
    return images, masks


class _Evaluates(nn.Module):
    def _register_eval(self, eval_data):
        if eval_data is not None:
            images, masks = eval_data
            if images.dim() != 4 or masks.shape != (images.shape[0], *images.shape[2:]):
                raise UsageError(
                    f"eval data must be images (N, C, H, W) and masks (N, H, W), got {tuple(masks.shape)}"
                )
            self.register_buffer("eval_images", images.float(), persistent=False)
            self.register_buffer("eval_masks", masks.long(), persistent=False)

    def _scores(self, model: nn.Module, prefix: str = "") -> dict[str, float]:
        predicted = predict_masks(model, self.eval_images)
        scores = dice_iou(predicted, self.eval_masks.cpu(), self.num_classes)
        return {f"{prefix}dice": scores["dice"], f"{prefix}iou": scores["iou"]}


class SegmenterTrainingTask(_Evaluates):
    """Per-pixel cross-entropy training of ``model`` on ``images`` (N, C, H, W) in [0, 1] and ``masks`` (N, H, W),
    with a random translation of up to ``padding`` pixels applied alike to both."""

    def __init__(self, model, images, masks, *, num_classes: int, eval_data=None, padding: int = 2):
        super().__init__()
        self.model, self.num_classes, self.padding = model, num_classes, padding
        self.register_buffer("images", images.float(), persistent=False)
        self.register_buffer("masks", masks.long(), persistent=False)
        self._register_eval(eval_data)

    def phases(self) -> list[Phase]:
        return [Phase("model")]

    def sample_batch(self, phase, batch_size, device):
        index = torch.randint(len(self.images), (batch_size,))
        images, masks = _shift(self.images[index], self.masks[index], self.padding)
        return {"images": images.to(device), "masks": masks.to(device)}

    def forward(self, phase, batch):
        return {"loss": F.cross_entropy(self.model(batch["images"]), batch["masks"])}

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        return self._scores(self.model if model is None else model) if hasattr(self, "eval_images") else {}


class SegmentationKDTask(_Evaluates):
    """A frozen ``teacher`` segmenter, a trainable ``student`` learning the teacher's masks on ``pool`` images
    (N, C, H, W) in [0, 1] only (drawn uniformly with replacement from the global RNG, translated by up to
    ``padding`` pixels); ``judge``: the model whose masks the label-free score compares with (default: the teacher).
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        pool: torch.Tensor,
        *,
        eval_data=None,
        soft: bool = True,
        tau: float = 1.0,
        padding: int = 2,
        judge: nn.Module | None = None,
    ):
        super().__init__()
        t, s = teacher.config, student.config
        if (t.num_classes, t.in_channels) != (s.num_classes, s.in_channels):
            raise UsageError(
                f"the teacher has {t.num_classes} classes and {t.in_channels} channels, the student "
                f"{s.num_classes} and {s.in_channels}; they must agree"
            )
        if pool.dim() != 4 or pool.shape[1] != t.in_channels or len(pool) == 0:
            raise UsageError(f"the pool must be images (N, {t.in_channels}, H, W), got {tuple(pool.shape)}")
        if not tau > 0:
            raise UsageError(f"tau must be positive, got {tau}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student.train().requires_grad_(True)
        self.judge = None if judge is None else judge.eval().requires_grad_(False)
        self.num_classes, self.soft, self.tau, self.padding = t.num_classes, soft, tau, padding
        self.register_buffer("pool", pool.float(), persistent=False)
        self._register_eval(eval_data)
        self._fixed: dict[str, float] | None = None  # the teacher's own scores and the judge's masks, once

    def phases(self) -> list[Phase]:
        return [Phase("student")]

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.train(False)
        if self.judge is not None:
            self.judge.train(False)
        return self

    def sample_batch(self, phase, batch_size, device):
        index = torch.randint(len(self.pool), (batch_size,))
        images, _ = _shift(self.pool[index], None, self.padding)
        return {"images": images.to(device)}

    def forward(self, phase, batch):
        images = batch["images"]
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        student_logits = self.student(images).float()
        if self.soft:
            log_t = F.log_softmax(teacher_logits / self.tau, dim=1)
            log_s = F.log_softmax(student_logits / self.tau, dim=1)
            loss = (log_t.exp() * (log_t - log_s)).sum(1).mean() * self.tau**2
        else:
            loss = F.cross_entropy(student_logits, teacher_logits.argmax(1))
        return {"loss": loss}

    def evaluate(self, student: nn.Module | None = None, **_) -> dict[str, float]:
        """Dice/IoU of the student (and once of the teacher) against the held-out masks, and the label-free score:
        the student's mean Dice against the judge's masks."""
        if not hasattr(self, "eval_images"):
            return {}
        student = self.student if student is None else student
        if self._fixed is None:
            judge = self.teacher if self.judge is None else self.judge
            self._judge_masks = predict_masks(judge, self.eval_images)
            self._fixed = {f"teacher_{k}": v for k, v in self._scores(self.teacher).items()}
        predicted = predict_masks(student, self.eval_images)
        scores = dice_iou(predicted, self.eval_masks.cpu(), self.num_classes)
        label_free = dice_iou(predicted, self._judge_masks, self.num_classes)["dice"]
        return {"dice": scores["dice"], "iou": scores["iou"], "label_free_dice": label_free, **self._fixed}

    @torch.no_grad()
    def sample_images(self, **modules) -> torch.Tensor:
        """Held-out images (or pool images), each followed by the teacher's and the student's masks (RGB)."""
        student = modules.get("student", self.student)
        source = self.eval_images if hasattr(self, "eval_images") else self.pool
        images = source[torch.linspace(0, len(source) - 1, min(8, len(source))).long().to(source.device)]
        rows = [images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images]
        rows += [colorize(predict_masks(m, images)).to(images.device) for m in (self.teacher, student)]
        return torch.stack(rows, 1).flatten(0, 1)  # image, teacher, student, next image, ...
