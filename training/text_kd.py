"""``gendistill text-kd``: distill a ``transformers`` text classifier into a small student without the task's text.

    gendistill text-kd --teacher docstring-teacher --pool pydoc --eval-data docstrings --output student

``--method zskd`` (default): KD on an out-of-domain pool of texts plus adversarial samples in the embedding space
(zero-shot KD for NLP); ``--method kd``: KD on the pool alone (the baseline). The pool is ``pydoc`` (the Python
language reference's paragraphs, shipped with Python), ``stdlib`` (docstrings of the standard-library modules
outside the docstring task's packages), a ``.txt``/``.jsonl``/``.csv`` file of texts, or Solidity code (a folder of
``.sol`` files or an npm ``.tgz``: its functions), which ``--pool-recombine N`` extends by N functions recombined
from the pool's statements (each a pool function with ``--recombine-statements`` of the pool's statements put in; the
seed is ``--seed``): AF-STip's setting, with ``--method-options pool_sampling=balanced``. The student reads the
teacher's tokenizer: built from config (``--student-hidden/--student-layers/--student-heads``) or loaded from a
folder (``--student``) with the same vocabulary. ``--eval-data`` (the task's held-out split: ``docstrings`` or a
labelled ``.jsonl``/``.csv``) is used to measure, never to train. The output folder loads with
``AutoModelForSequenceClassification.from_pretrained`` (tokenizer included); ``results.json`` has the held-out
accuracy, the teacher's, and both models' sizes.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from gendistill.data.code import recombined_functions
from gendistill.data.text import load_text_data, load_text_pool
from gendistill.errors import UsageError
from gendistill.text.models import (
    TextClassifierSize,
    build_text_classifier,
    count_parameters,
    load_text_classifier,
    save_text_classifier,
)
from gendistill.text.zero_shot import METHODS, ZeroShotConfig, ZeroShotTextKDTask, config_from_options

from .core import run_recipe
from .recipes import TrainRecipe, parse_options, parse_recipe
from .teach_text import encode

COMMAND = "text-kd"


@dataclass
class TextKDRecipe(TrainRecipe):
    output: str = "text-student"  # run folder; also the student (save_pretrained: model + the teacher's tokenizer)
    teacher: str | None = (
        None  # text classifier folder (save_pretrained), e.g. from `gendistill teach text-classifier`
    )
    method: str = "zskd"  # zskd (pool KD + adversarial samples) | kd (pool KD alone)
    pool: str = "pydoc"  # out-of-domain texts: pydoc | stdlib | a .txt/.jsonl/.csv file | Solidity: folder or .tgz
    pool_recombine: int = 0  # code pools: add this many functions recombined from the pool's statements
    recombine_statements: int = 2  # the pool's statements put into each recombined function
    method_options: list[str] | None = None  # key=value: ZeroShotConfig fields
    student: str | None = None  # a student folder to start from (same vocabulary); None: built from config
    student_hidden: int = 64  # built from config: hidden size
    student_layers: int = 2  # built from config: transformer layers
    student_heads: int = 2  # built from config: attention heads
    eval_data: str | None = None  # held-out task texts to measure on: docstrings | a labelled .jsonl/.csv file
    test_fraction: float = 0.2  # the held-out share of --eval-data (the teacher's split)
    max_length: int = 128  # tokens per text (at most the teacher's position embeddings)
    max_steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3  # AdamW learning rate of the student
    lr_scheduler: str = "constant"
    ema_decay: float = 0.0  # export the live student
    eval_every: int = 250
    sample_every: int = 0
    checkpoint_every: int = 500

    INPUT_PATHS = ("teacher", "pool", "student", "eval_data")

    def validate(self) -> None:
        super().validate()
        if not self.teacher:
            raise UsageError("--teacher is required: a text classifier folder (e.g. from gendistill teach "
                             "text-classifier)")  # fmt: skip
        if self.method not in METHODS:
            raise UsageError(f"unknown text KD method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.pool_recombine < 0 or self.recombine_statements < 1:
            raise UsageError(f"pool_recombine must be >= 0 and recombine_statements >= 1, got {self.pool_recombine} "
                             f"and {self.recombine_statements}")  # fmt: skip
        if self.max_length < 8:
            raise UsageError(f"max_length must be >= 8 tokens, got {self.max_length}")
        if self.student is None:
            TextClassifierSize(self.student_hidden, self.student_layers, self.student_heads).validate("student")
        self.config()

    def config(self) -> ZeroShotConfig:
        types = typing.get_type_hints(ZeroShotConfig)
        return config_from_options(parse_options(self.method_options, types, owner=self.method))


def teacher_label_ids(labels: list[int], label_names: list[str], teacher_names: list[str], *, what: str) -> list[int]:
    """``labels`` (indices into ``label_names``) as the teacher's label ids, matched by name."""
    unknown = sorted(set(label_names) - set(teacher_names))
    if unknown:
        raise UsageError(f"{what} has labels {unknown} the teacher does not know (its labels: "
                         f"{', '.join(teacher_names)})")  # fmt: skip
    return [teacher_names.index(label_names[label]) for label in labels]


def run(recipe: TextKDRecipe) -> dict:
    config = recipe.config()

    def build():
        teacher, tokenizer = load_text_classifier(recipe.teacher)
        names = [teacher.config.id2label[i] for i in range(teacher.config.num_labels)]
        length = min(recipe.max_length, teacher.config.max_position_embeddings)  # texts are cut to what it reads
        pool = load_text_pool(recipe.pool)
        if recipe.pool_recombine:
            made = recombined_functions(pool, recipe.pool_recombine, seed=recipe.seed,
                                        inserted=recipe.recombine_statements)  # fmt: skip
            pool = pool + made
        eval_data = None
        if recipe.eval_data:
            texts, labels, eval_names = load_text_data(recipe.eval_data, "test", test_fraction=recipe.test_fraction)
            labels = teacher_label_ids(labels, eval_names, names, what=f"--eval-data {recipe.eval_data!r}")
            eval_data = (*encode(tokenizer, texts, length), torch.tensor(labels))
        torch.manual_seed(recipe.seed)
        if recipe.student is not None:
            student, _ = load_text_classifier(recipe.student, num_labels=len(names))
            student_names = [student.config.id2label[i] for i in range(student.config.num_labels)]
            if student_names != names:
                raise UsageError(f"--student {recipe.student!r} has labels {student_names}, the teacher {names} "
                                 "(same labels in the same order)")  # fmt: skip
            student.train()
        else:
            size = TextClassifierSize(recipe.student_hidden, recipe.student_layers, recipe.student_heads)
            student = build_text_classifier(tokenizer, names, size, max_length=length)
        ids, mask = encode(tokenizer, pool, length)
        task = ZeroShotTextKDTask(teacher, student, ids, mask, method=recipe.method, config=config,
                                  special_ids=tokenizer.all_special_ids, eval_data=eval_data)  # fmt: skip
        task.tokenizer = tokenizer
        return task

    def export(trainer, task, metrics):
        student = trainer.export_module("student")
        save_text_classifier(student, task.tokenizer, Path(recipe.output))
        summary = {
            "method": recipe.method,
            "pool_size": len(task.pool_ids),
            "student_parameters": count_parameters(student),
            "teacher_parameters": count_parameters(task.teacher),
        }
        keys = ("accuracy", "macro_f1", "teacher_accuracy", "teacher_macro_f1", "relative_accuracy",
                "relative_macro_f1", "teacher_agreement")  # fmt: skip
        for key in keys:
            if key in metrics:
                summary[key] = metrics[key]
        summary["options"] = dataclasses.asdict(config)
        return summary

    return run_recipe(recipe, COMMAND, build, export)


def main(argv: list[str] | None = None) -> int:
    recipe = parse_recipe(
        TextKDRecipe,
        argv,
        prog="gendistill text-kd",
        method="text_kd",
        description="Distill a transformers text classifier into a small student without the task's text.",
    )
    summary = run(recipe)
    line = f"student {summary['student_parameters']:,} parameters (teacher {summary['teacher_parameters']:,})"
    if "accuracy" in summary:
        line += f"; held-out accuracy {summary['accuracy']:.3f} = {summary['relative_accuracy']:.1%} of the teacher"
    print(line)
    return 0
