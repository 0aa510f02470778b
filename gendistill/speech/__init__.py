"""Speech recognizers as ``transformers`` Whisper models (``models``) and their label-free filtered distillation
(uDistil-Whisper: ``udistil``)."""

from .models import WhisperSize, build_whisper, load_whisper, save_whisper, shrink_whisper, train_whisper_tokenizer
from .udistil import FILTERS, SpeechKDConfig, SpeechKDTask, error_rates

__all__ = [
    "FILTERS",
    "SpeechKDConfig",
    "SpeechKDTask",
    "WhisperSize",
    "build_whisper",
    "error_rates",
    "load_whisper",
    "save_whisper",
    "shrink_whisper",
    "train_whisper_tokenizer",
]
