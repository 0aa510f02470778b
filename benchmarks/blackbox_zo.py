"""How close the zero-order gradient through a probability-only teacher comes to the true gradient, against the
number of queries.

Teacher: the shipped LeNet-5-BN (MNIST), wrapped by ``BlackBoxTeacher`` (probabilities only). Loss: the per-image
cross-entropy of the answers against a target class (the next digit, so the gradient is not near zero). Images:
held-out MNIST digits and DeepInversion's starting point (0.5 + 0.25 N(0, 1) pixels, clamped), 20 each. The true
gradient comes from autograd on the same teacher; the estimate from ``zero_order_grad`` (antithetic Gaussian
directions, sigma 1e-3). Reported: mean cosine similarity per image and the queries per image (2 per direction).

    python benchmarks/blackbox_zo.py --out benchmarks/results/blackbox_zo_cpu_DATE.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gendistill.data.mnist import load_mnist5k
from gendistill.dfkd.blackbox import BlackBoxTeacher, zero_order_grad
from gendistill.dfkd.models import load_classifier
from gendistill.training.demo import CLASSIFIER_TEACHER, shipped_teacher


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--directions", nargs="+", type=int, default=[16, 64, 256, 1024, 2048])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--sigma", type=float, default=1e-3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = load_classifier(shipped_teacher(CLASSIFIER_TEACHER)).eval()
    images, labels = load_mnist5k("test")
    step = len(labels) // args.images
    digits = F.pad(images[::step][: args.images].float() / 255.0, (2, 2, 2, 2))
    target = (labels[::step][: args.images] + 1) % 10
    noise = (0.5 + 0.25 * torch.randn(args.images, 1, 32, 32)).clamp(0, 1)
    rows = []
    for name, x in (("heldout digits", digits), ("inversion start (noise)", noise)):
        xg = x.clone().requires_grad_()
        (true,) = torch.autograd.grad(F.cross_entropy(model(xg), target, reduction="sum"), xg)
        teacher = BlackBoxTeacher(model)

        def loss(batch, teacher=teacher):
            probs = teacher(batch)
            repeat = batch.shape[0] // len(target)
            return -torch.log(probs.gather(1, target.repeat(repeat).unsqueeze(1)).squeeze(1).clamp_min(1e-30))

        for q in args.directions:
            teacher.queries = 0
            tic = time.perf_counter()
            g = zero_order_grad(loss, x, directions=q, sigma=args.sigma, generator=torch.Generator().manual_seed(1))
            cos = F.cosine_similarity(g.flatten(1), true.flatten(1))
            rows.append({
                "images": name, "directions": q, "queries_per_image": teacher.queries // len(x),
                "mean_cosine": round(float(cos.mean()), 4), "min_cosine": round(float(cos.min()), 4),
                "seconds": round(time.perf_counter() - tic, 2),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    out = {
        "benchmark": "blackbox_zo",
        "device": f"cpu: {platform.machine()}, {torch.get_num_threads()} threads",
        "date": datetime.date.today().isoformat(),
        "teacher": "shipped LeNet-5-BN (probabilities only)",
        "pixels_per_image": 32 * 32,
        "sigma": args.sigma,
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
