# Copyright 2025 The gendistill authors. Licensed under the Apache License, Version 2.0.
"""Samplers for BOOT students of diffusers teachers: ``BootImagePipeline`` for pixel-space ``UNet2DModel`` teachers
(unconditional or class-conditional) and ``BootPipeline`` for text-to-image latent teachers (Stable Diffusion).

BOOT: J. Gu et al., "BOOT: Data-free Distillation of Denoising Diffusion Models with Bootstrapping",
arXiv 2306.05544 (2023); the signal-space DDIM step used for refinement is derived in gendistill's docs/boot.md.

This file depends only on torch, numpy, PIL, diffusers and the BOOT math beside it (``boot_math.py``; transformers
is imported only when a saved folder names it): ``save_pretrained`` copies both next to the weights, so a saved
folder also loads in stock diffusers with
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``. The pipelines' own ``from_pretrained`` (below)
loads the same folder without importing the folder's copy of this file.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    ImagePipelineOutput,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from .boot_math import (
    PREDICTION_TYPES,
    decode_latents,
    encode_prompts,
    guidance_embedding,
    guided_output,
    signal_step,
    start_signal,
    step_fraction,
    to_x0,
)

PIPELINE_MODULE = "pipeline_boot"
MATH_MODULE = "boot_math"  # imported by this file; saved beside it
PARAMETERIZATIONS = ("teacher", "raw")
OUTPUT_TYPES = ("pil", "np", "pt")
LATENT_OUTPUT_TYPES = ("pil", "np", "pt", "latent")

# Libraries whose classes the pipelines' `from_pretrained` may instantiate, with the base classes (by name, resolved
# lazily: transformers is imported only when a component names it) a component class must derive from.
LOADABLE_LIBRARIES: dict[str, tuple[str, ...]] = {
    "diffusers": ("ModelMixin", "SchedulerMixin"),
    "transformers": ("PreTrainedModel", "PreTrainedTokenizerBase"),
}
# How `torch_dtype` reaches each library's model classes: (base class name, keyword of its `from_pretrained`).
DTYPE_KEYWORDS: dict[str, tuple[str, str]] = {
    "diffusers": ("ModelMixin", "torch_dtype"),
    "transformers": ("PreTrainedModel", "dtype"),
}

IMAGE_EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from gendistill.pipelines import BootImagePipeline

        >>> pipe = BootImagePipeline.from_pretrained("path/to/boot-student")  # never runs the folder's .py
        >>> image = pipe(class_labels=207, generator=torch.Generator().manual_seed(0)).images[0]  # one step
        >>> image = pipe(class_labels=207, refine_steps=2).images[0]  # + 2 teacher DDIM steps (saved with the teacher)
        ```
"""

TEXT_EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from gendistill.pipelines import BootPipeline

        >>> pipe = BootPipeline.from_pretrained("path/to/boot-sd-student", torch_dtype=torch.bfloat16).to("cuda")
        >>> generator = torch.Generator("cuda").manual_seed(0)
        >>> image = pipe("a photo of a red cat", generator=generator).images[0]  # one UNet evaluation
        >>> image = pipe("a photo of a red cat", guidance_scale=4.0).images[0]  # guidance-range students only
        >>> image = pipe("a photo of a red cat", refine_steps=2).images[0]  # + 2 teacher DDIM steps (saved teacher)
        ```
"""


_Pipeline = TypeVar("_Pipeline", bound="_BootPipelineBase")


class _BootPipelineBase(DiffusionPipeline):
    """What both BOOT pipelines share: the grid checks, the teacher's schedule, the signal-space teacher refinement,
    and saving/loading a folder without running its code. Subclasses register ``unet``, ``scheduler``,
    ``teacher_unet`` and the config values ``boot_timesteps`` and ``parameterization``."""

    @staticmethod
    def _check_grid(scheduler, boot_timesteps, parameterization) -> list[int]:
        """Validate the parameterization, the scheduler's prediction type and the BOOT grid; return it as ints."""
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}; valid: {', '.join(PARAMETERIZATIONS)}")
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unsupported scheduler prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}"
            )
        if boot_timesteps is None:
            raise ValueError(
                "boot_timesteps is required: the BOOT grid t_0 > t_1 > ... > t_K the student was trained on"
            )
        grid = [int(t) for t in boot_timesteps]
        num_train_timesteps = len(scheduler.alphas_cumprod)
        if (
            len(grid) < 2
            or any(a <= b for a, b in zip(grid, grid[1:]))
            or grid[-1] < 0
            or grid[0] >= num_train_timesteps
        ):
            raise ValueError(
                f"boot_timesteps {grid} must be at least 2 distinct descending ints in 0..{num_train_timesteps - 1}"
            )
        if (
            parameterization == "teacher"
            and prediction_type == "epsilon"
            and float(scheduler.alphas_cumprod[grid[0]]) == 0
        ):
            raise ValueError(
                f"parameterization 'teacher' with an epsilon teacher divides by alpha at t_0={grid[0]}, which is 0 "
                "(zero terminal SNR); use parameterization 'raw'"
            )
        return grid

    @staticmethod
    def _check_student_timestep(scheduler, student_timestep) -> int | None:
        """``student_timestep`` as an int in the scheduler's range, or None."""
        if student_timestep is None:
            return None
        num_train_timesteps = len(scheduler.alphas_cumprod)
        if (
            isinstance(student_timestep, bool)
            or int(student_timestep) != student_timestep
            or not 0 <= int(student_timestep) < num_train_timesteps
        ):
            raise ValueError(
                f"student_timestep={student_timestep!r} is not valid; valid: an int in 0..{num_train_timesteps - 1} "
                "or None"
            )
        return int(student_timestep)

    @staticmethod
    def _check_teacher(unet, teacher_unet, keys: tuple[str, ...]) -> None:
        """The teacher must read and write what the student does."""
        if teacher_unet is None:
            return
        for key in keys:
            if teacher_unet.config[key] != unet.config[key]:
                raise ValueError(
                    f"teacher_unet {key}={teacher_unet.config[key]} differs from the student's {unet.config[key]}"
                )

    # --- speed ---------------------------------------------------------------------------------------------------
    COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

    def enable_compile(self, mode: str | None = "reduce-overhead", **compile_kwargs) -> None:
        """Compile the student UNet (and a latent pipeline's VAE decoder) with ``torch.compile`` for fast sampling.

        The default ``mode="reduce-overhead"`` captures CUDA graphs on CUDA, which removes most of the kernel-launch
        overhead that dominates one-step sampling at batch 1. The first call at each new input shape compiles
        (seconds to minutes); later calls reuse it. Outputs match the uncompiled pipeline within float tolerance.
        ``compile_kwargs`` go to ``torch.compile`` (``fullgraph=True``, ``backend=...``; ``mode=None`` for backends
        other than inductor). Saving the pipeline saves the original weights. The teacher UNet used by
        ``refine_steps`` is left as is.
        """
        if mode not in self.COMPILE_MODES:
            valid = ", ".join(str(m) for m in self.COMPILE_MODES)
            raise ValueError(f"mode {mode!r} is not valid; valid: {valid}")
        self.unet = torch.compile(self.unet, mode=mode, **compile_kwargs)
        vae = getattr(self, "vae", None)
        if vae is not None:
            vae.decode = torch.compile(vae.decode, mode=mode, **compile_kwargs)

    # --- schedule ------------------------------------------------------------------------------------------------
    def _alpha_sigma(self, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` as float32 scalars on ``device``."""
        ac = self.scheduler.alphas_cumprod[t].to(torch.float64).clamp(0.0, 1.0)
        return ac.sqrt().to(device, torch.float32), (1.0 - ac).sqrt().to(device, torch.float32)

    def _step_fraction(self, t: int, s: int, device: torch.device) -> torch.Tensor:
        """``d = 1 - exp(lambda_t - lambda_s)`` for a step from ``t`` to the less noisy ``s``.

        Written as ``1 - alpha_t sigma_s / (sigma_t alpha_s)`` in float64, so zero terminal SNR gives ``d = 1``.
        """
        ac = self.scheduler.alphas_cumprod.to(torch.float64).clamp(0.0, 1.0)
        alpha_t, sigma_t, alpha_s, sigma_s = ac[t].sqrt(), (1 - ac[t]).sqrt(), ac[s].sqrt(), (1 - ac[s]).sqrt()
        return step_fraction(alpha_t, sigma_t, alpha_s, sigma_s).to(device, torch.float32)

    # --- signals -------------------------------------------------------------------------------------------------
    def _signal_from_student_output(self, u: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The signal (B, C, H, W) from the student's raw float32 output ``u`` for the noise ``eps``."""
        if self.config.parameterization == "raw":
            return u
        # Read u as the teacher's native prediction at x_{t_0} = eps.
        alpha, sigma = self._alpha_sigma(self.config.boot_timesteps[0], eps.device)
        return to_x0(u, eps, alpha, sigma, self.scheduler.config.prediction_type)

    def start_signal(self, eps: torch.Tensor) -> torch.Tensor:
        """Exact signal at ``t_0`` (B, C, H, W): ``eps (1 - sigma) / alpha``; zero if ``alpha = 0`` (then d = 1)."""
        alpha, sigma = self._alpha_sigma(self.config.boot_timesteps[0], eps.device)
        if float(alpha) == 0.0:
            return torch.zeros_like(eps)
        return start_signal(eps, alpha, sigma)

    def refine(
        self,
        y: torch.Tensor,
        eps: torch.Tensor,
        *,
        refine_steps: int,
        teacher_x0: Callable[[torch.Tensor, int], torch.Tensor],
    ) -> torch.Tensor:
        """Run the last ``refine_steps`` teacher DDIM steps of the grid in signal space, from the signal ``y`` at
        ``t_{K-k}`` (B, C, H, W): ``x_t = alpha_t y + sigma_t eps``, ``y_s = y_t + d (f(x_t, t) - y_t)``.

        ``teacher_x0(x, t)`` is the teacher's (guided) clean prediction (B, C, H, W) at ``x`` (B, C, H, W), float32.
        """
        grid = self.config.boot_timesteps
        start = len(grid) - 1 - refine_steps
        with self.progress_bar(total=refine_steps) as progress_bar:
            for t, s in zip(grid[start:-1], grid[start + 1 :]):
                alpha, sigma = self._alpha_sigma(t, eps.device)
                x = alpha * y + sigma * eps
                f = teacher_x0(x, t)
                y = signal_step(y, f, self._step_fraction(t, s, eps.device))
                progress_bar.update()
        return y

    # --- inputs --------------------------------------------------------------------------------------------------
    def _check_refine_steps(self, refine_steps) -> None:
        num_intervals = len(self.config.boot_timesteps) - 1
        if not isinstance(refine_steps, int) or not 0 <= refine_steps <= num_intervals:
            raise ValueError(
                f"refine_steps={refine_steps!r} is out of range; valid: 0..{num_intervals} (K of the BOOT grid)"
            )
        if refine_steps > 0 and self.teacher_unet is None:
            raise ValueError(
                f"refine_steps={refine_steps} needs the teacher, but this folder has no teacher UNet; save the "
                "pipeline with its teacher_unet to refine, or use refine_steps=0"
            )

    @staticmethod
    def _check_noise(batch_size: int, generator, latents, expected: tuple[int, ...]) -> None:
        """One generator per image when a list is given; ``latents`` of the ``expected`` shape."""
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators were given for a batch of {batch_size}; give one per image")
        if latents is not None and tuple(latents.shape) != expected:
            raise ValueError(f"latents have shape {tuple(latents.shape)} but {expected} was expected")

    # --- saving and loading --------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save like diffusers, then name this file as the pipeline class and copy it into ``save_directory``.

        Stock diffusers then loads it with ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``.
        """
        if kwargs.get("push_to_hub"):
            raise ValueError("push_to_hub is not supported here; save locally, then upload the whole folder")
        super().save_pretrained(save_directory, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = [PIPELINE_MODULE, type(self).__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        shutil.copyfile(Path(__file__), Path(save_directory) / f"{PIPELINE_MODULE}.py")
        shutil.copyfile(Path(__file__).with_name(f"{MATH_MODULE}.py"), Path(save_directory) / f"{MATH_MODULE}.py")

    @classmethod
    def from_pretrained(
        cls: type[_Pipeline], folder: str | os.PathLike, *, torch_dtype: torch.dtype | None = None
    ) -> _Pipeline:
        """Load a saved folder by building each component from ``model_index.json``; never imports the folder's code.

        (diffusers' own ``from_pretrained`` would execute the folder's ``pipeline_boot.py`` and return its class.)
        Only classes of the libraries in ``LOADABLE_LIBRARIES`` that derive from their listed base classes load.
        ``torch_dtype`` is passed to the model components (diffusers models and transformers models).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"no such pipeline folder: {folder}")
        index_path = folder / "model_index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{folder} has no model_index.json; is it a folder saved by save_pretrained?")
        index = json.loads(index_path.read_text())
        class_name = index.get("_class_name")
        saved_name = class_name[-1] if isinstance(class_name, list) and class_name else class_name
        if saved_name != cls.__name__:
            raise ValueError(f"{index_path} describes pipeline {class_name!r}, not {cls.__name__}")

        # 1. Sort the entries into components and config values, resolving every component class before loading any
        component_names, config_names = cls._get_signature_keys(cls)
        component_classes, kwargs = {}, {}
        for name, value in index.items():
            if name.startswith("_"):
                continue
            if name in component_names:
                if value is None or value == [None, None]:
                    continue  # an optional component saved as absent
                component_classes[name] = (value[0], cls._component_class(name, value))
            elif name in config_names:
                kwargs[name] = value
            else:
                raise ValueError(f"{index_path} has an unexpected entry {name!r}; {cls.__name__} does not take it")
        missing = [n for n in component_names if n not in component_classes and n not in cls._optional_components]
        if missing:
            raise ValueError(f"{index_path} does not provide the required component(s) {missing}")

        # 2. Load each component from its subfolder, in torch_dtype where it is a model
        for name, (library_name, component_cls) in component_classes.items():
            subfolder = folder / name
            if not subfolder.is_dir():
                raise FileNotFoundError(f"component folder {subfolder} is missing")
            load_kwargs = {}
            if torch_dtype is not None and library_name in DTYPE_KEYWORDS:
                base_name, keyword = DTYPE_KEYWORDS[library_name]
                if issubclass(component_cls, getattr(_library(library_name), base_name)):
                    load_kwargs[keyword] = torch_dtype
            kwargs[name] = component_cls.from_pretrained(subfolder, **load_kwargs)
        return cls(**kwargs)

    @staticmethod
    def _component_class(name: str, value) -> type:
        """The class named by a component's ``[library, class_name]`` entry, if ``LOADABLE_LIBRARIES`` allows it."""
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
            raise ValueError(f"model_index.json entry {name!r} must be [library, class_name], got {value!r}")
        library_name, class_name = value
        if library_name not in LOADABLE_LIBRARIES:
            raise ValueError(
                f"component {name!r} comes from library {library_name!r}; loadable: {', '.join(LOADABLE_LIBRARIES)}"
            )
        library = _library(library_name)
        bases = tuple(getattr(library, base) for base in LOADABLE_LIBRARIES[library_name])
        component_cls = getattr(library, class_name, None) if class_name.isidentifier() else None
        if not (isinstance(component_cls, type) and issubclass(component_cls, bases)):
            raise ValueError(
                f"component {name!r} names class {class_name!r}, which is not a {library_name} subclass of "
                f"{' or '.join(LOADABLE_LIBRARIES[library_name])}"
            )
        return component_cls


def _library(library_name: str):
    """The module of a library in ``LOADABLE_LIBRARIES``, imported on first use (transformers only when named)."""
    return diffusers if library_name == "diffusers" else importlib.import_module(library_name)


class BootImagePipeline(_BootPipelineBase):
    r"""
    One-step (optionally teacher-refined) image generation from a BOOT student of a pixel-space teacher.

    The student ``g(eps, t, c)`` reads pure noise ``eps`` and returns the signal
    ``y_t = (x_t - sigma_t eps) / alpha_t`` of the teacher's DDIM trajectory from that noise; its output at the last
    grid time ``t_K`` is the image.

    Args:
        unet ([`UNet2DModel`]): The BOOT student (same class and config as the teacher).
        scheduler ([`DDIMScheduler`]): Built from the teacher's scheduler config; provides ``alphas_cumprod`` and
            ``config.prediction_type``. Its ``clip_sample``/``thresholding`` are not applied: the student was trained
            on the unclipped trajectory.
        teacher_unet ([`UNet2DModel`], *optional*): The teacher, needed only for ``refine_steps > 0``.
        boot_timesteps (`list[int]`): The BOOT grid ``t_0 > t_1 > ... > t_K`` (K + 1 distinct teacher timesteps);
            the trajectory starts at ``x_{t_0} = eps``.
        parameterization (`str`): ``"teacher"`` reads the student output as the teacher's native prediction at
            ``x_{t_0} = eps``; ``"raw"`` reads it as the signal itself.
        null_class_id (`int`, *optional*): The teacher's null class for classifier-free guidance; never a valid label.
        guidance_scale (`float`): The guidance scale ``w`` the student was distilled with; used in refinement.
        student_timestep (`int`, *optional*): For a one-step generator (gendistill's SiD/DMD students): the timestep
            the UNet is always given, whatever grid time is asked for; its output is the image, and refinement
            re-noises that image with ``eps`` at ``t_{K-k}``. ``None`` (BOOT students): the UNet is given the grid
            time itself.
    """

    model_cpu_offload_seq = "unet->teacher_unet"
    _optional_components = ["teacher_unet"]

    # Note: every non-module argument needs a default. diffusers treats an `__init__` argument without a default as a
    # pipeline component, both in `save_pretrained` and in `from_pretrained`.
    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DDIMScheduler,
        teacher_unet: UNet2DModel | None = None,
        *,
        boot_timesteps: list[int] | None = None,
        parameterization: str = "teacher",
        null_class_id: int | None = None,
        guidance_scale: float = 1.0,
        student_timestep: int | None = None,
    ):
        super().__init__()
        boot_timesteps = self._check_config(
            unet, scheduler, teacher_unet, boot_timesteps, parameterization, null_class_id, guidance_scale
        )
        student_timestep = self._check_student_timestep(scheduler, student_timestep)
        self.register_modules(unet=unet, scheduler=scheduler, teacher_unet=teacher_unet)
        self.register_to_config(
            boot_timesteps=boot_timesteps,
            parameterization=parameterization,
            null_class_id=None if null_class_id is None else int(null_class_id),
            guidance_scale=float(guidance_scale),
            student_timestep=student_timestep,
        )

    @classmethod
    def _check_config(
        cls, unet, scheduler, teacher_unet, boot_timesteps, parameterization, null_class_id, guidance_scale
    ):
        """Validate the constructor arguments; return ``boot_timesteps`` as a list of Python ints."""
        grid = cls._check_grid(scheduler, boot_timesteps, parameterization)
        num_classes = unet.config.num_class_embeds
        if num_classes is None:
            if null_class_id is not None:
                raise ValueError(f"null_class_id={null_class_id} was given but the student is unconditional")
            if guidance_scale != 1.0:
                raise ValueError(f"guidance_scale={guidance_scale} needs a class-conditional student; use 1.0")
        else:
            if null_class_id is not None and not 0 <= int(null_class_id) < num_classes:
                raise ValueError(f"null_class_id={null_class_id} is out of range; valid: 0..{num_classes - 1}")
            if guidance_scale != 1.0 and null_class_id is None:
                raise ValueError(f"guidance_scale={guidance_scale} needs the teacher's null_class_id")
        cls._check_teacher(unet, teacher_unet, ("in_channels", "out_channels", "sample_size", "num_class_embeds"))
        return grid

    # --- inputs --------------------------------------------------------------------------------------------------
    def valid_class_ids(self) -> list[int]:
        """Class ids a caller may request: all class embeddings except the null class; empty if unconditional."""
        num_classes = self.unet.config.num_class_embeds
        if num_classes is None:
            return []
        return [c for c in range(num_classes) if c != self.config.null_class_id]

    def _valid_ids_message(self) -> str:
        num_classes = self.unet.config.num_class_embeds
        null = self.config.null_class_id
        return f"valid: 0..{num_classes - 1}" + ("" if null is None else f" except the null class {null}")

    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one sample."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return self.unet.config.in_channels, height, width

    def check_inputs(self, batch_size, class_labels, generator, latents, refine_steps, output_type) -> int:
        """Validate the call arguments; return the effective batch size."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unsupported output_type {output_type!r}; valid: {', '.join(OUTPUT_TYPES)}")
        self._check_refine_steps(refine_steps)

        if class_labels is not None:
            if self.unet.config.num_class_embeds is None:
                raise ValueError("class_labels were given but this student is unconditional (no num_class_embeds)")
            labels = torch.as_tensor(class_labels)
            if labels.is_floating_point() or labels.is_complex() or labels.ndim > 1:
                raise ValueError(f"class_labels must be an int or a 1-D sequence of ints, got {class_labels!r}")
            if labels.ndim == 1:
                if len(labels) == 0:
                    raise ValueError("class_labels is empty")
                if batch_size != 1 and batch_size != len(labels):
                    raise ValueError(f"batch_size={batch_size} disagrees with the {len(labels)} class_labels given")
                batch_size = len(labels)
            bad = sorted({int(c) for c in labels.flatten().tolist()} - set(self.valid_class_ids()))
            if bad:
                raise ValueError(f"class id(s) {bad} cannot be requested; {self._valid_ids_message()}")

        self._check_noise(batch_size, generator, latents, (batch_size, *self.sample_shape()))
        return batch_size

    def prepare_class_labels(
        self,
        batch_size: int,
        class_labels: int | list[int] | torch.Tensor | None,
        generator: torch.Generator | list[torch.Generator] | None,
        device: torch.device,
    ) -> torch.Tensor | None:
        """Class labels (B,) long: the given ones (an int is broadcast), or drawn uniformly from the valid ids."""
        if self.unet.config.num_class_embeds is None:
            return None
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, dtype=torch.long)
            return labels.expand(batch_size).clone().to(device) if labels.ndim == 0 else labels.to(device)
        valid = torch.tensor(self.valid_class_ids(), dtype=torch.long)
        if isinstance(generator, list):
            index = torch.cat([torch.randint(len(valid), (1,), generator=g, device=g.device).cpu() for g in generator])
        else:
            rand_device = generator.device if generator is not None else torch.device("cpu")
            index = torch.randint(len(valid), (batch_size,), generator=generator, device=rand_device).cpu()
        return valid[index].to(device)

    # --- networks ------------------------------------------------------------------------------------------------
    def student_signal(self, eps: torch.Tensor, t: int, class_labels: torch.Tensor | None) -> torch.Tensor:
        """``g(eps, t, c)``: the student's estimate of the signal ``y_t`` (B, C, H, W), float32 (a one-step
        generator's image whatever ``t``, when the folder sets ``student_timestep``)."""
        if self.config.get("student_timestep") is not None:
            t = self.config.student_timestep
        timesteps = torch.full((eps.shape[0],), t, dtype=torch.long, device=eps.device)
        u = self.unet(eps.to(self.unet.dtype), timesteps, class_labels=class_labels).sample.float()
        return self._signal_from_student_output(u, eps)

    def teacher_x0(self, x: torch.Tensor, t: int, class_labels: torch.Tensor | None) -> torch.Tensor:
        """The teacher's clean prediction ``f(x_t, t, c)`` (B, C, H, W), with guidance applied to its native output."""
        w = self.config.guidance_scale
        timesteps = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        cond = {} if class_labels is None else {"class_labels": class_labels}
        null = (
            None
            if w == 1.0 or not cond
            else {"class_labels": torch.full_like(class_labels, self.config.null_class_id)}
        )
        u = guided_output(self.teacher_unet, x, timesteps, cond, null, w)
        alpha, sigma = self._alpha_sigma(t, x.device)
        return to_x0(u, x, alpha, sigma, self.scheduler.config.prediction_type)

    # --- sampling ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    @replace_example_docstring(IMAGE_EXAMPLE_DOC_STRING)
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: int | list[int] | torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        refine_steps: int = 0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate images with one student evaluation, optionally followed by ``refine_steps`` teacher DDIM steps.

        Args:
            batch_size (`int`, defaults to 1): Number of images; a list/tensor of ``class_labels`` sets it instead.
            class_labels (`int`, `list[int]` or `torch.LongTensor` (B,), *optional*): Classes for a class-conditional
                student; an int is used for every image. Drawn uniformly from the valid ids (with ``generator``)
                when omitted.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): Makes sampling deterministic.
            latents (`torch.Tensor` (B, C, H, W), *optional*): The noise ``eps``; drawn with ``generator`` if omitted.
            refine_steps (`int`, defaults to 0): ``k`` in ``0..K``: jump with the student to grid time ``t_{K-k}``,
                then run ``k`` teacher DDIM steps along the grid to ``t_K``. ``k = K`` is the teacher's own K-step DDIM
                sample (it starts from the exact signal at ``t_0``). Needs ``teacher_unet``.
            output_type (`str`, defaults to `"pil"`): ``"pil"``, ``"np"`` (B, H, W, C) or ``"pt"`` (B, C, H, W),
                values in [0, 1].
            return_dict (`bool`, defaults to `True`): Return an [`ImagePipelineOutput`] instead of a tuple.

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the images (in a one-element tuple when ``return_dict`` is False).
        """
        # 1. Check inputs
        batch_size = self.check_inputs(batch_size, class_labels, generator, latents, refine_steps, output_type)
        device = self._execution_device
        grid = self.config.boot_timesteps

        # 2. Prepare the noise eps (B, C, H, W), float32
        if latents is None:
            shape = (batch_size, *self.sample_shape())
            eps = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            eps = latents.to(device=device, dtype=torch.float32)

        # 3. Prepare class labels (B,) or None
        labels = self.prepare_class_labels(batch_size, class_labels, generator, device)

        # 4. Jump with the student to grid time t_{K-k}; at t_0 the signal is known exactly
        start = len(grid) - 1 - refine_steps
        y = self.start_signal(eps) if start == 0 else self.student_signal(eps, grid[start], labels)

        # 5. Refine with k teacher DDIM steps along the grid, in signal space: y_s = y_t + d (f(x_t) - y_t)
        if refine_steps > 0:
            y = self.refine(y, eps, refine_steps=refine_steps, teacher_x0=lambda x, t: self.teacher_x0(x, t, labels))

        # 6. Post-process to images in [0, 1]
        image = (y / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)

        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


class BootPipeline(_BootPipelineBase):
    r"""
    One-step (optionally teacher-refined) text-to-image generation from a BOOT student of a latent diffusion teacher
    (Stable Diffusion).

    The student ``g(eps, t, c)`` reads pure latent noise ``eps`` (B, C, h, w) and the prompt embedding ``c``, and
    returns the signal ``y_t = (x_t - sigma_t eps) / alpha_t`` of the teacher's guided DDIM trajectory from that noise;
    its output at the last grid time ``t_K`` is the latent, decoded by the VAE.

    Args:
        vae ([`AutoencoderKL`]): The teacher's VAE; decodes latents (B, C, h, w) to images (B, 3, h f, w f).
        text_encoder (`CLIPTextModel`): The teacher's frozen text encoder (transformers).
        tokenizer (`CLIPTokenizer`): The teacher's tokenizer (transformers).
        unet ([`UNet2DConditionModel`]): The BOOT student: the teacher's class and config, plus
            ``time_cond_proj_dim`` for a guidance-range student.
        scheduler ([`DDIMScheduler`]): Built from the teacher's scheduler config; provides ``alphas_cumprod`` and
            ``config.prediction_type``. Its ``clip_sample``/``thresholding`` are not applied.
        teacher_unet ([`UNet2DConditionModel`], *optional*): The teacher, needed only for ``refine_steps > 0``.
        boot_timesteps (`list[int]`): The BOOT grid ``t_0 > t_1 > ... > t_K`` (K + 1 distinct teacher timesteps);
            the trajectory starts at ``x_{t_0} = eps``.
        parameterization (`str`): ``"teacher"`` reads the student output as the teacher's native prediction at
            ``x_{t_0} = eps``; ``"raw"`` reads it as the signal itself.
        guidance_scale (`float`): The classifier-free guidance scale ``w`` of the teacher trajectory the student was
            distilled on (fixed-guidance student), or the default scale inside ``guidance_range``.
        guidance_range (`list[float]`, *optional*): ``[w_min, w_max]`` for a student that takes ``w`` through
            ``timestep_cond`` (``unet.config.time_cond_proj_dim``, see ``guidance_embedding``); ``None`` for a student
            distilled at the fixed ``guidance_scale``.
        student_timestep (`int`, *optional*): For a one-step generator (gendistill's SiD/DMD students): the timestep
            the UNet is always given; its output is the latent, and refinement re-noises it with ``eps`` at
            ``t_{K-k}``. ``None`` (BOOT students): the UNet is given the grid time itself.
    """

    model_cpu_offload_seq = "text_encoder->unet->teacher_unet->vae"
    _optional_components = ["teacher_unet"]

    # Note: every non-module argument needs a default. diffusers treats an `__init__` argument without a default as a
    # pipeline component, both in `save_pretrained` and in `from_pretrained`.
    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: torch.nn.Module,
        tokenizer,
        unet: UNet2DConditionModel,
        scheduler: DDIMScheduler,
        teacher_unet: UNet2DConditionModel | None = None,
        *,
        boot_timesteps: list[int] | None = None,
        parameterization: str = "teacher",
        guidance_scale: float = 7.5,
        guidance_range: list[float] | None = None,
        student_timestep: int | None = None,
    ):
        super().__init__()
        boot_timesteps, guidance_range = self._check_config(
            vae, unet, scheduler, teacher_unet, boot_timesteps, parameterization, guidance_scale, guidance_range
        )
        student_timestep = self._check_student_timestep(scheduler, student_timestep)
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            teacher_unet=teacher_unet,
        )
        self.register_to_config(
            boot_timesteps=boot_timesteps,
            parameterization=parameterization,
            guidance_scale=float(guidance_scale),
            guidance_range=guidance_range,
            student_timestep=student_timestep,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def _check_config(
        cls, vae, unet, scheduler, teacher_unet, boot_timesteps, parameterization, guidance_scale, guidance_range
    ) -> tuple[list[int], list[float] | None]:
        """Validate the constructor arguments; return the grid as ints and the guidance range as floats (or None)."""
        grid = cls._check_grid(scheduler, boot_timesteps, parameterization)
        if vae.config.latent_channels != unet.config.in_channels:
            raise ValueError(
                f"the VAE has {vae.config.latent_channels} latent channels but the student reads "
                f"{unet.config.in_channels}"
            )
        guidance_dim = unet.config.get("time_cond_proj_dim")
        if guidance_range is None:
            if guidance_dim is not None:
                raise ValueError(
                    f"the student takes a guidance embedding (time_cond_proj_dim={guidance_dim}), so guidance_range "
                    "[w_min, w_max] is required"
                )
        else:
            if guidance_dim is None:
                raise ValueError(
                    f"guidance_range={guidance_range} needs a student with a guidance embedding "
                    "(unet.config.time_cond_proj_dim), and this one has none; use a fixed guidance_scale"
                )
            if not (
                isinstance(guidance_range, (list, tuple))
                and len(guidance_range) == 2
                and all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in guidance_range)
                and 0 <= guidance_range[0] < guidance_range[1]
            ):
                raise ValueError(
                    f"guidance_range must be [w_min, w_max] with 0 <= w_min < w_max, got {guidance_range}"
                )
            guidance_range = [float(w) for w in guidance_range]
            if not guidance_range[0] <= guidance_scale <= guidance_range[1]:
                raise ValueError(
                    f"guidance_scale {float(guidance_scale)} (the default scale) is outside the guidance_range "
                    f"{guidance_range}"
                )
        if teacher_unet is not None and teacher_unet.config.get("time_cond_proj_dim") is not None:
            raise ValueError("teacher_unet takes timestep_cond (time_cond_proj_dim), which refinement does not supply")
        cls._check_teacher(unet, teacher_unet, ("in_channels", "out_channels", "sample_size", "cross_attention_dim"))
        return grid, guidance_range

    # --- inputs --------------------------------------------------------------------------------------------------
    def default_size(self) -> tuple[int, int]:
        """``(height, width)`` in pixels of the latents the student was trained on."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    def check_inputs(
        self,
        prompt,
        num_images_per_prompt,
        height,
        width,
        guidance_scale,
        generator,
        latents,
        refine_steps,
        output_type,
    ) -> None:
        """Validate the call arguments (``height``, ``width`` and ``guidance_scale`` already defaulted)."""
        if isinstance(prompt, str):
            num_prompts = 1
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            num_prompts = len(prompt)
        else:
            raise ValueError(f"prompt must be a str or a non-empty list of str, got {prompt!r}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int):
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        factor = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % factor:
                raise ValueError(f"{name}={value!r} must be a positive multiple of the VAE scale factor {factor}")
        guidance_range = self.config.guidance_range
        if guidance_range is None:
            if guidance_scale != self.config.guidance_scale:
                raise ValueError(
                    f"guidance_scale={guidance_scale} cannot be used: this student was distilled at the fixed "
                    f"guidance scale {self.config.guidance_scale}; changing it needs a student distilled with a "
                    "guidance_range"
                )
        elif not guidance_range[0] <= guidance_scale <= guidance_range[1]:
            raise ValueError(
                f"guidance_scale={guidance_scale} is outside this student's guidance_range "
                f"[{float(guidance_range[0])}, {float(guidance_range[1])}]"
            )
        self._check_refine_steps(refine_steps)
        if output_type not in LATENT_OUTPUT_TYPES:
            raise ValueError(f"unsupported output_type {output_type!r}; valid: {', '.join(LATENT_OUTPUT_TYPES)}")
        batch_size = num_prompts * num_images_per_prompt
        shape = (batch_size, self.unet.config.in_channels, height // factor, width // factor)
        self._check_noise(batch_size, generator, latents, shape)

    # --- networks ------------------------------------------------------------------------------------------------
    def encode_prompt(
        self, prompt: str | list[str], device: torch.device, num_images_per_prompt: int = 1
    ) -> torch.Tensor:
        """Text embeddings (B, L, D) for ``B = len(prompt) * num_images_per_prompt``, each prompt's images adjacent;
        ``L`` is the tokenizer's ``model_max_length`` (as in ``StableDiffusionPipeline``, without ``clip_skip``)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompt_embeds = encode_prompts(self.tokenizer, self.text_encoder, prompts, device)
        return prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)

    def student_signal(
        self, eps: torch.Tensor, t: int, prompt_embeds: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """``g(eps, t, c)``: the student's estimate of the signal ``y_t`` (B, C, h, w), float32, for noise ``eps``
        (B, C, h, w) and prompt embeddings (B, L, D); ``guidance_scale`` feeds a guidance-range student only. A
        one-step generator (``student_timestep`` set) returns its latent whatever ``t``."""
        if self.config.get("student_timestep") is not None:
            t = self.config.student_timestep
        dtype = self.unet.dtype
        timesteps = torch.full((eps.shape[0],), t, dtype=torch.long, device=eps.device)
        kwargs = {}
        guidance_dim = self.unet.config.time_cond_proj_dim
        if guidance_dim is not None:
            w = torch.full((eps.shape[0],), guidance_scale, dtype=torch.float32, device=eps.device)
            kwargs["timestep_cond"] = guidance_embedding(w, guidance_dim).to(dtype)
        u = self.unet(eps.to(dtype), timesteps, encoder_hidden_states=prompt_embeds.to(dtype), **kwargs).sample
        return self._signal_from_student_output(u.float(), eps)

    def teacher_x0(
        self,
        x: torch.Tensor,
        t: int,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The teacher's clean prediction ``f(x_t, t, c)`` (B, C, h, w) at ``x`` (B, C, h, w), with classifier-free
        guidance ``u = u_null + w (u_cond - u_null)`` on its native output (one batched call of size 2B) unless
        ``w = 1``. ``negative_prompt_embeds`` (B, L, D) embeds the null prompt ""."""
        timesteps = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        cond = {"encoder_hidden_states": prompt_embeds}
        null = None if guidance_scale == 1.0 else {"encoder_hidden_states": negative_prompt_embeds}
        u = guided_output(self.teacher_unet, x, timesteps, cond, null, guidance_scale)
        alpha, sigma = self._alpha_sigma(t, x.device)
        return to_x0(u, x, alpha, sigma, self.scheduler.config.prediction_type)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, h f, w f) in [-1, 1] (float32) from the student's latents (B, C, h, w)."""
        return decode_latents(self.vae, latents)

    # --- sampling ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    @replace_example_docstring(TEXT_EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        refine_steps: int = 0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate images with one student evaluation, optionally followed by ``refine_steps`` teacher DDIM steps.

        Args:
            prompt (`str` or `list[str]`): The prompt(s); ``B = len(prompt) * num_images_per_prompt`` images.
            num_images_per_prompt (`int`, defaults to 1): Images per prompt, from different noises.
            height (`int`, *optional*): Image height in pixels, a multiple of ``vae_scale_factor``; defaults to
                ``unet.config.sample_size * vae_scale_factor``.
            width (`int`, *optional*): Image width in pixels, likewise.
            guidance_scale (`float`, *optional*): The guidance scale ``w``; defaults to ``config.guidance_scale``.
                A fixed-guidance student accepts only that scale; a guidance-range student any ``w`` in
                ``config.guidance_range``. Also guides the teacher during refinement.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): Makes sampling deterministic.
            latents (`torch.Tensor` (B, C, height / f, width / f), *optional*): The noise ``eps``; drawn with
                ``generator`` if omitted.
            refine_steps (`int`, defaults to 0): ``k`` in ``0..K``: jump with the student to grid time ``t_{K-k}``,
                then run ``k`` guided teacher DDIM steps along the grid to ``t_K``. ``k = K`` is the teacher's own
                K-step DDIM sample (it starts from the exact signal at ``t_0``). Needs ``teacher_unet``.
            output_type (`str`, defaults to `"pil"`): ``"pil"``, ``"np"`` (B, H, W, 3) or ``"pt"`` (B, 3, H, W) with
                values in [0, 1], or ``"latent"``: the undecoded latents (B, C, height / f, width / f).
            return_dict (`bool`, defaults to `True`): Return an [`ImagePipelineOutput`] instead of a tuple.

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the images (in a one-element tuple when ``return_dict`` is False).
        """
        # 0. Default size and guidance scale
        default_height, default_width = self.default_size()
        height = default_height if height is None else height
        width = default_width if width is None else width
        guidance_scale = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)

        # 1. Check inputs
        self.check_inputs(
            prompt, num_images_per_prompt, height, width, guidance_scale, generator, latents, refine_steps, output_type
        )
        device = self._execution_device
        grid = self.config.boot_timesteps
        num_prompts = 1 if isinstance(prompt, str) else len(prompt)
        batch_size = num_prompts * num_images_per_prompt

        # 2. Encode the prompts (B, L, D); refinement with guidance also needs the null prompt ""
        prompt_embeds = self.encode_prompt(prompt, device, num_images_per_prompt)
        negative_prompt_embeds = None
        if refine_steps > 0 and guidance_scale != 1.0:
            negative_prompt_embeds = self.encode_prompt("", device).expand(batch_size, -1, -1)

        # 3. Prepare the latent noise eps (B, C, height / f, width / f), float32
        if latents is None:
            shape = (
                batch_size,
                self.unet.config.in_channels,
                height // self.vae_scale_factor,
                width // self.vae_scale_factor,
            )
            eps = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            eps = latents.to(device=device, dtype=torch.float32)

        # 4. Jump with the student to grid time t_{K-k} (at t_0 the signal is known exactly), then refine with k
        # guided teacher DDIM steps along the grid, in signal space: y_s = y_t + d (f(x_t) - y_t)
        start = len(grid) - 1 - refine_steps
        if start == 0:
            y = self.start_signal(eps)
        else:
            y = self.student_signal(eps, grid[start], prompt_embeds, guidance_scale)
        if refine_steps > 0:

            def teacher_x0(x: torch.Tensor, t: int) -> torch.Tensor:
                return self.teacher_x0(x, t, prompt_embeds, negative_prompt_embeds, guidance_scale)

            y = self.refine(y, eps, refine_steps=refine_steps, teacher_x0=teacher_x0)

        # 5. Decode with the VAE and post-process to images in [0, 1]
        if output_type == "latent":
            image = y
        else:
            image = self.image_processor.postprocess(self.decode_latents(y), output_type=output_type)

        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
