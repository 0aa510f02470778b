"""Where evaluated images come from: a folder, a tensor iterator, or a BOOT student pipeline sampled in batches.

Every source yields batches of images (B, C, H, W) float32 in [0, 1] and never holds more than one batch, so a
metric can stream 50k samples. Pipeline samples use one seeded generator per batch (batch ``i`` uses ``seed + i``),
so the same settings give the same images, and the teacher (``refine_steps = K``) and the student see the same
noises.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gendistill.data.images import list_image_files
from gendistill.errors import UsageError, as_usage_errors
from gendistill.files import error_summary, open_image
from gendistill.pipelines import BootImagePipeline, BootPipeline, load_boot_pipeline


def iter_image_folder(
    folder: str | os.PathLike, *, batch_size: int = 64, limit: int | None = None
) -> Iterator[torch.Tensor]:
    """Images of ``folder`` (recursively, sorted) at their own size as RGB batches; consecutive images of equal size
    share a batch."""
    files = list_image_files(folder)
    if limit is not None:
        files = files[:limit]
    batch: list[torch.Tensor] = []
    for path in files:
        array = np.asarray(open_image(path), dtype=np.uint8).copy()
        image = torch.from_numpy(array).permute(2, 0, 1).float() / 255.0
        if batch and (len(batch) == batch_size or batch[0].shape != image.shape):
            yield torch.stack(batch)
            batch = []
        batch.append(image)
    if batch:
        yield torch.stack(batch)


def count_images(folder: str | os.PathLike) -> int:
    return len(list_image_files(folder))


def iter_tensors(batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Check and pass through user batches (B, C, H, W) in [0, 1]."""
    for i, batch in enumerate(batches):
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            raise UsageError(f"batch {i} is not a tensor (B, C, H, W): {type(batch).__name__}")
        yield batch.float()


def load_student_pipeline(
    folder: str | os.PathLike, *, teacher: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> BootImagePipeline | BootPipeline:
    """A BOOT student folder (no folder code is run), optionally with the teacher UNet of a teacher folder attached
    (for teacher samples, ``refine_steps`` and trajectory errors when the student was saved without it)."""
    with as_usage_errors():
        pipe = load_boot_pipeline(folder)
    if teacher is not None:
        teacher_path = Path(teacher)
        subfolder = "unet" if (teacher_path / "unet").is_dir() else None
        if not (teacher_path / (subfolder or "") / "config.json").is_file():
            raise FileNotFoundError(f"teacher {str(teacher)!r} has no unet/config.json (a diffusers pipeline folder)")
        try:
            teacher_unet = type(pipe.unet).from_pretrained(teacher_path, subfolder=subfolder)
        except Exception as err:  # diffusers raises OSError, ValueError, safetensors errors... for bad weights
            raise UsageError(
                f"teacher {str(teacher)!r}: its UNet could not be loaded ({error_summary(err)}); "
                "expected a diffusers pipeline folder as save_pretrained writes it"
            ) from None
        pipe._check_teacher(pipe.unet, teacher_unet, ("in_channels", "out_channels", "sample_size"))
        pipe.register_modules(teacher_unet=teacher_unet)
    return pipe.to(device)


def num_intervals(pipe: BootImagePipeline | BootPipeline) -> int:
    """K of the student's BOOT grid: ``refine_steps = K`` is the teacher's own K-step DDIM sample."""
    return len(pipe.config.boot_timesteps) - 1


@dataclass
class SampleSettings:
    """How a pipeline is sampled (stored with every number computed from its samples)."""

    num_samples: int
    batch_size: int = 64
    seed: int = 0  # batch i uses a generator seeded with seed + i
    refine_steps: int = 0  # teacher DDIM steps after the student's jump (K: the teacher alone)
    class_labels: Sequence[int] | None = None  # cycled; default: the valid classes in turn (balanced)
    prompts: Sequence[str] | None = None  # text-to-image: cycled over the samples
    guidance_scale: float | None = None  # guidance-range text students only

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("prompts", "class_labels")}
        if self.prompts is not None:
            out["num_prompts"] = len(self.prompts)
        if self.class_labels is not None:
            out["class_labels"] = list(self.class_labels)
        return out


def check_sample_settings(pipe, settings: SampleSettings) -> None:
    if settings.num_samples < 1:
        raise UsageError(f"--num-samples must be positive, got {settings.num_samples}")
    if settings.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {settings.batch_size}")
    if isinstance(pipe, BootPipeline):
        if not settings.prompts:
            raise UsageError("this student is text-to-image: give prompts (--prompts FILE)")
        if settings.class_labels is not None:
            raise UsageError("--class-labels apply to class-conditional students; this one takes prompts")
    else:
        if settings.prompts:
            raise UsageError("prompts apply to text-to-image students; this one is not")
        if settings.guidance_scale is not None:
            raise UsageError("--guidance-scale applies to guidance-range text-to-image students only")
        valid = pipe.valid_class_ids()
        if settings.class_labels is not None:
            if not valid:
                raise UsageError("--class-labels were given but this student is unconditional")
            bad = [c for c in settings.class_labels if c not in valid]
            if bad:
                raise UsageError(f"class labels {bad} are not valid for this student; {pipe._valid_ids_message()}")


def batch_conditions(pipe, settings: SampleSettings, start: int, size: int) -> dict:
    """Pipeline keyword arguments (class labels or prompts) for samples ``start .. start + size - 1``."""
    index = range(start, start + size)
    if isinstance(pipe, BootPipeline):
        kwargs = {"prompt": [settings.prompts[i % len(settings.prompts)] for i in index]}
        if settings.guidance_scale is not None:
            kwargs["guidance_scale"] = settings.guidance_scale
        return kwargs
    ids = list(settings.class_labels) if settings.class_labels is not None else pipe.valid_class_ids()
    if not ids:
        return {"batch_size": size}
    return {"class_labels": [ids[i % len(ids)] for i in index]}


def iter_pipeline(
    pipe, settings: SampleSettings, *, progress: bool = True, desc: str = "sampling", timing: dict | None = None
) -> Iterator[tuple[torch.Tensor, list[int] | None]]:
    """Samples of a BOOT pipeline in batches: ``(images (B, C, H, W) in [0, 1], requested class labels or None)``
    (see the module docstring for the seeds). ``timing["seconds"]`` accumulates the time spent in the pipeline."""
    import time

    from tqdm.auto import tqdm

    check_sample_settings(pipe, settings)
    cuda = pipe.device.type == "cuda"
    with tqdm(total=settings.num_samples, desc=desc, unit="img", disable=not progress) as bar:
        for i, start in enumerate(range(0, settings.num_samples, settings.batch_size)):
            size = min(settings.batch_size, settings.num_samples - start)
            generator = torch.Generator(pipe.device).manual_seed(settings.seed + i)
            conditions = batch_conditions(pipe, settings, start, size)
            began = time.perf_counter()
            with as_usage_errors():
                images = pipe(**conditions, generator=generator, refine_steps=settings.refine_steps, output_type="pt")
            if cuda:
                torch.cuda.synchronize(pipe.device)
            if timing is not None:
                timing["seconds"] = timing.get("seconds", 0.0) + time.perf_counter() - began
            bar.update(size)
            yield images.images.float(), conditions.get("class_labels")
