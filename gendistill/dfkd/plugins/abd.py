"""ABD as a plug-in: J. Hong, Y. Zeng, S. Yu, L. Lyu, R. Jia and J. Zhou, "Revisiting Data-Free Knowledge
Distillation with Poisoned Teachers" (ICML 2023, arXiv 2306.02368).

A downloaded teacher may carry a backdoor: a trigger (a patch, a blended pattern) that sends any image to a target
class. Data-free distillation passes it on because the synthesis reproduces the trigger: a backdoored teacher's
most convincing images of the target class carry it, and the student learns "trigger -> target" from them. ABD adds
two defences to any DFKD method.

**Shuffling vaccine.** ``sv_copies`` copies of the teacher have the input channels of their last ``sv_layers``
convolutions shuffled (a fixed random permutation per copy and layer, drawn from ``sv_seed``). Clean features depend
on which channel is which and do not survive the shuffle; trigger features are few and strong and do. An image is
*suspect* where the copies (their mean logits) still predict the teacher's class. The vaccine acts twice:

- on the synthesis, with weight ``sv`` (the paper's form): the generator's loss (DAFL, DFAD, ZSKT, DFQ, CAE: the
  images and teacher logits the method's loss used) or each inversion step's loss (DeepInversion, CMI, Fast, NAYER:
  the augmented views) gets

      L_sv = - sv * sum_i m_i KL(softmax(T(x_i)) || softmax(T_shuf(x_i))) / max(1, sum_i m_i),
      m_i  = [argmax T_shuf(x_i) == argmax T(x_i)];

- on the student (``sv_filter``): suspect images are left out of the student's distillation loss (the term
  ``loss_abd_filter`` is minus their share of it, so the loss is the method's own over the other images, divided
  by the whole batch size). With ``sv_max_fraction`` < 1, a student batch where more than that share of the images
  looks suspect is not judged at all (as the paper turns the vaccine off when the suspects are no tail). Measured:
  0.5 keeps ZSKT's student from collapsing (an adversarial generator's first, featureless images all look suspect,
  and filtering them left ZSKT's student at 10%) but also let the BadNets backdoor through DFQ (ASR 90% instead
  of 0.4%), so every batch is judged by default.

**Self-retrospection.** The student is penalized for its sensitivity to an estimate of the trigger. The estimate
is a mask and a pattern (``x' = (1 - m) x + m p``, m (1, 1, H, W) and p (1, C, H, W) in [0, 1] through sigmoids),
which can express a patch (a small mask) as well as a blend (a faint full mask). At each student step, on the
first ``ceil(sr_portion * B)`` images x of the batch,

    (m, p) <- sr_steps Adam steps (lr sr_lr, from the previous estimate) minimizing
              CE(T((1 - m) x + m p), target) + sr_l1 * sum(m)
    L_sr   = sr * KL(softmax(S(x)) || softmax(S((1 - m) x + m p)))      (S(x) detached)

where ``target`` is the class the teacher gives most often to the suspect images seen so far (no penalty before
the first suspect image). For a backdoored teacher the cheapest mask that sends every image to the target is the
trigger; a student that ignores it does not inherit the backdoor. The student's perturbed forward does not move its
BatchNorm statistics.

Differences from the paper (and its public code), chosen from measurements on the MNIST benchmark
(``benchmarks/dfkd_backdoor.py``; numbers in docs/dfkd.md, "ABD"):

- The paper's retrospection searches an additive universal perturbation maximizing the divergence, refines it on
  the student and differentiates the student's penalty through that refinement (an implicit hypergradient). Here
  the search is first order (the estimate is a constant in the student's penalty), on the teacher, and *targeted*:
  untargeted additive perturbations of a digit classifier turn into drawings of another digit (measured: they send
  every image of a clean or a backdoored LeNet to one class with an L2 norm of 10-30), not into the trigger,
  while the targeted mask search recovers a BadNets patch in the corner (mask sum 1.7 against 36-69 for other
  classes or a clean teacher).
- The target class comes from the vaccine (the paper's retrospection needs none: it is untargeted).
- The vaccine also filters the student's batches, and its penalty on the synthesis is off by default (``sv`` 0):
  the generator learns to evade the copies while keeping the trigger (measured: with the penalty alone the
  student's attack success rate stayed at 100%).
- The paper tests the copies on synthetic data first and re-draws them when too few images look suspect; here the
  copies are drawn once.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from torch import nn

from ...errors import UsageError
from ..losses import kd_loss
from .base import Plugin, PluginConfig


@dataclass
class ABDConfig(PluginConfig):
    sv: float = 0.0  # weight of the vaccine penalty on the synthesis (0: off; measured: see docs/dfkd.md, ABD)
    sv_copies: int = 3  # shuffled teacher copies (their mean logits judge each image)
    sv_layers: int = 1  # the last convolutions (groups 1) whose input channels are shuffled
    sv_seed: int = 0  # seed of the channel permutations
    sv_filter: bool = True  # leave the student batch's suspect images out of its distillation loss
    sv_max_fraction: float = 1.0  # a batch with more suspects than this is not judged (1: every batch is)
    sr: float = 1.0  # weight of the self-retrospection penalty on the student (0: off)
    sr_steps: int = 5  # Adam steps on the trigger estimate per search
    sr_lr: float = 0.1  # their step size (on the mask's and the pattern's logits)
    sr_l1: float = 1e-2  # L1 penalty on the trigger estimate's mask during the search
    sr_portion: float = 0.25  # fraction of each student batch the trigger estimate is stamped on (and searched on)
    sr_every: int = 1  # the search runs at every N-th student step (the penalty at every step)

    def __post_init__(self):
        for name in ("sv", "sr", "sr_lr", "sr_l1"):
            if getattr(self, name) < 0:
                raise UsageError(f"abd option {name} must be >= 0, got {getattr(self, name)}")
        for name in ("sv_copies", "sv_layers", "sr_steps", "sr_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"abd option {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.sv_max_fraction <= 1:
            raise UsageError(f"abd option sv_max_fraction must be in [0, 1], got {self.sv_max_fraction}")
        if not 0 < self.sr_portion <= 1:
            raise UsageError(f"abd option sr_portion must be in (0, 1], got {self.sr_portion}")


def shuffled_copy(model: nn.Module, layers: int, generator: torch.Generator) -> nn.Module:
    """A frozen copy of ``model`` whose last ``layers`` ``nn.Conv2d`` (groups 1, in registration order) take their
    input channels in a random order: ``weight[:, perm]``, one ``perm`` per layer from ``generator``."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    if not convs:
        raise UsageError("abd's shuffling vaccine needs a teacher with nn.Conv2d layers (groups 1); it has none")
    copied = copy.deepcopy(model).eval().requires_grad_(False)
    chosen = [m for m in copied.modules() if isinstance(m, nn.Conv2d) and m.groups == 1][-layers:]
    for conv in chosen:
        perm = torch.randperm(conv.in_channels, generator=generator)
        conv.weight.data = conv.weight.data[:, perm.to(conv.weight.device)].contiguous()
    return copied


def vaccine_loss(teacher_logits: torch.Tensor, shuffled_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(-mean of KL(softmax(T) || softmax(T_shuf)) over the images where the argmaxes agree (0 if none), the
    agreement mask (B,))`` for logits (B, K)."""
    mask = (shuffled_logits.argmax(1) == teacher_logits.argmax(1)).to(teacher_logits.dtype)
    kl = (F.softmax(teacher_logits, 1) * (F.log_softmax(teacher_logits, 1) - F.log_softmax(shuffled_logits, 1))).sum(1)
    return -(kl * mask).sum() / mask.sum().clamp(min=1), mask


@contextlib.contextmanager
def frozen_batchnorm_statistics(model: nn.Module):
    """Forwards in train mode (batch statistics) that leave the running statistics as they are (momentum 0)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None]
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, saved):
            m.momentum = momentum


class ABD(Plugin):
    """The shuffling vaccine (synthesis penalty, student filter) and first-order, targeted self-retrospection
    (student). Options: :class:`ABDConfig`."""

    name = "abd"
    Config = ABDConfig

    def attach(self, task) -> None:
        config = self.config
        generator = torch.Generator().manual_seed(config.sv_seed)
        self.copies = [shuffled_copy(task.teacher, config.sv_layers, generator) for _ in range(config.sv_copies)]
        self.suspects = torch.zeros(task.num_classes)  # suspect student images so far, by the teacher's class
        self.steps = 0  # student steps seen (the retrospection runs at every sr_every-th)
        self.trigger: dict[str, torch.Tensor] | None = None  # the trigger estimate's logits, made at its first search
        self.suspect_fraction = 0.0  # the share of the latest synthetic batch the vaccine penalized
        self.filtered_fraction = 0.0  # the share of the latest student batch the filter left out

    def _shuffled_logits(self, images: torch.Tensor) -> torch.Tensor:
        device = images.device
        if next(self.copies[0].parameters()).device != device:
            self.copies = [c.to(device) for c in self.copies]
        return torch.stack([c(images) for c in self.copies]).mean(0)

    def _vaccine(self, images, teacher_logits) -> dict[str, torch.Tensor]:
        if not self.config.sv:
            return {}
        loss, mask = vaccine_loss(teacher_logits.float(), self._shuffled_logits(images).float())
        self.suspect_fraction = mask.mean().item()
        return {"loss_abd_sv": self.config.sv * loss}

    def generator_terms(self, *, images, teacher_logits, student_logits, task) -> dict[str, torch.Tensor]:
        """The vaccine on a generator step's images (B, C, H, W) and the teacher's logits on them (with graphs)."""
        return self._vaccine(images, teacher_logits)

    def synthesis_terms(self, *, images, teacher_logits) -> dict[str, torch.Tensor]:
        """The vaccine on an inversion step's augmented views and the teacher's logits on them (with graphs)."""
        return self._vaccine(images, teacher_logits)

    def student_terms(self, *, images, student_logits, teacher_logits, task) -> dict[str, torch.Tensor]:
        """The filter (``loss_abd_filter``: minus the suspect images' share of the distillation loss) and the
        retrospection penalty (``loss_abd_sr``) on one student batch."""
        config = self.config
        terms = {}
        with torch.no_grad():
            predicted = teacher_logits.argmax(1)
            suspect = self._shuffled_logits(images).argmax(1) == predicted
        if suspect.float().mean() > config.sv_max_fraction:
            suspect = torch.zeros_like(suspect)  # no tail of suspects: the judgement says nothing about this batch
        self.suspects = self.suspects.to(images.device) + torch.bincount(
            predicted[suspect], minlength=len(self.suspects)
        )
        self.filtered_fraction = suspect.float().mean().item()
        if config.sv_filter and suspect.any():
            part = task.synthesizer.student_loss(student_logits[suspect], teacher_logits[suspect])
            terms["loss_abd_filter"] = -part * suspect.float().mean()
        self.steps += 1
        if not config.sr or self.suspects.sum() == 0:
            return terms
        target = int(self.suspects.argmax())
        count = max(1, math.ceil(config.sr_portion * len(images)))
        x = images[:count].detach().float()
        if self.trigger is None or (self.steps - 1) % config.sr_every == 0:
            mask, pattern = self.search(task.teacher, x, target)
        else:
            mask, pattern = (torch.sigmoid(self.trigger[k].to(x.device)) for k in ("mask", "pattern"))
        student = extract_model_from_parallel(task.student)
        with frozen_batchnorm_statistics(student):
            perturbed = student((1 - mask) * x + mask * pattern)
        # KL(softmax(S(x)) || softmax(S(x'))), batch mean: the distillation loss at temperature 1, S(x) as target
        terms["loss_abd_sr"] = config.sr * kd_loss(perturbed.float(), student_logits[:count].detach().float(), tau=1.0)
        return terms

    def search(self, teacher: nn.Module, x: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``sr_steps`` Adam steps on the trigger estimate (from the previous one) minimizing
        ``CE(T((1 - m) x + m p), target) + sr_l1 * sum(m)`` on ``x`` (n, C, H, W); returns (m (1, 1, H, W),
        p (1, C, H, W)) detached, both in [0, 1]."""
        config = self.config
        if self.trigger is None:  # a faint random start (the loss is flat at m = 0)
            _, c, h, w = x.shape
            self.trigger = {
                "mask": -3.0 + 0.1 * torch.randn(1, 1, h, w, device=x.device),
                "pattern": torch.randn(1, c, h, w, device=x.device),
            }
        a, b = (self.trigger[k].to(x.device).clone().requires_grad_(True) for k in ("mask", "pattern"))
        optimizer = torch.optim.Adam([a, b], lr=config.sr_lr)
        labels = torch.full((len(x),), target, device=x.device)
        with torch.enable_grad():
            for _ in range(config.sr_steps):
                m, p = torch.sigmoid(a), torch.sigmoid(b)
                loss = F.cross_entropy(teacher((1 - m) * x + m * p).float(), labels) + config.sr_l1 * m.sum()
                a.grad, b.grad = torch.autograd.grad(loss, [a, b])
                optimizer.step()
        self.trigger = {"mask": a.detach(), "pattern": b.detach()}
        return torch.sigmoid(self.trigger["mask"]), torch.sigmoid(self.trigger["pattern"])

    def state_dict(self) -> dict:
        state = {"suspects": self.suspects, "steps": self.steps}
        return state if self.trigger is None else {**state, **{f"trigger_{k}": v for k, v in self.trigger.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.suspects, self.steps = state["suspects"], int(state["steps"])
        self.trigger = None if "trigger_mask" not in state else {k: state[f"trigger_{k}"] for k in ("mask", "pattern")}
