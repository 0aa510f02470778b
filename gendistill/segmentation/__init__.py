"""Segmentation distillation (EchoDFKD's setting): U-Net teachers and students from segmentation-models-pytorch,
digit masks, Dice/IoU, the label-free score, and the training tasks (``gendistill teach segmenter``,
``gendistill segment``). Needs ``pip install 'gendistill[segmentation]'``."""

from .data import DIGIT_CLASSES, digit_masks, load_segmentation_data
from .metrics import confusion_counts, dice_iou, predict_masks, scores_from_counts
from .models import ARCHITECTURES, Segmenter, SegmenterConfig, build_segmenter, load_segmenter, save_segmenter
from .task import SegmentationKDTask, SegmenterTrainingTask, colorize

__all__ = [
    "ARCHITECTURES",
    "DIGIT_CLASSES",
    "SegmentationKDTask",
    "Segmenter",
    "SegmenterConfig",
    "SegmenterTrainingTask",
    "build_segmenter",
    "colorize",
    "confusion_counts",
    "dice_iou",
    "digit_masks",
    "load_segmentation_data",
    "load_segmenter",
    "predict_masks",
    "save_segmenter",
    "scores_from_counts",
]
