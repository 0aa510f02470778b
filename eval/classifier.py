"""Classifier quality (docs/evaluation.md): top-k accuracy, teacher-student agreement, backdoor attack
success rate and the linear-probe transferability of frozen features, plus ``gendistill eval accuracy|asr``.

Every measure streams the images through the model in batches on the model's device (the images may stay on the
CPU), in eval mode and without gradients; the model's train/eval mode is restored afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gendistill.data.classification import _channels, _per_class_split, _resize, load_classification_data
from gendistill.dfkd.backdoor import TRIGGERS, Trigger, make_trigger
from gendistill.dfkd.models import Classifier, FeatureHooks, load_classifier
from gendistill.errors import UsageError

from .report import Report, check_report_folder

BATCH_SIZE = 256
PROBE_DATA = ("digits",)  # extra probe datasets beyond load_classification_data's: scikit-learn's 8x8 digits


def time_to_accuracy(rows: list[dict], fractions: Sequence[float] = (0.9, 0.95)) -> dict:
    """The DFKD speed metric from a distillation run's log rows (``logs/metrics.jsonl``): the first ``elapsed_s`` at
    which the student's held-out accuracy (its EMA when logged) reached each fraction of the teacher's accuracy on
    the same images; ``None`` where it never did. Also returns the curve ``(elapsed_s, accuracy)``."""
    key = "ema/student_accuracy" if any("ema/student_accuracy" in r for r in rows) else "student_accuracy"
    points = [(r["elapsed_s"], r[key], r.get("teacher_accuracy")) for r in rows if key in r and "elapsed_s" in r]
    teacher = next((t for *_, t in points if t is not None), None)
    if not points or teacher is None:
        return {}
    reached = {}
    for fraction in fractions:
        hits = [seconds for seconds, accuracy, _ in points if accuracy >= fraction * teacher]
        reached[f"{fraction:.0%}"] = min(hits) if hits else None
    curve = ([p[0] for p in points], [p[1] for p in points])
    return {"student_key": key, "teacher_accuracy": teacher, "seconds_to_reach": reached, "curve": curve}


def plot_accuracy_vs_time(
    report: Report, timing: dict, name: str, caption: str, *, student: str = "student", fractions: Sequence[float] = ()
) -> None:
    """Plot the curve of :func:`time_to_accuracy` into ``report``, with the teacher's accuracy (and ``fractions``
    of it) as flat lines."""
    seconds, accuracy = timing["curve"]
    ends, teacher = [seconds[0], seconds[-1]], timing["teacher_accuracy"]
    series = {student: (seconds, accuracy), "teacher": (ends, [teacher] * 2)}
    series |= {f"{f:.0%} of the teacher": (ends, [f * teacher] * 2) for f in fractions}
    report.add_plot(name, series, caption, xlabel="seconds", ylabel="accuracy")


# --- helpers ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _check_inputs(images: torch.Tensor, labels: torch.Tensor | None = None, *, batch_size: int) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise UsageError(f"images must be a tensor (N, C, H, W) in [0, 1], got {shape}")
    if len(images) == 0:
        raise UsageError("no images to evaluate")
    if labels is not None and (labels.dim() != 1 or len(labels) != len(images)):
        raise UsageError(f"labels must be (N,) with N = {len(images)} images, got shape {tuple(labels.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")


def _batches(images: torch.Tensor, batch_size: int, model: nn.Module) -> Iterator[torch.Tensor]:
    """``images`` in float32 batches on ``model``'s device (the CPU for a model without tensors)."""
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    for batch in images.split(batch_size):
        yield batch.to(device=device, dtype=torch.float32, non_blocking=True)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, *, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """Argmax class (N,) int64 on the CPU of ``images`` (N, C, H, W) in [0, 1]."""
    _check_inputs(images, batch_size=batch_size)
    with _eval_mode(model):
        return torch.cat([model(x).argmax(1).cpu() for x in _batches(images, batch_size, model)])


# --- accuracy and agreement -------------------------------------------------------------------------------------
@torch.no_grad()
def topk_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    topk: Sequence[int] = (1, 5),
    batch_size: int = BATCH_SIZE,
) -> dict[str, float]:
    """Top-k accuracy of ``model`` on ``images`` (N, C, H, W) in [0, 1] with ``labels`` (N,).

    Returns ``{"top1": ..., "top5": ...}``; a k larger than the number of classes K is left out (top-5 only when
    K >= 5). A label is counted correct at k when it is among the k largest logits (ties broken by ``torch.topk``).
    """
    _check_inputs(images, labels, batch_size=batch_size)
    ks = sorted(set(topk))
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise UsageError(f"topk must be positive integers, got {tuple(topk)}")
    correct: dict[int, int] = {}
    with _eval_mode(model):
        for x, y in zip(_batches(images, batch_size, model), labels.split(batch_size)):
            logits = model(x)
            num_classes = logits.shape[1]
            kept = [k for k in ks if k <= num_classes]
            if not kept:
                raise UsageError(f"topk {tuple(topk)}: every k exceeds the model's {num_classes} classes")
            ranked = logits.topk(max(kept), dim=1).indices  # (B, kmax), best first
            hits = ranked == y.to(logits.device)[:, None]
            for k in kept:
                correct[k] = correct.get(k, 0) + int(hits[:, :k].any(1).sum())
    return {f"top{k}": correct[k] / len(labels) for k in sorted(correct)}


@torch.no_grad()
def agreement(student: nn.Module, teacher: nn.Module, images: torch.Tensor, *, batch_size: int = BATCH_SIZE) -> float:
    """Fraction of ``images`` (N, C, H, W) on which the student's and the teacher's argmax classes agree."""
    same = (predict(student, images, batch_size=batch_size) == predict(teacher, images, batch_size=batch_size)).sum()
    return int(same) / len(images)


# --- backdoor -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def attack_success_rate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    trigger: Trigger | str,
    target: int,
    batch_size: int = BATCH_SIZE,
) -> float:
    """Attack success rate (ASR): the fraction of triggered inputs whose true class is NOT ``target`` that ``model``
    classifies as ``target``. Inputs of the target class are left out (for them a "success" means nothing).

    ``images`` (N, C, H, W) are clean images in [0, 1]; the trigger (an object or a name of ``TRIGGERS``) is applied
    here, batch by batch.
    """
    _check_inputs(images, labels, batch_size=batch_size)
    trigger = make_trigger(trigger) if isinstance(trigger, str) else trigger
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise UsageError(f"backdoor target must be a class index >= 0, got {target!r}")
    keep = labels.cpu() != target
    if not keep.any():
        raise UsageError(f"every image has label {target}: ASR needs images of other classes")
    hits = 0
    with _eval_mode(model):
        for x in _batches(images[keep.to(images.device)], batch_size, model):
            logits = model(trigger.apply(x))
            if target >= logits.shape[1]:
                raise UsageError(
                    f"backdoor target {target} is not a class of the model; valid: 0 to {logits.shape[1] - 1}"
                )
            hits += int((logits.argmax(1) == target).sum())
    return hits / int(keep.sum())


# --- linear probe -------------------------------------------------------------------------------------------------
@torch.no_grad()
def features(
    model: nn.Module, images: torch.Tensor, *, layer: str | None = None, batch_size: int = BATCH_SIZE
) -> torch.Tensor:
    """Penultimate features (N, D) float32 on the CPU: the INPUT of module ``layer`` (default
    ``model.feature_layer``, the final linear layer of a ``Classifier``) for ``images`` (N, C, H, W) in [0, 1]."""
    _check_inputs(images, batch_size=batch_size)
    layer = layer if layer is not None else getattr(model, "feature_layer", None)
    if layer is None:
        raise UsageError(f"{type(model).__name__} has no feature_layer; pass layer= (the final linear layer's name)")
    out = []
    with _eval_mode(model), FeatureHooks(model, [layer], inputs=True) as feats:
        for x in _batches(images, batch_size, model):
            model(x)
            out.append(feats[layer].flatten(1).float().cpu())
    return torch.cat(out)


def linear_probe(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    batch_size: int = BATCH_SIZE,
    **fit,
) -> dict[str, float]:
    """Linear-probe accuracy of ``model``'s frozen penultimate features (the CAE-DFKD transferability metric):
    :func:`probe_features` (``fit``: its ``steps``, ``lr``, ``weight_decay``, ``seed``) on the input of
    ``model.feature_layer`` for the train and test images."""
    train_features, test_features = (features(model, x, batch_size=batch_size) for x in (train_images, test_images))
    return probe_features(train_features, train_labels, test_features, test_labels, **fit)


def probe_features(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    steps: int = 100,
    lr: float = 1.0,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> dict[str, float]:
    """Linear probe of given features (N, D): they are standardized with the train split's per-dimension mean and
    std; a linear layer is fitted full-batch to the train features by L-BFGS (``steps`` iterations, strong-Wolfe
    line search) on cross-entropy + ``weight_decay`` * ||W||^2 (multinomial logistic regression) from a small
    ``seed``-ed initialization; returns test accuracy, train accuracy, the feature dimension and the class count.
    """
    for name, x, y in (("train", train_features, train_labels), ("test", test_features, test_labels)):
        if x.dim() != 2 or y.dim() != 1 or len(x) != len(y) or len(x) == 0:
            raise UsageError(
                f"{name} features must be (N, D) with N >= 1 labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}"
            )
    if train_features.shape[1] != test_features.shape[1]:
        raise UsageError(
            f"train and test features differ in dimension: {train_features.shape[1]} vs {test_features.shape[1]}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps must be a positive integer, got {steps!r}")
    if lr <= 0 or weight_decay < 0:
        raise UsageError(f"lr must be > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
    train_x, test_x = train_features.double().cpu(), test_features.double().cpu()
    train_y, test_y = train_labels.long().cpu(), test_labels.long().cpu()
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(num_classes, train_x.shape[1], generator=gen, dtype=torch.float64)).requires_grad_()
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=lr, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight.T + bias, train_y) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        train_accuracy = ((train_x @ weight.T + bias).argmax(1) == train_y).double().mean().item()
        accuracy = ((test_x @ weight.T + bias).argmax(1) == test_y).double().mean().item()
    return {
        "accuracy": accuracy,
        "train_accuracy": train_accuracy,
        "feature_dim": train_x.shape[1],
        "num_classes": num_classes,
    }


# --- data ---------------------------------------------------------------------------------------------------------
def load_probe_data(
    data: str, *, split: str, image_size: int, channels: int, seed: int = 0, data_root: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Like ``load_classification_data``, plus "digits": scikit-learn's 1,797 8x8 digits (bundled, offline),
    resized bilinearly, with a seeded 20% per-class held-out split."""
    if data not in PROBE_DATA:
        return load_classification_data(
            data, split=split, image_size=image_size, channels=channels, seed=seed, data_root=data_root
        )
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("probe data 'digits' needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().div(16.0)[:, None]  # (N, 1, 8, 8), values 0..16
    labels = torch.from_numpy(bunch.target).long()
    index = _per_class_split(labels, split, 0.2, seed)
    images = _channels(_resize(images[index], image_size), channels)
    return images.clamp(0, 1).contiguous(), labels[index], [str(i) for i in range(10)]


# --- command line -------------------------------------------------------------------------------------------------
def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; valid: cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} was asked for but CUDA is not available; use --device cpu")
    return device


def _load_model(folder: str, what: str, device: torch.device) -> Classifier:
    if not Path(folder).is_dir():
        raise FileNotFoundError(
            f"{what} folder {folder!r} does not exist (a classifier folder: model.safetensors + config.json)"
        )
    return load_classifier(folder).to(device).eval()


def _load_data(args, config) -> tuple[torch.Tensor, torch.Tensor, list[str], dict]:
    """Images, labels, class names and the data settings stored with every metric."""
    image_size = args.image_size or config.image_size
    channels = args.channels or config.in_channels
    images, labels, names = load_classification_data(
        args.data, split=args.split, image_size=image_size, channels=channels, data_root=args.data_root
    )
    if int(labels.max()) >= config.num_classes:
        raise UsageError(
            f"data {args.data!r} has {int(labels.max()) + 1} classes but the classifier only {config.num_classes}"
        )
    if args.limit:  # evenly spaced: splits are often sorted by class
        keep = _spread(len(labels), args.limit)
        images, labels = images[keep], labels[keep]
    settings = {"data": args.data, "split": args.split, "count": len(labels)}
    return images, labels, names, settings | {"image_size": image_size, "channels": channels}


def _parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Add the arguments both commands share, parse and check them, and refuse an output folder we may not write
    before anything is loaded."""
    parser.add_argument("--data", default="mnist5k", help="mnist5k | cifar10 | cifar100 | a folder | an .npz")
    parser.add_argument(
        "--split",
        default="test",
        help="train | test | all (default: test: the built-in test split, or a seeded 10%% of each class of a folder "
        "or .npz; all: every image, for a folder that is already a held-out set)",
    )
    parser.add_argument("--data-root", default=None, help="torchvision's CIFAR files (never downloaded)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the classifier's own")
    parser.add_argument("--channels", type=int, default=None, help="1 or 3 (default: the classifier's own)")
    parser.add_argument(
        "--limit", type=int, default=0, help="evaluate N images evenly spaced through the split (0: all)"
    )
    parser.add_argument("--output", required=True, help="report folder (metrics.json, report.md, PNGs)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    if args.channels not in (None, 1, 3):
        raise UsageError(f"--channels must be 1 or 3, got {args.channels}")
    if args.limit < 0 or args.num_images < 1:
        raise UsageError(f"--limit must be >= 0 and --num-images >= 1, got {args.limit} and {args.num_images}")
    check_report_folder(args.output)
    return args


def _spread(count: int, wanted: int) -> torch.Tensor:
    """Up to ``wanted`` indices evenly spaced over ``range(count)`` (splits are often sorted by class)."""
    return torch.linspace(0, count - 1, min(wanted, count)).round().long().unique()


def main_accuracy(argv: list[str] | None = None) -> int:
    """``gendistill eval accuracy``: top-1/top-5 of a student (and teacher), agreement, per-class accuracy and an
    optional linear probe on a second dataset; writes metrics.json + report.md + predictions.png."""
    parser = argparse.ArgumentParser(
        prog="gendistill eval accuracy",
        description="Top-1/top-5 accuracy of a classifier (and its teacher), agreement and linear-probe transfer.",
    )
    parser.add_argument("--student", required=True, help="classifier folder to evaluate (model.safetensors + config)")
    parser.add_argument("--teacher", default=None, help="teacher classifier folder: its accuracy and agreement")
    parser.add_argument(
        "--probe-data",
        default=None,
        help="second dataset for the linear probe of frozen features (as --data, or 'digits')",
    )
    parser.add_argument("--probe-steps", type=int, default=100, help="L-BFGS iterations of the linear probe")
    parser.add_argument("--probe-weight-decay", type=float, default=1e-4, help="L2 penalty of the linear probe")
    parser.add_argument("--num-images", type=int, default=16, help="images in the predictions grid")
    args = _parse_args(parser, argv)
    if args.probe_steps < 1 or args.probe_weight_decay < 0:
        raise UsageError(
            f"--probe-steps must be positive and --probe-weight-decay >= 0, got {args.probe_steps} and "
            f"{args.probe_weight_decay}"
        )
    device = _device(args.device)
    student = _load_model(args.student, "student", device)
    teacher = _load_model(args.teacher, "teacher", device) if args.teacher else None
    if teacher is not None and teacher.config.num_classes != student.config.num_classes:
        raise UsageError(
            f"the teacher has {teacher.config.num_classes} classes but the student {student.config.num_classes}"
        )
    images, labels, names, settings = _load_data(args, student.config)
    models = {"student": student} | ({"teacher": teacher} if teacher is not None else {})
    prefixes = {"student": "", "teacher": "teacher_"}  # of the metric names
    report = Report(args.output, title="Classifier accuracy", command="eval accuracy", device=device)

    # 1. predictions and accuracy of each model
    predictions = {role: predict(m, images, batch_size=args.batch_size) for role, m in models.items()}
    accuracies = {role: topk_accuracy(m, images, labels, batch_size=args.batch_size) for role, m in models.items()}

    # 2. the picture first: a grid of test images with their predictions
    shown = _spread(len(labels), args.num_images)
    report.add_grid(
        "predictions",
        images[shown],
        caption=f"{len(shown)} {args.data} {args.split} images, evenly spaced through the split (row-major); "
        "their predictions are in the table below",
        nrow=8,
    )
    report.add_table(
        "Predictions of the grid images (row-major)",
        [
            {"image": j, "index": i, "label": names[int(labels[i])]}
            | {role: names[int(p[i])] for role, p in predictions.items()}
            for j, i in enumerate(shown.tolist())
        ],
    )

    # 3. metrics with their settings
    for role, acc in accuracies.items():
        for key, value in acc.items():
            report.add_metric(prefixes[role] + key, value, model=getattr(args, role), **settings)
    if teacher is not None:
        agree = int((predictions["student"] == predictions["teacher"]).sum()) / len(labels)
        report.add_metric("agreement", agree, student=args.student, teacher=args.teacher, **settings)

    # 4. per-class accuracy
    rows = []
    for c, name in enumerate(names):
        if (of_class := labels == c).any():
            accuracy = {role: (p[of_class] == c).float().mean().item() for role, p in predictions.items()}
            rows.append({"class": name, "count": int(of_class.sum())} | accuracy)
    report.add_table("Per-class accuracy", rows)

    # 5. linear probe of frozen features on a second dataset (CAE-DFKD transferability)
    probe = {}
    if args.probe_data:
        load = {"image_size": settings["image_size"], "channels": settings["channels"], "data_root": args.data_root}
        train, test = (load_probe_data(args.probe_data, split=split, **load)[:2] for split in ("train", "test"))
        fit = {"steps": args.probe_steps, "weight_decay": args.probe_weight_decay}
        for role, m in models.items():
            result = linear_probe(m, *train, *test, batch_size=args.batch_size, **fit)
            probe[role] = result["accuracy"]
            report.add_metric(
                prefixes[role] + "linear_probe",
                result["accuracy"],
                model=getattr(args, role),
                probe_data=args.probe_data,
                train_count=len(train[1]),
                test_count=len(test[1]),
                image_size=settings["image_size"],
                feature_dim=result["feature_dim"],
                train_accuracy=result["train_accuracy"],
                optimizer="lbfgs",
                **fit,
                seed=0,
                standardized="train mean/std",
            )
    # 6. the distillation run's curves, when the student folder is a run (gendistill dfkd --output)
    timing = time_to_accuracy(report.run_log(args.student))
    if timing:
        report.add_training_curves(args.student)
        caption = "held-out accuracy during distillation against wall-clock time (the run's log)"
        plot_accuracy_vs_time(report, timing, "accuracy_vs_time", caption)
        report.add_metric(
            "seconds_to_teacher_fraction",
            timing["seconds_to_reach"],
            source="the run's logs/metrics.jsonl",
            accuracy_key=timing["student_key"],
            teacher_accuracy=timing["teacher_accuracy"],
        )
    report.add_note(
        "top-k: a label counts as correct at k when it is among the k largest logits. Agreement: the fraction of "
        "images on which student and teacher predict the same class. Linear probe: frozen penultimate features "
        "(input of the final linear layer), standardized with train statistics, multinomial logistic regression "
        "fitted full-batch by L-BFGS, accuracy on the probe data's held-out split."
    )
    path = report.save()

    line = f"top-1 {accuracies['student']['top1']:.4f}"
    if "top5" in accuracies["student"]:
        line += f", top-5 {accuracies['student']['top5']:.4f}"
    line += f" on {len(labels)} {args.data} {args.split} images"
    if teacher is not None:
        line += f"; teacher top-1 {accuracies['teacher']['top1']:.4f}, agreement {agree:.4f}"
    if probe:
        line += f"; linear probe on {args.probe_data} {probe['student']:.4f}"
    print(f"{line}; report: {path}")
    return 0


def main_asr(argv: list[str] | None = None) -> int:
    """``gendistill eval asr``: clean accuracy and backdoor attack success rate of one or more classifiers; writes
    metrics.json + report.md + triggers.png (clean vs triggered images)."""
    parser = argparse.ArgumentParser(
        prog="gendistill eval asr",
        description="Clean accuracy and backdoor attack success rate (ASR) of classifiers, e.g. a planted teacher "
        "and its distilled student.",
    )
    parser.add_argument("--model", action="append", default=[], help="classifier folder (repeat for several)")
    parser.add_argument("--teacher", default=None, help="teacher classifier folder")
    parser.add_argument("--student", default=None, help="student classifier folder")
    parser.add_argument("--trigger", default="badnets", help=f"{' | '.join(TRIGGERS)} (default settings)")
    parser.add_argument("--target", type=int, default=0, help="the backdoor's target class")
    parser.add_argument("--num-images", type=int, default=8, help="images in the clean-vs-triggered grid")
    args = _parse_args(parser, argv)
    trigger = make_trigger(args.trigger)
    folders = [(Path(f).name or f, f) for f in args.model]
    folders += [(role, getattr(args, role)) for role in ("teacher", "student") if getattr(args, role)]
    if not folders:
        raise UsageError("give at least one classifier: --model DIR (repeatable), --teacher DIR or --student DIR")
    labels_seen: dict[str, int] = {}
    named = []
    for label, folder in folders:  # unique labels for folders with the same name
        labels_seen[label] = labels_seen.get(label, 0) + 1
        named.append((label if labels_seen[label] == 1 else f"{label}_{labels_seen[label]}", folder))
    device = _device(args.device)
    models = {label: _load_model(folder, "model", device) for label, folder in named}
    first = next(iter(models.values())).config
    for label, m in models.items():
        c = m.config
        if (c.image_size, c.in_channels, c.num_classes) != (first.image_size, first.in_channels, first.num_classes):
            raise UsageError(
                f"the classifiers must take the same images and classes; {label} differs: "
                f"{c.in_channels}x{c.image_size}x{c.image_size}, {c.num_classes} classes"
            )
    if not 0 <= args.target < first.num_classes:
        raise UsageError(
            f"--target {args.target} is not a class of the classifiers; valid: 0 to {first.num_classes - 1}"
        )
    images, labels, names, settings = _load_data(args, first)
    trigger_settings = dataclasses.asdict(trigger) if dataclasses.is_dataclass(trigger) else {"repr": repr(trigger)}
    settings |= {"trigger": args.trigger, "trigger_settings": trigger_settings, "target": args.target}
    report = Report(args.output, title="Backdoor attack success rate", command="eval asr", device=device)

    # 1. the picture first: clean non-target images above the same images triggered
    others = torch.nonzero(labels != args.target).flatten()
    if len(others) == 0:
        raise UsageError(f"every image of {args.data!r} {args.split} has label {args.target}: nothing to trigger")
    shown = others[_spread(len(others), args.num_images)]
    clean, triggered = images[shown], trigger.apply(images[shown])
    report.add_grid(
        "triggers",
        torch.cat([clean, triggered]),
        nrow=len(shown),
        caption=f"top: clean {args.data} images; bottom: with the {args.trigger} trigger "
        f"(target class {names[args.target]})",
    )
    grid_rows = [{"image": j, "index": i, "label": names[int(labels[i])]} for j, i in enumerate(shown.tolist())]
    for label, m in models.items():
        for row, on_clean, on_triggered in zip(grid_rows, predict(m, clean), predict(m, triggered)):
            row[f"{label} clean"], row[f"{label} triggered"] = names[int(on_clean)], names[int(on_triggered)]

    # 2. clean accuracy and ASR of each model
    table, summary = [], []
    for (label, folder), m in zip(named, models.values()):
        accuracy = topk_accuracy(m, images, labels, topk=(1,), batch_size=args.batch_size)["top1"]
        asr = attack_success_rate(m, images, labels, trigger=trigger, target=args.target, batch_size=args.batch_size)
        report.add_metric(f"{label}_clean_top1", accuracy, model=folder, **settings)
        report.add_metric(f"{label}_asr", asr, model=folder, triggered_count=len(others), **settings)
        table.append({"model": label, "folder": folder, "clean top-1": accuracy, "ASR": asr})
        summary.append(f"{label}: clean top-1 {accuracy:.4f}, ASR {asr:.4f}")
    report.add_table("Clean accuracy and attack success rate", table)
    report.add_table("Predictions of the grid images", grid_rows)
    report.add_note(
        f"ASR: the fraction of the {len(others)} triggered images whose true class is not the target "
        f"({names[args.target]}) that a model classifies as the target. Clean top-1 on all {len(labels)} images."
    )
    path = report.save()
    print(
        f"{'; '.join(summary)} ({args.trigger} -> {args.target} on {len(others)} {args.data} images); report: {path}"
    )
    return 0


__all__ = [
    "agreement",
    "attack_success_rate",
    "features",
    "linear_probe",
    "load_probe_data",
    "main_accuracy",
    "main_asr",
    "predict",
    "probe_features",
    "topk_accuracy",
]
