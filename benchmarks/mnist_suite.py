"""The MNIST benchmark report: BOOT against the teacher's own fast samplers, and every DFKD method (README table).

BOOT: the shipped class-conditional MNIST DDPM (``gendistill demo``'s teacher) and a BOOT student of it (``--boot
DIR``, e.g. a demo's ``boot/`` folder, or trained here with the demo's recipe at ``--budget``). On the same noises and
classes: the student in 1 step and with 1/2/4 teacher refinement steps; the teacher with diffusers' DDIM at 1/2/4/8/50
steps and DPM-Solver++ (2M) at 1/2/4/8 steps, all with the student's guidance scale. Reported per sampler: FID on
the penultimate features of the shipped LeNet-5 (trained on the MNIST subset's train split) against the 500
held-out digits, class agreement (the LeNet classifies the sample as the requested class), UNet evaluations and
wall time per image (batch 100). "Equal cost": for each DPM-Solver++ setting, the best BOOT setting with at most
as many UNet evaluations per image; the table says which wins.

SiD and DMD (``--distribution-seconds S``, 0 to skip; default: the BOOT student's training time when it is trained
here): one-step generators of the same teacher trained by ``gendistill sid`` for the same wall-clock each, from the
teacher (SiD, DMD) and from the BOOT student (SiD), with the BOOT recipe's batch size and guidance scale, judged on
the same noises as the rest ("SiD student, 1 step", ...).

DFKD: ``dfkd_mnist.py`` (every method, each under the same wall-clock budget) with ``--dfkd-seconds`` per method,
or the result file of an earlier ``dfkd_mnist.py`` run (``--dfkd-results``), included as is and named as such.

    python benchmarks/mnist_suite.py --out benchmarks/results/mnist_suite_<device>_<date>.json --markdown
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import diffusers
import torch

from gendistill.diffusion.sampling import solver_settings
from gendistill.diffusion.teacher import DiffusionTeacher
from gendistill.eval.compare import BATCH_SIZE, Judge, Sampler, boot_samplers, run_samplers
from gendistill.eval.report import device_description
from gendistill.eval.sources import load_student_pipeline
from gendistill.training import boot, sid
from gendistill.training.demo import BUDGETS, CLASSIFIER_TEACHER, DDPM_TEACHER, boot_recipe, shipped_teacher

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dfkd_mnist  # noqa: E402  (the sibling benchmark)

SOLVERS = {"ddim": (1, 2, 4, 8, 50), "dpmsolver++": (1, 2, 4, 8)}
REFINE = (1, 2, 4)
DFKD_SECONDS = {"small": 60.0, "full": 300.0}
# The distribution-matching students: (key, label, objective, start from the BOOT student).
DISTRIBUTION_STUDENTS = (
    ("sid", "SiD student, 1 step", "sid", False),
    ("dmd", "DMD student, 1 step", "dmd", False),
    ("sid_from_boot", "SiD from the BOOT student, 1 step", "sid", True),
)


def agreement_verdict(boot: float, dpm: float, samples: int) -> dict:
    """Which class agreement is higher, and whether the gap exceeds two standard errors of the difference of two
    binomial proportions over ``samples`` images each (otherwise the two are a tie within sampling noise)."""
    se = math.sqrt((boot * (1 - boot) + dpm * (1 - dpm)) / samples)
    winner = "BOOT" if boot > dpm else "DPM-Solver++" if dpm > boot else "tie"
    return {
        "boot": boot,
        "dpm_solver": dpm,
        "winner": winner,
        "standard_error": se,
        "significant": abs(boot - dpm) > 2 * se,
    }


def equal_cost(rows: dict[str, dict], samples: int) -> list[dict]:
    """For each DPM-Solver++ setting: the best BOOT setting (by FID) with at most its UNet evaluations per image,
    and which of the two wins on FID and on class agreement."""
    boot_rows = [r for key, r in rows.items() if key == "student" or key.startswith("student_refine")]
    verdicts = []
    for d in (r for r in rows.values() if r["sampler"].startswith("teacher, DPM-Solver++")):
        affordable = [b for b in boot_rows if b["unet_evaluations_per_image"] <= d["unet_evaluations_per_image"]]
        if not affordable:
            continue
        b = min(affordable, key=lambda r: r["fid_lenet"])
        verdicts.append(
            {
                "dpm_solver": d["sampler"],
                "dpm_solver_unet_evaluations": d["unet_evaluations_per_image"],
                "boot": b["sampler"],
                "boot_unet_evaluations": b["unet_evaluations_per_image"],
                "fid": {
                    "boot": b["fid_lenet"],
                    "dpm_solver": d["fid_lenet"],
                    "winner": "BOOT" if b["fid_lenet"] < d["fid_lenet"] else "DPM-Solver++",
                },
                "class_agreement": agreement_verdict(b["class_agreement"], d["class_agreement"], samples),
            }
        )
    return verdicts


def run_boot(args, device: torch.device, workdir: Path) -> dict:
    teacher_dir, judge_dir = shipped_teacher(DDPM_TEACHER), shipped_teacher(CLASSIFIER_TEACHER)
    student_dir, train_seconds = args.boot, None
    if student_dir is None:
        student_dir = workdir / "boot"
        budget = BUDGETS[args.budget]
        start = time.perf_counter()
        boot.run(boot_recipe(str(student_dir), str(teacher_dir), budget, seed=args.seed))
        train_seconds = time.perf_counter() - start
    pipe = load_student_pipeline(student_dir, teacher=teacher_dir, device=device)
    pipe.set_progress_bar_config(disable=True)
    teacher = DiffusionTeacher.from_pretrained(teacher_dir).to(device)
    judge = Judge.load(judge_dir, device=device)
    samplers = boot_samplers(pipe, teacher, refine=REFINE, solvers=SOLVERS)
    run = json.loads((Path(student_dir) / "gendistill_run.json").read_text())["recipe"]
    seconds = args.distribution_seconds if args.distribution_seconds is not None else train_seconds
    distribution = {}
    if seconds:
        for key, label, objective, from_boot in DISTRIBUTION_STUDENTS:
            folder = workdir / key
            start = time.perf_counter()
            summary = sid.run(
                sid.SiDRecipe(
                    output=str(folder),
                    teacher=str(teacher_dir),
                    objective=objective,
                    init=f"boot:{student_dir}" if from_boot else "teacher",
                    guidance_scale=float(pipe.config.guidance_scale),
                    batch_size=run["batch_size"],
                    lr=args.distribution_lr,
                    max_steps=10**9,
                    max_seconds=seconds,
                    eval_every=0,
                    sample_every=0,
                    checkpoint_every=0,
                    seed=args.seed,
                )
            )
            distribution[key] = {"steps": summary["steps"], "seconds": time.perf_counter() - start}
            student = load_student_pipeline(folder, device=device)
            student.set_progress_bar_config(disable=True)

            def fn(eps, y, student=student):
                return student(class_labels=y, latents=eps, output_type="pt").images

            samplers.append(Sampler(key, label, "student", 1, 1, fn))
    rows, _ = run_samplers(
        samplers,
        judge,
        sample_shape=tuple(pipe.sample_shape()),
        num_classes=len(pipe.valid_class_ids()),
        eval_samples=args.samples,
        seed=args.seed,
        device=device,
    )
    for row in rows.values():
        print(json.dumps(row), flush=True)
    return {
        "student": str(student_dir) if args.boot else f"trained here with the demo's {args.budget!r} recipe",
        "student_recipe": {k: run[k] for k in ("max_steps", "batch_size", "num_intervals", "lr", "seed")},
        "student_training_seconds": train_seconds,
        "distribution_students": {
            "seconds_each": seconds,
            "seconds_from": "the BOOT student's training time" if args.distribution_seconds is None else "given",
            "lr": args.distribution_lr,
            "batch_size": run["batch_size"],
            "runs": distribution,
        },
        "guidance_scale": float(pipe.config.guidance_scale),
        "samples_per_sampler": args.samples,
        "batch_size": BATCH_SIZE,
        "fid_features": judge.extractor.name,
        "fid_reference": judge.real_description,
        "solvers": {name: solver_settings(name) for name in SOLVERS},
        "rows": rows,
        "equal_cost": equal_cost(rows, args.samples),
    }


def markdown(result: dict) -> str:
    """README tables of a result."""
    b = result["boot"]
    lines = [
        f"BOOT vs the teacher's samplers ({result['device']}, {result['date']}; {b['samples_per_sampler']} samples "
        f"each, same noises; FID on LeNet-5 features vs 500 held-out digits):",
        "",
        "| sampler | UNet calls / image | FID (LeNet) | class agreement | ms / image |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in sorted(b["rows"].values(), key=lambda r: (r["unet_evaluations_per_image"], r["model"] != "student")):
        lines.append(
            f"| {r['sampler']} | {r['unet_evaluations_per_image']} | {r['fid_lenet']:.2f} | "
            f"{r['class_agreement']:.3f} | {r['seconds_per_image'] * 1e3:.2f} |"
        )
    lines += [
        "",
        "At equal cost (the best BOOT setting with at most as many UNet calls as each DPM-Solver++ setting):",
        "",
    ]
    for v in b["equal_cost"]:
        agree = v["class_agreement"]
        if agree["winner"] == "tie":
            agree_text = "equal"
        else:
            loser = "BOOT loses" if agree["winner"] == "DPM-Solver++" else "BOOT wins"
            noise = "" if agree["significant"] else ", within two standard errors: a tie within sampling noise"
            agree_text = f"**{loser}**{noise}"
        fid_text = "**BOOT wins**" if v["fid"]["winner"] == "BOOT" else "**BOOT loses**"
        calls = v["boot_unet_evaluations"]
        lines.append(
            f"- {v['dpm_solver']} ({v['dpm_solver_unet_evaluations']} UNet calls) vs {v['boot']} "
            f"({calls} call{'s' * (calls != 1)}): FID {v['fid']['dpm_solver']:.2f} vs {v['fid']['boot']:.2f} "
            f"({fid_text}); class agreement {agree['dpm_solver']:.3f} vs {agree['boot']:.3f} ({agree_text})"
        )
    dist = b.get("distribution_students") or {}
    if dist.get("runs"):
        rows, source = b["rows"], dist.get("seconds_from", "the BOOT student's training time")
        boot_fid, dpm2 = rows["student"]["fid_lenet"], rows.get("teacher_dpmsolverpp2", {}).get("fid_lenet")
        lines += [
            "",
            f"SiD and DMD students trained {dist['seconds_each']:.0f} s each ({source}; batch "
            f"{dist['batch_size']}, lr {dist['lr']:g}), one UNet call per image, against BOOT's one step "
            f"(FID {boot_fid:.2f})" + (f" and the teacher's 2-step DPM-Solver++ (FID {dpm2:.2f}):" if dpm2 else ":"),
            "",
        ]
        for key, run in dist["runs"].items():
            fid = rows[key]["fid_lenet"]
            beats = [name for name, ref in (("BOOT", boot_fid), ("DPM-Solver++ 2 steps", dpm2)) if ref and fid < ref]
            verdict = "beats " + " and ".join(beats) if beats else "beats neither"
            lines.append(
                f"- {rows[key]['sampler']}: {run['steps']} iterations, FID {fid:.2f}, class agreement "
                f"{rows[key]['class_agreement']:.3f} ({verdict})"
            )
    if result.get("dfkd"):
        d = result["dfkd"]
        lines += [
            "",
            f"DFKD on MNIST, {d['budget_seconds']:.0f} s of training per run ({d['device']}); teacher held-out "
            "accuracy: " + ", ".join(f"{k} {v['heldout_accuracy']:.3f}" for k, v in d["teachers"].items()),
            "",
            dfkd_mnist.markdown(d),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small", help="BOOT recipe and DFKD seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--boot", type=Path, default=None, help="an existing BOOT student folder of the shipped DDPM")
    parser.add_argument("--samples", type=int, default=1000, help="samples per sampler (balanced over the classes)")
    parser.add_argument("--dfkd-seconds", type=float, default=None, help="seconds per DFKD method (default: budget)")
    parser.add_argument("--skip-dfkd", action="store_true", help="BOOT part only")
    parser.add_argument(
        "--dfkd-results", type=Path, default=None, help="include this dfkd_mnist.py result JSON instead of re-running"
    )
    parser.add_argument(
        "--distribution-seconds",
        type=float,
        default=None,
        help="training seconds of each SiD/DMD student (0: none; default: the BOOT student's when trained here)",
    )
    parser.add_argument("--distribution-lr", type=float, default=1e-4, help="learning rate of the SiD/DMD runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--markdown", action="store_true", help="also print the README tables")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result = {
        "benchmark": "mnist_suite",
        "device": device_description(device),
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "budget": args.budget,
    }
    with tempfile.TemporaryDirectory() as tmp:
        result["boot"] = run_boot(args, device, Path(tmp))
    if args.dfkd_results is not None:
        result["dfkd"] = json.loads(args.dfkd_results.read_text())
        result["dfkd_source"] = f"{args.dfkd_results.name} (an earlier run of dfkd_mnist.py, included as is)"
    elif not args.skip_dfkd:
        seconds = args.dfkd_seconds if args.dfkd_seconds is not None else DFKD_SECONDS[args.budget]
        result["dfkd"] = dfkd_mnist.main(["--budget-seconds", str(seconds), "--seeds", str(args.seed)])
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.markdown:
        print(markdown(result))
    return result


if __name__ == "__main__":
    main()
