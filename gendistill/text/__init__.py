"""Text classifiers as ``transformers`` models (``models``) and their data-free distillation: zero-shot KD for NLP
from an out-of-domain pool plus adversarial samples in the embedding space (``zero_shot``)."""

from .models import TextClassifierSize, build_text_classifier, load_text_classifier, save_text_classifier
from .zero_shot import METHODS, ZeroShotConfig, ZeroShotTextKDTask

__all__ = [
    "METHODS",
    "TextClassifierSize",
    "ZeroShotConfig",
    "ZeroShotTextKDTask",
    "build_text_classifier",
    "load_text_classifier",
    "save_text_classifier",
]
