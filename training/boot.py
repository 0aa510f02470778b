"""``gendistill boot``: distill a pixel-space diffusers teacher into a one-step BOOT student pipeline folder."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from diffusers import DDIMScheduler

from gendistill.diffusion.boot import BootConfig, BootTask
from gendistill.diffusion.teacher import DiffusionTeacher
from gendistill.pipelines import BootImagePipeline

from .core import Trainer, check_output_folder, export_pipeline, logged_values
from .recipes import TrainRecipe, parse_recipe

logger = logging.getLogger(__name__)

DEFAULT_CLASS_GUIDANCE = 2.0  # spec/BOOT.md: default w for class-conditional teachers


@dataclass
class BootRecipe(TrainRecipe):
    output: str = "boot-student"  # run folder; also the exported diffusers pipeline folder
    teacher: str | None = None  # diffusers pipeline folder / hub id with unet + scheduler (required)
    prediction_type: str | None = None  # override the teacher scheduler's prediction type
    null_class_id: int | None = None  # the teacher's null class (default: its last class embedding)
    num_intervals: int = 50  # K: DDIM intervals of the teacher trajectory
    guidance_scale: float | None = None  # teacher CFG scale baked in (default 2.0 class-conditional, else 1)
    class_ids: list[int] | None = None  # classes to distill (default: all but the null class)
    parameterization: str = "teacher"  # "teacher" (output read as the teacher's prediction at x_T) or "raw"
    boundary_fraction: float = 0.25  # share of each batch on the boundary interval k = 1
    boundary_weight: float = 1.0  # weight of the boundary loss
    num_eval_noises: int = 16  # fixed noises for the trajectory error and sample grids
    save_teacher: bool = False  # also store the teacher UNet in the folder (enables refine_steps)

    def validate(self) -> None:
        super().validate()
        if not self.teacher:
            raise ValueError("a teacher is required: --teacher PATH_OR_HUB_ID")
        if self.num_intervals < 1:
            raise ValueError(f"num_intervals (K) must be positive, got {self.num_intervals}")
        if self.num_eval_noises < 1:
            raise ValueError(f"num_eval_noises must be positive, got {self.num_eval_noises}")


def build_task(recipe: BootRecipe) -> BootTask:
    teacher = DiffusionTeacher.from_pretrained(
        recipe.teacher, prediction_type=recipe.prediction_type, null_class_id=recipe.null_class_id
    )
    guidance = recipe.guidance_scale
    if guidance is None:
        guidance = DEFAULT_CLASS_GUIDANCE if teacher.is_class_conditional else 1.0
    if recipe.class_ids is not None and not teacher.is_class_conditional:
        raise ValueError(f"class ids {list(recipe.class_ids)} were given but the teacher is unconditional")
    config = BootConfig(
        num_intervals=recipe.num_intervals,
        guidance_scale=guidance,
        parameterization=recipe.parameterization,
        boundary_fraction=recipe.boundary_fraction,
        boundary_weight=recipe.boundary_weight,
        class_ids=tuple(recipe.class_ids) if recipe.class_ids is not None else None,
        num_eval_noises=recipe.num_eval_noises,
    )
    return BootTask(teacher, config)


def build_pipeline(task: BootTask, student, *, save_teacher: bool) -> BootImagePipeline:
    teacher = task.teacher
    scheduler = DDIMScheduler.from_config(teacher.scheduler.config, prediction_type=teacher.prediction_type)
    return BootImagePipeline(
        unet=student,
        scheduler=scheduler,
        teacher_unet=teacher.unet if save_teacher else None,
        boot_timesteps=list(task.grid),
        parameterization=task.config.parameterization,
        null_class_id=teacher.null_class_id,
        guidance_scale=task.config.guidance_scale,
    )


def run(recipe: BootRecipe, task: BootTask | None = None) -> dict:
    """Train and export; returns the run's summary (also written to ``results.json``).

    ``task`` lets a caller that already built it with ``build_task(recipe)`` keep using it afterwards.
    """
    check_output_folder(recipe, "boot")  # fail before loading the teacher
    task = build_task(recipe) if task is None else task
    trainer = Trainer(task, recipe, command="boot")
    history_start = trainer.counters.step
    final = trainer.fit()
    summary = {}
    if trainer.accelerator.is_main_process:
        student = trainer.export_module("student")
        export_pipeline(build_pipeline(task, student, save_teacher=recipe.save_teacher), Path(recipe.output))
        summary = {"steps": trainer.counters.step, "resumed_at": history_start, **final}
        errors = logged_values(recipe.output, "trajectory_error")
        if errors:
            summary["initial_trajectory_error"] = errors[0]
        (Path(recipe.output) / "results.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    trainer.accelerator.wait_for_everyone()
    trainer.end()
    return summary


def main(argv: list[str] | None = None) -> int:
    recipe = parse_recipe(
        BootRecipe,
        argv,
        prog="gendistill boot",
        method="boot",
        description="Distill a diffusers UNet teacher into a one-step BOOT student (spec/BOOT.md).",
    )
    run(recipe)
    return 0
