"""Speech recognizers as ``transformers`` Whisper models: built from a config, or loaded from a folder (or hub id)
with ``from_pretrained``, and saved back the same way, processor included, so the folder loads anywhere with
``WhisperForConditionalGeneration.from_pretrained`` and ``WhisperProcessor.from_pretrained``.

A model built from scratch is English-only (no language or task tokens: its decoder prompt is
``<|startoftranscript|><|notimestamps|>``, as ``whisper-tiny.en``'s) and reads a byte-level BPE vocabulary learnt
from the transcripts the caller gives. Its log-mel window (``chunk_seconds``) may be shorter than Whisper's 30 s:
short commands do not need 1,500 encoder positions.

:func:`shrink_whisper` makes a student with fewer encoder and decoder layers whose weights start from the teacher's
(layers picked evenly from first to last, as Distil-Whisper initializes its students).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

from ..errors import UsageError
from ..text.models import byte_level_bpe, pretrained_source

SAMPLING_RATE = 16_000
# Whisper's special tokens, in its order (a tokenizer learnt here puts them right after the BPE vocabulary)
SPECIAL_TOKENS = ("<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
                  "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>")  # fmt: skip


@dataclass
class WhisperSize:
    """The shape of a Whisper model built from config."""

    width: int = 192  # d_model of the encoder and the decoder
    encoder_layers: int = 4
    decoder_layers: int = 4
    heads: int = 4  # attention heads (must divide width)
    mel_bins: int = 80  # log-mel channels (Whisper's: 80)
    chunk_seconds: int = 3  # the log-mel window: longer audio is refused, shorter is padded
    max_target_tokens: int = 48  # the longest transcript in tokens, prompt included

    def validate(self, what: str = "model") -> None:
        for name in ("width", "encoder_layers", "decoder_layers", "heads", "mel_bins", "chunk_seconds"):
            if getattr(self, name) < 1:
                raise UsageError(f"{what}: {name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise UsageError(f"{what}: heads ({self.heads}) must divide width ({self.width})")
        if self.max_target_tokens < 4:
            raise UsageError(f"{what}: max_target_tokens must be >= 4, got {self.max_target_tokens}")


def train_whisper_tokenizer(texts: list[str], vocab_size: int = 400) -> WhisperTokenizer:
    """A Whisper tokenizer whose byte-level BPE vocabulary (``tokenizers``' trainer) is learnt from ``texts``, with
    Whisper's special tokens after it; English-only, no timestamps."""
    if vocab_size < 257:
        raise UsageError(f"vocab_size must be >= 257 (the 256 bytes and one merge), got {vocab_size}")
    if not texts:
        raise UsageError("a tokenizer needs at least one transcript to learn from")
    vocab, merges = byte_level_bpe(texts, vocab_size)
    specials = list(SPECIAL_TOKENS[1:])
    return WhisperTokenizer(vocab=vocab, merges=merges, additional_special_tokens=specials,
                            pad_token=SPECIAL_TOKENS[0])  # fmt: skip


def special_ids(tokenizer) -> dict[str, int]:
    return {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}


def build_whisper(tokenizer: WhisperTokenizer, size: WhisperSize) -> tuple[WhisperForConditionalGeneration,
                                                                            WhisperProcessor]:  # fmt: skip
    """A freshly initialized English-only Whisper (seeded by the global RNG) over ``tokenizer``'s vocabulary, and
    its processor (feature extractor with a ``size.chunk_seconds`` window, and the tokenizer)."""
    size.validate()
    ids = special_ids(tokenizer)
    frames = size.chunk_seconds * SAMPLING_RATE // 160  # the feature extractor's hop is 160 samples
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=size.mel_bins,
        d_model=size.width,
        encoder_layers=size.encoder_layers,
        decoder_layers=size.decoder_layers,
        encoder_attention_heads=size.heads,
        decoder_attention_heads=size.heads,
        encoder_ffn_dim=4 * size.width,
        decoder_ffn_dim=4 * size.width,
        max_source_positions=frames // 2,  # the encoder's second convolution has stride 2
        max_target_positions=size.max_target_tokens,
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        no_timestamps_token_id=ids["<|notimestamps|>"],
        is_multilingual=False,
        max_length=size.max_target_tokens,
    )
    features = WhisperFeatureExtractor(feature_size=size.mel_bins, chunk_length=size.chunk_seconds)
    return model, WhisperProcessor(feature_extractor=features, tokenizer=tokenizer)


def has_processor(folder: Path) -> bool:
    """Whether ``folder`` holds a saved processor (transformers 5 writes processor_config.json, 4 wrote
    preprocessor_config.json)."""
    return any((folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json"))


def load_whisper(source: str | os.PathLike) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """``(model, processor)`` from a folder (or a hub id where the hub is reachable), in eval mode on the CPU."""
    source = pretrained_source(source, "speech model")
    if Path(source).exists() and not has_processor(Path(source)):
        raise FileNotFoundError(
            f"{source!r} is not a Whisper folder: it needs processor_config.json or preprocessor_config.json besides "
            "config.json (what save_pretrained of the model and its WhisperProcessor write)"
        )
    try:
        processor = WhisperProcessor.from_pretrained(source)
        model = WhisperForConditionalGeneration.from_pretrained(source)
    except OSError as err:
        raise UsageError(f"cannot load a Whisper model from {source!r}: {err}") from None
    expected = 2 * model.config.max_source_positions
    if processor.feature_extractor.nb_max_frames != expected:
        raise UsageError(
            f"{source!r}: the feature extractor makes {processor.feature_extractor.nb_max_frames} frames, the model "
            f"reads {expected}"
        )
    return model.eval(), processor


def save_whisper(model: WhisperForConditionalGeneration, processor: WhisperProcessor, folder) -> None:
    """``save_pretrained`` of the model (safetensors, generation config) and its processor into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(folder)
    model.to("cpu").save_pretrained(folder)


def layer_picks(total: int, keep: int) -> list[int]:
    """``keep`` of ``total`` layer indices, evenly spaced from the first to the last."""
    if not 1 <= keep <= total:
        raise UsageError(f"a student keeps between 1 and {total} layers here, got {keep}")
    if keep == 1:
        return [0]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


def shrink_whisper(teacher: WhisperForConditionalGeneration, encoder_layers: int,
                   decoder_layers: int) -> WhisperForConditionalGeneration:  # fmt: skip
    """A Whisper with ``encoder_layers``/``decoder_layers`` layers whose weights are the teacher's: every shared
    part (convolutions, embeddings, final norms) copied, and layer i of each stack copied from the teacher's
    :func:`layer_picks` i."""
    config = teacher.config.to_dict()
    picks = {
        "encoder": layer_picks(teacher.config.encoder_layers, encoder_layers),
        "decoder": layer_picks(teacher.config.decoder_layers, decoder_layers),
    }
    config.update(encoder_layers=encoder_layers, decoder_layers=decoder_layers)
    student = WhisperForConditionalGeneration(WhisperConfig.from_dict(config))
    student.generation_config = GenerationConfig.from_dict(teacher.generation_config.to_dict())
    source = teacher.state_dict()
    state = {}
    for name in student.state_dict():
        parts = name.split(".")
        if len(parts) > 3 and parts[2] == "layers" and parts[1] in picks:  # model.encoder.layers.i.*
            parts[3] = str(picks[parts[1]][int(parts[3])])
        state[name] = source[".".join(parts)].clone()
    student.load_state_dict(state)
    return student


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
