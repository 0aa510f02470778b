"""``gendistill teach segmenter``: train a U-Net segmenter (a teacher for ``gendistill segment``) on real masks.

    gendistill teach segmenter --data mnist5k --arch unet-resnet34 --output seg-teacher

Data: ``mnist5k`` (digit masks: every pixel of at least half the white level labelled ``digit + 1``, background 0;
the subset's own train/test split) or an ``.npz`` with ``images`` and ``masks`` (a seeded 10% held out). The folder
gets ``model.safetensors`` + ``config.json``, ``results.json`` (held-out Dice and IoU over the foreground classes)
and ``report.png`` (held-out images, their reference masks, the predicted masks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.utils import save_image

from gendistill.errors import UsageError
from gendistill.segmentation import (
    ARCHITECTURES,
    SegmenterTrainingTask,
    build_segmenter,
    colorize,
    dice_iou,
    load_segmentation_data,
    predict_masks,
    save_segmenter,
)

from .core import run_recipe
from .recipes import TrainRecipe, parse_recipe

COMMAND = "teach segmenter"


@dataclass
class TeachSegmenterRecipe(TrainRecipe):
    output: str = "segmenter-teacher"  # run folder; also the exported segmenter (model.safetensors + config.json)
    arch: str = "unet-resnet34"  # unet-resnet34 | unet-resnet18 | unet-mobilenet_v2
    data: str = "mnist5k"  # mnist5k (digit masks) | an .npz with images (N, H, W[, C]) and masks (N, H, W)
    image_size: int = 32  # input size (MNIST's 28x28 digits are zero-padded to 32)
    max_steps: int = 600  # optimizer steps
    batch_size: int = 64  # per-process batch size
    lr: float = 2e-3  # AdamW learning rate
    lr_scheduler: str = "cosine"  # any diffusers get_scheduler name
    ema_decay: float = 0.0  # EMA of the weights (0: export the trained weights)
    eval_every: int = 200  # held-out Dice every N steps
    sample_every: int = 0  # (the report picture is written at the end)
    checkpoint_every: int = 200  # resumable checkpoint every N steps

    INPUT_PATHS = ("data",)

    def validate(self) -> None:
        super().validate()
        if self.arch not in ARCHITECTURES:
            raise UsageError(f"unknown segmenter architecture {self.arch!r}; valid: {', '.join(ARCHITECTURES)}")


def split_data(recipe) -> tuple[tuple, tuple, int]:
    """(train images, masks), (held-out images, masks) and the number of classes of ``recipe.data``."""
    if recipe.data == "mnist5k":
        train = load_segmentation_data("mnist5k", split="train", image_size=recipe.image_size)
        test = load_segmentation_data("mnist5k", split="test", image_size=recipe.image_size)
        return train[:2], test[:2], train[2]
    images, masks, num_classes = load_segmentation_data(recipe.data, image_size=recipe.image_size)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(recipe.seed))
    held = max(1, len(images) // 10)
    if len(images) - held < 1:
        raise UsageError(f"{recipe.data} has {len(images)} image(s); at least 2 are needed (one is held out)")
    return (images[order[held:]], masks[order[held:]]), (images[order[:held]], masks[order[:held]]), num_classes


def write_report(path: Path, images: torch.Tensor, masks: list[torch.Tensor]) -> None:
    """A PNG with one row of ``images`` (grey or RGB) and one row per list of masks, coloured by class."""
    rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    save_image(torch.cat([rgb, *[colorize(m) for m in masks]]).cpu(), path, nrow=len(images))


def run(recipe: TeachSegmenterRecipe) -> dict:
    def build() -> SegmenterTrainingTask:
        (images, masks), held, num_classes = split_data(recipe)
        mean, std = images.mean((0, 2, 3)).tolist(), images.std((0, 2, 3)).clamp_min(1e-3).tolist()
        torch.manual_seed(recipe.seed)  # a reproducible initialization (the trainer seeds after the task is built)
        model = build_segmenter(
            recipe.arch,
            num_classes=num_classes,
            in_channels=images.shape[1],
            image_size=recipe.image_size,
            mean=mean,
            std=std,
        )
        return SegmenterTrainingTask(model, images, masks, num_classes=num_classes, eval_data=held)

    def export(trainer, task, metrics) -> dict:
        model = trainer.export_module("model")
        save_segmenter(model, Path(recipe.output))
        predicted = predict_masks(model, task.eval_images)
        scores = dice_iou(predicted, task.eval_masks.cpu(), task.num_classes)
        index = torch.linspace(0, len(task.eval_images) - 1, min(12, len(task.eval_images))).long()
        write_report(Path(recipe.output) / "report.png", task.eval_images[index].cpu(),
                     [task.eval_masks[index].cpu(), predicted[index]])  # fmt: skip
        return {
            "arch": recipe.arch,
            "heldout_dice": scores["dice"],
            "heldout_iou": scores["iou"],
            "heldout_dice_per_class": scores["dice_per_class"],
            "heldout_size": len(task.eval_images),
            "train_size": len(task.images),
            "parameters": sum(p.numel() for p in model.parameters()),
            "report": "report.png: held-out images, reference masks, predicted masks",
        }

    return run_recipe(recipe, COMMAND, build, export)


def main(argv: list[str] | None = None) -> int:
    recipe = parse_recipe(
        TeachSegmenterRecipe,
        argv,
        prog="gendistill teach segmenter",
        method="teach-segmenter",
        description="Train a U-Net segmenter on real masks (a teacher for gendistill segment).",
    )
    summary = run(recipe)
    if summary:
        print(f"held-out Dice {summary['heldout_dice']:.4f}, IoU {summary['heldout_iou']:.4f}")
    return 0
