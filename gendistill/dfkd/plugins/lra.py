"""LRA as a plug-in: G. Patel et al., "Learning to Retain while Acquiring: Combating Distribution-Shift in
Adversarial Data-Free Knowledge Distillation" (CVPR 2023, arXiv 2302.14290).

In adversarial DFKD the generator keeps moving, so a student that learns only from the newest batch forgets what
it learned from earlier ones. LRA keeps a long-term memory of past synthetic images (with the teacher's logits on
them) and treats learning the new batch as meta-train ("acquisition") and the memory as meta-test ("retention"):
at each student step, with ``L`` the method's student loss, ``x`` the new batch, ``m`` a memory batch and
``theta`` the student's weights,

    theta' = theta - inner_lr * grad L(x; theta)                     (one inner SGD step on the new batch)
    loss   = L(x; theta) + replay * L(m; theta) + lra * L(m; theta')

so the update favours directions that learn the new batch without losing the old ones (the last term), and the
memory is also learned directly (the middle term: the reference's distillation loss runs on the new and the memory
images together). The retention term is differentiated through the inner step (second order,
``torch.func.functional_call``); ``first_order`` treats the inner gradient as a constant, which is cheaper.

The memory, as in the reference, is sparse and long: every ``memory_every`` student steps the first
``ceil(memory_fraction * B)`` images of the step's batch join a ring buffer of ``memory_size`` images (the
reference keeps an eighth of a batch every five epochs). The memory batch, the new batch's size, is drawn
uniformly with replacement (global RNG, so resume is exact). The memory terms start once the memory holds
``min_memory`` images (0, the default: a student batch's worth, or the full memory if that is smaller): a batch
drawn with replacement from a few dozen images is those few images repeated, and fitting them (twice: replay and
retention) wrecked a student that started from its teacher's weights (measured: docs/dfkd.md, "LRA"). The memory
is checkpointed; the teacher's logits are stored beside the images (the teacher is frozen, so they equal the
reference's recomputed ones).

Not from the reference: the schedule (``memory_every`` 20 student steps, ``memory_size`` 1024) is scaled to runs
of minutes instead of hundreds of epochs, and ``inner_lr`` 1e-2 suits the AdamW student learning rates of this
project's methods (the reference: 0.9 with an SGD student at 0.1); neither is tuned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel

from ...errors import UsageError
from ..generators import ImagePool
from .base import Plugin, PluginConfig


@dataclass
class LRAConfig(PluginConfig):
    lra: float = 1.0  # weight of the retention loss through the adapted weights
    replay: float = 1.0  # weight of the plain distillation loss on the memory batch
    memory_size: int = 1024  # images in the long-term memory (with the teacher's logits)
    memory_every: int = 20  # student steps between additions to the memory
    memory_fraction: float = 0.125  # share of that step's batch that joins the memory
    inner_lr: float = 1e-2  # step size of the inner SGD step on the new batch
    first_order: bool = False  # treat the inner gradient as a constant (no second derivatives)
    min_memory: int = 0  # images the memory holds before its terms start (0: as many as a student batch)

    def __post_init__(self):
        for name in ("lra", "replay", "inner_lr", "min_memory"):
            if getattr(self, name) < 0:
                raise UsageError(f"lra option {name} must be >= 0, got {getattr(self, name)}")
        for name in ("memory_size", "memory_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"lra option {name} must be >= 1, got {getattr(self, name)}")
        if self.min_memory > self.memory_size:
            raise UsageError(
                f"lra option min_memory ({self.min_memory}) must be at most memory_size ({self.memory_size}): "
                "the memory terms would never start"
            )
        if not 0 < self.memory_fraction <= 1:
            raise UsageError(f"lra option memory_fraction must be in (0, 1], got {self.memory_fraction}")


class LRA(Plugin):
    """The retention and replay terms on a long-term memory (any method's student phase). Options:
    :class:`LRAConfig`."""

    name = "lra"
    Config = LRAConfig

    def attach(self, task) -> None:
        self.memory = ImagePool(self.config.memory_size)
        self.steps = 0  # student steps seen (the memory grows at every memory_every-th)

    def student_terms(self, *, images, student_logits, teacher_logits, task) -> dict[str, torch.Tensor]:
        """``{"loss_lra": lra * L(m; theta'), "loss_replay": replay * L(m; theta)}`` (absent while the memory holds
        fewer than ``min_memory`` images, or than the batch when that is 0, or none), with the student's graph; then,
        at every ``memory_every``-th step, part of the batch joins the memory."""
        config = self.config
        terms = {}
        # min_memory 0: a student batch, or the whole memory when it holds fewer images than a batch
        needed = config.min_memory or min(len(images), config.memory_size)
        if len(self.memory) >= needed:  # needed >= 1: never on an empty memory
            student = extract_model_from_parallel(task.student)
            self.memory.to(images.device)  # a resumed memory is on the CPU
            memory_images, memory_logits = self.memory.sample(len(images))
            loss = task.synthesizer.student_loss
            params = {name: p for name, p in student.named_parameters() if p.requires_grad}
            if config.lra:
                # retain_graph: the task's own loss still backpropagates through the new batch's logits.
                grads = torch.autograd.grad(
                    loss(student_logits, teacher_logits),
                    list(params.values()),
                    create_graph=not config.first_order,
                    retain_graph=True,
                )
                adapted = {
                    name: p - config.inner_lr * (g.detach() if config.first_order else g)
                    for (name, p), g in zip(params.items(), grads)
                }
                retained = torch.func.functional_call(student, adapted, (memory_images,))
                terms["loss_lra"] = config.lra * loss(retained, memory_logits)
            if config.replay:
                terms["loss_replay"] = config.replay * loss(student(memory_images), memory_logits)
        if self.steps % config.memory_every == 0:
            count = max(1, math.ceil(config.memory_fraction * len(images)))
            self.memory.to(images.device)
            self.memory.add(images[:count].detach(), teacher_logits[:count].detach())
        self.steps += 1
        return terms

    def state_dict(self) -> dict:
        return {"memory": self.memory.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.memory = ImagePool(self.config.memory_size)
        self.memory.load_state_dict(state["memory"])
        self.steps = int(state["steps"])
