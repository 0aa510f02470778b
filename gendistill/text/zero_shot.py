"""Zero-shot knowledge distillation for text classifiers (after Rashid et al., "Towards Zero-Shot Knowledge
Distillation for Natural Language Processing", EMNLP 2021, arXiv 2012.15495): a small student learns a text
classifier's outputs without any of the task's text, from an out-of-domain pool and adversarial samples.

Every iteration:

- **KD on the out-of-domain pool**: a batch of pool texts (token ids in the teacher's vocabulary); the student's
  temperature-``temperature`` softmax learns the teacher's (KL(teacher || student), times ``temperature``^2). The
  teacher's logits on the pool never change, so they are computed once when the task is built.
- **adversarial samples** (``method="zskd"``): the first ``adversarial_batch`` texts of the batch, cut to
  ``adversarial_length`` tokens (keeping their closing [SEP]), are moved to where the student disagrees with the
  teacher most, the regions of input space the pool does not cover. The direction is taken in the embedding space:
  the gradient of the teacher-student divergence with respect to each model's input embeddings, at the texts'
  one-hot token distributions, scores every (position, token) swap to first order (HotFlip). ``adversarial_kind=
  "tokens"`` (default) makes, ``adversarial_steps`` times, the best swap at the ``flip_fraction`` of positions that
  gain most (only swaps that gain; special tokens never move and are never swapped in): real token sequences.
  ``"soft"`` keeps per position a distribution over the vocabulary, started at ``softmax(token_scale * one_hot)``
  and moved by gradient ascent on its logits (steps of mean per-token L2 length ``adversarial_step_size``), which
  each model embeds as the mix of its own token embeddings. ``adversarial_objective="class"`` moves each sample
  towards a random class of the teacher's instead (its log-probability; label-conditional synthesis). The student
  then also learns the teacher's outputs on the moved samples, weighted by ``adversarial_weight``; teacher and student
  read the same samples because they share the vocabulary, whatever their widths.

``pool_sampling="balanced"`` draws the pool's texts so that every class the teacher predicts on the pool comes up
equally often (a class uniformly, then one of its texts): where the task's interesting classes are rare in the pool
(vulnerable code in a pool of ordinary contracts), uniform draws teach the student little but the common class. It
uses the teacher's predictions only, never a label.

``method="kd"`` is the first part alone: KD on the out-of-domain pool, the baseline the adversarial term is measured
against. What differs from the paper (whose code we could not read) is in docs/text.md.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..dfkd.losses import kd_loss
from ..errors import UsageError
from ..task import Phase

METHODS = ("zskd", "kd")
ADVERSARIAL_KINDS = ("tokens", "soft")
ADVERSARIAL_OBJECTIVES = ("divergence", "class")
POOL_SAMPLINGS = ("uniform", "balanced")


@dataclass
class ZeroShotConfig:
    temperature: float = 2.0  # KD temperature (both terms)
    adversarial_weight: float = 1.0  # weight of the KD loss on the adversarial samples (zskd)
    adversarial_batch: int = 8  # pool texts of each batch turned into adversarial samples
    adversarial_length: int = 64  # their length in tokens (longer texts are cut; the teacher's passes cost most)
    adversarial_kind: str = "tokens"  # tokens: gradient-guided token swaps | soft: soft token distributions
    adversarial_objective: str = "divergence"  # divergence: teacher-student KL | class: a random class's probability
    adversarial_steps: int = 1  # gradient steps (tokens: rounds of swaps; soft: ascent steps on the token logits)
    flip_fraction: float = 0.15  # tokens: share of each text's tokens swapped per step (at most; only gaining swaps)
    adversarial_step_size: float = 1.0  # soft: mean per-token L2 length of one ascent step on the token logits
    token_scale: float = 10.0  # soft: a token's start logits, token_scale x one-hot
    pool_sampling: str = "uniform"  # uniform: every pool text alike | balanced: every class the teacher predicts alike

    def validate(self) -> None:
        if not self.temperature > 0:
            raise UsageError(f"temperature must be > 0, got {self.temperature}")
        for name in ("adversarial_weight", "adversarial_step_size", "token_scale"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.adversarial_kind not in ADVERSARIAL_KINDS:
            raise UsageError(
                f"unknown adversarial_kind {self.adversarial_kind!r}; valid: {', '.join(ADVERSARIAL_KINDS)}"
            )
        if self.adversarial_objective not in ADVERSARIAL_OBJECTIVES:
            raise UsageError(f"unknown adversarial_objective {self.adversarial_objective!r}; valid: "
                             f"{', '.join(ADVERSARIAL_OBJECTIVES)}")  # fmt: skip
        if self.pool_sampling not in POOL_SAMPLINGS:
            raise UsageError(f"unknown pool_sampling {self.pool_sampling!r}; valid: {', '.join(POOL_SAMPLINGS)}")
        if not 0 < self.flip_fraction <= 1:
            raise UsageError(f"flip_fraction must be in (0, 1], got {self.flip_fraction}")
        for name in ("adversarial_batch", "adversarial_length", "adversarial_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.adversarial_length < 3:
            raise UsageError(f"adversarial_length must be >= 3 (two special tokens and text), got "
                             f"{self.adversarial_length}")  # fmt: skip


def config_from_options(options: dict) -> ZeroShotConfig:
    names = {f.name for f in fields(ZeroShotConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise UsageError(f"unknown zero-shot KD options {unknown}; valid: {', '.join(sorted(names))}")
    config = ZeroShotConfig(**options)
    config.validate()
    return config


def _bare(module: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (``accelerate launch``), for its embeddings and input-gradient passes."""
    return getattr(module, "module", module)


def soft_token_logits(model: nn.Module, token_probs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Classifier logits of ``model`` on soft token sequences: ``token_probs`` (B, L, V) mix its token embeddings."""
    embeddings = token_probs @ _bare(model).get_input_embeddings().weight
    return model(inputs_embeds=embeddings, attention_mask=attention_mask).logits


@torch.no_grad()
def classifier_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, *, batch: int = 64,
                      desc: str | None = None) -> torch.Tensor:  # fmt: skip
    """``model``'s logits on every row of ``ids``/``mask`` (in eval mode, in batches, on the model's device)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    for start in tqdm(range(0, len(ids), batch), desc=desc, disable=desc is None, leave=False):
        chunk_ids, chunk_mask = ids[start : start + batch].to(device), mask[start : start + batch].to(device)
        chunks.append(model(input_ids=chunk_ids, attention_mask=chunk_mask).logits.float().cpu())
    model.train(was_training)
    return torch.cat(chunks)


def f1_per_class(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """F1 of each class, one class against the rest (0 where a class is neither predicted nor present)."""
    f1 = torch.zeros(num_classes)
    for c in range(num_classes):
        tp = ((predictions == c) & (labels == c)).sum().item()
        predicted, present = (predictions == c).sum().item(), (labels == c).sum().item()
        f1[c] = 2 * tp / (predicted + present) if predicted + present else 0.0
    return f1


def classification_metrics(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy and macro F1 (the mean of :func:`f1_per_class` over the classes present in ``labels``)."""
    predictions, labels = predictions.cpu(), labels.cpu()
    present = torch.bincount(labels, minlength=num_classes) > 0
    return {
        "accuracy": (predictions == labels).float().mean().item(),
        "macro_f1": f1_per_class(predictions, labels, num_classes)[present].mean().item(),
    }


class ZeroShotTextKDTask(nn.Module):
    """The training core's task (phase ``"student"``) for ``method`` "zskd" or "kd" (module docstring).

    ``pool_ids``/``pool_mask``: the out-of-domain texts in the teacher's tokenization (N, L). ``special_ids``: the
    token ids an adversarial step must not change ([CLS], [SEP], [PAD], ...). ``eval_data``: ``(ids, mask, labels)``
    of held-out task texts, used for evaluation only (None: no evaluation).
    """

    example_unit = "texts"  # the progress bar and the logs show texts_per_s

    def __init__(self, teacher: nn.Module, student: nn.Module, pool_ids: torch.Tensor, pool_mask: torch.Tensor, *,
                 method: str = "zskd", config: ZeroShotConfig | None = None, special_ids: list[int] | tuple = (),
                 eval_data: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):  # fmt: skip
        super().__init__()
        if method not in METHODS:
            raise UsageError(f"unknown zero-shot KD method {method!r}; valid: {', '.join(METHODS)}")
        config = config or ZeroShotConfig()
        config.validate()
        if pool_ids.shape != pool_mask.shape or pool_ids.ndim != 2 or len(pool_ids) == 0:
            raise UsageError(f"the pool must be (N, L) ids and mask with N > 0, got {tuple(pool_ids.shape)} and "
                             f"{tuple(pool_mask.shape)}")  # fmt: skip
        t_vocab = teacher.get_input_embeddings().num_embeddings
        s_vocab = student.get_input_embeddings().num_embeddings
        if t_vocab != s_vocab:
            raise UsageError(f"teacher and student must share the vocabulary (the adversarial samples are token "
                             f"distributions): teacher {t_vocab} tokens, student {s_vocab}")  # fmt: skip
        if teacher.config.num_labels != student.config.num_labels:
            raise UsageError(f"teacher has {teacher.config.num_labels} labels, student {student.config.num_labels}")
        self.method, self.config = method, config
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.register_buffer("pool_ids", pool_ids.long(), persistent=False)
        self.register_buffer("pool_mask", pool_mask.long(), persistent=False)
        self.register_buffer(
            "pool_teacher_logits", classifier_logits(teacher, pool_ids, pool_mask, desc="teacher on the pool"),
            persistent=False,
        )  # fmt: skip
        # balanced sampling: the pool's indices grouped by the teacher's predicted class (classes it never predicts
        # on the pool are left out), drawn as a class uniformly, then a text of that class uniformly
        predicted = self.pool_teacher_logits.argmax(dim=1)
        order = predicted.argsort(stable=True)
        sizes = torch.bincount(predicted, minlength=teacher.config.num_labels)
        starts = sizes.cumsum(0) - sizes
        present = sizes > 0
        # plain attributes, not buffers: they stay on the CPU (classifier_logits returns CPU logits), where the draws
        # are made
        self.pool_by_class, self.class_starts, self.class_sizes = order, starts[present], sizes[present]
        special = torch.zeros(t_vocab, dtype=torch.bool)
        special[list(special_ids)] = True
        self.register_buffer("special", special, persistent=False)
        self.eval_data = eval_data
        self.teacher_metrics = self.teacher_predictions = None
        if eval_data is not None:  # the teacher is frozen: its held-out predictions are computed once
            self.teacher_predictions = self._predictions(teacher)
            self.teacher_metrics = self._metrics(self.teacher_predictions)

    def phases(self) -> list[Phase]:
        return [Phase("student")]

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: dropout stays off
        return self

    def sample_batch(self, phase: str, batch_size: int, device) -> torch.Tensor:
        if self.config.pool_sampling == "uniform":
            return torch.randint(len(self.pool_ids), (batch_size,)).to(device)
        classes = torch.randint(len(self.class_sizes), (batch_size,))
        offsets = (torch.rand(batch_size) * self.class_sizes[classes]).long()
        return self.pool_by_class[self.class_starts[classes] + offsets].to(device)

    def _objective_gradient(self, probs: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None):
        """d objective / d ``probs`` (B, L, V) on soft token sequences. The objective: KL(teacher || student)
        (``targets`` None), or the teacher's log-probability of ``targets`` (B,). At a one-hot ``probs``, entry
        (b, i, v) is how fast it grows as token v comes in at position i, through the models' token embeddings (the
        first-order swap score of HotFlip, Ebrahimi et al. 2018)."""
        probs = probs.detach().requires_grad_(True)
        teacher_logits = soft_token_logits(self.teacher, probs, mask)
        if targets is None:
            student_logits = soft_token_logits(_bare(self.student), probs, mask)
            objective = kd_loss(student_logits, teacher_logits, tau=self.config.temperature)
        else:
            objective = -F.cross_entropy(teacher_logits, targets, reduction="sum")
        (grad,) = torch.autograd.grad(objective, probs)
        return grad

    def adversarial_samples(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``ids`` moved towards teacher-student disagreement (``adversarial_objective="divergence"``) or towards
        a random class of the teacher's (``"class"``), the student's weights untouched, as token distributions
        (B, L, V): one-hot rows for ``adversarial_kind="tokens"``, soft rows for ``"soft"``."""
        c = self.config
        weight = self.teacher.get_input_embeddings().weight
        vocab = self.special.numel()
        movable = mask.bool() & ~self.special[ids]  # (B, L)
        targets = None
        if c.adversarial_objective == "class":  # a class per sample, drawn from the global RNG (resume restores it)
            targets = torch.randint(self.teacher.config.num_labels, (len(ids),)).to(ids.device)
        if c.adversarial_kind == "tokens":
            ids = ids.clone()
            flips = (movable.sum(dim=1).float() * c.flip_fraction).ceil().long()  # per sequence
            for _ in range(c.adversarial_steps):
                grad = self._objective_gradient(F.one_hot(ids, vocab).to(weight.dtype), mask, targets)
                gain = grad - grad.gather(-1, ids[..., None])  # first-order change of swapping in each token
                gain[..., self.special] = -torch.inf  # never swap in [CLS], [SEP], [PAD], ...
                best_gain, best_token = gain.max(dim=-1)  # (B, L)
                best_gain = best_gain.masked_fill(~movable, -torch.inf)
                order = best_gain.argsort(dim=1, descending=True)
                for row in range(len(ids)):
                    chosen = order[row, : flips[row]]
                    chosen = chosen[best_gain[row, chosen] > 0]  # only swaps that raise the objective
                    ids[row, chosen] = best_token[row, chosen]
            return F.one_hot(ids, vocab).to(weight.dtype)
        logits = c.token_scale * F.one_hot(ids, vocab).to(weight.dtype)
        movable = movable.to(weight.dtype)[..., None]  # (B, L, 1)
        tokens = movable.sum(dim=(1, 2)).clamp_min(1.0)  # movable tokens per sequence
        for _ in range(c.adversarial_steps):
            probs = F.softmax(logits, dim=-1)
            grad = self._objective_gradient(probs, mask, targets)
            grad = probs * (grad - (probs * grad).sum(dim=-1, keepdim=True))  # through the softmax to the logits
            grad = grad * movable
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
            step = c.adversarial_step_size * tokens.sqrt() / norm  # per sequence: mean per-token length = step size
            logits = (logits + step[:, None, None] * grad).detach()
        return F.softmax(logits, dim=-1)

    def forward(self, phase: str, index: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.config
        ids, mask = self.pool_ids[index], self.pool_mask[index]
        length = int(mask.sum(dim=1).max())  # drop the padding columns every text of the batch has
        ids, mask = ids[:, :length], mask[:, :length]
        if self.method == "kd":
            logits = self.student(input_ids=ids, attention_mask=mask).logits
            pool = kd_loss(logits, self.pool_teacher_logits[index], tau=c.temperature)
            return {"loss": pool, "kd_pool": pool.detach()}
        n, cut_length = min(c.adversarial_batch, len(ids)), min(c.adversarial_length, ids.shape[1])
        adv_ids, adv_mask = ids[:n, :cut_length].clone(), mask[:n, :cut_length]
        # A cut text keeps its closing [SEP]: the last kept position of each cut sequence gets the text's last token
        # (for BERT tokenizers, [SEP]), so the sample still looks like a whole text to the models.
        lengths = mask[:n].sum(dim=1)
        cut = lengths > cut_length
        adv_ids[cut, -1] = ids[:n][cut, lengths[cut] - 1]
        probs = self.adversarial_samples(adv_ids, adv_mask)
        with torch.no_grad():
            target = soft_token_logits(self.teacher, probs, adv_mask)
        # One student forward on the pool texts and the adversarial samples together (padded to one length), as
        # input embeddings: what a DDP-wrapped student needs (one forward per backward), and one pass, not two.
        table = _bare(self.student).get_input_embeddings()
        pad = length - cut_length
        pool_embeddings = F.embedding(ids, table.weight, padding_idx=table.padding_idx)
        embeddings = torch.cat([pool_embeddings, F.pad(probs.to(table.weight.dtype) @ table.weight, (0, 0, 0, pad))])
        both_mask = torch.cat([mask, F.pad(adv_mask, (0, pad))])
        logits = self.student(inputs_embeds=embeddings, attention_mask=both_mask).logits
        pool = kd_loss(logits[: len(ids)], self.pool_teacher_logits[index], tau=c.temperature)
        adversarial = kd_loss(logits[len(ids) :], target, tau=c.temperature)
        return {
            "loss": pool + c.adversarial_weight * adversarial,
            "kd_pool": pool.detach(),
            "kd_adversarial": adversarial.detach(),
        }

    def _predictions(self, model: nn.Module) -> torch.Tensor:
        ids, mask, _ = self.eval_data
        return classifier_logits(model, ids, mask).argmax(dim=1)

    def _metrics(self, predictions: torch.Tensor) -> dict[str, float]:
        return classification_metrics(predictions, self.eval_data[2], self.teacher.config.num_labels)

    def evaluate(self, student: nn.Module) -> dict[str, float]:
        if self.eval_data is None:
            return {}
        predictions = self._predictions(student)  # one pass of the student; the teacher's were kept
        student_metrics = self._metrics(predictions)
        agreement = (predictions == self.teacher_predictions).float().mean()
        teacher = self.teacher_metrics
        return {
            **student_metrics,
            "teacher_accuracy": teacher["accuracy"],
            "teacher_macro_f1": teacher["macro_f1"],
            "relative_accuracy": student_metrics["accuracy"] / max(teacher["accuracy"], 1e-12),
            "relative_macro_f1": student_metrics["macro_f1"] / max(teacher["macro_f1"], 1e-12),
            "teacher_agreement": agreement.item(),
        }
