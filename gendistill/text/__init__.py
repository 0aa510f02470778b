"""Text classifiers as ``transformers`` models (``models``) and their data-free distillation: zero-shot KD for NLP
from an out-of-domain pool plus adversarial samples in the embedding space (``zero_shot``), and ZeroGen: a causal
language model writes a labelled dataset from label-conditioned prompts for a small classifier (``zerogen``)."""

from .models import TextClassifierSize, build_text_classifier, load_text_classifier, save_text_classifier
from .zero_shot import METHODS, ZeroShotConfig, ZeroShotTextKDTask
from .zerogen import (
    LanguageModelSize,
    TextClassifierTask,
    build_language_model,
    generate_examples,
    load_language_model,
    save_language_model,
)

__all__ = [
    "METHODS",
    "LanguageModelSize",
    "TextClassifierSize",
    "TextClassifierTask",
    "ZeroShotConfig",
    "ZeroShotTextKDTask",
    "build_language_model",
    "build_text_classifier",
    "generate_examples",
    "load_language_model",
    "load_text_classifier",
    "save_language_model",
    "save_text_classifier",
]
