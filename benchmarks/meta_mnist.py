"""BiDf-MKD against plain black-box KD into the same meta-learner, at equal wall-clock, on a CPU.

The APIs: five LeNet-5 classifiers, each trained by ``gendistill teach classifier`` on two classes of the MNIST
subset's training split, the ten classes being digits 0-4 upright and digits 0-4 turned 90 degrees (so the five
teachers hold disjoint classes and none has seen digits 5-9): {0, 1}, {2, 3}, {4, turned 0}, {turned 1, turned 2},
{turned 3, turned 4}. Each is read by ``gendistill meta`` only through its probabilities, every query counted.

The meta-learner (LeNet-5, 2-way) is judged on 2-way 1-shot episodes of the unseen digits 5-9 (all 500 images of
each in the MNIST subset; 15 query images per class), each adapted by 30 gradient steps of 0.1 (the command's
default), the same seeded episodes for both methods of a seed. For context the JSON also gives the randomly initialised
meta-learner under the same protocol and every model adapted by the training's inner loop alone (3 steps).

    python benchmarks/meta_mnist.py --seeds 0 1 2 --budget-seconds 90 --out benchmarks/results/meta_mnist_...json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch

from gendistill.data.classification import load_classification_data
from gendistill.data.mnist import load_mnist5k
from gendistill.dfkd.models import build_classifier, load_classifier
from gendistill.eval.report import device_description
from gendistill.meta.episodes import meta_test
from gendistill.training.meta import main as meta_main
from gendistill.training.teach_classifier import main as teach_main

PAIRS = [((0, 0), (1, 0)), ((2, 0), (3, 0)), ((4, 0), (0, 1)), ((1, 1), (2, 1)), ((3, 1), (4, 1))]  # (digit, turns)


def write_pairs(root: Path) -> list[Path]:
    """One .npz per teacher: its two classes of the training split (labels 0 and 1), 28x28 uint8."""
    images, labels = load_mnist5k("train")
    files = []
    for i, pair in enumerate(PAIRS):
        xs, ys = [], []
        for label, (digit, turns) in enumerate(pair):
            x = torch.rot90(images[labels == digit], turns, (2, 3))
            xs.append(x[:, 0].numpy())
            ys.append(np.full(len(x), label))
        path = root / f"pair{i}.npz"
        np.savez(path, images=np.concatenate(xs), labels=np.concatenate(ys))
        files.append(path)
    return files


def unseen_digits() -> list[torch.Tensor]:
    images, labels, _ = load_classification_data("mnist5k", split="all", image_size=32, channels=1)
    return [images[labels == d] for d in range(5, 10)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget-seconds", type=float, default=90.0)
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--methods", nargs="+", default=["bidf-mkd", "kd"])
    parser.add_argument("--options", default=None, help="--method-options for bidf-mkd (key=value,...)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="meta_mnist_"))
    teachers, teacher_accuracy = [], []
    for i, data in enumerate(write_pairs(root)):
        folder = root / f"api{i}"
        teach_main(["--data", str(data), "--arch", "lenet5", "--max-steps", str(args.teacher_steps), "--output",
                    str(folder), "--checkpoint-every", "0", "--eval-every", "0"])  # fmt: skip
        teachers.append(str(folder))
        teacher_accuracy.append(json.loads((folder / "results.json").read_text())["heldout_accuracy"])
    classes = unseen_digits()
    rows = []
    for seed in args.seeds:
        torch.manual_seed(seed)  # the command's initialisation of the meta-learner, before any training
        first = load_classifier(teachers[0]).config
        init = build_classifier("lenet5", num_classes=2, in_channels=1, mean=first.mean, std=first.std)
        protocol = {"ways": 2, "shots": 1, "queries": 15, "episodes": args.episodes, "lr": 0.1, "seed": seed}
        row = {"seed": seed, "random_init": meta_test(init, classes, steps=30, **protocol)["accuracy"],
               "random_init_3_steps": meta_test(init, classes, steps=3, **protocol)["accuracy"]}  # fmt: skip
        for method in args.methods:
            out = root / f"{method}_{seed}"
            extra = ["--method-options", args.options] if args.options and method == "bidf-mkd" else []
            meta_main(["--teachers", ",".join(teachers), "--method", method, "--meta-test", "mnist5k",
                       "--meta-test-classes", "5,6,7,8,9", "--test-episodes", str(args.episodes), "--seed", str(seed),
                       "--max-steps", "1000000", "--max-seconds", str(args.budget_seconds), "--eval-every", "0",
                       "--checkpoint-every", "0", "--output", str(out), *extra])  # fmt: skip
            result = json.loads((out / "results.json").read_text())
            model = load_classifier(out)
            row[method] = {
                "accuracy": result["meta_test_accuracy"],
                "ci95": result["meta_test_ci95"],
                "accuracy_3_steps": meta_test(model, classes, steps=3, **protocol)["accuracy"],
                "iterations": result["steps"],
                "teacher_queries": result["teacher_queries"],
            }
        if {"bidf-mkd", "kd"} <= set(args.methods):
            row["bidf_minus_kd_points"] = 100 * (row["bidf-mkd"]["accuracy"] - row["kd"]["accuracy"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {
        "benchmark": "meta_mnist",
        "date": date.today().isoformat(),
        "device": device_description("cpu"),
        "budget_seconds": args.budget_seconds,
        "teachers": [f"{p[0]}/{p[1]} (digit, quarter turns)" for p in PAIRS],
        "teacher_heldout_accuracy": teacher_accuracy,
        "protocol": "2-way 1-shot, 15 queries per class, digits 5-9, adapted 30 steps of 0.1 (context: 3, the inner "
        "loop's)",
        "options": args.options,
        "rows": rows,
    }
    if all("bidf_minus_kd_points" in r for r in rows):
        summary["target_bidf_beats_kd_by_5_points_every_seed"] = all(r["bidf_minus_kd_points"] >= 5 for r in rows)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
