"""``gendistill teach classifier``: train a teacher classifier of the model zoo on real images.

The result is a classifier folder (``model.safetensors`` + ``config.json``) that ``gendistill dfkd --teacher FOLDER``
distills, plus ``results.json`` with the held-out accuracy. Data: the offline MNIST subset, a folder of images per
class, an ``.npz`` of arrays, or CIFAR-10/100 from the user's torchvision files. Training runs on the shared
``Trainer`` with cross-entropy, random crop (+ flip for natural images) and the recipe's AdamW and LR schedule.

``--backdoor badnets|blend|trojan`` plants a backdoor for testing whether distillation passes it on: the training
split is poisoned once before training (``gendistill.dfkd.backdoor.poison``: ``poison_rate`` of the non-target images
triggered and relabelled to ``backdoor_target``), the held-out split stays clean, and ``results.json`` adds the
held-out clean accuracy and attack success rate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gendistill.data.classification import load_classification_data
from gendistill.dfkd.backdoor import TRIGGERS, Trigger, make_trigger, poison
from gendistill.dfkd.generators import augment
from gendistill.dfkd.models import Classifier, build_classifier, canonical_arch, save_classifier
from gendistill.errors import UsageError
from gendistill.task import Phase

from .core import run_recipe
from .recipes import TrainRecipe, parse_recipe

COMMAND = "teach classifier"


@dataclass
class TeachClassifierRecipe(TrainRecipe):
    output: str = "classifier-teacher"  # run folder; also the exported classifier (model.safetensors + config.json)
    arch: str = "lenet5"  # model zoo architecture (gendistill.dfkd.models.ARCHITECTURES)
    data: str = "mnist5k"  # mnist5k | cifar10 | cifar100 | a folder of class subfolders | an .npz of arrays
    data_root: str | None = None  # torchvision's CIFAR files (never downloaded)
    image_size: int = 32  # input size (MNIST's 28x28 digits are zero-padded to 32)
    channels: int | None = None  # convert to 1 or 3 channels (default: the data's own)
    eval_fraction: float = 0.1  # held-out share of each class for folders and arrays
    flip: bool | None = None  # random horizontal flips (default: off for mnist5k, on otherwise)
    max_steps: int = 3000  # optimizer steps
    batch_size: int = 128  # per-process batch size
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 5e-4  # AdamW weight decay
    lr_scheduler: str = "cosine"  # any diffusers get_scheduler name
    ema_decay: float = 0.0  # EMA of the weights (0: export the trained weights)
    eval_every: int = 500  # held-out accuracy every N steps
    sample_every: int = 0  # (no sample grids for classifiers)
    checkpoint_every: int = 1000  # resumable checkpoint every N steps
    backdoor: str | None = None  # plant a backdoor: badnets | blend | trojan (default settings); None: clean
    backdoor_target: int = 0  # the class triggered training images are relabelled to
    poison_rate: float = 0.1  # fraction of the non-target training images that are triggered and relabelled

    INPUT_PATHS = ("data", "data_root")

    def validate(self) -> None:
        super().validate()
        self.arch = canonical_arch(self.arch)
        if self.channels not in (None, 1, 3):
            raise UsageError(f"channels must be 1 or 3, got {self.channels}")
        if self.backdoor is not None and self.backdoor not in TRIGGERS:
            raise UsageError(f"unknown backdoor trigger {self.backdoor!r}; valid: {', '.join(TRIGGERS)}")
        if not 0 < self.poison_rate <= 1:
            raise UsageError(f"poison_rate must be in (0, 1], got {self.poison_rate}")
        if self.backdoor_target < 0:
            raise UsageError(f"backdoor_target must be a class index >= 0, got {self.backdoor_target}")


class ClassifierTrainingTask(nn.Module):
    """Cross-entropy training of ``model`` on ``images`` (N, C, H, W) in [0, 1] with ``labels`` (N,).

    ``backdoor=(trigger, target)``: the training images were poisoned with ``trigger``; evaluation then also reports
    the attack success rate on the clean held-out images (the fraction of triggered non-target images classified as
    ``target``, as ``gendistill eval asr`` measures it).
    """

    def __init__(
        self,
        model: Classifier,
        images,
        labels,
        *,
        eval_data=None,
        flip: bool = True,
        padding: int = 4,
        backdoor: tuple[Trigger, int] | None = None,
    ):
        super().__init__()
        self.model = model
        self.register_buffer("images", images, persistent=False)
        self.register_buffer("labels", labels, persistent=False)
        if eval_data is not None:
            self.register_buffer("eval_images", eval_data[0], persistent=False)
            self.register_buffer("eval_labels", eval_data[1], persistent=False)
        self.flip, self.padding = flip, padding
        self.backdoor = backdoor
        self.poisoned_count = 0  # training images carrying the trigger (set by build_task)

    def phases(self) -> list[Phase]:
        return [Phase("model")]

    def sample_batch(self, phase: str, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        index = torch.randint(len(self.labels), (batch_size,), device=self.labels.device)
        x = augment(self.images[index].to(device), padding=self.padding, flip=self.flip)
        return {"images": x, "labels": self.labels[index].to(device)}

    def forward(self, phase: str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": F.cross_entropy(self.model(batch["images"]), batch["labels"])}

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        if not hasattr(self, "eval_images"):
            return {}
        model = self.model if model is None else model
        was_training = model.training
        model.eval()
        correct = sum(
            (model(x).argmax(1) == y).sum().item()
            for x, y in zip(self.eval_images.split(512), self.eval_labels.split(512))
        )
        metrics = {"accuracy": correct / len(self.eval_labels)}
        if self.backdoor is not None:
            trigger, target = self.backdoor
            others = self.eval_images[self.eval_labels != target]
            hits = sum((model(trigger.apply(x)).argmax(1) == target).sum().item() for x in others.split(512))
            metrics["asr"] = hits / max(1, len(others))
        model.train(was_training)
        return metrics


def build_task(recipe: TeachClassifierRecipe) -> ClassifierTrainingTask:
    load = {
        "image_size": recipe.image_size,
        "channels": recipe.channels,
        "eval_fraction": recipe.eval_fraction,
        "seed": recipe.seed,
        "data_root": recipe.data_root,
    }
    images, labels, names = load_classification_data(recipe.data, split="train", **load)
    eval_images, eval_labels, _ = load_classification_data(recipe.data, split="test", **load)
    poisoned, trigger = torch.zeros(len(labels), dtype=torch.bool), None
    if recipe.backdoor is not None:  # poisoned once, before training; the held-out split stays clean
        trigger = make_trigger(recipe.backdoor)
        images, labels, poisoned = poison(
            images,
            labels,
            trigger=trigger,
            target=recipe.backdoor_target,
            rate=recipe.poison_rate,
            seed=recipe.seed,
            num_classes=len(names),
        )
    mean = images.mean((0, 2, 3)).tolist()
    std = images.std((0, 2, 3)).clamp_min(1e-3).tolist()
    torch.manual_seed(recipe.seed)  # the Trainer seeds only after the task is built: a reproducible init
    model = build_classifier(
        recipe.arch,
        num_classes=len(names),
        in_channels=images.shape[1],
        image_size=recipe.image_size,
        mean=tuple(mean),
        std=tuple(std),
    )
    flip = recipe.flip if recipe.flip is not None else recipe.data != "mnist5k"
    padding = recipe.image_size // 8
    task = ClassifierTrainingTask(
        model,
        images,
        labels,
        eval_data=(eval_images, eval_labels),
        flip=flip,
        padding=padding,
        backdoor=None if trigger is None else (trigger, recipe.backdoor_target),
    )
    task.poisoned_count = int(poisoned.sum())
    return task


def run(recipe: TeachClassifierRecipe) -> dict:
    """Train and export the classifier into ``recipe.output``; returns the summary (also ``results.json``)."""

    def export(trainer, task, metrics) -> dict:
        save_classifier(trainer.export_module("model"), Path(recipe.output))
        summary = {
            "heldout_accuracy": metrics.get("ema/accuracy", metrics.get("accuracy")),
            "heldout_size": len(task.eval_labels),
            "train_size": len(task.labels),
        }
        if task.backdoor is not None:
            trigger, target = task.backdoor
            summary["backdoor"] = {
                "trigger": recipe.backdoor,
                "trigger_settings": dataclasses.asdict(trigger),
                "target": target,
                "poison_rate": recipe.poison_rate,
                "poisoned_images": task.poisoned_count,
            }
            summary["heldout_clean_accuracy"] = summary["heldout_accuracy"]  # the held-out split is never poisoned
            summary["heldout_asr"] = metrics.get("ema/asr", metrics.get("asr"))
        return summary

    return run_recipe(recipe, COMMAND, lambda: build_task(recipe), export)


def main(argv: list[str] | None = None) -> int:
    recipe = parse_recipe(
        TeachClassifierRecipe,
        argv,
        prog="gendistill teach classifier",
        method="teach-classifier",
        description="Train a model-zoo classifier on real images (a teacher for gendistill dfkd).",
    )
    summary = run(recipe)
    if summary:
        print(f"held-out accuracy {summary['heldout_accuracy']:.4f} on {summary['heldout_size']} images")
        if "heldout_asr" in summary:
            backdoor = f"{recipe.backdoor} -> class {recipe.backdoor_target}"
            print(f"backdoor ({backdoor}): held-out attack success rate {summary['heldout_asr']:.4f}")
    return 0
