"""The evaluation and report of ``gendistill demo`` (the folder layout written by ``gendistill.training.demo``).

BOOT (see ``compare``): the teacher's 50-step DDIM, its 1-step DDIM, its K-step DDIM on the BOOT grid and the
student (1 step, and with 1 or 2 teacher refinement steps), all from the same noises and classes. The judge of
class agreement, and the feature extractor of the FID, is the LeNet-5 teacher of the DFKD half: trained on the real
train split, never on generated images; the FID reference is the 500 held-out real digits. Seconds per image are
wall time of batched sampling (batch 100) on the evaluation device; the latency rows time one image (batch 1).

DFKD: held-out accuracy (500 real digits the teacher never saw) of the teacher and the data-free student, their
agreement, and the student's accuracy against wall-clock time during distillation (from the run's log).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import torch

from gendistill.data.classification import load_classification_data
from gendistill.dfkd.models import load_classifier
from gendistill.diffusion.sampling import solver_settings
from gendistill.diffusion.teacher import DiffusionTeacher

from .classifier import agreement, plot_accuracy_vs_time, time_to_accuracy, topk_accuracy
from .compare import (
    BATCH_SIZE,
    Judge,
    Sampler,
    boot_samplers,
    class_rows,
    noise_batches,
    run_samplers,
    student_images,
)
from .report import Report, device_description
from .sources import load_student_pipeline
from .speed import measure

TEACHER_STEPS = 50  # the reference: the teacher's 50-step DDIM
AGREEMENT_TARGET, ACCURACY_TARGET = 0.80, 0.97  # the demo's promises, as fractions of the teacher's number


def _row(what: str, teacher: str, student: str, ratio: str | float = "", target: float | None = None) -> dict:
    """One summary row; with a ``target``, ``ratio`` is the fraction (student/teacher) that must reach it."""
    row = {"": what, "teacher": teacher, "student": student, "student/teacher": ratio, "target": "", "met": ""}
    if target is not None:
        row |= {
            "student/teacher": f"{ratio:.1%}",
            "target": f">= {target:.0%}",
            "met": "yes" if ratio >= target else "NO",
        }
    return row


def evaluate_boot(report: Report, folder: Path, device: torch.device, eval_samples: int, seed: int) -> dict:
    boot_dir = folder / "boot"
    pipe = load_student_pipeline(boot_dir, device=device)
    pipe.set_progress_bar_config(disable=True)
    teacher = DiffusionTeacher.from_pretrained(folder / "teachers" / "mnist_ddpm").to(device)
    judge = Judge.load(folder / "teachers" / "mnist_lenet5_bn", device=device)
    num_classes, shape = len(pipe.valid_class_ids()), tuple(pipe.sample_shape())
    samplers = boot_samplers(
        pipe, teacher, refine=(1, 2), solvers={"ddim": (TEACHER_STEPS, 1)}, boot_grid_teacher=True
    )
    sid_dir = folder / "sid"
    if (sid_dir / "model_index.json").is_file():  # the demo's SiD stage ran (it is skipped with --sid-steps 0)
        sid_pipe = load_student_pipeline(sid_dir, device=device)
        sid_pipe.set_progress_bar_config(disable=True)
        label = "SiD student, 1 step"
        samplers.append(Sampler("sid", label, "student", 1, 1, lambda eps, y: student_images(sid_pipe, eps, y)))
    results, grids = run_samplers(
        samplers,
        judge,
        sample_shape=shape,
        num_classes=num_classes,
        eval_samples=eval_samples,
        seed=seed,
        device=device,
    )
    teacher_key = f"teacher_ddim{TEACHER_STEPS}"

    # Latency of one image: the student's one step against the teacher's 50-step DDIM.
    eps1, y1 = next(noise_batches(1, shape, seed, device, num_classes))
    by_key = {s.key: s for s in samplers}
    latency = {
        key: statistics.median(measure(lambda k=key: by_key[k].fn(eps1, y1), device=device, warmup=1, repeats=5))
        for key in (teacher_key, "student")
    }

    # Pictures first: same noises across samplers, then per-class grids.
    per = min(10, eval_samples // num_classes)
    if per >= 1:
        order = [teacher_key, "teacher_ddim1", "student", "student_refine2", *(["sid"] if "sid" in grids else [])]
        first = torch.cat([grids[k][:num_classes] for k in order])
        report.add_grid(
            "teacher_vs_student",
            first,
            caption="same noises and classes (columns 0..9); rows: " + "; ".join(results[k]["sampler"] for k in order),
            nrow=num_classes,
        )
        for key, name in ((teacher_key, "teacher"), ("student", "student")):
            report.add_grid(
                f"per_class_{name}",
                class_rows(grids[key], num_classes, per),
                caption=f"{results[key]['sampler']}: one row per class 0..9, {per} samples each "
                "(the same noises in both grids)",
                nrow=per,
            )
    series = {}
    groups = (
        ("teacher, DDIM", lambda key, r: r["model"] == "teacher"),
        ("BOOT student (+ refinement steps)", lambda key, r: r["model"] == "student" and key != "sid"),
        ("SiD student", lambda key, r: key == "sid"),
    )
    for name, member in groups:
        points = sorted((r["seconds_per_image"] * 1e3, r["fid_lenet"]) for k, r in results.items() if member(k, r))
        if points:
            series[name] = ([p[0] for p in points], [p[1] for p in points])
    report.add_plot(
        "quality_vs_time",
        series,
        "FID (LeNet features, lower is better) against milliseconds per image (batched sampling on this device): "
        "the teacher's DDIM at 1, K and 50 steps; the BOOT student at 1 step and with 1 and 2 teacher refinement "
        "steps; the SiD student's one step",
        xlabel="ms per image",
        ylabel="FID",
        logx=True,
    )
    sample_settings = {
        "samples": eval_samples,
        "batch_size": BATCH_SIZE,
        "seed": seed,
        "classes": "sample i has class i % 10",
        "noise": "batch i from torch.Generator().manual_seed(seed + i), shared by every sampler",
        "guidance_scale": float(pipe.config.guidance_scale),
        "judge": str(judge.folder),
        "fid_features": judge.extractor.name,
        "fid_reference": f"{judge.real_description}, 28x28 zero-padded to {judge.image_size}x{judge.image_size}",
        "ddim": solver_settings("ddim"),
    }
    for key, result in results.items():
        report.add_metric(f"boot/{key}", result, **sample_settings)
    report.add_metric(
        "boot/latency_batch1_s", latency, repeats=5, warmup=1, statistic="median", device=device_description(device)
    )
    report.add_table(
        "BOOT: every sampler from the same noises",
        [
            {
                "sampler": r["sampler"],
                "steps": r["steps"],
                "UNet calls / image": r["unet_evaluations_per_image"],
                "class agreement": r["class_agreement"],
                "FID (LeNet features)": r["fid_lenet"],
                "ms / image": r["seconds_per_image"] * 1e3,
            }
            for r in results.values()
        ],
    )
    report.add_training_curves(boot_dir, prefix="boot_")
    return {"results": results, "latency": latency, "teacher_key": teacher_key}


def evaluate_dfkd(report: Report, folder: Path, device: torch.device) -> dict:
    dfkd_dir, teacher_dir = folder / "dfkd", folder / "teachers" / "mnist_lenet5_bn"
    student, teacher = load_classifier(dfkd_dir).to(device), load_classifier(teacher_dir).to(device)
    images, labels, _ = load_classification_data(
        "mnist5k", split="test", image_size=teacher.config.image_size, channels=teacher.config.in_channels
    )
    models = {"teacher": teacher, "student": student}
    acc = {name: topk_accuracy(m, images, labels, topk=(1,))["top1"] for name, m in models.items()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    batch, throughput = images[:256].to(device), {}
    for name, model in models.items():
        with torch.no_grad():
            times = measure(lambda m=model: m(batch), device=device, warmup=2, repeats=10)
        throughput[name] = len(batch) / statistics.median(times)
    rows = report.run_log(dfkd_dir)
    timing = time_to_accuracy(rows)
    recipe = json.loads((dfkd_dir / "gendistill_run.json").read_text(encoding="utf-8"))["recipe"]
    result = {
        "teacher_accuracy": acc["teacher"],
        "student_accuracy": acc["student"],
        "accuracy_ratio": acc["student"] / acc["teacher"],
        "agreement": agreement(student, teacher, images),
        "parameters": params,
        "images_per_s_batch256": throughput,
        "distillation_seconds": max((r["elapsed_s"] for r in rows if "elapsed_s" in r), default=None),
        "seconds_to_teacher_fraction": timing.get("seconds_to_reach"),
    }
    settings = {
        "data": f"mnist5k held-out split ({len(labels)} digits, never seen by the teacher)",
        "method": recipe["method"],
        "student_arch": recipe["student_arch"],
        "iterations": recipe["max_steps"],
        "batch_size": recipe["batch_size"],
    }
    report.add_metric("dfkd", result, **settings)
    if timing:
        caption = "DFKD: held-out accuracy of the student during distillation against wall-clock time"
        plot_accuracy_vs_time(
            report, timing, "dfkd_accuracy_vs_time", caption, student="student (EMA)", fractions=(ACCURACY_TARGET,)
        )
    report.add_training_curves(dfkd_dir, prefix="dfkd_")
    return result


def evaluate_demo(folder: str | os.PathLike, *, device: torch.device, eval_samples: int, seed: int) -> list[dict]:
    """Write ``folder/report`` (report.md, metrics.json, PNGs) and return the summary rows for the terminal."""
    folder = Path(folder)
    report = Report(folder / "report", title="gendistill demo (MNIST)", command="demo", device=device)
    boot = evaluate_boot(report, folder, device, eval_samples, seed)
    dfkd = evaluate_dfkd(report, folder, device)
    r = boot["results"]
    teacher50, student = r[boot["teacher_key"]], r["student"]
    agree_ratio = student["class_agreement"] / teacher50["class_agreement"] if teacher50["class_agreement"] else 0.0
    speedup = boot["latency"][boot["teacher_key"]] / boot["latency"]["student"]
    batched = teacher50["seconds_per_image"] / student["seconds_per_image"]
    rows = [
        _row(
            "BOOT class agreement (teacher: DDIM 50 steps; student: 1 step)",
            f"{teacher50['class_agreement']:.3f}",
            f"{student['class_agreement']:.3f}",
            agree_ratio,
            AGREEMENT_TARGET,
        ),
        _row(
            "BOOT FID, LeNet features (lower is better)",
            f"{teacher50['fid_lenet']:.2f}",
            f"{student['fid_lenet']:.2f}",
        ),
        *(
            [
                _row(
                    "SiD FID, LeNet features (teacher: DDIM 50 steps; student: 1 step)",
                    f"{teacher50['fid_lenet']:.2f}",
                    f"{r['sid']['fid_lenet']:.2f}",
                )
            ]
            if "sid" in r
            else []
        ),
        _row(
            "BOOT time per image, batch 1",
            f"{boot['latency'][boot['teacher_key']] * 1e3:.1f} ms",
            f"{boot['latency']['student'] * 1e3:.2f} ms",
            f"{speedup:.0f}x faster",
        ),
        _row(
            f"BOOT time per image, batch {min(BATCH_SIZE, eval_samples)}",
            f"{teacher50['seconds_per_image'] * 1e3:.2f} ms",
            f"{student['seconds_per_image'] * 1e3:.3f} ms",
            f"{batched:.0f}x faster",
        ),
        _row(
            "DFKD held-out accuracy (LeNet-5 -> LeNet-5-half, no data)",
            f"{dfkd['teacher_accuracy']:.3f}",
            f"{dfkd['student_accuracy']:.3f}",
            dfkd["accuracy_ratio"],
            ACCURACY_TARGET,
        ),
        _row(
            "DFKD parameters",
            f"{dfkd['parameters']['teacher']:,}",
            f"{dfkd['parameters']['student']:,}",
            f"{dfkd['parameters']['student'] / dfkd['parameters']['teacher']:.0%}",
        ),
    ]
    report.add_metric(
        "summary",
        {
            "boot_agreement_ratio": agree_ratio,
            "boot_speedup_batch1": speedup,
            "boot_speedup_batched": batched,
            "dfkd_accuracy_ratio": dfkd["accuracy_ratio"],
        },
        agreement_target=AGREEMENT_TARGET,
        accuracy_target=ACCURACY_TARGET,
    )
    report.add_table("Summary", rows, lead=True)
    report.add_note(__doc__.split("\n\n", 1)[1].replace("\n", " "))
    report.save()
    (folder / "report" / "summary.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return rows
