"""``gendistill sid``: distill a diffusers teacher into a one-step generator with SiD or DMD (a fake score network
trained beside it; docs/sid.md), starting from a copy of the teacher or from a BOOT student folder.

Pixel-space teachers export a ``BootImagePipeline`` folder, Stable Diffusion teachers (distilled on a prompts file
with no images) a ``BootPipeline`` folder, each with ``student_timestep`` set: ``gendistill sample``, ``gendistill
eval`` and stock diffusers (``trust_remote_code=True``) read them like a BOOT student's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from gendistill.data.prompts import load_prompts
from gendistill.diffusion.sid import OBJECTIVES, GeneratorInit, SiDConfig, SiDTask, teacher_init
from gendistill.diffusion.teacher import DiffusionTeacher, load_teacher
from gendistill.errors import UsageError
from gendistill.pipelines import BootImagePipeline, BootPipeline, load_boot_pipeline

from .boot import (
    DEFAULT_CLASS_GUIDANCE,
    DEFAULT_TEXT_GUIDANCE,
    attach_prompt_embeddings,
    merged_student,
    save_lora_adapter,
)
from .core import export_pipeline, resolve_mixed_precision, run_recipe
from .recipes import TrainRecipe, parse_recipe

BOOT_INIT = "boot:"


@dataclass
class SiDRecipe(TrainRecipe):
    output: str = "sid-student"  # run folder; also the exported pipeline folder
    teacher: str | None = None  # diffusers pipeline folder / hub id (pixel UNet or Stable Diffusion) (required)
    prompts: str | None = None  # text file of prompts, one per line (required for text-to-image teachers)
    objective: str = "sid"  # sid (score identity distillation) | dmd (distribution-matching gradient)
    init: str = "teacher"  # the generator's start: "teacher" (a copy) or "boot:FOLDER" (a gendistill boot student)
    init_timestep: int | None = None  # teacher init: the noise level the generator reads (default: sigma/alpha 2.5)
    alpha: float = 1.2  # SiD's alpha
    timestep_range: list[float] | None = None  # low,high fractions of the teacher's timesteps (default 0.02,0.98)
    fake_steps: int = 1  # fake-score steps per generator step
    fake_lr: float | None = None  # the fake score's learning rate (default: --lr)
    prediction_type: str | None = None  # override the teacher scheduler's prediction type
    null_class_id: int | None = None  # the teacher's null class (default: its last class embedding)
    guidance_scale: float | None = None  # teacher CFG (default: a BOOT init's, else 7.5 text, 2.0 class-cond., 1)
    class_ids: list[int] | None = None  # classes to distill (default: all but the null class)
    num_eval_noises: int = 16  # fixed noises for the sample grids and the evaluation
    save_teacher: bool = False  # also store the teacher UNet in the folder (enables refine_steps)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower steps
    lora_rank: int = 0  # > 0: a LoRA generator of this rank on its frozen start (needs peft)
    lora_alpha: float | None = None  # LoRA scale numerator (default: the rank)
    cache_text_embeddings: bool = False  # encode every prompt once up front (saved in the run folder)
    lr: float = 1e-4  # Adam learning rate of the generator (small pixel UNets; SiD used 1e-5 for EDM-sized ones)
    adam_beta1: float = 0.0  # SiD's Adam betas (0, 0.999) for both networks
    ema_decay: float = 0.99  # EMA of the generator (and fake score) weights; the EMA generator is exported
    sample_every: int = 100

    INPUT_PATHS = ("teacher", "prompts")

    @property
    def init_folder(self) -> str | None:
        """The BOOT student folder of ``--init boot:FOLDER``, else None."""
        return self.init[len(BOOT_INIT) :] if self.init.startswith(BOOT_INIT) else None

    def input_paths(self) -> dict[str, str | None]:
        return {**super().input_paths(), "--init": self.init_folder}

    def validate(self) -> None:
        super().validate()
        if self.init != "teacher" and not (self.init.startswith(BOOT_INIT) and self.init_folder):
            raise UsageError(
                f"--init {self.init!r} is not valid; valid: teacher, boot:FOLDER (a gendistill boot output)"
            )
        if self.init_folder and self.init_timestep is not None:
            raise UsageError("--init-timestep applies to --init teacher (a BOOT student brings its own timesteps)")
        self.sid_config(1.0).validate()

    def sid_config(self, guidance_scale: float) -> SiDConfig:
        if self.objective not in OBJECTIVES:
            raise UsageError(f"--objective {self.objective!r} is not valid; valid: {', '.join(OBJECTIVES)}")
        if self.timestep_range is not None and len(self.timestep_range) != 2:
            raise UsageError(f"--timestep-range takes two numbers low,high; got {self.timestep_range}")
        return SiDConfig(
            objective=self.objective,
            alpha=self.alpha,
            timestep_range=tuple(self.timestep_range) if self.timestep_range is not None else (0.02, 0.98),
            guidance_scale=guidance_scale,
            fake_steps=self.fake_steps,
            fake_lr=self.fake_lr,
            init_timestep=self.init_timestep,
            class_ids=tuple(self.class_ids) if self.class_ids is not None else None,
            num_eval_noises=self.num_eval_noises,
            gradient_checkpointing=self.gradient_checkpointing,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
        )


def boot_init(folder: str, teacher: DiffusionTeacher) -> tuple[GeneratorInit, float]:
    """The generator start from a ``gendistill boot`` folder of this teacher, and its guidance scale."""
    pipe = load_boot_pipeline(folder)
    expected = BootPipeline if teacher.is_text_conditional else BootImagePipeline
    if not isinstance(pipe, expected):
        raise UsageError(
            f"--init boot:{folder} is a {type(pipe).__name__} folder; this teacher's BOOT students are "
            f"{expected.__name__} folders"
        )
    if pipe.config.get("guidance_range") is not None:
        raise UsageError(
            f"--init boot:{folder} is a guidance-range student (it takes the scale as an input); start SiD from a "
            "fixed-guidance BOOT student or from the teacher"
        )
    unet = pipe.unet
    keys = (
        "in_channels",
        "out_channels",
        "sample_size",
        "cross_attention_dim" if teacher.is_text_conditional else "num_class_embeds",
    )
    for key in keys:
        if unet.config[key] != teacher.unet.config[key]:
            raise UsageError(
                f"--init boot:{folder}: the student's {key}={unet.config[key]} differs from the teacher's "
                f"{teacher.unet.config[key]}; give the BOOT student of this teacher"
            )
    if pipe.scheduler.config.prediction_type != teacher.prediction_type:
        raise UsageError(
            f"--init boot:{folder} was distilled from a {pipe.scheduler.config.prediction_type} teacher; this "
            f"teacher predicts {teacher.prediction_type}"
        )
    grid = list(pipe.config.boot_timesteps)
    input_timestep = pipe.config.get("student_timestep")
    init = GeneratorInit(
        unet,
        read_timestep=grid[0],
        input_timestep=grid[-1] if input_timestep is None else int(input_timestep),
        parameterization=pipe.config.parameterization,
        grid=grid,
    )
    return init, float(pipe.config.guidance_scale)


def build_task(recipe: SiDRecipe) -> SiDTask:
    if not recipe.teacher:
        raise UsageError("a teacher is required: --teacher PATH_OR_HUB_ID")
    prompts = load_prompts(recipe.prompts) if recipe.prompts else None  # fail on a bad file before loading
    teacher = load_teacher(recipe.teacher, prediction_type=recipe.prediction_type, null_class_id=recipe.null_class_id)
    if teacher.is_text_conditional:
        if prompts is None:
            raise UsageError(f"teacher {recipe.teacher!r} is text-to-image: give --prompts FILE (one prompt per line)")
    else:
        if prompts is not None:
            raise UsageError(f"--prompts was given but teacher {recipe.teacher!r} is not text-to-image")
        if recipe.class_ids is not None and not teacher.is_class_conditional:
            raise UsageError(f"class ids {list(recipe.class_ids)} were given but the teacher is unconditional")
    if recipe.cache_text_embeddings and not teacher.is_text_conditional:
        raise UsageError("--cache-text-embeddings applies to text-to-image teachers only")
    guidance = recipe.guidance_scale
    init = None
    if recipe.init_folder:
        init, boot_guidance = boot_init(recipe.init_folder, teacher)
        guidance = boot_guidance if guidance is None else guidance
    if guidance is None:
        if teacher.is_text_conditional:
            guidance = DEFAULT_TEXT_GUIDANCE
        else:
            guidance = DEFAULT_CLASS_GUIDANCE if teacher.is_class_conditional else 1.0
    config = recipe.sid_config(guidance)
    return SiDTask(teacher, config, init=init or teacher_init(teacher, config.init_timestep), prompts=prompts)


def build_pipeline(task: SiDTask, student, *, save_teacher: bool) -> BootImagePipeline | BootPipeline:
    """The generator as a BOOT pipeline folder: the UNet (LoRA fused in) always told ``input_timestep``, its output
    read at the grid's ``t_0`` (a BOOT init's grid, else ``[read_timestep, 0]``)."""
    teacher = task.teacher
    scheduler = DDIMScheduler.from_config(teacher.scheduler.config, prediction_type=teacher.prediction_type)
    common = {
        "unet": merged_student(task, student),
        "scheduler": scheduler,
        "teacher_unet": teacher.unet if save_teacher else None,
        "boot_timesteps": task.boot_grid or [task.read_timestep, 0],
        "parameterization": task.parameterization,
        "guidance_scale": task.config.guidance_scale,
        "student_timestep": task.input_timestep,
    }
    if teacher.is_text_conditional:
        return BootPipeline(vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer, **common)
    return BootImagePipeline(null_class_id=teacher.null_class_id, **common)


def run(recipe: SiDRecipe, task: SiDTask | None = None) -> dict:
    """Train and export; returns the run's summary (also written to ``results.json``)."""

    def build() -> SiDTask:
        built = build_task(recipe) if task is None else task
        if resolve_mixed_precision(recipe) == "bf16" and torch.cuda.is_available():
            built.teacher.to(torch.bfloat16)
        return built

    def prepare(trainer, task) -> None:
        if recipe.cache_text_embeddings and task.prompt_embeddings is None:
            attach_prompt_embeddings(trainer, task)

    def export(trainer, task, metrics) -> dict:
        student = trainer.export_module("student")
        if task.config.lora_rank > 0:
            save_lora_adapter(student, Path(recipe.output))
        export_pipeline(build_pipeline(task, student, save_teacher=recipe.save_teacher), Path(recipe.output))
        info = {"objective": task.config.objective, "init": recipe.init, "input_timestep": task.input_timestep}
        (Path(recipe.output) / "sid.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        return {**metrics, **info}

    return run_recipe(recipe, "sid", build, export, prepare=prepare)


def main(argv: list[str] | None = None) -> int:
    recipe = parse_recipe(
        SiDRecipe,
        argv,
        prog="gendistill sid",
        method="sid",
        description="Distill a diffusers teacher (pixel UNet or Stable Diffusion) into a one-step generator with SiD "
        "or DMD (a fake score network trained beside it), from a copy of the teacher or a BOOT student (docs/sid.md).",
    )
    run(recipe)
    return 0
