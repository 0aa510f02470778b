"""Dice and IoU of predicted masks against reference masks, and EchoDFKD's label-free score.

Both are dataset-level and per class: true positives, false positives and false negatives of every class are summed
over all pixels of all images (``segmentation_models_pytorch.metrics.get_stats``), then
``Dice_c = 2 TP / (2 TP + FP + FN)`` and ``IoU_c = TP / (TP + FP + FN)``; the mean is over the foreground classes
(1..K-1) that occur in the reference or the prediction (a class absent from both has no score). Background is left
out of the mean: on digits it is three quarters of the pixels and would hide the digits' errors.

The label-free score (EchoDFKD's idea: judge a segmenter without human masks, by a larger auxiliary model) is the
mean Dice of the student's masks against a judge's masks on images that have no labels; the judge is by default the
teacher. How well it tracks the true Dice is measured, not assumed (``benchmarks/segment_mnist.py``).
"""

from __future__ import annotations

import torch

from ..errors import UsageError


def confusion_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, 3) int64: TP, FP, FN of each class summed over all pixels of masks ``pred``/``target`` (N, H, W)."""
    from .models import _smp

    if pred.shape != target.shape or pred.dim() != 3:
        raise UsageError(f"masks must both be (N, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}")
    tp, fp, fn, _ = _smp().metrics.get_stats(pred.long(), target.long(), mode="multiclass", num_classes=num_classes)
    return torch.stack([tp.sum(0), fp.sum(0), fn.sum(0)], dim=1)


def scores_from_counts(counts: torch.Tensor) -> dict[str, float | list]:
    """Mean Dice and IoU over the foreground classes with any pixel, and the per-class lists (None: no pixel)."""
    tp, fp, fn = counts[:, 0].double(), counts[:, 1].double(), counts[:, 2].double()
    present = (tp + fp + fn) > 0
    dice = torch.where(present, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.nan)
    iou = torch.where(present, tp / (tp + fp + fn).clamp_min(1), torch.nan)
    foreground = torch.arange(len(counts)) > 0
    chosen = present & foreground
    if not bool(chosen.any()):
        raise UsageError("no foreground pixel in the reference or the prediction: Dice is undefined")
    return {
        "dice": float(dice[chosen].mean()),
        "iou": float(iou[chosen].mean()),
        "dice_per_class": [None if torch.isnan(d) else round(float(d), 6) for d in dice],
        "iou_per_class": [None if torch.isnan(v) else round(float(v), 6) for v in iou],
    }


def dice_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict[str, float | list]:
    """Dataset-level mean Dice and IoU of masks ``pred`` against ``target`` (N, H, W), see the module docstring."""
    return scores_from_counts(confusion_counts(pred, target, num_classes))


@torch.no_grad()
def predict_masks(model: torch.nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Masks (N, H, W): the per-pixel argmax of ``model`` on ``images`` (N, C, H, W), in eval mode (restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    masks = [model(chunk.to(device)).argmax(1).cpu() for chunk in images.split(batch_size)]
    model.train(was_training)
    return torch.cat(masks)
