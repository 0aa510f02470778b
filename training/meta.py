"""``gendistill meta``: one meta-learner from many black-box classifiers (BiDf-MKD), or plain black-box KD into it.

    gendistill meta --teachers api0,api1,api2,api3,api4 --meta-test mnist5k --meta-test-classes 5,6,7,8,9 \\
        --output meta-run

Each ``--teachers`` folder is a classifier (``model.safetensors`` + ``config.json``, e.g. from ``gendistill teach
classifier``) read only through its probabilities, every answered image counted. All must be N-way on the same
input; the meta-learner (``--arch``) is N-way too. ``--method bidf-mkd`` (default) or ``kd``; method options as
``--method-options key=value,...`` (``gendistill.meta.bidf_mkd.MetaConfig``'s fields and ``recovery_*`` for the
zero-order data recovery). With ``--meta-test`` (classes no teacher knows) the run reports N-way
``--test-shots``-shot accuracy on ``--test-episodes`` seeded episodes, each adapted from the meta-learner by 30
gradient steps of the inner loop's step size (``--test-steps``/``--test-lr`` to change them). The output folder is
the meta-learner's classifier folder, with ``results.json`` (accuracy, its 95% interval, queries) and ``samples/``
(every API's recovered images, API after API).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from gendistill.data.classification import load_classification_data
from gendistill.dfkd.models import build_classifier, canonical_arch, load_classifier, save_classifier
from gendistill.errors import UsageError
from gendistill.meta.bidf_mkd import METHODS, MetaConfig, MetaDistillTask, config_from_options
from gendistill.meta.recovery import RecoveryConfig

from .core import run_recipe
from .recipes import TrainRecipe, parse_options, parse_recipe

COMMAND = "meta"


def _option_types() -> dict[str, type]:
    hints = {k: v for k, v in typing.get_type_hints(MetaConfig).items() if k != "recovery"}
    hints.update({f"recovery_{k}": v for k, v in typing.get_type_hints(RecoveryConfig).items()})
    return hints


@dataclass
class MetaRecipe(TrainRecipe):
    output: str = "meta-learner"  # run folder; also the meta-learner (model.safetensors + config.json)
    teachers: list[str] | None = None  # classifier folders, comma-separated: the black-box APIs (required)
    method: str = "bidf-mkd"  # bidf-mkd | kd (plain black-box KD into the meta-learner)
    arch: str = "lenet5"  # model zoo architecture of the meta-learner
    method_options: list[str] | None = None  # key=value: MetaConfig fields, recovery_* for the data recovery
    meta_test: str | None = None  # unseen classes for the meta-test: mnist5k | folder of class subfolders | .npz
    meta_test_classes: list[int] | None = None  # which classes of --meta-test (indices; default: all of them)
    test_shots: int = 1  # support images per class of a meta-test episode
    test_queries: int = 15  # query images per class of a meta-test episode
    test_episodes: int = 100  # meta-test episodes (seeded: the same for every model)
    test_steps: int = 30  # adaptation steps at meta-test (the inner loop's 3 misjudge real images: docs/meta.md)
    test_lr: float | None = None  # adaptation step size at meta-test (default: the inner loop's)
    max_steps: int = 2000  # meta-training iterations (one episode each)
    lr: float = 1e-3  # AdamW learning rate of the meta-learner
    lr_scheduler: str = "constant"
    grad_clip: float = 0.0  # no clipping (the episode losses are small; measured without)
    ema_decay: float = 0.0  # the meta-learner's live weights are exported (an average of inits is no init)
    eval_every: int = 500  # meta-test accuracy every N iterations (with --meta-test)
    sample_every: int = 0  # recovered images at the end
    checkpoint_every: int = 500

    INPUT_PATHS = ("meta_test",)

    def validate(self) -> None:
        super().validate()
        if not self.teachers:
            raise UsageError("--teachers is required: classifier folders (comma-separated), the black-box APIs")
        if self.method not in METHODS:
            raise UsageError(f"unknown meta-learning method {self.method!r}; valid: {', '.join(METHODS)}")
        self.arch = canonical_arch(self.arch, what="meta-learner architecture")
        for name in ("test_shots", "test_queries", "test_episodes"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.test_steps < 0:
            raise UsageError(f"test_steps must be >= 0, got {self.test_steps}")
        if self.test_lr is not None and not self.test_lr > 0:
            raise UsageError(f"test_lr must be > 0, got {self.test_lr}")
        if self.meta_test_classes and not self.meta_test:
            raise UsageError("--meta-test-classes needs --meta-test")
        self.config()

    def input_paths(self) -> dict[str, str | None]:
        paths = super().input_paths()
        for i, path in enumerate(self.teachers or [], start=1):
            paths[f"--teachers ({i})"] = path
        return paths

    def config(self) -> MetaConfig:
        """``method_options`` as a :class:`MetaConfig` (values converted to the fields' types)."""
        return config_from_options(parse_options(self.method_options, _option_types(), owner=self.method))


def load_meta_test(recipe: MetaRecipe, image_size: int, channels: int) -> list[torch.Tensor] | None:
    """The meta-test images of each chosen class (all of each class: no teacher has seen these classes)."""
    if not recipe.meta_test:
        return None
    images, labels, names = load_classification_data(recipe.meta_test, split="all", image_size=image_size,
                                                     channels=channels)  # fmt: skip
    chosen = recipe.meta_test_classes if recipe.meta_test_classes else list(range(len(names)))
    bad = [c for c in chosen if not 0 <= c < len(names)]
    if bad:
        raise UsageError(f"--meta-test-classes {bad} are not classes of {recipe.meta_test} (0..{len(names) - 1})")
    return [images[labels == c] for c in chosen]


def run(recipe: MetaRecipe) -> dict:
    config = recipe.config()

    def build():
        teachers = [load_classifier(path) for path in recipe.teachers]
        first = teachers[0].config
        classes = load_meta_test(recipe, first.image_size, first.in_channels)
        torch.manual_seed(recipe.seed)
        model = build_classifier(recipe.arch, num_classes=first.num_classes, in_channels=first.in_channels,
                                 image_size=first.image_size, mean=first.mean, std=first.std)  # fmt: skip
        test = {"shots": recipe.test_shots, "queries": recipe.test_queries, "episodes": recipe.test_episodes,
                "seed": recipe.seed, "steps": recipe.test_steps}  # fmt: skip
        if recipe.test_lr is not None:
            test["lr"] = recipe.test_lr
        return MetaDistillTask(model, teachers, method=recipe.method, config=config, meta_test_classes=classes,
                               test=test)  # fmt: skip

    def export(trainer, task, metrics):
        save_classifier(trainer.export_module("meta"), Path(recipe.output))
        summary = {"method": recipe.method, "apis": len(task.apis), "teacher_queries": task.queries}
        for key in ("meta_test_accuracy", "meta_test_ci95"):
            if key in metrics:
                summary[key] = metrics[key]
        if task.meta_test_classes is not None:
            summary["meta_test"] = {k: task.test[k] for k in ("ways", "shots", "queries", "episodes", "steps", "lr")}
        summary["options"] = dataclasses.asdict(config)
        return summary

    return run_recipe(recipe, COMMAND, build, export)


def main(argv: list[str] | None = None) -> int:
    recipe = parse_recipe(
        MetaRecipe,
        argv,
        prog="gendistill meta",
        method="meta",
        description="Meta-learn from black-box classifiers without their data (BiDf-MKD), or plain black-box KD.",
    )
    summary = run(recipe)
    if "meta_test_accuracy" in summary:
        print(
            f"meta-test accuracy {summary['meta_test_accuracy']:.3f} +- {summary['meta_test_ci95']:.3f} "
            f"({summary['teacher_queries']:,} queries)"
        )
    return 0
