"""Same-noise comparison of a BOOT student with its class-conditional teacher's samplers, judged by a classifier.

Every sampler gets the same noises and the same requested classes (balanced: sample ``i`` has class ``i % n``;
batch ``i`` of noise from a CPU generator seeded with ``seed + i``, so every sampler and device sees the same
noises). Per sampler: class agreement (the fraction of samples the judge classifies as the requested class), FID on
the judge's penultimate features against real images, wall time per image of batched sampling, and the UNet
evaluations per image (a guided teacher step is one call on a batch of 2B, counted as 2). Samples smaller than the
judge's input are zero-padded to it (MNIST's 28x28 -> LeNet's 32x32, as the real digits are).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gendistill.data.classification import load_classification_data
from gendistill.data.images import to_channels
from gendistill.dfkd.models import load_classifier
from gendistill.diffusion.sampling import teacher_sample
from gendistill.diffusion.teacher import DiffusionTeacher
from gendistill.errors import UsageError

from .classifier import topk_accuracy
from .features import classifier_features
from .fid import FeatureStats, compute_stats, frechet_distance

BATCH_SIZE = 100
SOLVER_NAMES = {"ddim": "DDIM", "dpmsolver++": "DPM-Solver++"}


def pad_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad (N, C, h, w) in [0, 1] to ``size`` x ``size`` (centered)."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    if h > size or w > size:
        raise UsageError(f"samples of {h}x{w} do not fit the judge's {size}x{size} input")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(images, (left, size - w - left, top, size - h - top))


@dataclass
class Sampler:
    """One way of turning (noise (B, C, H, W), labels (B,)) into images in [0, 1]."""

    key: str
    label: str
    model: str  # "teacher" | "student"
    steps: int  # sampler steps (the student's jump counts as one)
    unet_evaluations: int  # per image
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def boot_samplers(
    pipe,
    teacher: DiffusionTeacher,
    *,
    refine: Sequence[int] = (),
    solvers: dict[str, Sequence[int]] | None = None,
    boot_grid_teacher: bool = False,
    prompts_for: Callable[[torch.Tensor], list[str]] | None = None,
) -> list[Sampler]:
    """The student (1 step, then ``refine`` teacher steps along its grid) and the teacher's diffusers ``solvers``
    (``{"ddim": [1, 50], ...}``) with the student's guidance scale; ``boot_grid_teacher``: also the teacher's own
    K-step DDIM on the BOOT grid (the trajectory the student learned). ``prompts_for``: for a text-to-image
    teacher, the prompts (one per sample) that request classes ``y``; the judge checks the requested class."""
    guidance = float(pipe.config.guidance_scale)
    k_steps = len(pipe.config.boot_timesteps) - 1
    per_step = 2 if guidance != 1.0 else 1

    def solver_fn(solver: str, steps: int):
        def fn(eps, y):
            condition = {"class_labels": y} if prompts_for is None else {"prompts": prompts_for(y)}
            x = teacher_sample(teacher, eps, solver=solver, num_steps=steps, guidance_scale=guidance, **condition)
            return x.add(1).div(2).clamp(0, 1)

        return fn

    def student_fn(k: int):
        return lambda eps, y: student_images(pipe, eps, y, prompts_for, refine_steps=k)

    out = []
    for solver, steps_list in (solvers or {}).items():
        for steps in steps_list:
            name = f"teacher, {SOLVER_NAMES[solver]} {steps} step{'s' * (steps > 1)}"
            key = f"teacher_{solver.replace('+', 'p')}{steps}"
            out.append(Sampler(key, name, "teacher", steps, steps * per_step, solver_fn(solver, steps)))
    if boot_grid_teacher:
        label = f"teacher, DDIM {k_steps} steps on the BOOT grid (what the student learned)"
        out.append(
            Sampler(f"teacher_boot_grid{k_steps}", label, "teacher", k_steps, k_steps * per_step, student_fn(k_steps))
        )
    out.append(Sampler("student", "BOOT student, 1 step", "student", 1, 1, student_fn(0)))
    for k in refine:
        if not 0 < k < k_steps:
            raise UsageError(f"refine steps {k} out of range: valid 1..{k_steps - 1} for this student (K={k_steps})")
        label = f"BOOT student + {k} teacher step{'s' * (k > 1)}"
        out.append(Sampler(f"student_refine{k}", label, "student", 1 + k, 1 + k * per_step, student_fn(k)))
    return out


def student_images(pipe, eps, y, prompts_for=None, **kwargs) -> torch.Tensor:
    """A BOOT/SiD pipeline's images in [0, 1] for noises ``eps`` and requested classes ``y`` (as prompts when
    ``prompts_for`` is given)."""
    if prompts_for is None:
        return pipe(class_labels=y, latents=eps, output_type="pt", **kwargs).images
    return pipe(prompt=prompts_for(y), latents=eps, output_type="pt", **kwargs).images


def to_judge(images: torch.Tensor, judge: Judge) -> torch.Tensor:
    """Images (N, C, h, w) in [0, 1] as the judge reads them: RGB averaged to gray for a one-channel judge (a
    text-to-image teacher's autoencoder writes three channels), then zero-padded to its input size."""
    channels = judge.model.config.in_channels
    if images.shape[1] != channels and (images.shape[1], channels) != (3, 1):
        raise UsageError(
            f"samples with {images.shape[1]} channels cannot be judged by a {channels}-channel classifier"
        )
    return pad_to(to_channels(images, channels), judge.image_size)


def noise_batches(count: int, shape: Sequence[int], seed: int, device: torch.device, num_classes: int):
    """Batches of (noise (B, *shape), labels (B,)) as the module docstring says."""
    for i, start in enumerate(range(0, count, BATCH_SIZE)):
        size = min(BATCH_SIZE, count - start)
        eps = torch.randn(size, *shape, generator=torch.Generator().manual_seed(seed + i))
        labels = torch.arange(start, start + size) % num_classes
        yield eps.to(device), labels.to(device)


@dataclass
class Judge:
    """A classifier folder as judge (class agreement) and feature extractor (FID), with real-image statistics."""

    folder: Path
    model: torch.nn.Module
    extractor: torch.nn.Module
    real_stats: FeatureStats
    real_description: str

    @classmethod
    def load(cls, folder: str | Path, *, data: str = "mnist5k", split: str = "test", device: torch.device) -> Judge:
        model = load_classifier(folder).to(device).eval()
        config = model.config
        extractor = classifier_features(folder).to(device)
        real, _, _ = load_classification_data(
            data, split=split, image_size=config.image_size, channels=config.in_channels
        )
        stats = compute_stats(real.split(250), extractor, device=device)
        return cls(Path(folder), model, extractor, stats, f"{data} {split} split ({len(real)} images)")

    @property
    def image_size(self) -> int:
        return self.model.config.image_size


def run_samplers(
    samplers: Sequence[Sampler],
    judge: Judge,
    *,
    sample_shape: Sequence[int],
    num_classes: int,
    eval_samples: int,
    seed: int,
    device: torch.device,
) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Results per sampler key (and the padded images in [0, 1], (N, C, S, S), for grids)."""
    results, images_by_key = {}, {}
    for sampler in samplers:
        images, labels, seconds = [], [], 0.0
        batches = noise_batches(eval_samples, sample_shape, seed, device, num_classes)
        total = math.ceil(eval_samples / BATCH_SIZE)
        for eps, y in tqdm(batches, total=total, desc=sampler.label, unit="batch", leave=False):
            began = time.perf_counter()
            with torch.no_grad():
                x = sampler.fn(eps, y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - began
            images.append(to_judge(x.float().cpu(), judge))
            labels.append(y.cpu())
        images, labels = torch.cat(images), torch.cat(labels)
        stats = compute_stats(images.split(250), judge.extractor, device=device)
        results[sampler.key] = {
            "sampler": sampler.label,
            "model": sampler.model,
            "steps": sampler.steps,
            "unet_evaluations_per_image": sampler.unet_evaluations,
            "class_agreement": topk_accuracy(judge.model, images, labels, topk=(1,))["top1"],
            "fid_lenet": frechet_distance(stats, judge.real_stats),
            "seconds_per_image": seconds / len(images),
        }
        images_by_key[sampler.key] = images
    return results, images_by_key


def class_rows(images: torch.Tensor, num_classes: int, per_class: int) -> torch.Tensor:
    """The first ``per_class`` samples of each class, one row per class (sample i has class i % num_classes)."""
    index = [c + num_classes * r for c in range(num_classes) for r in range(per_class)]
    return images[index]
