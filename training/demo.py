"""``gendistill demo``: the embedded default, end to end on the offline MNIST subset (no download).

1. Teachers: a class-conditional v-prediction DDPM UNet and a LeNet-5 (with BatchNorm) trained on the subset's
   train split (4,500 digits; the 500 held-out digits are never trained on). They ship with the package
   (``gendistill/training/assets/``, made by this project's own ``gendistill teach`` recipes, see the README there)
   and are copied into ``OUTPUT/teachers``; ``--train-teachers`` trains them again with the same recipes instead.
2. BOOT: the DDPM is distilled into a one-step student (classifier-free guidance baked in) from noise alone,
   saved as a diffusers pipeline folder (``OUTPUT/boot``) that also holds the teacher UNet for refinement.
3. SiD: a second one-step student of the DDPM by Score identity Distillation (``OUTPUT/sid``, the same kind of
   pipeline folder), started from the teacher: a fake score network learns the student's own distribution and the
   student moves where the teacher's denoiser and the fake one disagree; still no image is touched.
4. DFKD: the LeNet-5 is distilled into LeNet-5-half on synthesized images only (DFQ: a generator trained to match
   the teacher's BatchNorm statistics while fooling the student), saved as ``OUTPUT/dfkd``.
5. Evaluation (``OUTPUT/report``: report.md + metrics.json + PNGs): class agreement and LeNet-feature FID of the
   teacher's 50-step DDIM, the teacher's own 1-step DDIM, the BOOT student (1 step, and with 1 or 2 teacher
   refinement steps) and the SiD student (1 step), all from the same noises; per-class grids; held-out accuracy of
   both classifiers; speed-ups.
   A short summary table is printed at the end.

``--budget small`` (default) is sized to finish within 10 minutes on 2 CPU cores; ``--budget full`` trains much
longer and evaluates more samples (meant for a GPU: ``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch

from gendistill.dfkd.synthesizers.dfq import PROFILES
from gendistill.errors import UsageError

from . import boot, dfkd, sid, teach_classifier, teach_diffusion

MARKER = "gendistill_demo.json"
DEVICES = ("auto", "cpu", "cuda")
DDPM_TEACHER, CLASSIFIER_TEACHER = "mnist_ddpm", "mnist_lenet5_bn"


@dataclass(frozen=True)
class Budget:
    boot_steps: int  # BOOT optimizer steps
    boot_batch_size: int
    num_intervals: int  # K: the teacher DDIM trajectory the student learns
    sid_steps: int  # SiD iterations of the second one-step student (0: no SiD stage)
    dfkd_iterations: int  # DFKD iterations (1 generator step + 5 student steps each)
    dfkd_batch_size: int | None  # None: the method's own (DFQ: 128)
    eval_samples: int  # generated images per sampler in the evaluation (balanced over the 10 classes)


BUDGETS = {
    "small": Budget(
        boot_steps=300,
        boot_batch_size=32,
        num_intervals=16,
        sid_steps=60,
        dfkd_iterations=1000,
        dfkd_batch_size=None,
        eval_samples=300,
    ),
    "full": Budget(
        boot_steps=6000,
        boot_batch_size=128,
        num_intervals=32,
        sid_steps=2000,
        dfkd_iterations=6000,
        dfkd_batch_size=256,
        eval_samples=5000,
    ),
}


def ddpm_teacher_recipe(
    output: str, *, seed: int = 0, max_steps: int = 4000, cpu: bool = False
) -> teach_diffusion.TeachDiffusionRecipe:
    """The recipe of the shipped DDPM teacher (``gendistill teach diffusion`` with these flags)."""
    return teach_diffusion.TeachDiffusionRecipe(
        output=output,
        data="mnist5k",
        block_out_channels=[16, 32, 32],
        prediction_type="v_prediction",
        max_steps=max_steps,
        batch_size=64,
        lr=1e-3,
        lr_warmup_steps=100,
        checkpoint_every=0,
        sample_every=1000,
        seed=seed,
        cpu=cpu,
    )


def classifier_teacher_recipe(
    output: str, *, seed: int = 0, max_steps: int = 1500, cpu: bool = False
) -> teach_classifier.TeachClassifierRecipe:
    """The recipe of the shipped LeNet-5 teacher (``gendistill teach classifier`` with these flags)."""
    return teach_classifier.TeachClassifierRecipe(
        output=output,
        arch="lenet5_bn",
        data="mnist5k",
        max_steps=max_steps,
        batch_size=128,
        lr=2e-3,
        eval_every=0,
        checkpoint_every=0,
        seed=seed,
        cpu=cpu,
    )


def boot_recipe(output: str, teacher: str, budget: Budget, *, seed: int = 0, cpu: bool = False) -> boot.BootRecipe:
    """The demo's BOOT run: a one-step student of the DDPM with the default class guidance (2.0) baked in."""
    return boot.BootRecipe(
        output=output,
        teacher=teacher,
        max_steps=budget.boot_steps,
        batch_size=budget.boot_batch_size,
        num_intervals=budget.num_intervals,
        lr=2e-4,
        eval_every=max(1, budget.boot_steps // 5),
        checkpoint_every=0,
        sample_every=0,
        seed=seed,
        cpu=cpu,
        save_teacher=True,
    )


def sid_recipe(output: str, teacher: str, budget: Budget, *, seed: int = 0, cpu: bool = False) -> sid.SiDRecipe:
    """The demo's SiD run: a one-step generator started from the teacher (SiD's start; in 60 steps it reached a
    lower FID than when started from the demo's BOOT student, 6.4 against 7.9 on 500 samples, 2 CPU cores,
    2026-12-03), with BOOT's guidance scale (2) and batch size and SiD's recipe defaults otherwise."""
    return sid.SiDRecipe(
        output=output,
        teacher=teacher,
        guidance_scale=2.0,
        max_steps=budget.sid_steps,
        batch_size=budget.boot_batch_size,
        eval_every=0,
        checkpoint_every=0,
        sample_every=0,
        seed=seed,
        cpu=cpu,
    )


def dfkd_recipe(output: str, teacher: str, budget: Budget, *, seed: int = 0, cpu: bool = False) -> dfkd.DFKDRecipe:
    """The demo's DFKD run: DFQ with its defaults (the recommended method, ``benchmarks/dfkd_mnist.py``) into
    LeNet-5-half, held-out accuracy logged for the accuracy-against-time curve, the EMA student exported. The
    student's steps start after the profile's 60 generator-only iterations, or after a tenth of a shorter run."""
    student_start = min(PROFILES["shallow"]["student_start"], budget.dfkd_iterations // 10)
    return dfkd.DFKDRecipe(
        output=output,
        method="dfq",
        teacher=teacher,
        student_arch="lenet5_half",
        eval_data="mnist5k",
        max_steps=budget.dfkd_iterations,
        batch_size=budget.dfkd_batch_size,
        method_options=[f"student_start={student_start}"],
        eval_every=max(1, budget.dfkd_iterations // 10),
        checkpoint_every=0,
        sample_every=0,
        seed=seed,
        cpu=cpu,
    )


def shipped_teacher(name: str) -> Path:
    """The folder of a teacher shipped with the package (``DDPM_TEACHER`` or ``CLASSIFIER_TEACHER``)."""
    path = Path(str(resources.files("gendistill.training") / "assets" / name))
    if not path.is_dir():
        raise FileNotFoundError(f"the shipped teacher {name!r} is missing from {path.parent} (a broken install?)")
    return path


def _copy_teacher(name: str, destination: Path) -> Path:
    source = shipped_teacher(name)
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("README.md", "__pycache__"))
    return destination


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gendistill demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="gendistill-demo", help="demo folder (default: gendistill-demo)")
    parser.add_argument("--budget", default="small", choices=sorted(BUDGETS), help="small (default) | full")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="auto (CUDA when available) | cpu | cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage (0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")
    parser.add_argument(
        "--train-teachers", action="store_true", help="train both teachers with their recipes instead of copying"
    )
    parser.add_argument("--boot-steps", type=_positive, default=None, help="override the budget's BOOT steps")
    parser.add_argument(
        "--sid-steps", type=_non_negative, default=None, help="override the SiD student's steps (0: no SiD stage)"
    )
    parser.add_argument("--dfkd-iterations", type=_positive, default=None, help="override the DFKD iterations")
    parser.add_argument("--eval-samples", type=_positive, default=None, help="override the samples per sampler")
    parser.add_argument("--num-intervals", type=_positive, default=None, help="override K of the BOOT trajectory")
    parser.add_argument(
        "--teacher-steps",
        type=_positive,
        default=None,
        help="with --train-teachers: training steps of both teachers (default: the shipped recipes')",
    )
    return parser


def prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder unless ``overwrite``; never delete a folder the demo did not write."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"output folder {str(out)!r} is not empty; choose another folder or pass --overwrite")
        if not (out / MARKER).is_file():
            raise UsageError(f"output folder {str(out)!r} holds no gendistill demo ({MARKER}); refusing to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def demo_device(device: str) -> torch.device:
    """``auto``: CUDA when it is available; ``cpu`` forces the CPU (the recipes' ``cpu`` field); ``cuda`` insists."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine; valid here: auto, cpu")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


def main(argv: list[str] | None = None, *, evaluate: Callable[..., list[dict]] | None = None) -> int:
    """Run the demo. ``evaluate(folder, device=, eval_samples=, seed=)`` writes the report and returns the summary
    rows (the CLI passes ``gendistill.eval.demo.evaluate_demo``; training does not import eval)."""
    args = build_parser().parse_args(argv)
    budget = BUDGETS[args.budget]
    overrides = {
        "boot_steps": args.boot_steps,
        "sid_steps": args.sid_steps,
        "dfkd_iterations": args.dfkd_iterations,
        "eval_samples": args.eval_samples,
        "num_intervals": args.num_intervals,
    }
    budget = Budget(**{**asdict(budget), **{k: v for k, v in overrides.items() if v is not None}})
    if args.teacher_steps is not None and not args.train_teachers:
        raise UsageError("--teacher-steps applies to --train-teachers only (the shipped teachers are trained already)")
    device = demo_device(args.device)
    out = Path(args.output)
    prepare_output(out, args.overwrite)
    started = time.perf_counter()
    stages = {}
    (out / MARKER).write_text(
        json.dumps({"budget": args.budget, "settings": asdict(budget), "seed": args.seed, "device": args.device})
        + "\n",
        encoding="utf-8",
    )
    cpu = device.type == "cpu"
    teachers = out / "teachers"
    ddpm_dir, lenet_dir = teachers / DDPM_TEACHER, teachers / CLASSIFIER_TEACHER
    tic = time.perf_counter()
    if args.train_teachers:
        steps = {} if args.teacher_steps is None else {"max_steps": args.teacher_steps}
        print(f"[1/5] training the teachers on the MNIST subset's train split -> {teachers}")
        teach_diffusion.run(ddpm_teacher_recipe(str(ddpm_dir), seed=args.seed, cpu=cpu, **steps))
        teach_classifier.run(classifier_teacher_recipe(str(lenet_dir), seed=args.seed, cpu=cpu, **steps))
    else:
        print(f"[1/5] teachers: the shipped MNIST DDPM and LeNet-5 (see {shipped_teacher(DDPM_TEACHER).parent})")
        _copy_teacher(DDPM_TEACHER, ddpm_dir)
        _copy_teacher(CLASSIFIER_TEACHER, lenet_dir)
    stages["teachers"] = time.perf_counter() - tic

    tic = time.perf_counter()
    print(f"[2/5] BOOT: distilling the DDPM into a one-step student ({budget.boot_steps} steps) -> {out / 'boot'}")
    boot.run(boot_recipe(str(out / "boot"), str(ddpm_dir), budget, seed=args.seed, cpu=cpu))
    stages["boot"] = time.perf_counter() - tic

    if budget.sid_steps:
        tic = time.perf_counter()
        print(f"[3/5] SiD: a second one-step student of the DDPM ({budget.sid_steps} steps) -> {out / 'sid'}")
        sid.run(sid_recipe(str(out / "sid"), str(ddpm_dir), budget, seed=args.seed, cpu=cpu))
        stages["sid"] = time.perf_counter() - tic
    else:
        print("[3/5] SiD: skipped (--sid-steps 0)")

    tic = time.perf_counter()
    print(
        f"[4/5] DFKD: distilling LeNet-5 into LeNet-5-half from synthesized images only (DFQ, "
        f"{budget.dfkd_iterations} iterations) -> {out / 'dfkd'}"
    )
    dfkd.run(dfkd_recipe(str(out / "dfkd"), str(lenet_dir), budget, seed=args.seed, cpu=cpu))
    stages["dfkd"] = time.perf_counter() - tic

    tic = time.perf_counter()
    print(f"[5/5] evaluating teachers and students -> {out / 'report'}")
    rows = []
    if evaluate is not None:
        rows = evaluate(out, device=device, eval_samples=budget.eval_samples, seed=args.seed)
    stages["evaluation"] = time.perf_counter() - tic
    total = time.perf_counter() - started
    timing = {"seconds": {**stages, "total": total}}
    (out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n", encoding="utf-8")
    if rows:
        print()
        print(format_table(rows))
    print(
        f"\ndone in {total / 60:.1f} min ("
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stages.items())
        + f"); report: {out / 'report' / 'report.md'}"
    )
    print(f"load the student: DiffusionPipeline.from_pretrained({str(out / 'boot')!r}, trust_remote_code=True)")
    return 0


def format_table(rows: list[dict]) -> str:
    """A plain-text table of ``rows`` (dicts with the same keys)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
