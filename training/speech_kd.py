"""``gendistill speech-kd``: distill a Whisper teacher into a smaller Whisper on unlabelled audio, its pseudo-labels
filtered without ground truth (uDistil-Whisper).

    gendistill speech-kd --teacher speech-teacher --audio unlabelled/ --filter proxy --proxy speech-proxy \\
        --eval-data heldout/ --output speech-student

The teacher transcribes every ``.wav`` of ``--audio`` (any metadata there is ignored); ``--filter`` ranks its
transcripts without labels (``confidence``: the teacher's mean token log-probability; ``proxy``: agreement with
``--proxy``'s transcripts; ``similarity``: their sentence embeddings' cosine similarity by ``--sentence-encoder``;
``none``: all of them) and ``--keep`` of the pool is kept. The student starts from the
teacher's weights with ``--student-encoder-layers``/``--student-decoder-layers`` layers (default: half of each,
picked evenly from first to last), or from a Whisper folder (``--student``) with the teacher's vocabulary. It learns
the kept pseudo-labels (cross-entropy; ``--method-options kl_weight=W`` adds W x KL from the teacher's token
distributions). ``--eval-data`` (a labelled audio folder) is used to measure, never to train. The run folder
gets ``pseudo_labels.jsonl`` (each file's transcript, scores and whether it was kept), the student (loads with
``WhisperForConditionalGeneration.from_pretrained``, processor included) and ``results.json`` with the held-out WER
and CER, the teacher's, and both models' sizes.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from gendistill.data.speech import load_audio_folder
from gendistill.errors import UsageError
from gendistill.speech.models import count_parameters, load_whisper, save_whisper, shrink_whisper
from gendistill.speech.udistil import (
    FILTERS,
    SpeechKDConfig,
    SpeechKDTask,
    config_from_options,
    filter_scores,
    label_ids,
    load_sentence_encoder,
    log_mel,
    select,
    sentence_embeddings,
    transcribe,
    transcript_confidence,
    utterance_wer,
)

from .core import run_recipe
from .recipes import TrainRecipe, parse_options, parse_recipe

COMMAND = "speech-kd"
PSEUDO_LABELS = "pseudo_labels.jsonl"


@dataclass
class SpeechKDRecipe(TrainRecipe):
    output: str = "speech-student"  # run folder; also the student (save_pretrained: model + processor)
    teacher: str | None = None  # Whisper folder (save_pretrained), e.g. from `gendistill teach speech-recognizer`
    audio: str | None = None  # unlabelled audio folder (.wav files) the teacher transcribes
    filter: str = "proxy"  # confidence | proxy | similarity | none: how pseudo-labels are ranked, without labels
    keep: float = 0.5  # the fraction of the pool kept (best first by the filter's score)
    proxy: str | None = None  # a second Whisper folder whose transcripts the proxy filter compares with the teacher's
    sentence_encoder: str | None = None  # similarity filter: a transformers text encoder folder (AutoModel)
    student: str | None = None  # a Whisper folder to start from (the teacher's vocabulary); None: the teacher shrunk
    student_encoder_layers: int = 0  # the teacher shrunk: encoder layers kept (0: half, at least 1)
    student_decoder_layers: int = 0  # the teacher shrunk: decoder layers kept (0: half, at least 1)
    method_options: list[str] | None = None  # key=value: kl_weight, temperature
    eval_data: str | None = None  # labelled audio folder to measure on (.wav + metadata.csv)
    max_steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4  # AdamW learning rate of the student
    lr_scheduler: str = "constant"
    ema_decay: float = 0.0  # export the live student
    eval_every: int = 250
    sample_every: int = 0
    checkpoint_every: int = 500

    INPUT_PATHS = ("teacher", "audio", "proxy", "sentence_encoder", "student", "eval_data")

    def validate(self) -> None:
        super().validate()
        if not self.teacher or not self.audio:
            raise UsageError("--teacher (a Whisper folder) and --audio (a folder of unlabelled .wav files) are "
                             "required")  # fmt: skip
        if self.filter not in FILTERS:
            raise UsageError(f"unknown filter {self.filter!r}; valid: {', '.join(FILTERS)}")
        if self.filter in ("proxy", "similarity") and not self.proxy:
            raise UsageError(f"--filter {self.filter} needs --proxy: a second Whisper folder (e.g. another "
                             "`gendistill teach speech-recognizer` run)")  # fmt: skip
        if self.filter == "similarity" and not self.sentence_encoder:
            raise UsageError("--filter similarity needs --sentence-encoder: a transformers text encoder folder")
        if not 0 < self.keep <= 1:
            raise UsageError(f"keep must be in (0, 1], got {self.keep}")
        if self.student_encoder_layers < 0 or self.student_decoder_layers < 0:
            raise UsageError("student layer counts must be >= 0 (0: half the teacher's)")
        self.config()

    def config(self) -> SpeechKDConfig:
        return config_from_options(parse_options(self.method_options, typing.get_type_hints(SpeechKDConfig),
                                                 owner="speech-kd"))  # fmt: skip


def pseudo_label(recipe: SpeechKDRecipe, teacher, processor, features: torch.Tensor, names: list[str]):
    """The teacher's transcripts of the pool, their scores, and the kept indices; the rows of pseudo_labels.jsonl."""
    tokenizer = processor.tokenizer
    texts = transcribe(teacher, tokenizer, features, desc="teacher transcribes the pool")
    usable = torch.tensor([bool(t) for t in texts])
    labels = label_ids(tokenizer, [t or "-" for t in texts], teacher.config.max_target_positions, truncate=True)
    confidence = transcript_confidence(teacher, features, labels)
    proxy_texts = proxy_wer = None
    if recipe.proxy:
        proxy, proxy_processor = load_whisper(recipe.proxy)
        keys = ("n_samples", "feature_size", "hop_length", "n_fft", "sampling_rate")  # what the log-mel depends on
        ours, theirs = ({k: getattr(p.feature_extractor, k) for k in keys} for p in (processor, proxy_processor))
        if ours != theirs:
            raise UsageError(f"--proxy {recipe.proxy!r} reads other features than the teacher: {theirs} against "
                             f"{ours}")  # fmt: skip
        proxy_texts = transcribe(proxy, proxy_processor.tokenizer, features, desc="proxy transcribes the pool")
        proxy_wer = utterance_wer(texts, proxy_texts)
    similarity = None
    if recipe.sentence_encoder and proxy_texts is not None:
        encoder, encoder_tokenizer = load_sentence_encoder(recipe.sentence_encoder)
        both = sentence_embeddings(encoder, encoder_tokenizer, texts + proxy_texts)
        similarity = (both[: len(texts)] * both[len(texts) :]).sum(dim=1)
    scores, tie_break = filter_scores(recipe.filter, confidence, proxy_wer, similarity)
    kept = select(scores, recipe.keep, usable, tie_break=tie_break)
    kept_set = set(kept.tolist())
    rows = []
    for i, name in enumerate(names):
        row = {"file_name": name, "transcription": texts[i], "confidence": round(float(confidence[i]), 6)}
        if proxy_texts is not None:
            row.update(proxy_transcription=proxy_texts[i], proxy_wer=round(proxy_wer[i], 6))
        if similarity is not None:
            row["similarity"] = round(float(similarity[i]), 6)
        row["kept"] = i in kept_set
        rows.append(row)
    return texts, kept, rows


def run(recipe: SpeechKDRecipe) -> dict:
    config = recipe.config()

    def build():
        teacher, processor = load_whisper(recipe.teacher)
        audio, _, names = load_audio_folder(recipe.audio, labelled=False)
        features = log_mel(processor, audio, names=names)
        texts, kept, rows = pseudo_label(recipe, teacher, processor, features, names)
        eval_data = None
        if recipe.eval_data:
            eval_audio, references, eval_names = load_audio_folder(recipe.eval_data, labelled=True)
            eval_data = (log_mel(processor, eval_audio, names=eval_names), references)
        torch.manual_seed(recipe.seed)
        if recipe.student is not None:
            student, _ = load_whisper(recipe.student)
            if student.config.vocab_size != teacher.config.vocab_size:
                raise UsageError(f"--student {recipe.student!r} has {student.config.vocab_size} tokens, the "
                                 f"teacher {teacher.config.vocab_size} (it reads the teacher's text)")  # fmt: skip
        else:
            encoder = recipe.student_encoder_layers or max(1, teacher.config.encoder_layers // 2)
            decoder = recipe.student_decoder_layers or max(1, teacher.config.decoder_layers // 2)
            student = shrink_whisper(teacher, encoder, decoder)
        student.train()
        labels = label_ids(processor.tokenizer, [texts[i] for i in kept], teacher.config.max_target_positions,
                           truncate=True)  # fmt: skip
        task = SpeechKDTask(teacher, student, features[kept], labels, processor.tokenizer, config=config,
                            eval_data=eval_data)  # fmt: skip
        task.processor, task.rows = processor, rows
        return task

    def prepare(trainer, task):
        if trainer.accelerator.is_main_process:
            text = "".join(json.dumps(row) + "\n" for row in task.rows)
            (Path(recipe.output) / PSEUDO_LABELS).write_text(text, encoding="utf-8")

    def export(trainer, task, metrics):
        student = trainer.export_module("student")
        save_whisper(student, task.processor, Path(recipe.output))
        teacher = task.teacher.config
        summary = {
            "filter": recipe.filter,
            "pool_size": len(task.rows),
            "kept": len(task.labels),
            "student_parameters": count_parameters(student),
            "teacher_parameters": count_parameters(task.teacher),
            "student_layers": [student.config.encoder_layers, student.config.decoder_layers],
            "teacher_layers": [teacher.encoder_layers, teacher.decoder_layers],
        }
        for key in ("wer", "cer", "teacher_wer", "teacher_cer"):
            if key in metrics:
                summary[key] = metrics[key]
        summary["options"] = dataclasses.asdict(config)
        return summary

    return run_recipe(recipe, COMMAND, build, export, prepare=prepare)


def main(argv: list[str] | None = None) -> int:
    recipe = parse_recipe(
        SpeechKDRecipe,
        argv,
        prog="gendistill speech-kd",
        method="speech_kd",
        description="Distill a Whisper teacher into a smaller Whisper on unlabelled audio with label-free filtered "
        "pseudo-labels (uDistil-Whisper).",
    )
    summary = run(recipe)
    line = (f"kept {summary['kept']} of {summary['pool_size']} pseudo-labels ({recipe.filter}); student "
            f"{summary['student_parameters']:,} parameters (teacher {summary['teacher_parameters']:,})")  # fmt: skip
    if "wer" in summary:
        line += f"; held-out WER {summary['wer']:.3f} (teacher {summary['teacher_wer']:.3f})"
    print(line)
    return 0
