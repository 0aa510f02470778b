"""``gendistill dfkd``: distill a classifier into a student on synthesized images only (docs/dfkd.md).

    gendistill dfkd --method fast --teacher T_DIR --student-arch lenet5_half --output DIR --eval-data mnist5k

The teacher is a classifier folder (``gendistill teach classifier`` writes one); the student, a model-zoo
architecture, is exported the same way (``model.safetensors`` + ``config.json``) with ``results.json``. From Python,
``distill(teacher, student, method=...)`` takes ``Classifier`` objects (any ``nn.Module`` wrapped in one).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel

from gendistill.data.classification import load_classification_data
from gendistill.dfkd.losses import batchnorm_layer_count
from gendistill.dfkd.models import (
    QUANT_BITS,
    STUDENT_INITS,
    Classifier,
    build_classifier,
    canonical_arch,
    init_from_teacher,
    load_classifier,
    save_classifier,
)
from gendistill.dfkd.plugins import build_plugins
from gendistill.dfkd.synthesizers import METHODS, get_method
from gendistill.dfkd.task import DFKDTask
from gendistill.errors import UsageError
from gendistill.kernels import backend_for

from .core import run_recipe
from .recipes import TrainRecipe, convert_value, parse_options, parse_recipe
from .transfer import generate_transfer_set, generated_source

EVAL_SPLITS = ("test", "all")  # --eval-split: the held-out part of --eval-data, or all of it
COMMAND = "dfkd"

logger = logging.getLogger(__name__)


@dataclass
class DFKDRecipe(TrainRecipe):
    output: str = "dfkd-student"  # run folder; also the exported student (model.safetensors + config.json)
    method: str = "dfq"  # dafl dfad dfme zskt dfq deepinversion mixmix cmi fast nayer cae; on a pool: unlabeled kd3
    teacher: str | None = None  # classifier folder (model.safetensors + config.json) (required)
    extra_teachers: list[str] | None = None  # mixmix: more classifier folders whose statistics join the synthesis
    student_arch: str = "lenet5_half"  # model zoo architecture of the student
    student_quant_bits: int | None = None  # 1 | 2 | 4 | 8: a quantization-aware student (weights fake-quantized)
    student_init: str = "auto"  # teacher: weight selection from the teacher (each tensor the leading slice of the
    # teacher's of the same name: ResNet-8 from ResNet-20, LeNet-5-half from LeNet-5) | random | auto: teacher
    # when every student tensor has such a teacher tensor, else random (always random for dfme and under abd)
    method_options: list[str] | None = None  # method options as key=value (e.g. oh=0.5,adv=1.33): the method's Config
    pool: str | None = None  # unlabeled, kd3: the image pool (folder | .npz | mnist5k | generated:PIPELINE_FOLDER)
    plugins: list[str] | None = None  # plug-ins on top of the method, comma-separated: abd | faqd | lra
    plugin_options: list[str] | None = None  # plug-in options as name.key=value (e.g. faqd.fa=2,faqd.fast=true)
    eval_data: str | None = None  # held-out real data for accuracy/agreement: mnist5k | cifar10 | folder | .npz
    eval_split: str = "test"  # part of --eval-data: test (built-in test split; 10% of each class of a folder) | all
    data_root: str | None = None  # torchvision's CIFAR files for --eval-data cifar10/cifar100
    iterations: int | None = None  # alias of max_steps (one iteration runs every phase's steps)
    max_steps: int | None = None  # iterations (default: the method's: 1,000; DFQ 2,500 on a shallow teacher such as
    # LeNet-5-BN, whose iterations are cheap, and 1,000 on a deep one)
    batch_size: int | None = None  # images per generator and student step, per process (default: the method's)
    lr: float | None = None  # the student's AdamW learning rate (default: the method's student_lr option)
    lr_scheduler: str = "cosine"  # learning rates over max_steps (student and generator): cosine decay to 0, as
    # Fast-Datafree's code anneals its student; any diffusers get_scheduler name (constant_with_warmup: flat)
    ema_decay: float = 0.99  # EMA of the student weights; the EMA student is evaluated and exported (0: the live one)
    eval_every: int = 100  # held-out accuracy and teacher agreement every N iterations (with --eval-data)
    sample_every: int = 500  # PNG grid of synthesized images every N iterations
    channels_last: bool = True  # convolutions in channels-last layout (oneDNN on CPUs, tensor cores on GPUs)

    INPUT_PATHS = ("teacher", "eval_data", "data_root")
    RESUMABLE_CHANGES = (*TrainRecipe.RESUMABLE_CHANGES, "iterations")

    def validate(self) -> None:
        if self.iterations is not None:
            self.max_steps = self.iterations
        cls = get_method(self.method)
        if self.eval_split not in EVAL_SPLITS:
            raise UsageError(f"eval_split {self.eval_split!r} is not valid; valid: {', '.join(EVAL_SPLITS)}")
        if self.lr is None or self.batch_size is None or self.max_steps is None:
            # The method's own defaults, which may depend on the teacher (DFQ's profiles)
            self.take_method_defaults(cls.config_for_teacher(cls.Config(**self.options()), self.teacher_bn_layers()))
        super().validate()
        self.student_arch = canonical_arch(self.student_arch, what="student architecture")
        self.resolved_student_init()
        if self.student_quant_bits is not None and self.student_quant_bits not in QUANT_BITS:
            raise UsageError(
                f"student_quant_bits {self.student_quant_bits!r} is not valid; valid: "
                f"{', '.join(map(str, QUANT_BITS))} (or unset: a full-precision student)"
            )
        self.options()
        self.build_plugins()

    def take_method_defaults(self, config) -> None:
        """Fill the fields left at None (student lr, batch size, max_steps) from a method's resolved ``config``."""
        self.lr = float(config.student_lr) if self.lr is None else self.lr
        self.batch_size = int(config.batch_size) if self.batch_size is None else self.batch_size
        self.max_steps = int(config.max_steps) if self.max_steps is None else self.max_steps

    def resolved_student_init(self) -> str:
        """``student_init`` as it applies: ``"random"`` where the teacher's weights stay out of the student (a
        black-box method such as DFME reads the teacher only through queries; under ABD the teacher may be poisoned
        and its weights would carry the backdoor), where ``"teacher"`` is refused; else ``student_init``."""
        if self.student_init not in STUDENT_INITS:
            raise UsageError(f"student_init {self.student_init!r} is not valid; valid: {', '.join(STUDENT_INITS)}")
        black_box = get_method(self.method).black_box
        if not black_box and "abd" not in (self.plugins or []):
            return self.student_init
        if self.student_init == "teacher":
            why = (
                f"method {self.method!r} reads the teacher only through queries"
                if black_box
                else "--plugins abd is there to keep a possible backdoor of the teacher out of the student"
            )
            raise UsageError(
                f"student_init 'teacher' copies the teacher's weights, but {why}; use student_init random (or auto, "
                "which is random here)"
            )
        return "random"

    def teacher_bn_layers(self) -> int | None:
        """How many BatchNorm layers the teacher has (the architecture in its folder's config.json; the weights are
        not read), or None when the teacher is not known yet or its folder cannot be read (``run`` reports that)."""
        if not self.teacher:
            return None
        try:
            return batchnorm_layer_count(load_classifier(self.teacher, weights=False))
        except (OSError, UsageError, ValueError):
            return None

    def input_paths(self) -> dict[str, str | None]:
        paths = super().input_paths()
        for i, path in enumerate(self.extra_teachers or [], start=1):
            paths[f"--extra-teachers ({i})"] = path
        return paths

    def build_plugins(self) -> list:
        """The recipe's plug-ins, configured by ``plugin_options`` (converted like method options)."""
        if self.plugin_options and not self.plugins:
            raise UsageError(f"plugin_options {self.plugin_options} were given without --plugins")
        return build_plugins(list(self.plugins or []), self.plugin_options, convert=convert_value)

    def options(self) -> dict[str, object]:
        """``method_options`` as a dict, each value converted to the type of the method's config field by the recipe
        parser's own conversion (``reset_generator=flase`` is an error, as ``--overwrite flase`` is)."""
        config = get_method(self.method).Config
        hints = typing.get_type_hints(config)
        names = [f.name for f in dataclasses.fields(config)]
        options = parse_options(self.method_options, {n: hints[n] for n in names}, owner=self.method)
        if self.pool is not None:
            if "data" not in names:
                takers = ", ".join(sorted(m for m, cls in METHODS.items() if not cls.data_free))
                raise UsageError(f"--pool is for the methods that learn on a pool ({takers}); not {self.method!r}")
            if "data" in options and options["data"] != self.pool:
                raise UsageError(f"--pool {self.pool!r} and --method-options data={options['data']!r} disagree")
            options["data"] = self.pool
        return options


def build_task(
    teacher: Classifier,
    student: Classifier,
    method: str,
    *,
    options: dict | None = None,
    eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    objectives: list | None = None,
    kernel_backend: str | None = None,
    extra_teachers: list[Classifier] | None = None,
) -> DFKDTask:
    """The DFKD task of ``method`` (options override the method's config fields; ``objectives``: plug-in loss terms,
    see ``DFKDTask``; ``kernel_backend``: the BN-statistics kernel's, ``gendistill.kernels.backend_for``;
    ``extra_teachers``: MixMix's other classifiers)."""
    cls = get_method(method)
    config = teacher.config
    synthesizer = cls(
        num_classes=config.num_classes,
        image_shape=(config.in_channels, config.image_size, config.image_size),
        normalization=None if config.mean is None else (tuple(config.mean), tuple(config.std)),
        kernel_backend=kernel_backend,
        **(options or {}),
    )
    synthesizer.check_teacher(teacher)
    return DFKDTask(
        teacher,
        student,
        synthesizer,
        eval_data=eval_data,
        objectives=objectives or (),
        extra_teachers=extra_teachers or (),
    )


def task_from_recipe(recipe: DFKDRecipe) -> DFKDTask:
    """The task of a recipe: its teacher folder, a fresh student of ``student_arch`` (seeded), the held-out data."""
    if not recipe.teacher:
        raise UsageError("a teacher is required: --teacher CLASSIFIER_FOLDER (gendistill teach classifier)")
    teacher = load_classifier(recipe.teacher)
    config = teacher.config
    eval_data = None
    if recipe.eval_data:
        images, labels, _ = load_classification_data(
            recipe.eval_data,
            split=recipe.eval_split,
            image_size=config.image_size,
            channels=config.in_channels,
            data_root=recipe.data_root,
        )
        if int(labels.max()) >= config.num_classes:
            raise UsageError(
                f"--eval-data {recipe.eval_data!r} has labels up to {int(labels.max())} but the teacher has "
                f"{config.num_classes} classes"
            )
        eval_data = (images, labels)
    torch.manual_seed(recipe.seed)  # a reproducible student initialization
    student = build_classifier(
        recipe.student_arch,
        num_classes=config.num_classes,
        in_channels=config.in_channels,
        image_size=config.image_size,
        mean=None if config.mean is None else tuple(config.mean),
        std=None if config.std is None else tuple(config.std),
        quant_bits=recipe.student_quant_bits,
    )
    copied = init_from_teacher(student, teacher, recipe.resolved_student_init())
    if copied:
        logger.info("student initialized from the teacher: %d tensors copied", len(copied))
    options = recipe.options()
    method = get_method(recipe.method)
    source = None if method.data_free else generated_source(options.get("data", ""))
    if source is not None:  # a transfer set drawn from a diffusion model (training/transfer.py)
        defaults = method.Config()
        images, info = generate_transfer_set(
            source,
            num_images=int(options.get("generated_images", defaults.generated_images)),
            steps=int(options.get("generated_steps", defaults.generated_steps)),
            seed=recipe.seed,
            # this process's GPU under accelerate launch (the set is drawn before the accelerator exists)
            device="cpu" if recipe.cpu or not torch.cuda.is_available() else f"cuda:{os.environ.get('LOCAL_RANK', 0)}",
        )
        logger.info("transfer set: %d images from %s (%s) in %.1f s", info["images"], source, info["pipeline"],
                    info["seconds"])  # fmt: skip
        options["images"] = images
    task = build_task(
        teacher,
        student,
        recipe.method,
        options=options,
        eval_data=eval_data,
        objectives=recipe.build_plugins(),
        kernel_backend=backend_for(recipe.fused_kernels),
        extra_teachers=[load_classifier(path) for path in recipe.extra_teachers or []],
    )
    if source is not None:
        task.synthesizer.source_info = info  # results.json records what the set was
    return task


def run(recipe: DFKDRecipe, task: DFKDTask | None = None) -> dict:
    """Distill and export the student into ``recipe.output``; returns the summary (also ``results.json``).
    ``task``: one built by the caller (``distill``) instead of the recipe's."""
    recipe.validate()  # the defaults left at None (max_steps, lr, batch size) come from the method

    def export(trainer, task, metrics) -> dict:
        save_classifier(trainer.export_module("student"), Path(recipe.output))
        summary = {"method": recipe.method, "plugins": list(recipe.plugins or []), **metrics}
        # how the student started: "teacher" (whole tensors), "teacher-slices" (weight selection) or "random"
        student = extract_model_from_parallel(task.student)
        summary["student_init"] = getattr(student, "initialized_from", None) or "random"
        if getattr(task.synthesizer, "source_info", None):  # a transfer set drawn from a diffusion model
            summary["transfer_set"] = task.synthesizer.source_info
        if recipe.eval_data and hasattr(task, "eval_labels"):  # what the held-out accuracy is measured on
            summary["eval_data"] = {
                "data": recipe.eval_data,
                "split": recipe.eval_split,
                "images": len(task.eval_labels),
            }
        return summary

    def build() -> DFKDTask:
        built = task_from_recipe(recipe) if task is None else task
        check_student_start(recipe, built)
        return built

    return run_recipe(recipe, COMMAND, build, export)


def check_student_start(recipe: DFKDRecipe, task: DFKDTask) -> None:
    """Warn when the run ends before the student's first step (the exported student would be untrained); a run that
    is resumed later with more ``--max-steps`` (its first part) is legitimate, so this is not an error."""
    start = getattr(task.synthesizer.config, "student_start", 0) or 0
    if start and recipe.max_steps <= start:
        logger.warning(
            "--max-steps %d ends before the student's first step: method %r runs its generator alone for the first "
            "%d iterations (student_start), so the exported student is untrained unless the run is resumed with "
            "more --max-steps; --method-options student_start=N moves the first step",
            recipe.max_steps,
            recipe.method,
            start,
        )


def distill(
    teacher: Classifier,
    student: Classifier,
    *,
    method: str = DFKDRecipe.method,
    output: str = "dfkd-student",
    eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    options: dict | None = None,
    objectives: list | None = None,
    **recipe_fields,
) -> dict:
    """Distill ``teacher`` into ``student`` with ``method`` (Python API); trains ``student`` in place, exports it to
    ``output`` and returns the summary. ``recipe_fields`` are any ``DFKDRecipe`` fields (max_steps, batch_size, lr,
    ...); ``objectives`` add terms to the losses (see ``DFKDTask``). The student keeps the weights it comes with
    unless ``student_init`` is given (``"teacher"`` or ``"auto"``: ``init_from_teacher``)."""
    recipe = DFKDRecipe(output=output, method=method, **recipe_fields)
    if "student_init" in recipe_fields:  # only when asked: the student given may already be trained
        init_from_teacher(student, teacher, recipe.resolved_student_init())
    if recipe.pool is not None:  # pool= is the method's data option, as on the command line
        if (options or {}).get("data", recipe.pool) != recipe.pool:
            raise UsageError(f"pool={recipe.pool!r} and options data={options['data']!r} disagree")
        options = {**(options or {}), "data": recipe.pool}
    task = build_task(
        teacher,
        student,
        method,
        options=options,
        eval_data=eval_data,
        objectives=[*(objectives or []), *recipe.build_plugins()],
        kernel_backend=backend_for(recipe.fused_kernels),
    )
    recipe.take_method_defaults(task.synthesizer.config)  # the method's defaults for this teacher
    return run(recipe, task)  # which validates the recipe


def main(argv: list[str] | None = None) -> int:
    recipe = parse_recipe(
        DFKDRecipe,
        argv,
        prog="gendistill dfkd",
        method=None,
        description=f"Data-free distillation of a classifier; methods: {', '.join(sorted(METHODS))}.",
    )
    summary = run(recipe)
    if summary and "student_accuracy" in summary:
        print(
            f"student accuracy {summary['student_accuracy']:.4f} (teacher {summary['teacher_accuracy']:.4f}, "
            f"agreement {summary['teacher_agreement']:.4f})"
        )
    if summary and "teacher_queries" in summary:  # a black-box method (DFME)
        print(f"teacher queries {int(summary['teacher_queries']):,} (images the teacher answered)")
    return 0
