"""``gendistill eval fid`` and ``gendistill eval kid``: quality of generated images against real ones.

``--fake`` and ``--real`` each take a BOOT student folder (sampled in batches straight into the metric), a folder of
images, or a statistics ``.npz`` written by an earlier run. With a student folder, the report also holds sample
grids, teacher-vs-student images for the same noises and the trajectory error (when the folder carries its teacher
or ``--teacher`` names one), class agreement of an independent classifier (``--classifier``), FID against
``--refine-steps`` (quality vs steps and vs time per image) and the training curves of the run that wrote it.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from gendistill.dfkd.models import load_classifier
from gendistill.errors import UsageError, as_usage_errors

from . import sources
from .features import ModuleFeatures, load_feature_extractor
from .fid import KID_SUBSET_SIZE, KID_SUBSETS, FeatureStats, compute_stats, frechet_distance, kernel_inception_distance
from .report import Report, check_report_folder

GRID_SIZE = 64
KID_SETTINGS = {"kernel": "(x.y/d + 1)^3", "estimator": "unbiased MMD^2, mean/std over subsets"}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def _refine_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    for v in values:
        if v != "K" and not v.isdigit():
            raise argparse.ArgumentTypeError(f"refine steps are integers or K (the teacher alone), got {v!r}")
    return values


def build_parser(prog: str, *, kid: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--fake", required=True, help="BOOT student folder, image folder or statistics .npz")
    parser.add_argument(
        "--real", required=True, help="image folder or statistics .npz (written by an earlier run: real_stats.npz)"
    )
    parser.add_argument("--output", default="eval-" + ("kid" if kid else "fid"), help="report folder")
    parser.add_argument("--num-samples", type=int, default=10000, help="samples drawn from a student (default 10000)")
    parser.add_argument("--num-real", type=int, default=None, help="use only the first N real images (sorted)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed: batch i uses seed + i (default 0)")
    parser.add_argument("--class-labels", type=_int_list, default=None, help="classes to sample, cycled (default all)")
    parser.add_argument("--prompts", default=None, help="text-to-image students: a prompts file (one per line)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="guidance-range text students only")
    parser.add_argument(
        "--refine-steps",
        type=_refine_list,
        default=["0"],
        help="comma-separated teacher steps after the student's jump, e.g. 0,1,2,K (K: the teacher's own K-step\n"
        "DDIM); one FID per value and quality-vs-steps/time plots (default 0)",
    )
    parser.add_argument("--teacher", default=None, help="teacher pipeline folder, if the student was saved without it")
    parser.add_argument("--classifier", default=None, help="classifier folder: class agreement of the samples")
    parser.add_argument(
        "--feature-extractor",
        default="inception",
        help="'inception' (the FID Inception-v3) or a classifier folder (its penultimate features)",
    )
    parser.add_argument("--inception-weights", default=None, help="local FID Inception weights (.pth/.safetensors)")
    parser.add_argument("--check-sha256", action="store_true", help="refuse Inception weights other than the official")
    parser.add_argument("--save-real-stats", default=None, help="also write the real statistics to this .npz")
    parser.add_argument("--trajectory-samples", type=int, default=64, help="noises for the trajectory error")
    parser.add_argument("--device", default=default_device(), help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions on CUDA (recorded)")
    if kid:
        parser.add_argument("--kid-subsets", type=int, default=KID_SUBSETS, help="KID subsets (default 100)")
        parser.add_argument("--kid-subset-size", type=int, default=KID_SUBSET_SIZE, help="KID subset size")
    return parser


def _kind(path: str) -> str:
    p = Path(path)
    if p.suffix == ".npz":
        return "stats"
    if (p / "model_index.json").is_file():
        return "pipeline"
    if p.is_dir():
        return "folder"
    raise FileNotFoundError(f"{path!r} is neither a statistics .npz, a BOOT student folder nor a folder of images")


class _Grid(list):
    """Keeps the first GRID_SIZE images that stream past (``torch.cat`` it for the grid)."""

    def __call__(self, images: torch.Tensor) -> None:
        kept = sum(len(x) for x in self)
        if kept < GRID_SIZE:
            self.append(images[: GRID_SIZE - kept].cpu())


def _stats_of_source(path, kind, extractor, args, *, keep, grid=None, limit=None) -> FeatureStats:
    if kind == "stats":
        stats = FeatureStats.load(path)
        if stats.extractor != extractor.name:
            raise UsageError(
                f"{path} was computed with {stats.extractor!r}, not with this run's {extractor.name!r}; "
                "recompute it from the images with the same feature extractor"
            )
        if keep and stats.features is None:
            raise UsageError(f"{path} holds no features; KID needs the images or a file saved by gendistill eval kid")
        return stats
    batches = sources.iter_image_folder(path, batch_size=args.batch_size, limit=limit)
    return compute_stats(batches, extractor, device=args.device, keep_features=keep, on_batch=grid)


def _classifier(path: str) -> ModuleFeatures:
    model = load_classifier(path)
    config = model.config
    return ModuleFeatures(model, name=f"classifier {config.arch}", channels=config.in_channels, size=config.image_size)


def _sample_pipeline(pipe, settings, extractor, args, *, keep, classifier, desc):
    """Stream samples into the feature statistics; returns stats, grid, seconds per image, class agreement."""
    grid, timing = _Grid(), {}
    correct = [0, 0]

    def batches():
        for images, labels in sources.iter_pipeline(pipe, settings, desc=desc, timing=timing):
            grid(images)
            if classifier is not None and labels is not None:
                predicted = classifier(images.to(args.device)).argmax(1).cpu()
                correct[0] += int((predicted == torch.tensor(labels)).sum())
                correct[1] += len(labels)
            yield images

    stats = compute_stats(batches(), extractor, device=args.device, keep_features=keep)
    agreement = correct[0] / correct[1] if correct[1] else None
    return stats, torch.cat(grid), timing["seconds"] / settings.num_samples, agreement


@torch.no_grad()
def _teacher_vs_student(pipe, settings, args, report: Report) -> None:
    """Same noises through the student (one step) and the teacher (K-step DDIM): grid + trajectory error."""
    k = sources.num_intervals(pipe)
    n = min(args.trajectory_samples, settings.num_samples)
    outputs = {}
    for name, refine in (("student", 0), ("teacher", k)):
        one = sources.SampleSettings(**{**settings.__dict__, "num_samples": n, "refine_steps": refine})
        outputs[name] = torch.cat([x for x, _ in sources.iter_pipeline(pipe, one, progress=False)])
    rows = min(n, 8)
    report.add_grid(
        "teacher_vs_student",
        torch.cat([outputs["teacher"][:rows], outputs["student"][:rows]]),
        f"top: teacher ({k}-step DDIM), bottom: student (one step), same noises",
        nrow=rows,
    )
    error = torch.mean((2 * outputs["student"] - 2 * outputs["teacher"]) ** 2).item()
    report.add_metric(
        "trajectory_error",
        error,
        definition=f"MSE of one-step student vs {k}-step teacher DDIM, images in [-1, 1] (clamped), same noises",
        num_samples=n,
        seed=settings.seed,
    )


def run(args: argparse.Namespace, *, kid: bool) -> dict:
    command = "eval kid" if kid else "eval fid"
    fake_kind, real_kind = _kind(args.fake), _kind(args.real)
    if real_kind == "pipeline":
        raise UsageError(f"--real {args.real!r} is a pipeline folder; give real images or their statistics .npz")
    for name in ("num_samples", "batch_size", "trajectory_samples"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.num_real is not None and args.num_real < 2:
        raise UsageError(f"--num-real must be at least 2, got {args.num_real}")
    if fake_kind != "pipeline" and args.refine_steps != ["0"]:
        raise UsageError("--refine-steps applies to a BOOT student folder given as --fake")
    check_report_folder(args.output)  # refuse a folder we may not write before loading or sampling anything
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    pipe = None
    if fake_kind == "pipeline":  # load and check before the (long) real statistics
        from gendistill.data.prompts import load_prompts

        pipe = sources.load_student_pipeline(args.fake, teacher=args.teacher, device=device)
        k = sources.num_intervals(pipe)
        refine = sorted({k if v == "K" else int(v) for v in args.refine_steps})
        for value in refine:
            with as_usage_errors():
                pipe._check_refine_steps(value)
        base = sources.SampleSettings(
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            seed=args.seed,
            class_labels=args.class_labels,
            prompts=None if args.prompts is None else load_prompts(args.prompts),
            guidance_scale=args.guidance_scale,
        )
        sources.check_sample_settings(pipe, base)
    elif args.teacher or args.classifier:
        raise UsageError("--teacher and --classifier apply to a BOOT student folder given as --fake")
    classifier = _classifier(args.classifier).to(device) if args.classifier else None
    extractor = load_feature_extractor(
        args.feature_extractor, inception_weights=args.inception_weights, check_sha256=args.check_sha256
    ).to(device)
    report = Report(args.output, title=f"gendistill {command}: {Path(args.fake).name}", command=command, device=device)
    common = {
        "feature_extractor": extractor.name,
        "resize": extractor.resize,
        "precision": "float32" + (" (TF32 allowed)" if device.type == "cuda" and args.tf32 else ""),
        "real": str(args.real),
        "fake": str(args.fake),
    }

    real_grid = _Grid() if real_kind == "folder" else None
    real = _stats_of_source(args.real, real_kind, extractor, args, keep=kid, grid=real_grid, limit=args.num_real)
    real.save(report.output / "real_stats.npz")
    if args.save_real_stats:
        real.save(args.save_real_stats)
    common["num_real"] = real.count

    results = []  # (label, refine steps, stats, seconds per image, agreement)
    if pipe is None:
        fake_grid = _Grid() if fake_kind == "folder" else None
        fake = _stats_of_source(args.fake, fake_kind, extractor, args, keep=kid, grid=fake_grid)
        results.append(("fake", None, fake, None, None))
        if fake_grid is not None:
            report.add_grid("fake_samples", torch.cat(fake_grid), f"fake images ({args.fake})")
    else:
        for value in refine:
            settings = sources.SampleSettings(**{**base.__dict__, "refine_steps": value})
            label = "teacher" if value == k else ("student" if value == 0 else f"student+{value}")
            stats, grid, seconds, agreement = _sample_pipeline(
                pipe, settings, extractor, args, keep=kid, classifier=classifier, desc=f"{label} samples"
            )
            results.append((label, settings, stats, seconds, agreement))
            report.add_grid(
                f"samples_{label.replace('+', '_refine')}",
                grid,
                f"{label} samples (refine_steps={value}, seed {args.seed})",
            )
        if pipe.teacher_unet is not None:
            _teacher_vs_student(pipe, base, args, report)
    if real_grid is not None:
        report.add_grid("real_samples", torch.cat(real_grid), f"real images ({args.real})")

    rows = []
    for label, settings, stats, seconds, agreement in results:
        suffix = "" if len(results) == 1 else f"@{label}"
        sampling = settings.as_dict() if settings is not None else {}
        fid = frechet_distance(stats, real)
        report.add_metric("fid" + suffix, fid, **common, num_fake=stats.count, **sampling)
        row = {"samples": label, "refine_steps": sampling.get("refine_steps", "-"), "fid": fid}
        if kid:
            value = kernel_inception_distance(
                stats, real, subsets=args.kid_subsets, subset_size=args.kid_subset_size, seed=args.seed
            )
            report.add_metric("kid" + suffix, value, **common, num_fake=stats.count, **KID_SETTINGS, **sampling)
            row["kid"] = value["mean"]
        if seconds is not None:
            report.add_metric("seconds_per_image" + suffix, seconds, device=report.device, **sampling)
            row["s/image"] = seconds
        if agreement is not None:
            report.add_metric("class_agreement" + suffix, agreement, classifier=args.classifier, **sampling)
            row["class agreement"] = agreement
        rows.append(row)
    report.add_table("Results", rows)
    if len(results) > 1:
        fids, steps, times = [r["fid"] for r in rows], [r[1].refine_steps for r in results], [r[3] for r in results]
        plots = {  # name: (x values, caption, x label, log x)
            "quality_vs_steps": (
                steps,
                "teacher steps after the student's jump",
                "refine steps (0: one-step student, K: teacher alone)",
                False,
            ),
            "quality_vs_time": (times, "time per image", "seconds / image", all(t > 0 for t in times)),
        }
        for name, (xs, what, xlabel, logx) in plots.items():
            report.add_plot(name, {"FID": (xs, fids)}, f"FID vs {what}", xlabel=xlabel, ylabel="FID", logx=logx)
    if pipe is not None:
        report.add_training_curves(Path(args.fake))
    if extractor.name.startswith("inception") and "UNOFFICIAL" in extractor.name:
        report.add_note("**Not comparable with published numbers:** the Inception weights are not the official file.")
    report.save()
    return {row["samples"]: {k: v for k, v in row.items() if k != "samples"} for row in rows}


def _main(argv, *, kid: bool) -> int:
    name = "kid" if kid else "fid"
    args = build_parser(f"gendistill eval {name}", kid=kid).parse_args(argv)
    summary = run(args, kid=kid)
    for label, row in summary.items():
        values = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k} {v}" for k, v in row.items()
        )
        print(f"{label}: {values}")
    print(f"wrote {os.path.join(args.output, 'report.md')} and metrics.json")
    return 0


def main_fid(argv: list[str] | None = None) -> int:
    return _main(argv, kid=False)


def main_kid(argv: list[str] | None = None) -> int:
    return _main(argv, kid=True)
