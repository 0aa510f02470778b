"""``gendistill boot``: distill a diffusers teacher into a one-step BOOT student pipeline folder.

Pixel-space teachers (``UNet2DModel``: unconditional or class-conditional) export a ``BootImagePipeline``; Stable
Diffusion teachers (``UNet2DConditionModel`` + VAE + CLIP text encoder) are distilled on a prompts file with no images
and export a text-to-image ``BootPipeline``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from gendistill.data.prompts import PromptEmbeddings, load_prompts, prompts_fingerprint
from gendistill.diffusion.boot import BootConfig, BootTask
from gendistill.diffusion.teacher import load_teacher
from gendistill.errors import UsageError
from gendistill.kernels import backend_for
from gendistill.pipelines import BootImagePipeline, BootPipeline

from .core import Trainer, export_pipeline, logged_values, resolve_mixed_precision, run_recipe
from .recipes import TrainRecipe, parse_recipe

logger = logging.getLogger(__name__)

DEFAULT_CLASS_GUIDANCE = 2.0  # docs/boot.md: default w for class-conditional teachers
DEFAULT_TEXT_GUIDANCE = 7.5  # and for Stable Diffusion
ATTENTION = ("sdpa", "xformers")
EMBEDDINGS_FILE = "text_embeddings.safetensors"
LORA_FOLDER = "lora"  # the LoRA adapter alone (diffusers format), beside the merged student


@dataclass
class BootRecipe(TrainRecipe):
    output: str = "boot-student"  # run folder; also the exported diffusers pipeline folder
    teacher: str | None = None  # diffusers pipeline folder / hub id (pixel UNet or Stable Diffusion) (required)
    prompts: str | None = None  # text file of prompts, one per line (required for text-to-image teachers)
    prediction_type: str | None = None  # override the teacher scheduler's prediction type
    null_class_id: int | None = None  # the teacher's null class (default: its last class embedding)
    num_intervals: int = 50  # K: DDIM intervals of the teacher trajectory
    guidance_scale: float | None = None  # teacher CFG scale baked in (default 7.5 text, 2.0 class-conditional, else 1)
    guidance_range: list[float] | None = None  # w_min,w_max: one student serves every scale in it (text teachers)
    guidance_embedding_dim: int = 256  # size of the student's guidance embedding (with a guidance range)
    class_ids: list[int] | None = None  # classes to distill (default: all but the null class)
    parameterization: str = "auto"  # "teacher" (output read as the teacher's prediction at x_T), "raw" or "auto"
    # ("raw" for an epsilon teacher, "teacher" otherwise)
    boundary_fraction: float = 0.25  # share of each batch on the boundary interval k = 1
    boundary_weight: float = 1.0  # weight of the boundary loss
    num_eval_noises: int = 16  # fixed noises for the trajectory error and sample grids
    save_teacher: bool = False  # also store the teacher UNet in the folder (enables refine_steps)
    gradient_checkpointing: bool = False  # recompute student activations in backward: less memory, slower steps
    lora_rank: int = 0  # > 0: a LoRA student of this rank on a frozen teacher copy (needs peft)
    lora_alpha: float | None = None  # LoRA scale numerator (default: the rank)
    cache_text_embeddings: bool = False  # encode every prompt once up front (saved in the run folder)
    attention: str = "sdpa"  # sdpa (PyTorch scaled-dot-product attention) | xformers (CUDA, when it works)

    INPUT_PATHS = ("teacher", "prompts")

    def validate(self) -> None:
        super().validate()
        if self.num_intervals < 1:
            raise UsageError(f"num_intervals (K) must be positive, got {self.num_intervals}")
        if self.num_eval_noises < 1:
            raise UsageError(f"num_eval_noises must be positive, got {self.num_eval_noises}")
        if self.attention not in ATTENTION:
            raise UsageError(f"attention {self.attention!r} is not valid; valid: {', '.join(ATTENTION)}")
        # Range, LoRA and parameterization checks before anything is loaded.
        default = self.guidance_range[0] if self.guidance_range else 1.0
        self.boot_config(self.guidance_scale if self.guidance_scale is not None else default).validate()

    def boot_config(self, guidance_scale: float) -> BootConfig:
        return BootConfig(
            num_intervals=self.num_intervals,
            guidance_scale=guidance_scale,
            guidance_range=tuple(self.guidance_range) if self.guidance_range is not None else None,
            guidance_embedding_dim=self.guidance_embedding_dim,
            parameterization=self.parameterization,
            boundary_fraction=self.boundary_fraction,
            boundary_weight=self.boundary_weight,
            class_ids=tuple(self.class_ids) if self.class_ids is not None else None,
            num_eval_noises=self.num_eval_noises,
            gradient_checkpointing=self.gradient_checkpointing,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
        )


def check_xformers() -> None:
    """Raise a clear ``ValueError`` unless xformers is installed and its CUDA kernels run here (xformers 0.0.35 cannot
    load them with torch 2.11: better to say so now than to crash mid-run)."""
    if importlib.util.find_spec("xformers") is None:
        raise UsageError("attention 'xformers' was asked for but xformers is not installed; use --attention sdpa")
    if not torch.cuda.is_available():
        raise UsageError("attention 'xformers' needs a CUDA device; use --attention sdpa (the default)")
    try:
        import xformers.ops

        q = torch.randn(1, 16, 1, 64, device="cuda", dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
        torch.cuda.synchronize()
    except Exception as err:  # noqa: BLE001 - any failure of the probe means: do not use xformers here
        raise UsageError(
            f"xformers is installed but its CUDA kernels do not run with torch {torch.__version__} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); use --attention sdpa"
        ) from None


def build_task(recipe: BootRecipe) -> BootTask:
    if not recipe.teacher:
        raise UsageError("a teacher is required: --teacher PATH_OR_HUB_ID")
    if recipe.attention == "xformers":
        check_xformers()
    prompts = load_prompts(recipe.prompts) if recipe.prompts else None  # fail on a bad file before loading
    teacher = load_teacher(recipe.teacher, prediction_type=recipe.prediction_type, null_class_id=recipe.null_class_id)
    guidance = recipe.guidance_scale
    if teacher.is_text_conditional:
        if prompts is None:
            raise UsageError(f"teacher {recipe.teacher!r} is text-to-image: give --prompts FILE (one prompt per line)")
        truncated = teacher.count_truncated(prompts)
        if truncated:
            logger.warning(
                "%d of %d prompts are longer than the tokenizer's %d tokens and are truncated",
                truncated,
                len(prompts),
                teacher.max_prompt_length,
            )
        if guidance is None:
            guidance = DEFAULT_TEXT_GUIDANCE
            if recipe.guidance_range is not None:  # the default scale, clipped into the trained range
                guidance = min(max(guidance, recipe.guidance_range[0]), recipe.guidance_range[1])
    else:
        if prompts is not None:
            raise UsageError(f"--prompts was given but teacher {recipe.teacher!r} is not text-to-image")
        if recipe.class_ids is not None and not teacher.is_class_conditional:
            raise UsageError(f"class ids {list(recipe.class_ids)} were given but the teacher is unconditional")
        if guidance is None:
            guidance = DEFAULT_CLASS_GUIDANCE if teacher.is_class_conditional else 1.0
    task = BootTask(
        teacher, recipe.boot_config(guidance), prompts=prompts, kernel_backend=backend_for(recipe.fused_kernels)
    )
    if recipe.attention == "xformers":
        task.student.enable_xformers_memory_efficient_attention()
        teacher.unet.enable_xformers_memory_efficient_attention()
    return task


def attach_prompt_embeddings(trainer: Trainer, task: BootTask) -> None:
    """Encode every prompt once (main process, progress bar), keep the result in the run folder and use it instead of
    the text encoder; a resumed run reuses the file when the prompts and encoder are unchanged."""
    teacher, accelerator = task.teacher, trainer.accelerator
    path = Path(trainer.output) / EMBEDDINGS_FILE
    encoder = teacher.text_encoder
    fingerprint = prompts_fingerprint(
        task.prompts, json.dumps(encoder.config.to_dict(), sort_keys=True, default=str), str(encoder.dtype)
    )
    if accelerator.is_main_process and (
        not path.is_file() or PromptEmbeddings.from_file(path, fingerprint=fingerprint, in_memory=False) is None
    ):
        embeddings = PromptEmbeddings.encode(teacher.encode_prompts, task.prompts, progress=True)
        embeddings.save(path, fingerprint=fingerprint)
    accelerator.wait_for_everyone()
    task.use_prompt_embeddings(PromptEmbeddings.from_file(path, fingerprint=fingerprint))
    encoder.to("cpu")  # off the accelerator: the null prompt's embedding is already a buffer of the teacher


def merged_student(task: BootTask, student: torch.nn.Module) -> torch.nn.Module:
    """The student as a plain UNet: LoRA adapters fused into a copy of the weights (no peft needed to sample)."""
    if task.config.lora_rank == 0:
        return student
    merged = copy.deepcopy(student)
    merged.fuse_lora()
    merged.unload_lora()
    return merged


def build_pipeline(task: BootTask, student, *, save_teacher: bool) -> BootImagePipeline | BootPipeline:
    teacher = task.teacher
    scheduler = DDIMScheduler.from_config(teacher.scheduler.config, prediction_type=teacher.prediction_type)
    student = merged_student(task, student)
    if teacher.is_text_conditional:
        return BootPipeline(
            vae=teacher.vae,
            text_encoder=teacher.text_encoder,
            tokenizer=teacher.tokenizer,
            unet=student,
            scheduler=scheduler,
            teacher_unet=teacher.unet if save_teacher else None,
            boot_timesteps=list(task.grid),
            parameterization=task.config.parameterization,
            guidance_scale=task.config.guidance_scale,
            guidance_range=list(task.config.guidance_range) if task.config.guidance_range is not None else None,
        )
    return BootImagePipeline(
        unet=student,
        scheduler=scheduler,
        teacher_unet=teacher.unet if save_teacher else None,
        boot_timesteps=list(task.grid),
        parameterization=task.config.parameterization,
        null_class_id=teacher.null_class_id,
        guidance_scale=task.config.guidance_scale,
    )


def save_lora_adapter(student: torch.nn.Module, output: Path) -> None:
    """The LoRA adapter alone (``lora/pytorch_lora_weights.safetensors``), written to a temporary folder first."""
    tmp, final = output / (LORA_FOLDER + ".tmp"), output / LORA_FOLDER
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_lora_adapter(tmp, weight_name="pytorch_lora_weights.safetensors")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def run(recipe: BootRecipe, task: BootTask | None = None) -> dict:
    """Train and export; returns the run's summary (also written to ``results.json``).

    ``task`` lets a caller that already built it with ``build_task(recipe)`` keep using it afterwards.
    """

    def build() -> BootTask:
        built = build_task(recipe) if task is None else task
        if recipe.cache_text_embeddings and not built.teacher.is_text_conditional:
            raise UsageError("--cache-text-embeddings applies to text-to-image teachers only")
        if resolve_mixed_precision(recipe) == "bf16" and torch.cuda.is_available():
            built.teacher.to(torch.bfloat16)  # the frozen teacher in bf16; the student keeps float32 master weights
        return built

    def prepare(trainer, task) -> None:
        if recipe.cache_text_embeddings and task.prompt_embeddings is None:
            attach_prompt_embeddings(trainer, task)

    def export(trainer, task, metrics) -> dict:
        student = trainer.export_module("student")
        if task.config.lora_rank > 0:
            save_lora_adapter(student, Path(recipe.output))
        export_pipeline(build_pipeline(task, student, save_teacher=recipe.save_teacher), Path(recipe.output))
        summary = dict(metrics)
        errors = logged_values(recipe.output, "trajectory_error")
        if errors:
            summary["initial_trajectory_error"] = errors[0]
        return summary

    return run_recipe(recipe, "boot", build, export, prepare=prepare)


def main(argv: list[str] | None = None) -> int:
    recipe = parse_recipe(
        BootRecipe,
        argv,
        prog="gendistill boot",
        method="boot",
        description="Distill a diffusers teacher (pixel UNet or Stable Diffusion) into a one-step BOOT student "
        "pipeline folder (docs/boot.md).",
    )
    run(recipe)
    return 0
