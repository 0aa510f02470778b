"""Where one DFKD iteration spends its time, for every method, on LeNet-5-BN -> LeNet-5-half at 32x32 (MNIST).

Each method runs through the real training core (``gendistill.training.dfkd``) with the shipped LeNet-5-BN teacher
and the MNIST benchmark's CPU settings (batch 64, generator width 16, the shortened round schedules of
``dfkd_mnist.py``). After ``--warmup`` iterations, ``--iterations`` more are timed phase by phase with wall-clock
timers (CPU work is synchronous, so a timer around a call measures that call):

- forward and backward of the generators (the task's, and the inner or round generators of Fast, CMI and NAYER),
  the teacher and the student: global module forward hooks (the teacher's forward includes the BatchNorm-statistics
  hooks of the loss), and for backward a hook on each module's output (see ``instrument``); the hooks themselves
  add a few microseconds per module call;
- augmentation (``augment``, CMI's ``local_view``) and pool I/O (``ImagePool.add``/``sample``);
- optimizer steps (every optimizer, the core's and the synthesizers' inner ones, through torch's global optimizer
  hooks);
- the rest of the iteration ("other"): loss arithmetic, the core's host syncs (finite checks, ``float(loss)``),
  logging and Python overhead.

Pool methods synthesize in rounds (every ``synthesis_every`` student batches), so their per-iteration numbers are
averages over the timed iterations; ``--iterations`` should span at least one round (the default does).

    python benchmarks/dfkd_profile.py --out benchmarks/results/dfkd_profile_cpu_<date>.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from gendistill.dfkd import generators
from gendistill.dfkd.models import build_classifier, load_classifier
from gendistill.dfkd.synthesizers import METHODS
from gendistill.dfkd.synthesizers.nayer import NoisyLayerGenerator
from gendistill.eval.report import device_description
from gendistill.training.core import Trainer
from gendistill.training.demo import CLASSIFIER_TEACHER, shipped_teacher
from gendistill.training.dfkd import DFKDRecipe, build_task

CPU_SCHEDULES = {  # dfkd_mnist.py's CPU-sized round schedules, so a round falls inside the timed iterations
    "deepinversion": {"inversion_steps": 200, "synthesis_every": 50},
    "cmi": {"synthesis_steps": 50, "synthesis_every": 50},
    "nayer": {"warmup": 2, "synthesis_every": 50},
}
CATEGORIES = (
    "generator forward",
    "generator backward",
    "teacher forward",
    "teacher backward",
    "student forward",
    "student backward",
    "augmentation",
    "pool I/O",
    "optimizer steps",
    "other",
)


class PhaseTimer:
    """Accumulates wall time per category; nested timed regions count only in the innermost one."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[tuple[str, float]] = []
        self.enabled = False

    def push(self, name: str) -> None:
        if self.enabled:
            now = time.perf_counter()
            if self._stack:  # pause the enclosing region
                outer, since = self._stack[-1]
                self.seconds[outer] += now - since
            self._stack.append((name, now))

    def pop(self) -> None:
        if self.enabled and self._stack:
            now = time.perf_counter()
            name, since = self._stack.pop()
            self.seconds[name] += now - since
            if self._stack:  # resume the enclosing region
                outer, _ = self._stack[-1]
                self._stack[-1] = (outer, now)

    def switch_backward(self, name: str) -> None:
        """Autograd reached the output of another module: the previous module's backward (if any) is over."""
        if self._stack and self._stack[-1][0].endswith("backward"):
            self.pop()
        self.push(name)

    def end_backward(self) -> None:
        while self._stack and self._stack[-1][0].endswith("backward"):
            self.pop()

    @contextlib.contextmanager
    def region(self, name: str):
        self.push(name)
        try:
            yield
        finally:
            self.pop()


def instrument(task, trainer: Trainer, timer: PhaseTimer) -> list:
    """Install the timers; returns the functions that undo them.

    Backward: autograd runs the modules' backward in the reverse order of their forwards, one after the other; a
    hook on each module's output marks where its backward starts, which ends the previous module's, and the end of
    ``backward``/``autograd.grad`` ends the last one (the generator, first in the forward, is last in the backward).
    """
    undo = []

    # Global module hooks: the task's teacher and student by identity, and every generator (the task's, Fast's inner
    # copies, CMI's and NAYER's round generators) by class; nested calls of the same role count once.
    roles = {id(task.teacher): "teacher", id(trainer.accelerator.unwrap_model(task.student)): "student"}
    generator_classes = (generators.Generator, generators.EmbeddingGenerator, NoisyLayerGenerator)

    def role_of(module):
        return roles.get(id(module)) or ("generator" if isinstance(module, generator_classes) else None)

    def before_forward(module, args):
        role = role_of(module)
        if role is not None:
            timer.push(f"{role} forward")

    def after_forward(module, args, output):
        role = role_of(module)
        if role is None:
            return
        timer.pop()
        if isinstance(output, torch.Tensor) and output.requires_grad and timer.enabled:
            output.register_hook(lambda grad: timer.switch_backward(f"{role} backward"))

    handles = [register_module_forward_pre_hook(before_forward), register_module_forward_hook(after_forward)]
    undo += [h.remove for h in handles]
    handles = [
        register_optimizer_step_pre_hook(lambda *_: timer.push("optimizer steps")),
        register_optimizer_step_post_hook(lambda *_: timer.pop()),
    ]
    undo += [h.remove for h in handles]

    def timed(function, name):
        def wrapper(*args, **kwargs):
            with timer.region(name):
                return function(*args, **kwargs)

        return wrapper

    def ends_backward(function):
        def wrapper(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            finally:
                timer.end_backward()

        return wrapper

    for attr in ("backward", "grad"):
        original = getattr(torch.autograd, attr)
        setattr(torch.autograd, attr, ends_backward(original))
        undo.append(lambda a=attr, o=original: setattr(torch.autograd, a, o))
    # The names the synthesizer modules imported, and the pool's methods.
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("gendistill.dfkd"):
            continue
        for attr in ("augment", "local_view"):
            original = getattr(module, attr, None)
            if callable(original):
                setattr(module, attr, timed(original, "augmentation"))
                undo.append(lambda m=module, a=attr, o=original: setattr(m, a, o))
    for attr in ("add", "sample"):
        original = getattr(generators.ImagePool, attr)
        setattr(generators.ImagePool, attr, timed(original, "pool I/O"))
        undo.append(lambda a=attr, o=original: setattr(generators.ImagePool, a, o))
    return undo


def profile_method(method: str, teacher_dir: Path, workdir: Path, args) -> dict:
    teacher = load_classifier(teacher_dir)
    config = teacher.config
    torch.manual_seed(args.seed)
    student = build_classifier("lenet5_half", num_classes=10, in_channels=1, mean=config.mean, std=config.std)
    fields = vars(METHODS[method].Config())
    options = {"ngf": args.ngf} if "ngf" in fields else {}
    options.update(CPU_SCHEDULES.get(method, {}))
    recipe = DFKDRecipe(
        output=str(workdir / method),
        method=method,
        max_steps=args.warmup,
        batch_size=args.batch_size,
        lr=2e-3,
        ema_decay=0.99,
        eval_every=0,
        sample_every=0,
        checkpoint_every=0,
        log_every=10**6,
        seed=args.seed,
    )
    task = build_task(teacher, student, method, options=options)
    trainer = Trainer(task, recipe, command="dfkd")
    trainer.fit()  # warm-up (first rounds, allocator, one-off builds)
    timer = PhaseTimer()
    undo = instrument(task, trainer, timer)
    trainer.recipe.max_steps = args.warmup + args.iterations
    try:
        timer.enabled = True
        start = time.perf_counter()
        with timer.region("other"):
            trainer.fit()
        total = time.perf_counter() - start
    finally:
        timer.enabled = False
        for fn in undo:
            fn()
    trainer.end()
    # fit() ends with an evaluation (none: no eval data), a sample grid (sample_every=0: none) and a checkpoint;
    # the checkpoint's time is measured apart and removed from "other".
    tic = time.perf_counter()
    trainer.save_checkpoint()
    checkpoint = time.perf_counter() - tic
    per_iteration = {k: 1000 * timer.seconds.get(k, 0.0) / args.iterations for k in CATEGORIES}
    per_iteration["other"] = max(0.0, per_iteration["other"] - 1000 * checkpoint / args.iterations)
    total_ms = sum(per_iteration.values())
    return {
        "method": method,
        "options": options,
        "iterations": args.iterations,
        "ms_per_iteration": round(total_ms, 2),
        "wall_ms_per_iteration": round(1000 * (total - checkpoint) / args.iterations, 2),
        "ms": {k: round(v, 2) for k, v in per_iteration.items()},
        "share": {k: round(v / total_ms, 3) for k, v in per_iteration.items()},
    }


def markdown(rows: list[dict]) -> str:
    head = "| method | ms / iteration | " + " | ".join(CATEGORIES) + " |"
    lines = [head, "|" + " --- |" * (len(CATEGORIES) + 2)]
    for row in rows:
        cells = [f"{row['ms'][k]:.1f} ({100 * row['share'][k]:.0f}%)" for k in CATEGORIES]
        lines.append(f"| {row['method']} | {row['ms_per_iteration']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS))
    parser.add_argument("--warmup", type=int, default=10, help="untimed iterations first")
    parser.add_argument("--iterations", type=int, default=100, help="timed iterations (span a round: >= 50)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ngf", type=int, default=16, help="generator width (the CPU benchmark's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(sorted(METHODS))}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            rows.append(profile_method(method, shipped_teacher(CLASSIFIER_TEACHER), Path(tmp), args))
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "benchmark": "dfkd_profile",
        "device": device_description("cuda" if torch.cuda.is_available() else "cpu"),
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "setting": "shipped LeNet-5-BN teacher -> LeNet-5-half, 1x32x32, batch "
        f"{args.batch_size}, ngf {args.ngf}, {args.warmup} warm-up + {args.iterations} timed iterations",
        "methods": rows,
        "markdown": markdown(rows),
    }
    print(result["markdown"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
