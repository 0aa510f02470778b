"""DFKD training throughput: CIFAR-sized ResNet-34 teacher -> ResNet-18 student at 32x32, through the real training
core, side by side for the generator methods (the DFKD throughput target).

One iteration of ``dfq`` is 1 generator step + 5 student steps (the naive H100 reference: about 10k synthetic
images/s at batch 256, bf16); ``fast`` is 1 meta step of ``g_steps`` inner steps + 5 student steps; ``dfad`` is 5
student steps + 1 generator step. Networks are randomly initialized (the cost of a trained one); the teacher's BN
statistics come from a few forwards of random images. Reported per method: iterations/s, student images/s
(``student_steps * batch`` per iteration) and generator images/s, over the iterations after ``--warmup``, and peak
CUDA memory.

    python benchmarks/dfkd_throughput.py --out benchmarks/results/dfkd_throughput_<device>_<date>.json   # GPU
    python benchmarks/dfkd_throughput.py --tiny                                                           # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from datetime import date
from pathlib import Path

import torch

from gendistill.dfkd.models import build_classifier
from gendistill.training.core import logged_values
from gendistill.training.dfkd import DFKDRecipe, build_task, run

VARIANTS = {"naive": False, "fused": True}  # the recipe's fused_kernels flag (the one-pass BN-statistics kernel)


def measure(method: str, args, workdir: Path, variant: str = "fused") -> dict:
    torch.manual_seed(0)
    teacher = build_classifier(args.teacher, num_classes=10, in_channels=3, image_size=32)
    teacher.train()
    with torch.no_grad():  # non-trivial BN running statistics
        for _ in range(3):
            teacher(torch.rand(32, 3, 32, 32))
    teacher.eval()
    student = build_classifier(args.student, num_classes=10, in_channels=3, image_size=32)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher.to(device)
    recipe = DFKDRecipe(
        output=str(workdir / f"{method}_{variant}"),
        method=method,
        fused_kernels=VARIANTS[variant],
        max_steps=args.warmup + args.iterations,
        batch_size=args.batch_size,
        mixed_precision=args.mixed_precision,
        eval_every=0,
        sample_every=0,
        checkpoint_every=0,
        log_every=1,
        method_options=list(args.common) or None,
    )
    recipe.validate()
    task = build_task(teacher, student, method, options=recipe.options())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run(recipe, task)
    elapsed = logged_values(workdir / f"{method}_{variant}", "elapsed_s")
    seconds = elapsed[-1] - elapsed[args.warmup - 1]
    phases = {p.name: p.steps for p in task.synthesizer.phases()}
    per_s = args.iterations / seconds
    return {
        "method": method,
        "variant": variant,
        "student_steps_per_iteration": phases.get("student", 0),
        "generator_steps_per_iteration": phases.get("generator", 0),
        "iterations_per_s": per_s,
        "student_images_per_s": per_s * phases.get("student", 0) * args.batch_size,
        "generator_images_per_s": per_s * phases.get("generator", 0) * args.batch_size,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["dfq", "fast", "dfad"])
    parser.add_argument("--teacher", default="resnet34")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=30, help="measured iterations per method")
    parser.add_argument("--warmup", type=int, default=5, help="iterations before measuring (compilation, caches)")
    parser.add_argument("--mixed-precision", default="auto", help="auto (bf16 on CUDA) | no | bf16 | fp16")
    parser.add_argument("--common", nargs="*", default=[], help="key=value options for every method")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: WRN-16-1 -> LeNet-5-half, batch 8")
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="naive and/or fused kernels"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.teacher, args.student, args.batch_size, args.iterations, args.warmup = "wrn16_1", "lenet5_half", 8, 3, 1
        args.common = ["ngf=8", "nz=16"]
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for method in args.methods:
            for variant in args.variants:
                rows.append(measure(method, args, Path(tmp), variant))
                print(json.dumps(rows[-1]), flush=True)
    result = {
        "benchmark": "dfkd_throughput",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "teacher": args.teacher,
        "student": args.student,
        "batch_size": args.batch_size,
        "mixed_precision": args.mixed_precision,
        "iterations": args.iterations,
        "tiny": args.tiny,
        "reference": "naive H100: about 10k synthetic images/s, 1 generator step + 5 student steps, batch 256, bf16",
        "methods": rows,
        "fused_over_naive": {
            m: by["fused"]["student_images_per_s"] / by["naive"]["student_images_per_s"]
            for m in args.methods
            if len(by := {r["variant"]: r for r in rows if r["method"] == m}) == 2
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
