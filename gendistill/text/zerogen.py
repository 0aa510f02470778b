"""ZeroGen: a causal language model writes a labelled dataset from label-conditioned prompts (top-p sampling), and a
small task model learns from it (Ye et al., "ZeroGen: Efficient Zero-shot Learning via Dataset Generation", EMNLP
2022). The task model never sees a text of the task; with a teacher classifier, it learns the teacher's soft labels
on the generated text instead of the prompts' labels.

The generator is any ``transformers`` causal LM folder (``AutoModelForCausalLM``); where none can be downloaded, a
GPT-2 is built from config (:func:`build_language_model`, a byte-level BPE vocabulary learnt from the corpus) and
pretrained on text that is there (:class:`LanguageModelTask`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from ..errors import UsageError
from ..task import Phase
from .models import byte_level_bpe, pretrained_source
from .zero_shot import classification_metrics, classifier_logits

END_OF_TEXT = "<|endoftext|>"
LABEL_SOURCES = ("prompt", "teacher")

# Prompts for the built-in docstring task (which standard-library package a docstring documents). A generator from
# `gendistill teach language-model` read every docstring after the dotted name it documents ("smtplib.SMTP.sendmail:
# This command performs ..."), so a package's name followed by a colon asks for the documentation of a module of that
# name: the bare label is the first prompt. The second adds what the package is for, as a user who knows the labels
# but has none of the task's text would describe it (written from the packages' purpose, not from their docstrings).
# Only the continuation becomes an example.
DOCSTRING_PROMPTS = {
    "asyncio": ["asyncio:", "asyncio: Asynchronous I/O: coroutines, the event loop, tasks, futures and streams."],
    "email": ["email:", "email: Email messages: headers, MIME parts, parsing and generating messages."],
    "http": ["http:", "http: HTTP clients and servers: requests, responses, status codes, headers and cookies."],
    "logging": ["logging:", "logging: Logging: loggers, handlers, formatters, filters and log levels."],
    "unittest": ["unittest:", "unittest: Unit testing: test cases, test suites, assertions, mocks and runners."],
    "xml": ["xml:", "xml: XML processing: parsers, elements, the DOM, SAX events and XML documents."],
}


@dataclass
class LanguageModelSize:
    """The shape of a GPT-2 built from config."""

    hidden: int = 192  # width of every layer and of the token embeddings
    layers: int = 4  # transformer blocks
    heads: int = 4  # attention heads (must divide hidden)
    context: int = 128  # position embeddings: the longest text it reads or writes, prompt included

    def validate(self) -> None:
        for name in ("hidden", "layers", "heads"):
            if getattr(self, name) < 1:
                raise UsageError(f"language model: {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise UsageError(f"language model: heads ({self.heads}) must divide hidden ({self.hidden})")
        if self.context < 16:
            raise UsageError(f"language model: context must be >= 16 tokens, got {self.context}")


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 5000) -> GPT2TokenizerFast:
    """A GPT-2 tokenizer whose byte-level BPE vocabulary (``tokenizers``' trainer) is learnt from ``texts``, with
    ``<|endoftext|>`` as its one special token (end of text, start, padding)."""
    if vocab_size < 258:
        raise UsageError(f"vocab_size must be >= 258 (the 256 bytes, one merge, end of text), got {vocab_size}")
    if not texts:
        raise UsageError("a tokenizer needs at least one text to learn from")
    vocab, merges = byte_level_bpe(texts, vocab_size, special_tokens=[END_OF_TEXT])
    return GPT2TokenizerFast(vocab=vocab, merges=merges, pad_token=END_OF_TEXT)


def build_language_model(tokenizer, size: LanguageModelSize) -> GPT2LMHeadModel:
    """A freshly initialized GPT-2 (seeded by the global RNG) over ``tokenizer``'s vocabulary."""
    size.validate()
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=size.context, n_embd=size.hidden, n_layer=size.layers,
                        n_head=size.heads, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)  # fmt: skip
    return GPT2LMHeadModel(config)


def load_language_model(source: str | os.PathLike):
    """``(model, tokenizer)`` of a causal LM folder (or a hub id where the hub is reachable), in eval mode on the
    CPU; the tokenizer pads on the left (generation continues every prompt of a batch at its end) with its end of
    text where it has no padding token."""
    source = pretrained_source(source, "language model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load a causal language model from {source!r}: {err}") from None
    if tokenizer.eos_token_id is None:
        raise UsageError(f"{source!r}: the tokenizer has no end-of-text token, which generation stops at")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def save_language_model(model: nn.Module, tokenizer, folder: str | os.PathLike) -> None:
    """``save_pretrained`` of the model (safetensors) and its tokenizer into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    model.to("cpu").save_pretrained(folder)


KEYWORDS = "Keywords:"  # the line keyword_headers puts in front of every text


def keyword_headers(texts: list[str], count: int = 5) -> list[str]:
    """Each text after a line naming its ``count`` most distinctive words, ``"Keywords: a, b, c.\n" + text``: the
    words (lowercase, 3 letters or more) with the highest tf-idf within the texts, best first, ties by the word.

    A language model pretrained on texts with these lines learns that a text is about the words its header names
    (what CTRL's control codes do); prompted with ``"Keywords: logger, handler, level."`` it writes about them. The
    keywords come from each text itself, so no label is involved."""
    import math
    import re
    from collections import Counter

    if count < 1:
        raise UsageError(f"keyword count must be >= 1, got {count}")
    words = [Counter(re.findall(r"[a-z]{3,}", text.lower())) for text in texts]
    frequency = Counter(w for counts in words for w in counts)
    headed = []
    for text, counts in zip(texts, words, strict=True):
        score = {w: n / sum(counts.values()) * math.log(len(texts) / frequency[w]) for w, n in counts.items()}
        best = sorted(score, key=lambda w: (-score[w], w))[:count]
        headed.append(f"{KEYWORDS} {', '.join(best)}.\n{text}" if best else text)
    return headed


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """The texts' token ids end to end, each followed by the end of text: one 1-D tensor, read in windows."""
    eos = tokenizer.eos_token_id
    ids = [i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in [*row, eos]]
    return torch.tensor(ids, dtype=torch.long)


class LanguageModelTask(nn.Module):
    """Next-token prediction on random windows of ``context`` tokens of a token stream (GPT-2's pretraining);
    evaluation: the mean loss and perplexity on the held-out stream's consecutive windows."""

    def __init__(self, model: nn.Module, stream: torch.Tensor, *, context: int, eval_stream=None, eval_windows=64):
        super().__init__()
        if len(stream) <= context:
            raise UsageError(f"the corpus has {len(stream)} tokens, fewer than one window of {context} + 1")
        self.model = model
        self.context = context
        self.register_buffer("stream", stream, persistent=False)
        windows = None
        if eval_stream is not None and len(eval_stream) > context:
            count = min(eval_windows, len(eval_stream) // context)
            windows = eval_stream[: count * context].view(count, context)
        self.eval_windows = windows

    def phases(self) -> list[Phase]:
        return [Phase("model")]

    def sample_batch(self, phase: str, batch_size: int, device) -> torch.Tensor:
        starts = torch.randint(len(self.stream) - self.context, (batch_size,))
        return starts.to(device)

    def forward(self, phase: str, starts: torch.Tensor) -> dict[str, torch.Tensor]:
        offsets = torch.arange(self.context, device=starts.device)
        ids = self.stream[starts[:, None] + offsets]
        return {"loss": self.model(input_ids=ids, labels=ids).loss}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self.eval_windows is None:
            return {}
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        losses = [model(input_ids=w.to(device), labels=w.to(device)).loss for w in self.eval_windows.split(16)]
        model.train(was_training)
        loss = float(torch.stack(losses).mean())
        return {"heldout_loss": loss, "heldout_perplexity": float(torch.tensor(loss).exp())}


def load_label_prompts(source: str) -> dict[str, list[str]]:
    """Prompts per label: ``docstrings`` (:data:`DOCSTRING_PROMPTS`, for the built-in docstring task) or a JSON
    file of ``{"label": "prompt" | ["prompt", ...]}``; a prompt may hold ``{label}``, replaced by the label."""
    if source == "docstrings":
        prompts = DOCSTRING_PROMPTS
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompts {source!r} do not exist (valid: docstrings, or a .json file)")
        try:
            prompts = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UsageError(f"{source!r} is not valid JSON ({err})") from None
        if not isinstance(prompts, dict):
            raise UsageError(
                f'{source!r}: expected an object {{"label": ["prompt", ...]}}, got {type(prompts).__name__}'
            )
    out = {}
    for label, value in prompts.items():
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not value or not all(isinstance(p, str) and p.strip() for p in value):
            raise UsageError(f"prompts of label {label!r}: expected a non-empty string or list of them, got {value!r}")
        out[str(label)] = [p.replace("{label}", str(label)) for p in value]
    if len(out) < 2:
        raise UsageError(f"prompts {source!r} name {len(out)} label(s); a classifier needs at least two")
    return out


@torch.no_grad()
def generate_examples(
    model: nn.Module,
    tokenizer,
    prompts: dict[str, list[str]],
    per_label: int,
    *,
    top_p: float = 0.9,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    min_words: int = 5,
    max_tries: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """``per_label`` distinct examples per label, ``{"text", "label", "prompt"}``: each the continuation of one of
    its label's prompts (taken in turn) by top-p sampling, cut at the end of text, whitespace collapsed; a
    continuation of fewer than ``min_words`` words, or one already written, is drawn again (at most ``max_tries`` x
    ``per_label`` draws per label, then a clear error)."""
    from tqdm.auto import tqdm

    if per_label < 1:
        raise UsageError(f"per_label must be >= 1, got {per_label}")
    if not 0 < top_p <= 1:
        raise UsageError(f"top_p must be in (0, 1], got {top_p}")
    if temperature <= 0:
        raise UsageError(f"temperature must be > 0, got {temperature}")
    if max_new_tokens < 1 or batch_size < 1:
        raise UsageError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for ps in prompts.values() for p in ps)
    if limit is not None and longest + 1 + max_new_tokens > limit:
        raise UsageError(f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceed the "
                         f"generator's {limit} positions: shorten the prompts or lower max_new_tokens")  # fmt: skip
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    rows, seen = [], set()
    bar = tqdm(total=per_label * len(prompts), desc="generating", unit="text", disable=not progress)
    try:
        for label, label_prompts in prompts.items():
            kept, drawn = 0, 0
            while kept < per_label:
                if drawn >= max_tries * per_label:
                    raise UsageError(
                        f"label {label!r}: only {kept} of {per_label} distinct texts of >= {min_words} words after "
                        f"{drawn} draws; ask for fewer, lower min_words, or raise top_p/temperature"
                    )
                batch = [label_prompts[(drawn + i) % len(label_prompts)] for i in range(batch_size)]
                # every prompt starts after an end of text, as every text of the corpus does
                inputs = tokenizer([tokenizer.eos_token + p for p in batch], return_tensors="pt", padding=True,
                                   add_special_tokens=False).to(device)  # fmt: skip
                out = model.generate(**inputs, do_sample=True, top_p=top_p, top_k=0, temperature=temperature,
                                     max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)  # fmt: skip
                texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                drawn += batch_size
                for prompt, text in zip(batch, texts, strict=True):
                    text = " ".join(text.split())
                    if kept < per_label and len(text.split()) >= min_words and text not in seen:
                        seen.add(text)
                        rows.append({"text": text, "label": label, "prompt": prompt})
                        kept += 1
                        bar.update()
    finally:
        bar.close()
        torch.random.set_rng_state(generator_state)
    return rows


def synthetic_loss(logits, labels, teacher_logits=None, *, temperature: float = 1.0, label_smoothing: float = 0.0):
    """The task model's loss on generated text: cross-entropy on the prompts' labels, or, with ``teacher_logits``,
    KL(teacher || model) at ``temperature`` (x temperature², Hinton et al.'s scale)."""
    if teacher_logits is None:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    log_student = F.log_softmax(logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature**2


class TextClassifierTask(nn.Module):
    """Training of a sequence classifier on token ids (N, L) with a mask and labels (N,): cross-entropy, or, given
    a teacher's logits on the same texts (N, C), KD from them (:func:`synthetic_loss`); ZeroGen trains on generated
    texts this way, ``gendistill teach text-classifier`` on real ones. Evaluation: accuracy and macro F1 on held-out
    text, when given (it is never trained on)."""

    def __init__(self, model, ids, mask, labels, *, teacher_logits=None, temperature=1.0, label_smoothing=0.0,
                 eval_data=None):  # fmt: skip
        super().__init__()
        self.model = model
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("teacher_logits", teacher_logits, persistent=False)
        self.temperature, self.label_smoothing = temperature, label_smoothing
        self.eval_data = eval_data

    def phases(self) -> list[Phase]:
        return [Phase("model")]

    def sample_batch(self, phase: str, batch_size: int, device) -> torch.Tensor:
        return torch.randint(len(self.labels), (batch_size,)).to(device)

    def forward(self, phase: str, index: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = self.mask[index]
        length = int(mask.sum(dim=1).max())  # the padding columns every text of the batch has are dropped
        logits = self.model(input_ids=self.ids[index, :length], attention_mask=mask[:, :length]).logits
        teacher = None if self.teacher_logits is None else self.teacher_logits[index]
        loss = synthetic_loss(logits, self.labels[index], teacher, temperature=self.temperature,
                              label_smoothing=self.label_smoothing)  # fmt: skip
        return {"loss": loss}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self.eval_data is None:
            return {}
        ids, mask, labels = self.eval_data
        predictions = classifier_logits(model, ids, mask).argmax(1)
        return classification_metrics(predictions, labels, model.config.num_labels)
