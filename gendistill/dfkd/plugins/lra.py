"""LRA as a plug-in: G. Patel et al., "Learning to Retain while Acquiring: Combating Distribution-Shift in
Adversarial Data-Free Knowledge Distillation" (CVPR 2023, arXiv 2302.14290).

In adversarial DFKD the generator keeps moving, so a student that learns only from the newest batch forgets what
it learned from earlier ones. LRA keeps a memory of past synthetic batches (with the teacher's logits on them) and
treats learning the new batch as meta-train ("acquisition") and the memory as meta-test ("retention"): at each
student step, with ``L_acq`` the method's student loss on the new batch and ``theta`` the student's weights,

    theta' = theta - inner_lr * grad L_acq(theta)     (one inner SGD step on the new batch)
    loss   = L_acq(theta) + lra * L_ret(theta')       (L_ret: the same loss on a memory batch, stored teacher logits)

so the update favours directions that learn the new batch without losing the old ones. The retention loss is
differentiated through the inner step (second order, ``torch.func.functional_call``); ``first_order`` treats the
inner gradient as a constant, which is cheaper. The memory is a ring buffer of the last ``memory_batches`` student
batches; a batch joins it after its step, the memory batch is drawn uniformly (global RNG, so resume is exact) with
the new batch's size, and the first step (an empty memory) has no retention term. The memory is checkpointed.

Not from the paper: the inner step size ``inner_lr`` 1e-2 is this project's default, not tuned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel

from ...errors import UsageError
from ..generators import ImagePool
from .base import Plugin, PluginConfig


@dataclass
class LRAConfig(PluginConfig):
    lra: float = 1.0  # weight of the retention loss through the adapted weights
    memory_batches: int = 10  # past student batches kept, with the teacher's logits on them
    inner_lr: float = 1e-2  # step size of the inner SGD step on the new batch
    first_order: bool = False  # treat the inner gradient as a constant (no second derivatives)

    def __post_init__(self):
        for name in ("lra", "inner_lr"):
            if getattr(self, name) < 0:
                raise UsageError(f"lra option {name} must be >= 0, got {getattr(self, name)}")
        if self.memory_batches < 1:
            raise UsageError(f"lra option memory_batches must be >= 1, got {self.memory_batches}")


class LRA(Plugin):
    """The retention term through one inner step (any method's student phase). Options: :class:`LRAConfig`."""

    name = "lra"
    Config = LRAConfig

    def attach(self, task) -> None:
        self.memory: ImagePool | None = None  # created at the first batch (its size sets the capacity)

    def student_terms(self, *, images, student_logits, teacher_logits, task) -> dict[str, torch.Tensor]:
        """``{"loss_lra": lra * L_ret(theta')}`` (zero while the memory is empty), with the student's graph; then
        the batch joins the memory."""
        config = self.config
        term = student_logits.new_zeros((), dtype=torch.float32)
        if self.memory is not None:
            student = extract_model_from_parallel(task.student)
            params = {name: p for name, p in student.named_parameters() if p.requires_grad}
            acquisition = task.synthesizer.student_loss(student_logits, teacher_logits)
            # retain_graph: the task's own loss still backpropagates through the new batch's logits.
            grads = torch.autograd.grad(
                acquisition, list(params.values()), create_graph=not config.first_order, retain_graph=True
            )
            adapted = {
                name: p - config.inner_lr * (g.detach() if config.first_order else g)
                for (name, p), g in zip(params.items(), grads)
            }
            memory_images, memory_logits = self.memory.sample(len(images))
            retained = torch.func.functional_call(student, adapted, (memory_images,))
            term = config.lra * task.synthesizer.student_loss(retained, memory_logits)
        if self.memory is None:
            self.memory = ImagePool(config.memory_batches * len(images))
        self.memory.add(images.detach(), teacher_logits.detach())
        return {"loss_lra": term}

    def state_dict(self) -> dict:
        return {} if self.memory is None else {"memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.memory = None
        if state:
            self.memory = ImagePool(int(state["memory"]["capacity"]))
            self.memory.load_state_dict(state["memory"])
