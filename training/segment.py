"""``gendistill segment``: distill a segmenter into a smaller one on images it never had masks for (EchoDFKD).

    gendistill segment --teacher SEG_TEACHER --pool generated:training/assets/mnist_ddpm --eval-data mnist5k

The student learns the teacher's masks (soft per-pixel distributions, or ``--hard`` argmax masks) on a pool of
images only: ``generated:PIPELINE_FOLDER`` (samples of a diffusion teacher or a one-step BOOT/SiD student, drawn at
the start of the run from its seed), a folder of images, an ``.npz`` of ``images`` or ``mnist5k``. ``--eval-data``
(masks the student never sees) gives held-out Dice and IoU and the label-free score: the student's Dice against
the masks of a judge model (``--judge FOLDER``, default the teacher) on the same images without their masks.
Writes the student (``model.safetensors`` + ``config.json``), ``results.json`` and ``report.png`` (held-out images,
reference masks, the teacher's and the student's masks).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gendistill.data.classification import load_unlabeled_images
from gendistill.errors import UsageError
from gendistill.segmentation import (
    ARCHITECTURES,
    SegmentationKDTask,
    build_segmenter,
    dice_iou,
    load_segmentation_data,
    load_segmenter,
    predict_masks,
    save_segmenter,
)

from .core import run_recipe
from .recipes import TrainRecipe, parse_recipe
from .teach_segmenter import write_report
from .transfer import generate_transfer_set, generated_source

COMMAND = "segment"
logger = logging.getLogger(__name__)


@dataclass
class SegmentRecipe(TrainRecipe):
    output: str = "segmenter-student"  # run folder; also the exported student (model.safetensors + config.json)
    teacher: str | None = None  # segmenter folder (gendistill teach segmenter) (required)
    student_arch: str = "unet-resnet18"  # unet-resnet34 | unet-resnet18 | unet-mobilenet_v2
    pool: str | None = None  # the images: generated:PIPELINE_FOLDER | a folder | an .npz of images | mnist5k
    generated_images: int = 2000  # a generated: pool's size
    generated_steps: int = 20  # DDIM steps per image of a generated: diffusion teacher (a one-step student takes 1)
    hard: bool = False  # learn the teacher's argmax masks (cross-entropy) instead of its per-pixel distributions
    tau: float = 1.0  # temperature of the soft per-pixel KL
    eval_data: str | None = None  # held-out images with masks: mnist5k (its test split) | an .npz of images + masks
    judge: str | None = None  # segmenter folder whose masks the label-free score compares with (default: teacher)
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 64  # per-process batch size
    lr: float = 2e-3  # AdamW learning rate
    ema_decay: float = 0.0  # EMA of the student's weights (0: export the trained weights)
    eval_every: int = 100  # held-out Dice, IoU and label-free score every N steps
    sample_every: int = 500  # PNG grid: held-out images, the teacher's and the student's masks

    INPUT_PATHS = ("teacher", "eval_data", "judge")

    def validate(self) -> None:
        super().validate()
        if not self.teacher:
            raise UsageError("a teacher is required: --teacher SEGMENTER_FOLDER (gendistill teach segmenter)")
        if not self.pool:
            raise UsageError(
                "the student's images are required: --pool generated:PIPELINE_FOLDER (or a folder, an .npz, mnist5k)"
            )
        if self.student_arch not in ARCHITECTURES:
            raise UsageError(f"unknown student architecture {self.student_arch!r}; valid: {', '.join(ARCHITECTURES)}")
        if self.generated_images < 1 or self.generated_steps < 1:
            raise UsageError("generated_images and generated_steps must be >= 1")
        if not self.tau > 0:
            raise UsageError(f"tau must be positive, got {self.tau}")


def build_task(recipe: SegmentRecipe) -> SegmentationKDTask:
    teacher = load_segmenter(recipe.teacher)
    config = teacher.config
    eval_data = None
    if recipe.eval_data:
        split = "test" if recipe.eval_data == "mnist5k" else "all"
        images, masks, num_classes = load_segmentation_data(
            recipe.eval_data, split=split, image_size=config.image_size
        )
        if num_classes > config.num_classes:
            raise UsageError(
                f"--eval-data has class {num_classes - 1} but the teacher has {config.num_classes} classes"
            )
        eval_data = (images, masks)
    source = generated_source(recipe.pool)
    info = None
    if source is not None:
        device = "cpu" if recipe.cpu or not torch.cuda.is_available() else f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        pool, info = generate_transfer_set(
            source, num_images=recipe.generated_images, steps=recipe.generated_steps, seed=recipe.seed, device=device
        )
        from gendistill.data.classification import convert_images

        pool = convert_images(pool.float(), image_size=config.image_size, channels=config.in_channels)
    else:
        pool = load_unlabeled_images(recipe.pool, image_size=config.image_size, channels=config.in_channels)
    torch.manual_seed(recipe.seed)  # a reproducible student initialization
    student = build_segmenter(
        recipe.student_arch,
        num_classes=config.num_classes,
        in_channels=config.in_channels,
        image_size=config.image_size,
        mean=config.mean,
        std=config.std,
    )
    task = SegmentationKDTask(
        teacher,
        student,
        pool,
        eval_data=eval_data,
        soft=not recipe.hard,
        tau=recipe.tau,
        judge=load_segmenter(recipe.judge) if recipe.judge else None,
    )
    task.source_info = info
    return task


def run(recipe: SegmentRecipe) -> dict:
    def export(trainer, task, metrics) -> dict:
        student = trainer.export_module("student")
        save_segmenter(student, Path(recipe.output))
        summary = {
            "teacher": recipe.teacher,
            "pool": recipe.pool,
            "pool_images": len(task.pool),
            "loss": "hard (argmax masks)" if recipe.hard else f"soft (per-pixel KL, tau {recipe.tau})",
            "student_parameters": sum(p.numel() for p in student.parameters()),
            "teacher_parameters": sum(p.numel() for p in task.teacher.parameters()),
        }
        if task.source_info is not None:
            summary["transfer_set"] = task.source_info
        if hasattr(task, "eval_images"):
            final = task.evaluate(student=student.to(task.eval_images.device))
            per_class = dice_iou(predict_masks(student, task.eval_images), task.eval_masks.cpu(), task.num_classes)
            summary.update({f"heldout_{k}": v for k, v in final.items()})
            summary["heldout_dice_per_class"] = per_class["dice_per_class"]
            summary["dice_ratio_to_teacher"] = final["dice"] / final["teacher_dice"]
            summary["heldout_size"] = len(task.eval_images)
            summary["judge"] = recipe.judge or "the teacher"
            index = torch.linspace(0, len(task.eval_images) - 1, min(12, len(task.eval_images))).long()
            images = task.eval_images[index]  # spread over the held-out set (mnist5k's is ordered by class)
            rows = [task.eval_masks[index].cpu(), predict_masks(task.teacher, images), predict_masks(student, images)]
            write_report(Path(recipe.output) / "report.png", images.cpu(), rows)
            summary["report"] = "report.png: held-out images, reference masks, the teacher's masks, the student's"
        return summary

    return run_recipe(recipe, COMMAND, lambda: build_task(recipe), export)


def main(argv: list[str] | None = None) -> int:
    recipe = parse_recipe(
        SegmentRecipe,
        argv,
        prog="gendistill segment",
        method="segment",
        description="Distill a segmenter on generated or unlabeled images with the teacher's masks (EchoDFKD).",
    )
    summary = run(recipe)
    if summary and "heldout_dice" in summary:
        print(
            f"student Dice {summary['heldout_dice']:.4f} (teacher {summary['heldout_teacher_dice']:.4f}, "
            f"{summary['dice_ratio_to_teacher']:.1%}); label-free Dice {summary['heldout_label_free_dice']:.4f}"
        )
    return 0
