"""Transfer sets drawn from a diffusion model: the images a classifier student learns on when the teacher's data is
not available but a generative model of it is (``gendistill dfkd --method unlabeled --method-options
data=generated:FOLDER``).

``FOLDER`` is a diffusers pipeline folder of either kind this project writes or reads: a one-step BOOT or SiD
student (one UNet call per image) or a pixel-space diffusion teacher (``DDPMPipeline`` layout, sampled with
``steps`` DDIM steps by :func:`gendistill.diffusion.sampling.teacher_sample`). A class-conditional model is asked
for its valid classes in turn (image i gets the i-th, modulo their number), so the set is balanced over the
classes the model knows; the classifier teacher's soft labels on the images are what the student learns, the
classes asked for are never used as labels.

The set is drawn at the start of the run from ``seed`` (every image from its own noise, in batches), on the run's
device; the same seed on the same device gives the same images, so a resumed run draws the same set again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gendistill.diffusion.sampling import teacher_sample
from gendistill.diffusion.teacher import load_teacher
from gendistill.errors import UsageError

GENERATED_PREFIX = "generated:"


def generated_source(data: str) -> str | None:
    """The pipeline folder of a ``generated:FOLDER`` data source (None for any other source)."""
    if not isinstance(data, str) or not data.startswith(GENERATED_PREFIX):
        return None
    folder = data[len(GENERATED_PREFIX) :]
    if not folder:
        raise UsageError("data 'generated:' names no folder; use generated:PIPELINE_FOLDER")
    return folder


def _pipeline_class(folder: Path) -> str:
    index = folder / "model_index.json"
    if not index.is_file():
        raise UsageError(
            f"generated:{folder}: no model_index.json; expected a diffusers pipeline folder (a BOOT or SiD student "
            "written by gendistill, or a DDPMPipeline-style teacher)"
        )
    name = json.loads(index.read_text()).get("_class_name")
    return name[-1] if isinstance(name, list) else str(name)


@torch.no_grad()
def generate_transfer_set(
    source: str,
    *,
    num_images: int,
    steps: int = 20,
    seed: int = 0,
    batch_size: int = 100,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, dict]:
    """Images (N, C, H, W) float in [0, 1] drawn from the pipeline folder ``source``, and a description of the set
    (source, kind, classes asked for, steps, seconds) for the run's records."""
    if num_images < 1:
        raise UsageError(f"generated_images must be >= 1, got {num_images}")
    if steps < 1:
        raise UsageError(f"generated_steps must be >= 1, got {steps}")
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"generated:{source}: no such folder")
    device = torch.device(device)
    kind = _pipeline_class(folder)
    tic = time.perf_counter()
    if kind in ("BootPipeline", "BootImagePipeline"):
        from gendistill.pipelines import load_boot_pipeline

        pipe = load_boot_pipeline(folder).to(device)
        if getattr(pipe, "tokenizer", None) is not None:
            raise UsageError(f"generated:{source} is a text-to-image student; transfer sets need a pixel-space model")
        pipe.set_progress_bar_config(disable=True)
        class_ids = list(pipe.valid_class_ids())

        def draw(noise_seed: int, n: int, labels):
            generator = torch.Generator(device).manual_seed(noise_seed)
            return pipe(batch_size=n, class_labels=labels, generator=generator, output_type="pt").images

        steps_used = 1
    else:
        teacher = load_teacher(folder)
        if teacher.is_text_conditional:
            raise UsageError(f"generated:{source} is a text-to-image teacher; transfer sets need a pixel-space model")
        teacher.to(device)
        class_ids = teacher.class_ids

        def draw(noise_seed: int, n: int, labels):
            generator = torch.Generator(device).manual_seed(noise_seed)
            noise = torch.randn((n, *teacher.sample_shape), generator=generator, device=device)
            images = teacher_sample(teacher, noise, solver="ddim", num_steps=steps, class_labels=labels)
            return (images.float() + 1) / 2

        steps_used = steps
    batches = []
    for start in tqdm(range(0, num_images, batch_size), desc="transfer set", unit="batch", leave=False):
        n = min(batch_size, num_images - start)
        labels = None
        if class_ids:
            labels = torch.tensor([class_ids[i % len(class_ids)] for i in range(start, start + n)], device=device)
        batches.append(draw(seed * 1_000_003 + start, n, labels).clamp(0, 1).cpu())
    images = torch.cat(batches)
    info = {
        "source": str(folder),
        "pipeline": kind,
        "images": int(len(images)),
        "classes_asked": class_ids or None,
        "steps": steps_used,
        "seed": seed,
        "seconds": round(time.perf_counter() - tic, 1),
    }
    return images, info
