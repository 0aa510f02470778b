"""One-step students of a *trained* text-to-image teacher, distilled from caption prompts only.

The teacher is a small Stable-Diffusion-architecture model (``AutoencoderKL``, ``CLIPTextModel`` + tokenizer,
``UNet2DConditionModel``) trained on MNIST-5k with captions such as "a handwritten seven" by ``gendistill teach
text2image`` (``--teacher FOLDER``, or trained here with that command's defaults). Its students, each trained for the
same wall-clock (``--seconds``) from the teacher's caption prompts and nothing else: BOOT, SiD and DMD (both started
from the teacher). On the same latent noises and the same requested digits (prompt "a handwritten {digit name}"),
every sampler is judged like the pixel ones of ``mnist_suite.py``: class agreement of the shipped LeNet-5 with the
prompted digit, FID on its penultimate features against the 500 held-out digits (samples averaged to gray), UNet
evaluations and wall time per image (batch 100, VAE decode included); the teacher runs diffusers' DDIM at
1/2/4/8/50 steps and DPM-Solver++ (2M) at the same step counts, with the students' guidance scale.

    python benchmarks/text2image_suite.py --teacher mnist-text2image --out benchmarks/results/text2image_<dev>.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path

import diffusers
import torch

from gendistill.data.mnist import DIGIT_NAMES
from gendistill.diffusion.sampling import solver_settings
from gendistill.diffusion.teacher import load_teacher
from gendistill.eval.compare import Judge, Sampler, boot_samplers, run_samplers, student_images
from gendistill.eval.report import device_description
from gendistill.eval.sources import load_student_pipeline
from gendistill.training import boot, sid, teach_text2image
from gendistill.training.demo import CLASSIFIER_TEACHER, shipped_teacher

SOLVERS = {"ddim": (1, 2, 4, 8, 50), "dpmsolver++": (1, 2, 4, 8, 50)}
PROMPT = "a handwritten {name}"
# The students trained for the same wall-clock: (key, label, objective: "boot" | "sid" | "dmd").
STUDENTS = (("sid", "SiD student, 1 step", "sid"), ("dmd", "DMD student, 1 step", "dmd"))


def train_teacher(folder: Path, seed: int) -> float:
    start = time.perf_counter()
    teach_text2image.run(teach_text2image.TeachText2ImageRecipe(output=str(folder), seed=seed))
    return time.perf_counter() - start


def prompts_for(y: torch.Tensor) -> list[str]:
    return [PROMPT.format(name=DIGIT_NAMES[int(c)]) for c in y]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=None, help="a `teach text2image` folder (default: train one)")
    parser.add_argument("--seconds", type=float, default=180.0, help="training seconds of each student")
    parser.add_argument("--guidance-scale", type=float, default=2.0, help="teacher CFG scale, students and solvers")
    parser.add_argument("--boot-lr", type=float, default=2e-4)
    parser.add_argument("--boot-intervals", type=int, default=16, help="K of the BOOT students (the demo's)")
    parser.add_argument("--sid-lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of every student")
    parser.add_argument("--samples", type=int, default=500, help="samples per sampler (balanced over the digits)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--markdown", action="store_true", help="also print the README table")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result = {
        "benchmark": "text2image_suite",
        "device": device_description(device),
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "seconds_per_student": args.seconds,
        "guidance_scale": args.guidance_scale,
        "batch_size": args.batch_size,
        "prompt": PROMPT,
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teacher_dir = args.teacher
        if teacher_dir is None:
            teacher_dir = work / "teacher"
            result["teacher_training_seconds"] = train_teacher(teacher_dir, args.seed)
        teacher_info = json.loads((teacher_dir / "results.json").read_text())
        run = json.loads((teacher_dir / "gendistill_run.json").read_text())["recipe"]
        logged = [json.loads(line) for line in (teacher_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
        result["teacher"] = {
            "folder": str(args.teacher) if args.teacher else "trained here with `teach text2image` defaults",
            "training_seconds": logged[-1]["train_s"],
            "final_loss": teacher_info["final_loss"],
            "recipe": {k: run[k] for k in ("max_steps", "vae_steps", "block_out_channels", "vae_block_out_channels")},
        }
        prompts_file = work / "prompts.txt"
        prompts_file.write_text("".join(c + "\n" for row in teacher_info["captions"] for c in row))
        common = dict(
            teacher=str(teacher_dir),
            prompts=str(prompts_file),
            guidance_scale=args.guidance_scale,
            batch_size=args.batch_size,
            cache_text_embeddings=True,
            max_steps=10**9,
            max_seconds=args.seconds,
            eval_every=0,
            sample_every=0,
            checkpoint_every=0,
            seed=args.seed,
        )
        runs = {}
        start = time.perf_counter()
        boot_recipe = boot.BootRecipe(
            output=str(work / "boot"), lr=args.boot_lr, num_intervals=args.boot_intervals, save_teacher=True, **common
        )
        summary = boot.run(boot_recipe)
        boot_info = json.loads((work / "boot" / "model_index.json").read_text())
        runs["boot"] = {
            "steps": summary["steps"],
            "seconds": time.perf_counter() - start,
            "lr": args.boot_lr,
            "num_intervals": args.boot_intervals,
            "parameterization": boot_info["parameterization"],
        }
        for key, _, objective in STUDENTS:
            start = time.perf_counter()
            summary = sid.run(sid.SiDRecipe(output=str(work / key), objective=objective, lr=args.sid_lr, **common))
            runs[key] = {"steps": summary["steps"], "seconds": time.perf_counter() - start, "lr": args.sid_lr}
        result["students"] = runs

        teacher = load_teacher(str(teacher_dir)).to(device)
        judge = Judge.load(shipped_teacher(CLASSIFIER_TEACHER), device=device)
        pipe = load_student_pipeline(work / "boot", device=device)
        pipe.set_progress_bar_config(disable=True)
        samplers = boot_samplers(pipe, teacher, refine=(1, 2), solvers=SOLVERS, prompts_for=prompts_for)
        for key, label, _ in STUDENTS:
            student = load_student_pipeline(work / key, device=device)
            student.set_progress_bar_config(disable=True)
            samplers.append(
                Sampler(key, label, "student", 1, 1, lambda eps, y, s=student: student_images(s, eps, y, prompts_for))
            )
        rows, _ = run_samplers(
            samplers,
            judge,
            sample_shape=tuple(teacher.sample_shape),
            num_classes=len(DIGIT_NAMES),
            eval_samples=args.samples,
            seed=args.seed,
            device=device,
        )
    for row in rows.values():
        print(json.dumps(row), flush=True)
    result.update(
        samples_per_sampler=args.samples,
        fid_features=judge.extractor.name,
        fid_reference=judge.real_description,
        solvers={name: solver_settings(name) for name in SOLVERS},
        rows=rows,
    )
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.markdown:
        print(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [
        f"Text-to-image MNIST teacher ({result['device']}, {result['date']}; students "
        f"{result['seconds_per_student']:.0f} s each from the caption prompts only; guidance "
        f"{result['guidance_scale']:g}; {result['samples_per_sampler']}"
        f' samples each, prompt "{result["prompt"]}", same latent noises; FID on LeNet-5 features vs 500 held-out '
        "digits):",
        "",
        "| sampler | UNet calls / image | FID (LeNet) | class agreement | ms / image |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in sorted(result["rows"].values(), key=lambda r: (r["unet_evaluations_per_image"], r["model"] != "student")):
        lines.append(
            f"| {r['sampler']} | {r['unet_evaluations_per_image']} | {r['fid_lenet']:.2f} | "
            f"{r['class_agreement']:.3f} | {r['seconds_per_image'] * 1e3:.2f} |"
        )
    runs = result["students"]
    lines += ["", "Student runs: " + ", ".join(f"{k} {v['steps']} iterations" for k, v in runs.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
