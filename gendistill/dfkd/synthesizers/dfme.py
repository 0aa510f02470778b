"""DFME: Data-Free Model Extraction (J.-B. Truong et al., CVPR 2021, arXiv 2011.14779): DFAD against a teacher that
only answers queries with probabilities.

DFAD's min-max game (``dfad.py``) needs the teacher's logits and their gradient with respect to the generator's
images. A black-box teacher (:class:`gendistill.dfkd.blackbox.BlackBoxTeacher`) gives neither, so DFME

- recovers logits from the probabilities, ``log p - mean_k log p_k`` (the softmax is unchanged by the centring),
  for the student's L1 loss and the generator's disagreement;
- splits the gradient of the disagreement ``-mean |S(x) - T(x)|`` in the images x into the student's part
  (autograd, the teacher's answer held fixed) and the teacher's part, which only queries can give: a zero-order
  estimate (:func:`gendistill.dfkd.blackbox.zero_order_grad`) of the gradient of ``-mean |S(x) - T(x')|`` in x' at
  x, the student's logits held fixed, from ``zo_directions`` q random directions per image (2 q queries per image
  per generator step). DFME itself estimates the whole loss by forward differences; the student's part needs no
  estimate, so only the teacher's is taken from queries.

Every image the teacher answers is counted (``queries``, logged as ``teacher_queries`` with every evaluation). Per
iteration: ``student_steps * batch_size`` answers for the student's fresh samples (or none with a student memory,
``memory_batches``), plus ``batch_size * (1 + 2 q)`` for the generator step (``batch_size`` with ``zo`` 0). The
held-out evaluation's teacher accuracy (a report of the run, not training) reads the teacher directly and is not
counted. Measured against white-box DFAD at equal wall-clock: docs/dfkd.md, "DFME (black-box teachers)".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..blackbox import BlackBoxTeacher, zero_order_grad
from ..losses import adversarial_loss
from .dfad import DFAD, DFADConfig


@dataclass
class DFMEConfig(DFADConfig):
    zo: float = 3.0  # weight of the teacher's part of the disagreement's gradient (zero-order; 0: student part only)
    zo_directions: int = 8  # random directions per image of the zero-order estimate (2 queries each)
    zo_sigma: float = 1e-2  # step along each direction (in the generator's output space)
    zo_resolution: int = 8  # directions drawn at this size and upsampled (low frequencies; 0 or >= image: full)
    AT_LEAST = {**DFADConfig.AT_LEAST, "zo": 0, "zo_directions": 1, "zo_resolution": 0}
    POSITIVE = (*DFADConfig.POSITIVE, "zo_sigma")


def logits_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """Logits (B, K) with softmax ``probs`` (B, K): ``log p - mean_k log p_k`` (a zero probability is clamped to the
    smallest normal number of its dtype, so the logit stays finite)."""
    log_p = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
    return log_p - log_p.mean(dim=1, keepdim=True)


class DFME(DFAD):
    name = "dfme"
    Config = DFMEConfig
    black_box = True  # the task's teacher is read only through queries

    def __init__(self, *, num_classes: int, image_shape: tuple[int, int, int], config=None, **overrides):
        super().__init__(num_classes=num_classes, image_shape=image_shape, config=config, **overrides)
        self.api: BlackBoxTeacher | None = None
        self._queries_before = 0  # queries of the run this one resumes

    @property
    def queries(self) -> int:
        """Images the teacher has answered in this run, the run it resumes included."""
        return self._queries_before + (self.api.queries if self.api is not None else 0)

    def adapt_to_teacher(self, teacher) -> None:
        super().adapt_to_teacher(teacher)
        self.api = BlackBoxTeacher(teacher, output="probs")

    def answers(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits recovered from its probabilities on ``images`` (one query per image)."""
        return logits_from_probs(self.api.query(images.detach()))

    def generator_loss(self, batch, *, generator, teacher, student):
        """``adv * -mean |S(x) - T(x)|``: the student's part of the gradient by autograd, the teacher's (``zo``) by
        a zero-order estimate whose x-gradient is attached through ``(x * g).sum() / B``."""
        cfg = self.config
        x = generator(batch["z"])
        teacher_logits = self.answers(x)
        student_logits = student(x)
        self.remember(x, teacher_logits, student_logits)
        loss_adv = adversarial_loss(student_logits, teacher_logits, kind="l1")
        loss = cfg.adv * loss_adv
        if cfg.zo:
            fixed = student_logits.detach()

            def disagreement(images):  # per image, the student's logits held at x
                answers = self.answers(images)
                return -(answers - fixed.repeat(len(images) // len(fixed), 1)).abs().mean(dim=1)

            grad = zero_order_grad(
                disagreement,
                x,
                directions=cfg.zo_directions,
                sigma=cfg.zo_sigma,
                resolution=min(cfg.zo_resolution, *x.shape[-2:]) or None,  # small images: full size
            )
            teacher_part = (x * grad).sum() / len(x)
            loss = loss + cfg.adv * cfg.zo * (teacher_part - teacher_part.detach())  # adds a gradient, not a value
        return {"loss": loss, "loss_adv": loss_adv.detach()}

    def student_batch(self, batch_size, device, *, teacher, student, generator):
        batch = super().student_batch(batch_size, device, teacher=teacher, student=student, generator=generator)
        if "teacher_logits" not in batch:  # fresh samples (no student memory): answered by queries
            batch["teacher_logits"] = self.answers(batch["images"])
        return batch

    def state_dict(self) -> dict:
        return {**super().state_dict(), "queries": self.queries}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict({"memory": state["memory"]})
        self._queries_before = int(state["queries"])
        if self.api is not None:
            self.api.queries = 0
