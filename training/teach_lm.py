"""``gendistill teach language-model``: pretrain a small GPT-2 from config on a text corpus (ZeroGen's generator where
no pretrained language model can be downloaded).

    gendistill teach language-model --corpus stdlib,packages --output docs-lm

The result is a folder ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load
(config.json, model.safetensors, tokenizer files), plus ``results.json`` with the held-out perplexity. Corpus:
one or more of ``stdlib`` (the docstrings of the standard library outside the docstring task's six packages),
``packages`` (the docstrings of the installed third-party packages, read from their source), ``pydoc`` (the
language reference's paragraphs), or ``.txt``/``.jsonl``/``.csv`` files; every text the docstring task holds is
removed from the built-in corpora, and with ``--names`` (default) each built-in docstring comes after the dotted name
it documents (``smtplib.SMTP.sendmail: This command performs ...``), so the model can be prompted with a name;
``--keywords N`` puts a line of each text's N most distinctive words (tf-idf) in front of it, so the model can be
prompted with keywords (``Keywords: logger, handler, level.``).
A byte-level BPE vocabulary (``--vocab-size``) is learnt from the corpus; the run
keeps it (``tokenizer/``) and a resumed run reads it, so resume is exact. ``--held-out-fraction`` of the texts (by a
hash of each) measure the perplexity and are never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from gendistill.data.text import installed_docstrings, load_text_pool, split_of, stdlib_source_docstrings
from gendistill.errors import UsageError
from gendistill.text.models import count_parameters
from gendistill.text.zerogen import (
    LanguageModelSize,
    LanguageModelTask,
    build_language_model,
    keyword_headers,
    save_language_model,
    token_stream,
    train_bpe_tokenizer,
)

from .core import run_recipe
from .recipes import TrainRecipe, parse_recipe

COMMAND = "teach language-model"
TOKENIZER_FOLDER = "tokenizer"  # in the run folder: the tokenizer learnt at the start, which a resumed run reads


@dataclass
class TeachLanguageModelRecipe(TrainRecipe):
    output: str = "language-model"  # run folder; also the model (save_pretrained: model + tokenizer)
    corpus: list[str] = field(default_factory=lambda: ["stdlib", "packages"])  # stdlib | packages | pydoc | files
    names: bool = True  # built-in docstring corpora (stdlib, packages) as "dotted.name: docstring"
    keywords: int = 0  # > 0: each text after a "Keywords: ..." line of its N most distinctive words (tf-idf)
    held_out_fraction: float = 0.01  # share of the texts (by a hash of each) kept to measure the perplexity
    hidden: int = 192  # GPT-2 width
    layers: int = 4  # transformer blocks
    heads: int = 4  # attention heads
    context: int = 128  # tokens per training window (the model's positions)
    vocab_size: int = 5000  # byte-level BPE vocabulary learnt from the corpus
    max_steps: int = 2000
    batch_size: int = 32  # windows of --context tokens per step
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.01
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 100
    ema_decay: float = 0.0  # export the trained weights
    eval_every: int = 250  # held-out perplexity every N steps
    sample_every: int = 0
    checkpoint_every: int = 500

    def input_paths(self) -> dict[str, str | None]:
        paths = super().input_paths()
        for i, path in enumerate(self.corpus or [], start=1):
            paths[f"--corpus ({i})"] = path
        return paths

    def validate(self) -> None:
        super().validate()
        if not self.corpus:
            raise UsageError("--corpus needs at least one source: stdlib, packages, pydoc or a .txt/.jsonl/.csv file")
        if self.keywords < 0:
            raise UsageError(f"keywords must be >= 0 (0: no keyword line), got {self.keywords}")
        if not 0 < self.held_out_fraction < 1:
            raise UsageError(f"held_out_fraction must be in (0, 1), got {self.held_out_fraction}")
        LanguageModelSize(self.hidden, self.layers, self.heads, self.context).validate()


def load_corpus(sources: list[str], *, names: bool = False) -> list[str]:
    """The texts of every source, each once, in the order given; ``names``: the built-in docstring corpora with the
    dotted name each docstring documents in front (``"smtplib.SMTP.sendmail: This command performs ..."``), which
    ties what a text says to where it belongs, so the model can be prompted with a name."""
    texts = {}
    for source in sources:
        if names and source == "stdlib":
            found = stdlib_source_docstrings(with_names=True)
        elif names and source == "packages":
            found = installed_docstrings(with_names=True)
        else:
            found = load_text_pool(source)
        texts.update(dict.fromkeys(found))
    return list(texts)


def run(recipe: TeachLanguageModelRecipe) -> dict:
    def build():
        texts = load_corpus(recipe.corpus, names=recipe.names)
        if recipe.keywords:
            texts = keyword_headers(texts, recipe.keywords)
        train = [t for t in texts if split_of(t, recipe.held_out_fraction) == "train"]
        held_out = [t for t in texts if split_of(t, recipe.held_out_fraction) == "test"]
        if not train:
            raise UsageError(f"--corpus {recipe.corpus} leaves no text to train on")
        if recipe.resume is not None:
            tokenizer_folder = Path(recipe.output) / TOKENIZER_FOLDER
            if not (tokenizer_folder / "tokenizer_config.json").is_file():
                raise UsageError(
                    f"cannot resume: {str(tokenizer_folder)!r} (the tokenizer this run learnt) is missing"
                )
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
        else:
            tokenizer = train_bpe_tokenizer(train, recipe.vocab_size)
        torch.manual_seed(recipe.seed)
        size = LanguageModelSize(recipe.hidden, recipe.layers, recipe.heads, recipe.context)
        model = build_language_model(tokenizer, size)
        stream = token_stream(tokenizer, train)
        eval_stream = token_stream(tokenizer, held_out) if held_out else None
        task = LanguageModelTask(model, stream, context=recipe.context, eval_stream=eval_stream)
        task.tokenizer, task.sizes = tokenizer, (len(train), len(held_out), len(stream))
        return task

    def prepare(trainer, task):
        if trainer.accelerator.is_main_process:
            task.tokenizer.save_pretrained(Path(recipe.output) / TOKENIZER_FOLDER)

    def export(trainer, task, metrics):
        model = trainer.export_module("model")
        save_language_model(model, task.tokenizer, Path(recipe.output))
        return {
            "heldout_loss": metrics.get("heldout_loss"),
            "heldout_perplexity": metrics.get("heldout_perplexity"),
            "train_texts": task.sizes[0],
            "heldout_texts": task.sizes[1],
            "train_tokens": task.sizes[2],
            "corpus": list(recipe.corpus),
            "keywords": recipe.keywords,
            "parameters": count_parameters(model),
        }

    return run_recipe(recipe, COMMAND, build, export, prepare=prepare)


def main(argv: list[str] | None = None) -> int:
    recipe = parse_recipe(
        TeachLanguageModelRecipe,
        argv,
        prog="gendistill teach language-model",
        method="teach_lm",
        description="Pretrain a small GPT-2 from config on a text corpus (a generator for gendistill zerogen).",
    )
    summary = run(recipe)
    perplexity = summary["heldout_perplexity"]
    line = f"{summary['parameters']:,} parameters, {summary['train_tokens']:,} training tokens"
    print(line + (f"; held-out perplexity {perplexity:.1f}" if perplexity is not None else ""))
    return 0
