"""``gendistill eval speed``: latency and images/s of a student against its teacher on the same device.

Diffusion: a BOOT student folder (one UNet evaluation, + VAE decode for latent students) against its teacher's own
K-step DDIM (``refine_steps = K``, the teacher UNet saved in the folder or given with ``--teacher``), from the same
noises. Classifiers: two classifier folders (``--model`` the student, ``--teacher``), forward passes on random
images. Each setting is warmed up, then timed ``--repeats`` times (CUDA events on GPUs, ``perf_counter`` on CPUs);
the median is reported, with the batch size, dtype and device.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from gendistill.errors import UsageError

from . import generative, sources
from .report import Report, check_report_folder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure(fn, *, device: torch.device, warmup: int = 2, repeats: int = 10) -> list[float]:
    """Seconds per call of ``fn`` over ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return times


def _int_list(text: str) -> list[int]:
    values = generative._int_list(text)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gendistill eval speed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a BOOT student folder or a classifier folder (the student)")
    parser.add_argument(
        "--teacher",
        default=None,
        help="teacher folder (diffusion: if not saved with the student; classifiers: the teacher classifier)",
    )
    parser.add_argument("--batch-sizes", type=_int_list, default=[1, 16], help="comma-separated (default 1,16)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls; the median is reported (default 10)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model weights dtype (default fp32)")
    parser.add_argument("--prompt", default="a photo of a cat", help="prompt of a text-to-image student")
    parser.add_argument("--output", default="eval-speed", help="report folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def _diffusion_runners(args, device, dtype):
    pipe = sources.load_student_pipeline(args.model, teacher=args.teacher, device=device)
    pipe.to(dtype=dtype)
    k = sources.num_intervals(pipe)
    text = isinstance(pipe, sources.BootPipeline)

    def runner(refine_steps: int):
        def make(batch: int):
            settings = sources.SampleSettings(
                num_samples=batch, batch_size=batch, refine_steps=refine_steps, prompts=[args.prompt] if text else None
            )
            conditions = sources.batch_conditions(pipe, settings, 0, batch)
            generator = torch.Generator(device).manual_seed(0)
            return lambda: pipe(**conditions, generator=generator, refine_steps=refine_steps, output_type="pt")

        return make

    runners = {"student (1 step)": runner(0)}
    if pipe.teacher_unet is not None:
        runners[f"teacher ({k}-step DDIM)"] = runner(k)
    return runners, {"model": "BOOT student", "teacher_steps": k if pipe.teacher_unet is not None else None}


def _classifier_runners(args, device, dtype):
    from gendistill.dfkd.models import load_classifier

    models = {"student": load_classifier(args.model)}
    if args.teacher:
        models["teacher"] = load_classifier(args.teacher)
    runners = {}
    for name, model in models.items():
        model = model.to(device, dtype).eval()
        config = model.config

        def make(batch: int, model=model, config=config):
            x = torch.rand(batch, config.in_channels, config.image_size, config.image_size, device=device, dtype=dtype)
            return lambda: model(x)

        runners[f"{name} ({config.arch})"] = make
    return runners, {"model": "classifier"}


@torch.no_grad()
def run(args: argparse.Namespace) -> list[dict]:
    if args.warmup < 0 or args.repeats < 1:
        raise UsageError(f"--warmup must be >= 0 and --repeats >= 1, got {args.warmup} and {args.repeats}")
    check_report_folder(args.output)  # refuse a folder we may not write before loading anything
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = Path(args.model)
    if (model / "model_index.json").is_file():
        runners, kind = _diffusion_runners(args, device, dtype)
    elif (model / "model.safetensors").is_file():
        runners, kind = _classifier_runners(args, device, dtype)
    else:
        raise FileNotFoundError(f"--model {args.model!r} is neither a BOOT student folder nor a classifier folder")
    report = Report(args.output, title=f"gendistill eval speed: {model.name}", command="eval speed", device=device)
    rows, series = [], {}
    for name, make in runners.items():
        for batch in args.batch_sizes:
            times = measure(make(batch), device=device, warmup=args.warmup, repeats=args.repeats)
            median = statistics.median(times)
            rows.append({"model": name, "batch": batch, "latency_ms": 1000 * median, "images_per_s": batch / median})
        series[name] = (args.batch_sizes, [row["images_per_s"] for row in rows if row["model"] == name])
    student = next(iter(runners))
    for row in rows:
        ref = next(r for r in rows if r["model"] == student and r["batch"] == row["batch"])
        row["student speed-up"] = row["latency_ms"] / ref["latency_ms"]
    report.add_plot(
        "images_per_s",
        series,
        "images/s against batch size (median of the timed calls)",
        xlabel="batch size",
        ylabel="images / s",
        logx=len(args.batch_sizes) > 1,
    )
    report.add_table("Latency", rows)
    report.add_metric(
        "speed",
        rows,
        dtype=args.dtype,
        warmup=args.warmup,
        repeats=args.repeats,
        timer="CUDA events" if device.type == "cuda" else "time.perf_counter",
        statistic="median",
        **kind,
    )
    report.save()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for row in run(args):
        print(
            f"{row['model']:28s} batch {row['batch']:4d}: {row['latency_ms']:9.2f} ms, "
            f"{row['images_per_s']:9.1f} img/s, student speed-up x{row['student speed-up']:.1f}"
        )
    return 0
