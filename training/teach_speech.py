"""``gendistill teach speech-recognizer``: train (or fine-tune) a ``transformers`` Whisper model on labelled audio.

    gendistill teach speech-recognizer --data speech/train --output speech-teacher

``--data`` is an audio folder (``.wav`` files and ``metadata.csv`` with ``file_name`` and ``transcription``, the layout
``datasets``' audiofolder reads); ``--test-fraction`` of its files (by a hash of the file name) are held out and the
run reports the word and character error rates on them. ``--base FOLDER_OR_HUB_ID`` fine-tunes a Whisper model with
its own processor; without it an English-only Whisper (``--width/--encoder-layers/--decoder-layers/--heads``, a
``--chunk-seconds`` log-mel window) is built from config with a byte-level BPE vocabulary (``--vocab-size``) learnt
from the training transcripts. The result is a folder ``WhisperForConditionalGeneration.from_pretrained`` and
``WhisperProcessor.from_pretrained`` load, plus ``results.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import WhisperProcessor

from gendistill.data.speech import load_audio_folder
from gendistill.data.text import split_of
from gendistill.errors import UsageError
from gendistill.speech.models import (
    WhisperSize,
    build_whisper,
    count_parameters,
    has_processor,
    load_whisper,
    save_whisper,
    train_whisper_tokenizer,
)
from gendistill.speech.udistil import IGNORE, error_rates, label_ids, log_mel, transcribe
from gendistill.task import Phase

from .core import run_recipe
from .recipes import TrainRecipe, parse_recipe

COMMAND = "teach speech-recognizer"
PROCESSOR_FOLDER = "processor"  # in the run folder: the processor (tokenizer) learnt at the start, read on resume


@dataclass
class TeachSpeechRecipe(TrainRecipe):
    output: str = "speech-teacher"  # run folder; also the model (save_pretrained: model + processor)
    data: str | None = None  # labelled audio folder (.wav files + metadata.csv: file_name, transcription)
    test_fraction: float = 0.1  # held-out share of the files (by a hash of each file name)
    base: str | None = None  # a Whisper folder (or hub id) to fine-tune; None: built from config
    width: int = 192  # built from config: d_model
    encoder_layers: int = 4  # built from config
    decoder_layers: int = 4  # built from config
    heads: int = 4  # built from config: attention heads
    chunk_seconds: int = 3  # built from config: the log-mel window (longer clips are refused)
    vocab_size: int = 400  # built from config: byte-level BPE vocabulary learnt from the training transcripts
    max_target_tokens: int = 48  # built from config: the longest transcript in tokens, prompt included
    max_steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3  # AdamW learning rate
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 100
    ema_decay: float = 0.0  # export the trained weights
    eval_every: int = 250  # held-out WER every N steps (greedy decoding of the held-out files)
    sample_every: int = 0
    checkpoint_every: int = 500

    INPUT_PATHS = ("data", "base")

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise UsageError("--data is required: a labelled audio folder (.wav files + metadata.csv)")
        if not 0 < self.test_fraction < 1:
            raise UsageError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.base is None:
            self.size().validate("teacher")

    def size(self) -> WhisperSize:
        return WhisperSize(self.width, self.encoder_layers, self.decoder_layers, self.heads,
                           chunk_seconds=self.chunk_seconds, max_target_tokens=self.max_target_tokens)  # fmt: skip


class SpeechRecognizerTrainingTask(nn.Module):
    """Cross-entropy training of a Whisper model on log-mel features (N, mel, frames) and label rows (N, L)."""

    example_unit = "clips"  # the progress bar and the logs show clips_per_s

    def __init__(self, model: nn.Module, features: torch.Tensor, labels: torch.Tensor, tokenizer, *, eval_data=None):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.register_buffer("features", features, persistent=False)
        self.register_buffer("labels", labels, persistent=False)
        self.eval_data = eval_data

    def phases(self) -> list[Phase]:
        return [Phase("model")]

    def sample_batch(self, phase: str, batch_size: int, device) -> torch.Tensor:
        return torch.randint(len(self.labels), (batch_size,)).to(device)

    def forward(self, phase: str, index: torch.Tensor) -> dict[str, torch.Tensor]:
        labels = self.labels[index]
        labels = labels[:, : int((labels != IGNORE).sum(dim=1).max())]
        return {"loss": self.model(input_features=self.features[index], labels=labels).loss}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self.eval_data is None:
            return {}
        features, references = self.eval_data
        return error_rates(references, transcribe(model, self.tokenizer, features))


def split_audio(audio, transcripts, names, test_fraction: float, split: str):
    keep = [i for i, n in enumerate(names) if split_of(n, test_fraction) == split]
    return [audio[i] for i in keep], [transcripts[i] for i in keep], [names[i] for i in keep]


def run(recipe: TeachSpeechRecipe) -> dict:
    def build():
        everything = load_audio_folder(recipe.data, labelled=True)
        audio, texts, names = split_audio(*everything, recipe.test_fraction, "train")
        test_audio, test_texts, test_names = split_audio(*everything, recipe.test_fraction, "test")
        if not audio or not test_audio:
            raise UsageError(f"{recipe.data!r}: {len(everything[0])} files give {len(audio)} to train and "
                             f"{len(test_audio)} held out (--test-fraction {recipe.test_fraction})")  # fmt: skip
        torch.manual_seed(recipe.seed)
        if recipe.base is not None:
            model, processor = load_whisper(recipe.base)
            model.train()
        else:
            if recipe.resume is not None:  # the run's own tokenizer: a retrained one may break ties differently
                folder = Path(recipe.output) / PROCESSOR_FOLDER
                if not has_processor(folder):
                    raise UsageError(f"cannot resume: {str(folder)!r} (the processor this run learnt) is missing")
                tokenizer = WhisperProcessor.from_pretrained(folder).tokenizer
            else:
                tokenizer = train_whisper_tokenizer(texts, recipe.vocab_size)
            model, processor = build_whisper(tokenizer, recipe.size())
        max_tokens = model.config.max_target_positions
        task = SpeechRecognizerTrainingTask(
            model, log_mel(processor, audio, names=names), label_ids(processor.tokenizer, texts, max_tokens),
            processor.tokenizer, eval_data=(log_mel(processor, test_audio, names=test_names), test_texts),
        )  # fmt: skip
        task.processor, task.sizes = processor, (len(audio), len(test_audio))
        return task

    def prepare(trainer, task):
        if trainer.accelerator.is_main_process and recipe.base is None:
            task.processor.save_pretrained(Path(recipe.output) / PROCESSOR_FOLDER)

    def export(trainer, task, metrics):
        model = trainer.export_module("model")
        save_whisper(model, task.processor, Path(recipe.output))
        return {
            "heldout_wer": metrics.get("wer"),
            "heldout_cer": metrics.get("cer"),
            "train_size": task.sizes[0],
            "heldout_size": task.sizes[1],
            "parameters": count_parameters(model),
            "encoder_layers": model.config.encoder_layers,
            "decoder_layers": model.config.decoder_layers,
        }

    return run_recipe(recipe, COMMAND, build, export, prepare=prepare)


def main(argv: list[str] | None = None) -> int:
    recipe = parse_recipe(
        TeachSpeechRecipe,
        argv,
        prog="gendistill teach speech-recognizer",
        method="teach_speech",
        description="Train or fine-tune a transformers Whisper speech recognizer on labelled audio.",
    )
    summary = run(recipe)
    print(f"held-out WER {summary['heldout_wer']:.3f}, CER {summary['heldout_cer']:.3f} "
          f"({summary['parameters']:,} parameters)")  # fmt: skip
    return 0
