"""BOOT student parameterization, side by side (docs/boot.md, "The student"): "teacher" (output read as the teacher's
prediction type at x_T) vs "raw" (output is the signal y). Same teacher, seed, steps and batch for both; prints JSON
with the trajectory error at initialization and every `--eval-every` steps.

    python benchmarks/boot_parameterization.py --teacher gendistill-demo/teacher --steps 300 --out result.json
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

from gendistill.training.boot import BootRecipe, build_task
from gendistill.training.core import Trainer


def run_one(teacher: str, parameterization: str, args, workdir: Path) -> dict:
    recipe = BootRecipe(
        teacher=teacher,
        output=str(workdir / parameterization),
        parameterization=parameterization,
        max_steps=args.steps,
        batch_size=args.batch_size,
        num_intervals=args.num_intervals,
        lr=args.lr,
        eval_every=args.eval_every,
        checkpoint_every=0,
        sample_every=0,
        log_every=args.eval_every,
        seed=args.seed,
    )
    task = build_task(recipe)
    start = time.perf_counter()
    trainer = Trainer(task, recipe, command="boot")
    trainer.fit()
    seconds = time.perf_counter() - start
    trainer.end()
    rows = [
        json.loads(line) for line in (workdir / parameterization / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    curve = {r["step"]: r["trajectory_error"] for r in rows if "trajectory_error" in r}
    ema = {r["step"]: r["ema/trajectory_error"] for r in rows if "ema/trajectory_error" in r}
    return {"trajectory_error": curve, "ema_trajectory_error": ema, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-intervals", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({platform.processor() or 'x86_64'}, {torch.get_num_threads()} threads)"
    )
    result = {
        "benchmark": "boot_parameterization",
        "date": date.today().isoformat(),
        "device": device,
        "torch": torch.__version__,
        "teacher": args.teacher,
        "settings": vars(args),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for parameterization in ("teacher", "raw"):
            result[parameterization] = run_one(args.teacher, parameterization, args, Path(tmp))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
