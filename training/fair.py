"""``gendistill fair``: fair synthetic data by data-free distillation (Fair4Free's setting), on biased MNIST digits.

    gendistill fair --output fair-run --rate 0.95

Stages, each a run of the training core in its own subfolder: ``teacher/`` (the fair conditional VAE on the biased
training digits: label ``digit >= 5``, sensitive attribute "inverted image" agreeing with the label at ``--rate``),
``student/`` (a decoder of ``--student-width`` distilled from the teacher's decoder on latent draws only, no
image), then ``classifiers/{biased_real,teacher_samples,student_samples}`` (LeNet-5 on the biased real digits and
on ``--synthetic-images`` samples of each decoder, attributes drawn independently of digits). All three are judged
on the balanced held-out digits (attribute independent of label): accuracy, demographic-parity and equalized-odds
differences (fairlearn) and, for the samples, the FID on the biased-real classifier's penultimate features.
``results.json`` and ``report.md`` (with ``samples.png``) hold the table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.utils import save_image

from gendistill.dfkd.models import build_classifier, load_classifier, save_classifier
from gendistill.errors import UsageError
from gendistill.fair import Decoder, FairVAE, FairVAETask, LatentDistillTask, biased_digits, load_decoder, save_decoder
from gendistill.fair.task import draw_conditions

from .core import run_recipe, write_json_atomic
from .recipes import TrainRecipe, parse_recipe
from .teach_classifier import ClassifierTrainingTask

COMMAND = "fair"


@dataclass
class FairRecipe(TrainRecipe):
    output: str = "fair4free"  # run folder: teacher/, student/, classifiers/, results.json, report.md
    rate: float = 0.95  # how often the sensitive attribute equals the label in the biased training digits
    fair: float = 100.0  # weight of the latent MMD between the attribute groups in the teacher's loss
    z_dim: int = 8  # latent size
    teacher_width: int = 32  # the teacher VAE's width
    student_width: int = 16  # the distilled decoder's width (43% of the teacher decoder's weights at 32)
    teacher_steps: int = 3000  # the teacher's optimizer steps
    max_steps: int = 8000  # the student decoder's distillation steps
    classifier_steps: int = 600  # optimizer steps of each judged classifier
    synthetic_images: int = 4500  # samples drawn from each decoder to train a classifier on
    batch_size: int = 128  # per-process batch size (the teacher's: the same number from each label/attribute group)
    lr: float = 1e-3  # AdamW learning rate of the teacher
    student_lr: float = 2e-3  # AdamW learning rate of the student decoder
    grad_clip: float = 0.0  # no clipping: the VAE's loss is summed over pixels (~100), a norm of 1 would stall it
    ema_decay: float = 0.0  # EMA of the weights (0: the trained weights)
    eval_every: int = 500  # the student's pixel gap to the teacher every N steps
    sample_every: int = 0  # (samples.png is written at the end)
    checkpoint_every: int = 1000  # resumable checkpoint every N steps of each stage

    def validate(self) -> None:
        super().validate()
        if not 0.5 <= self.rate <= 1.0:
            raise UsageError(f"rate must be in [0.5, 1] (0.5: no bias), got {self.rate}")
        for name in ("z_dim", "teacher_width", "student_width", "teacher_steps", "classifier_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.synthetic_images < 2:
            raise UsageError(f"synthetic_images must be >= 2, got {self.synthetic_images}")
        if not self.student_lr > 0:
            raise UsageError(f"student_lr must be positive, got {self.student_lr}")
        if self.fair < 0:
            raise UsageError(f"fair must be >= 0, got {self.fair}")


def _stage(recipe: FairRecipe, name: str, **changes) -> FairRecipe:
    return dataclasses.replace(recipe, output=str(Path(recipe.output) / name), **changes)


@torch.no_grad()
def sample(decoder: Decoder, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` images (N, 1, 32, 32) in [0, 1] with their labels (digit >= 5) and attributes (drawn independently)."""
    z, digits, attributes = draw_conditions(n, decoder.z_dim, "cpu", torch.Generator().manual_seed(seed))
    images = torch.cat(
        [torch.sigmoid(decoder(*a)) for a in zip(z.split(500), digits.split(500), attributes.split(500))]
    )
    return images, (digits >= 5).long(), attributes


def train_classifier(recipe: FairRecipe, name: str, images, labels, held_out) -> Path:
    """A LeNet-5 (2 classes) trained on ``images``/``labels`` by the training core; its folder."""
    stage = _stage(recipe, f"classifiers/{name}", max_steps=recipe.classifier_steps, lr=2e-3, ema_decay=0.0,
                   batch_size=64, eval_every=0, checkpoint_every=0)  # fmt: skip

    def build():
        mean, std = images.mean().item(), images.std().clamp_min(1e-3).item()
        torch.manual_seed(recipe.seed)
        model = build_classifier("lenet5", num_classes=2, in_channels=1, image_size=32, mean=(mean,), std=(std,))
        return ClassifierTrainingTask(model, images, labels, eval_data=held_out, flip=False, padding=4)

    def export(trainer, task, metrics):
        save_classifier(trainer.export_module("model"), Path(stage.output))
        return {"train_size": len(labels), "heldout_accuracy": metrics.get("accuracy")}

    run_recipe(stage, "fair classifier", build, export)
    return Path(stage.output)


def judge(folder: Path, held_out, attributes) -> dict[str, float]:
    """Accuracy and fairness of the classifier in ``folder`` on the balanced held-out digits."""
    from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

    model = load_classifier(folder)
    images, labels = held_out
    with torch.no_grad():
        predicted = model(images).argmax(1).numpy()
    y, s = labels.numpy(), attributes.numpy()
    return {
        "accuracy": float((predicted == y).mean()),
        "demographic_parity_difference": float(demographic_parity_difference(y, predicted, sensitive_features=s)),
        "equalized_odds_difference": float(equalized_odds_difference(y, predicted, sensitive_features=s)),
        "positive_rate_by_attribute": [float(predicted[s == a].mean()) for a in (0, 1)],
    }


def fid(extractor_folder: Path, real: torch.Tensor, fake: torch.Tensor) -> float:
    from gendistill.eval.features import classifier_features
    from gendistill.eval.fid import compute_stats, frechet_distance

    extractor = classifier_features(extractor_folder)
    stats = [compute_stats(x.split(500), extractor) for x in (real, fake)]
    return frechet_distance(*stats)


def run(recipe: FairRecipe) -> dict:
    try:
        import fairlearn  # noqa: F401
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "gendistill fair needs fairlearn for its fairness metrics: pip install 'gendistill[fair]'",
            name="fairlearn",
        ) from None
    out = Path(recipe.output)
    images, digits, labels, attributes = biased_digits("train", rate=recipe.rate, seed=recipe.seed)
    test_images, _, test_labels, test_attributes = biased_digits("test", rate=0.5, seed=recipe.seed + 1)
    held_out = (test_images, test_labels)

    teacher_recipe = _stage(recipe, "teacher", max_steps=recipe.teacher_steps, eval_every=0)

    def build_teacher():
        torch.manual_seed(recipe.seed)
        vae = FairVAE(recipe.teacher_width, recipe.z_dim)
        return FairVAETask(vae, images, digits, labels, attributes, fair=recipe.fair)

    def export_teacher(trainer, task, metrics):
        save_decoder(trainer.export_module("vae").decoder, teacher_recipe.output)
        return {"decoder_parameters": sum(p.numel() for p in task.vae.decoder.parameters())}

    run_recipe(teacher_recipe, "fair teacher", build_teacher, export_teacher)
    teacher = load_decoder(teacher_recipe.output)

    student_recipe = _stage(recipe, "student", lr=recipe.student_lr)

    def build_student():
        torch.manual_seed(recipe.seed)
        return LatentDistillTask(teacher, Decoder(recipe.student_width, recipe.z_dim))

    def export_student(trainer, task, metrics):
        save_decoder(trainer.export_module("student"), student_recipe.output)
        return {"pixel_gap_to_teacher": metrics.get("pixel_gap_to_teacher")}

    run_recipe(student_recipe, "fair distill", build_student, export_student)
    student = load_decoder(student_recipe.output)

    rows, samples = {}, {}
    folders = {"biased_real": train_classifier(recipe, "biased_real", images, labels, held_out)}
    for name, decoder in (("teacher_samples", teacher), ("student_samples", student)):
        x, y, _ = sample(decoder, recipe.synthetic_images, recipe.seed + 2)
        samples[name] = x
        folders[name] = train_classifier(recipe, name, x, y, held_out)
    for name, folder in folders.items():
        rows[name] = judge(folder, held_out, test_attributes)
    for name, x in samples.items():
        rows[name]["fid_biased_real_classifier_features"] = fid(folders["biased_real"], test_images, x)
    base = rows["biased_real"]
    summary = {
        "rate": recipe.rate,
        "train_size": len(images),
        "heldout_size": len(test_images),
        "teacher_decoder_parameters": sum(p.numel() for p in teacher.parameters()),
        "student_decoder_parameters": sum(p.numel() for p in student.parameters()),
        "classifiers": rows,
        "student_dp_over_biased_dp": rows["student_samples"]["demographic_parity_difference"]
        / max(base["demographic_parity_difference"], 1e-12),
        "student_accuracy_minus_biased": rows["student_samples"]["accuracy"] - base["accuracy"],
    }
    summary["student_to_teacher_parameters"] = (
        summary["student_decoder_parameters"] / summary["teacher_decoder_parameters"]
    )
    grid = torch.cat([samples["teacher_samples"][:16], samples["student_samples"][:16]])
    save_image(grid, out / "samples.png", nrow=16)
    write_json_atomic(out / "results.json", summary)
    (out / "report.md").write_text(report(summary), encoding="utf-8")
    return summary


def report(summary: dict) -> str:
    lines = [
        "# Fair synthetic digits (Fair4Free's setting)",
        "",
        f"Biased training digits: label `digit >= 5`, attribute 'inverted' equal to it at rate {summary['rate']}; "
        f"judged on {summary['heldout_size']} balanced held-out digits. Decoders: teacher "
        f"{summary['teacher_decoder_parameters']:,} weights, student {summary['student_decoder_parameters']:,} "
        f"({summary['student_to_teacher_parameters']:.0%}).",
        "",
        "| classifier trained on | accuracy | demographic parity diff. | equalized odds diff. | FID (clf. features) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in summary["classifiers"].items():
        fid_value = row.get("fid_biased_real_classifier_features")
        lines.append(
            f"| {name.replace('_', ' ')} | {row['accuracy']:.3f} | {row['demographic_parity_difference']:.3f} | "
            f"{row['equalized_odds_difference']:.3f} | {'-' if fid_value is None else f'{fid_value:.2f}'} |"
        )
    lines += ["", "![samples](samples.png): teacher samples (top), student samples (bottom).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    recipe = parse_recipe(
        FairRecipe,
        argv,
        prog="gendistill fair",
        method="fair",
        description="Fair synthetic digits: a fair VAE teacher, a data-free distilled decoder, fairness judged.",
    )
    summary = run(recipe)
    student, biased = summary["classifiers"]["student_samples"], summary["classifiers"]["biased_real"]
    print(
        f"demographic parity difference {biased['demographic_parity_difference']:.3f} (biased real) -> "
        f"{student['demographic_parity_difference']:.3f} (student samples); accuracy {biased['accuracy']:.3f} -> "
        f"{student['accuracy']:.3f}"
    )
    return 0
