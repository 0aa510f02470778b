"""Label-free filtered distillation of a Whisper teacher (uDistil-Whisper, Waheed et al., NAACL 2025).

The teacher transcribes unlabelled audio (greedy decoding); its transcripts are the student's labels (pseudo-labels).
Some are wrong, and a student that learns wrong transcripts learns to make them, so the pseudo-labels are filtered
before training, without any ground truth:

- ``confidence``: the teacher's mean log-probability of its own transcript's tokens (teacher forcing on the
  transcript it wrote, the end-of-text token included); low means unsure.
- ``proxy``: a second recognizer (the proxy) transcribes the same audio; the word error rate between the two
  transcripts (the teacher's as the reference) measures their disagreement; ties are broken by ``confidence``.
- ``similarity``: the cosine similarity of the two transcripts' sentence embeddings (a ``transformers`` encoder,
  mean-pooled): agreement in meaning rather than word for word; ties are broken by ``confidence``.
- ``none``: every pseudo-label (the baseline).

Empty transcripts are always dropped (nothing to learn). The filter keeps the best ``keep`` fraction of the pool by
its score. The student (usually :func:`~gendistill.speech.models.shrink_whisper` of the teacher) then learns from
the kept audio: cross-entropy on the pseudo-label tokens, plus (``kl_weight`` > 0) ``kl_weight`` x the KL divergence
from the teacher's token distributions at the same positions (Distil-Whisper's objective; the teacher runs on each
batch, as there: a vocabulary of 51,865 tokens makes a whole pool's logits too big to keep).

Word and character error rates are ``jiwer``'s (the ``speech`` extra), on normalized transcripts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from torch import nn
from tqdm.auto import tqdm

from ..data.speech import normalize_transcript
from ..errors import UsageError
from ..task import Phase

FILTERS = ("none", "confidence", "proxy", "similarity")
IGNORE = -100  # label positions the loss skips (padding)


def _jiwer():
    try:
        import jiwer
    except ImportError:  # pragma: no cover - the speech extra installs it
        raise UsageError("word error rates need jiwer: pip install 'gendistill[speech]'") from None
    return jiwer


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus word and character error rates (``jiwer``: edits summed over all utterances / reference length), on
    normalized transcripts. References must not be empty."""
    if len(references) != len(hypotheses) or not references:
        raise UsageError(f"need as many hypotheses as references (> 0), got {len(hypotheses)} and {len(references)}")
    references = [normalize_transcript(t) for t in references]
    hypotheses = [normalize_transcript(t) for t in hypotheses]
    if not all(references):
        raise UsageError("a reference transcript is empty: error rates are relative to the reference's length")
    jiwer = _jiwer()
    return {"wer": float(jiwer.wer(references, hypotheses)), "cer": float(jiwer.cer(references, hypotheses))}


def utterance_wer(references: list[str], hypotheses: list[str]) -> list[float]:
    """Each hypothesis's word error rate against its own reference (an empty reference: 0 if the hypothesis is
    empty too, else 1)."""
    jiwer = _jiwer()
    rates = []
    for reference, hypothesis in zip(references, hypotheses):
        reference, hypothesis = normalize_transcript(reference), normalize_transcript(hypothesis)
        rates.append(float(jiwer.wer(reference, hypothesis)) if reference else float(bool(hypothesis)))
    return rates


def log_mel(processor, audio: list[np.ndarray], *, names: list[str] | None = None, batch: int = 64) -> torch.Tensor:
    """The processor's log-mel features (N, mel bins, frames). Audio longer than its window is refused (Whisper
    would cut it, and its transcript with it)."""
    extractor = processor.feature_extractor
    window = extractor.n_samples
    too_long = [i for i, a in enumerate(audio) if len(a) > window]
    if too_long:
        i = too_long[0]
        what = names[i] if names else f"clip {i}"
        raise UsageError(f"{len(too_long)} clip(s) are longer than the model's {window / extractor.sampling_rate:g} "
                         f"s window, e.g. {what!r} ({len(audio[i]) / extractor.sampling_rate:.2f} s); cut them or "
                         "use a model with a longer window (--chunk-seconds)")  # fmt: skip
    chunks = []
    for start in range(0, len(audio), batch):
        part = extractor(audio[start : start + batch], sampling_rate=extractor.sampling_rate, return_tensors="pt")
        chunks.append(part.input_features)
    return torch.cat(chunks)


def label_ids(tokenizer, texts: list[str], max_tokens: int, *, truncate: bool = False) -> torch.Tensor:
    """The decoder's labels (N, L): each transcript's tokens after ``<|startoftranscript|>`` (the decoder's start
    token, which the model prepends), i.e. ``<|notimestamps|>``, the text, ``<|endoftext|>``; padded with -100.

    A transcript longer than the decoder reads (``max_tokens`` with the start token) is an error, or with
    ``truncate`` cut to fit without its end-of-text token: what a teacher's runaway transcript (a repetition loop
    that ran to the length limit) is, and what a student learns from it unfiltered."""
    rows = [tokenizer(text).input_ids[1:] for text in texts]
    if truncate:
        rows = [row[: max_tokens - 1] for row in rows]
    longest = max(len(r) for r in rows)
    if longest + 1 > max_tokens:
        i = max(range(len(rows)), key=lambda k: len(rows[k]))
        raise UsageError(f"transcript {texts[i]!r} is {longest + 1} tokens with its prompt; the model reads at most "
                         f"{max_tokens}")  # fmt: skip
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    for i, row in enumerate(rows):
        labels[i, : len(row)] = torch.tensor(row)
    return labels


@torch.no_grad()
def transcribe(model: nn.Module, tokenizer, features: torch.Tensor, *, batch: int = 32,
               desc: str | None = None) -> list[str]:  # fmt: skip
    """Greedy transcripts of ``model`` (``generate``) for every row of ``features``, normalized."""
    model = extract_model_from_parallel(model)  # generate() is not on a DDP wrapper
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts = []
    for start in tqdm(range(0, len(features), batch), desc=desc, disable=desc is None, leave=False):
        chunk = features[start : start + batch].to(device)
        mask = torch.ones(chunk.shape[0], chunk.shape[-1], dtype=torch.long, device=device)  # no padded frames
        ids = model.generate(chunk, attention_mask=mask, do_sample=False, num_beams=1)
        texts += [normalize_transcript(t) for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    model.train(was_training)
    return texts


def sequence_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean log-probability (N,) of each label row's tokens after its first (``<|notimestamps|>``, which the prompt
    forces), the end-of-text token included."""
    scored = labels.clone()
    scored[:, 0] = IGNORE
    valid = scored != IGNORE
    log_probs = F.log_softmax(logits, dim=-1).gather(-1, scored.clamp_min(0)[..., None])[..., 0]
    return (log_probs * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1)


@torch.no_grad()
def transcript_confidence(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, *,
                          batch: int = 32) -> torch.Tensor:  # fmt: skip
    """:func:`sequence_confidence` (N,) of ``model`` on its ``labels`` under teacher forcing, batch by batch (the
    logits of a whole pool, N x L x vocabulary, are never held at once)."""
    model = extract_model_from_parallel(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = []
    for start in range(0, len(features), batch):
        rows = labels[start : start + batch].to(device)
        logits = model(input_features=features[start : start + batch].to(device), labels=rows).logits
        scores.append(sequence_confidence(logits.float(), rows).cpu())
    model.train(was_training)
    return torch.cat(scores)


def select(scores: torch.Tensor, keep: float, usable: torch.Tensor, *, tie_break: torch.Tensor | None = None):
    """Indices (ascending) of the ``keep`` fraction of all rows with the highest ``scores`` (N,), among ``usable``
    rows; equal scores are ordered by ``tie_break`` (higher first), then by row (the earlier first)."""
    count = min(int(usable.sum()), max(1, round(keep * len(scores))))
    candidates = torch.nonzero(usable)[:, 0]
    order = torch.arange(len(candidates))
    if tie_break is not None:  # lexicographic: sort by the tie-break, then stably by the score
        order = torch.sort(-tie_break[candidates].double(), stable=True).indices
    order = order[torch.sort(-scores[candidates][order].double(), stable=True).indices]
    return candidates[order[:count]].sort().values


def load_sentence_encoder(source: str):
    """``(model, tokenizer)`` of a ``transformers`` text encoder folder (``AutoModel``/``AutoTokenizer``), in eval
    mode on the CPU."""
    from transformers import AutoModel, AutoTokenizer

    folder = Path(source).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"sentence encoder folder {source!r} has no config.json (what save_pretrained of a "
                                "transformers encoder and its tokenizer writes)")  # fmt: skip
    try:
        return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load a sentence encoder from {source!r}: {err}") from None


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, texts: list[str], *, batch: int = 64) -> torch.Tensor:
    """Unit-length sentence embeddings (N, D): the encoder's last hidden states averaged over each text's tokens."""
    chunks = []
    for start in range(0, len(texts), batch):
        encoded = tokenizer(texts[start : start + batch], padding=True, truncation=True, return_tensors="pt")
        hidden = model(**encoded).last_hidden_state  # (B, L, D)
        mask = encoded["attention_mask"][..., None].to(hidden.dtype)
        chunks.append(F.normalize((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1), dim=-1))
    return torch.cat(chunks)


def filter_scores(method: str, confidence: torch.Tensor, proxy_wer: list[float] | None = None,
                  similarity: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """``(scores, tie_break)`` that :func:`select` ranks by (higher is kept first) for filter ``method``: the
    teacher's confidence; the proxy's disagreement (negated) or the transcripts' similarity, ties broken by the
    confidence; or nothing (none)."""
    if method not in FILTERS:
        raise UsageError(f"unknown filter {method!r}; valid: {', '.join(FILTERS)}")
    if method == "none":
        return torch.zeros_like(confidence), None
    if method == "confidence":
        return confidence.clone(), None
    if method == "similarity":
        if similarity is None:
            raise UsageError("the similarity filter needs a proxy model (--proxy) and a sentence encoder")
        return similarity.double(), confidence.clone()
    if proxy_wer is None:
        raise UsageError("the proxy filter needs a proxy model (--proxy)")
    return -torch.tensor(proxy_wer, dtype=torch.float64), confidence.clone()


@dataclass
class SpeechKDConfig:
    """The distillation's options (``--method-options`` of ``gendistill speech-kd``)."""

    kl_weight: float = 0.0  # weight of KL(teacher || student) on the pseudo-label positions (0: cross-entropy only;
    # Distil-Whisper uses 0.8 with cross-entropy 1.0; measured here, the KL term made the students copy the teacher)
    temperature: float = 1.0  # softmax temperature of the KL term (scaled by temperature^2)

    def validate(self) -> None:
        if self.kl_weight < 0:
            raise UsageError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.temperature <= 0:
            raise UsageError(f"temperature must be > 0, got {self.temperature}")


def config_from_options(options: dict) -> SpeechKDConfig:
    names = {f.name for f in fields(SpeechKDConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise UsageError(f"unknown speech KD options {unknown}; valid: {', '.join(sorted(names))}")
    config = SpeechKDConfig(**options)
    config.validate()
    return config


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor, tau: float):
    """Mean over ``valid`` positions of KL(teacher || student) at temperature ``tau``, times tau^2."""
    teacher = F.log_softmax(teacher_logits / tau, dim=-1)
    student = F.log_softmax(student_logits / tau, dim=-1)
    per_position = (teacher.exp() * (teacher - student)).sum(dim=-1)
    return (per_position * valid).sum() / valid.sum().clamp_min(1) * tau**2


class SpeechKDTask(nn.Module):
    """The training core's task (phase ``"student"``): the student learns the kept pseudo-labels (module docstring).

    ``features`` (N, mel, frames) and ``labels`` (N, L; -100 padded, from :func:`label_ids`) are the kept pool
    utterances and their pseudo-labels. ``eval_data``: ``(features, references)`` of labelled held-out audio, used
    for evaluation only.
    """

    example_unit = "clips"  # the progress bar and the logs show clips_per_s

    def __init__(self, teacher: nn.Module, student: nn.Module, features: torch.Tensor, labels: torch.Tensor,
                 tokenizer, *, config: SpeechKDConfig | None = None,
                 eval_data: tuple[torch.Tensor, list[str]] | None = None):  # fmt: skip
        super().__init__()
        config = config or SpeechKDConfig()
        config.validate()
        if len(features) != len(labels) or len(features) == 0:
            raise UsageError(f"need one label row per utterance (> 0), got {len(features)} and {len(labels)}")
        if teacher.config.vocab_size != student.config.vocab_size:
            raise UsageError(f"teacher and student must share the vocabulary: {teacher.config.vocab_size} and "
                             f"{student.config.vocab_size} tokens")  # fmt: skip
        self.config, self.tokenizer = config, tokenizer
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.register_buffer("features", features, persistent=False)
        self.register_buffer("labels", labels, persistent=False)
        self.eval_data = eval_data
        self.teacher_metrics = None
        if eval_data is not None:
            self.teacher_metrics = self._metrics(teacher)

    def phases(self) -> list[Phase]:
        return [Phase("student")]

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def sample_batch(self, phase: str, batch_size: int, device) -> torch.Tensor:
        return torch.randint(len(self.labels), (batch_size,)).to(device)

    def forward(self, phase: str, index: torch.Tensor) -> dict[str, torch.Tensor]:
        labels = self.labels[index]
        length = int((labels != IGNORE).sum(dim=1).max())  # drop the padding columns every row of the batch has
        labels = labels[:, :length]
        logits = self.student(input_features=self.features[index], labels=labels).logits
        valid = labels != IGNORE
        ce = F.cross_entropy(logits[valid], labels[valid])
        out = {"loss": ce, "ce": ce.detach()}
        if self.config.kl_weight > 0:  # the frozen teacher's token distributions on the batch, as Distil-Whisper
            with torch.no_grad():
                teacher_logits = self.teacher(input_features=self.features[index], labels=labels).logits
            kl = token_kl(logits, teacher_logits, valid, self.config.temperature)
            out["loss"] = ce + self.config.kl_weight * kl
            out["kl"] = kl.detach()
        return out

    def _metrics(self, model: nn.Module) -> dict[str, float]:
        features, references = self.eval_data
        return error_rates(references, transcribe(model, self.tokenizer, features))

    def evaluate(self, student: nn.Module) -> dict[str, float]:
        if self.eval_data is None:
            return {}
        metrics = self._metrics(student)
        return {**metrics, "teacher_wer": self.teacher_metrics["wer"], "teacher_cer": self.teacher_metrics["cer"]}
