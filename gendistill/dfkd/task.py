"""The DFKD task: a frozen teacher, a student and a synthesizer that makes the student's images from nothing.

The student learns ``tau^2 KL(softmax(T(x)/tau) || softmax(S(x)/tau))`` on synthesized images ``x`` (the
synthesizer's ``student_loss``; DFAD keeps its reference's L1 on logits); what differs between methods is how ``x`` is
made, which the synthesizer decides (one file per method in ``gendistill/dfkd/synthesizers``). Methods with a
generator train it as a phase of its own ("generator"), before or after the student's steps of the same iteration;
pure inversion methods have only the student phase and synthesize inside it. Plug-in ``objectives`` add terms to
either phase's loss; the synthesizer's state (pools, banks, counters) is checkpointed through ``extra_state``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from ..errors import UsageError
from ..task import Phase, weights_frozen
from .models import Classifier
from .plugins import Plugin


class DFKDTask(nn.Module):
    """Frozen teacher + trainable student (+ the synthesizer's generator, when it has one).

    Args:
        teacher: the classifier to distill (kept frozen, in eval mode: its BatchNorm statistics are the data's memory).
        extra_teachers: more frozen classifiers (same classes and image size, any architecture) whose statistics and
            classes join the synthesis of the methods that take them (MixMix); the student learns from ``teacher``.
        student: the classifier to train; same number of classes and input shape.
        synthesizer: a ``Synthesizer`` from ``gendistill.dfkd.synthesizers``.
        eval_data: optional held-out real images (N, C, H, W) in [0, 1] and labels (N,): accuracy and agreement.
        objectives: plug-in objects adding terms to the losses, each with any of the optional methods
            ``student_terms(*, images, student_logits, teacher_logits, task)`` (every method's student phase) and
            ``generator_terms(*, images, teacher_logits, student_logits, task)`` (the generator phase of the
            generator methods: DAFL, DFAD, ZSKT, DFQ, CAE; with the images and logits the method's loss used, with
            their graphs: CAE's are augmented views; the student's logits are computed when the method has none, as
            in DAFL). Both return ``{name: scalar tensor}``; each term is added to the phase's ``"loss"`` and
            returned, detached, under its name. For the methods whose synthesis is an inversion (DeepInversion,
            CMI, Fast, NAYER) a third, ``synthesis_terms(*, images, teacher_logits)``, is added to every inversion
            step's loss instead of generator terms (the augmented views and the teacher's logits on them).
            Images are (B, C, H, W), logits (B, K). Objectives are not modules
            of the task. Plug-ins (``gendistill.dfkd.plugins.Plugin``) are objectives that are also attached to
            the task, may watch the student phase's forwards, and keep their state in its checkpoints.
    """

    def __init__(
        self,
        teacher: Classifier,
        student: Classifier,
        synthesizer,
        *,
        eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
        objectives: Sequence = (),
        extra_teachers: Sequence[Classifier] = (),
    ):
        super().__init__()
        t, s = teacher.config, student.config
        if t.num_classes != s.num_classes:
            raise UsageError(
                f"the teacher has {t.num_classes} classes but the student {s.num_classes}; they must agree"
            )
        if (t.in_channels, t.image_size) != (s.in_channels, s.image_size):
            raise UsageError(
                f"the teacher takes {t.in_channels}x{t.image_size}x{t.image_size} images but the student "
                f"{s.in_channels}x{s.image_size}x{s.image_size}; they must agree"
            )
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student.train().requires_grad_(True)
        self.synthesizer = synthesizer
        if extra_teachers:
            if not getattr(synthesizer, "uses_extra_teachers", False):
                raise UsageError(f"method {synthesizer.name!r} takes one teacher; extra teachers are for: mixmix")
            for extra in extra_teachers:
                e = extra.config
                if (e.num_classes, e.image_size) != (t.num_classes, t.image_size):
                    raise UsageError(
                        f"an extra teacher has {e.num_classes} classes at {e.image_size}x{e.image_size}, the teacher "
                        f"{t.num_classes} at {t.image_size}x{t.image_size}; they must agree"
                    )
        # Frozen like the teacher; modules of the task (so they follow it to the device), not of any checkpoint.
        self.extra_teachers = nn.ModuleList([m.eval().requires_grad_(False) for m in extra_teachers])
        if extra_teachers:
            synthesizer.set_extra_teachers(list(self.extra_teachers))
        synthesizer.adapt_to_teacher(self.teacher)
        synthesizer.adapt_to_student(self.student)
        generator = synthesizer.build_generator()
        if generator is not None:
            self.generator = generator
        self.objectives = list(objectives)
        if synthesizer.black_box and self.objectives:
            raise UsageError(
                f"method {synthesizer.name!r} reads the teacher only through queries; plug-ins and objectives need "
                "a white-box teacher (its logits with gradients), so none can be combined with it"
            )
        if synthesizer.owns_student_loss and self.objectives:
            raise UsageError(
                f"method {synthesizer.name!r} makes the student's whole loss itself (weighted instances, feature "
                "terms, perturbed copies), so plug-ins and objectives cannot be combined with it"
            )
        names = [o.name for o in self.objectives if isinstance(o, Plugin)]
        if len(set(names)) != len(names):
            raise UsageError(f"plug-ins {names} name one twice")
        if not synthesizer.exposes_generator_tensors:
            # The synthesis is an inversion (DeepInversion, CMI, Fast, NAYER): synthesis terms join its steps.
            synthesizer.synthesis_objectives = [o for o in self.objectives if hasattr(o, "synthesis_terms")]
            unsupported = [
                type(o).__name__
                for o in self.objectives
                if hasattr(o, "generator_terms") and not hasattr(o, "synthesis_terms")
            ]
            if generator is not None and unsupported:
                raise UsageError(
                    f"objective(s) {', '.join(unsupported)} add generator terms, which method {synthesizer.name!r} "
                    "does not support (its generator phase is not a loss on generated images); use student_terms "
                    "or synthesis_terms"
                )
        if eval_data is not None:
            images, labels = eval_data
            if images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
                raise UsageError(f"eval_data must be images (N, C, H, W) and labels (N,), got {tuple(images.shape)}")
            self.register_buffer("eval_images", images.float(), persistent=False)
            self.register_buffer("eval_labels", labels.long(), persistent=False)
        self._teacher_eval: dict[str, torch.Tensor] | None = None
        for objective in self.objectives:
            if isinstance(objective, Plugin):
                objective.attach(self)

    @property
    def num_classes(self) -> int:
        return self.teacher.config.num_classes

    def phases(self) -> list[Phase]:
        return self.synthesizer.phases()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.train(False)
        self.extra_teachers.train(False)
        return self

    # --- the training core's interface ----------------------------------------------------------------------
    def sample_batch(self, phase: str, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Student phase: synthesized ``"images"`` (B, C, H, W) in [0, 1], with ``"teacher_logits"`` (B, K) when the
        synthesizer has them (a student memory); generator phase: the synthesizer's inputs."""
        generator = getattr(self, "generator", None)
        if phase == "student":
            batch = self.synthesizer.student_batch(
                batch_size,
                device,
                teacher=self.teacher,
                student=extract_model_from_parallel(self.student),
                generator=generator,
            )
            return {k: v.detach() for k, v in batch.items()}
        return self.synthesizer.generator_batch(batch_size, device)

    def forward(self, phase: str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if phase == "student" and self.synthesizer.owns_student_loss:
            return self.synthesizer.student_losses(batch, teacher=self.teacher, student=self.student)
        if phase == "student":
            images, teacher_logits = batch["images"], batch.get("teacher_logits")
            with contextlib.ExitStack() as watches:
                for plugin in self.objectives:
                    if isinstance(plugin, Plugin):
                        student = extract_model_from_parallel(self.student)
                        watches.enter_context(plugin.watch_student(teacher=self.teacher, student=student))
                if teacher_logits is None:
                    with torch.no_grad():
                        teacher_logits = self.teacher(images)
                student_logits = self.student(images)
            losses = {"loss": self.synthesizer.student_loss(student_logits, teacher_logits)}
            tensors = {"images": images, "student_logits": student_logits, "teacher_logits": teacher_logits}
            return self._add_terms(losses, "student_terms", tensors)
        # The student is called unwrapped and in eval mode: its gradients from this phase are never used (each
        # phase starts from zeroed gradients), must not trigger a DDP all-reduce, and synthetic batches must not move
        # its BatchNorm statistics. Its parameters are frozen while the graph is built, so the backward computes the
        # gradients w.r.t. the images through it but not the unused ones of its weights.
        student = extract_model_from_parallel(self.student)
        was_training = student.training
        student.eval()
        try:
            with weights_frozen(student):
                losses = self.synthesizer.generator_loss(
                    batch, generator=self.generator, teacher=self.teacher, student=student
                )
                tensors = self.synthesizer.pop_generator_tensors()
                if tensors is None or not any(hasattr(o, "generator_terms") for o in self.objectives):
                    return losses  # no generator terms (an inversion method's are its synthesis terms)
                if tensors["student_logits"] is None:  # a loss without the student (DAFL)
                    tensors = {**tensors, "student_logits": student(tensors["images"])}
                return self._add_terms(losses, "generator_terms", tensors)
        finally:
            student.train(was_training)

    def _add_terms(self, losses: dict, hook: str, tensors: dict) -> dict[str, torch.Tensor]:
        """``losses`` with the terms of every objective's ``hook`` added to ``"loss"`` and, detached, by name."""
        for objective in self.objectives:
            if not hasattr(objective, hook):
                continue
            for name, term in getattr(objective, hook)(**tensors, task=self).items():
                if name in losses:
                    raise UsageError(f"{type(objective).__name__}.{hook} returns {name!r}, a name already in the loss")
                losses["loss"] = losses["loss"] + term
                losses[name] = term.detach()
        return losses

    # --- checkpointed state ---------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        """The synthesizer's state (pools, banks, counters, the student memory): JSON scalars and tensors, which the
        training core checkpoints beside the modules."""
        plugins = {o.name: o.state_dict() for o in self.objectives if isinstance(o, Plugin)}
        return {"method": self.synthesizer.name, "synthesizer": self.synthesizer.state_dict(), "plugins": plugins}

    def load_extra_state(self, state: dict) -> None:
        if state["method"] != self.synthesizer.name:
            raise UsageError(f"the state is of method {state['method']!r}, this task's is {self.synthesizer.name!r}")
        expected, saved = sorted(self.synthesizer.state_dict()), sorted(state["synthesizer"])
        if saved != expected:
            raise UsageError(f"the synthesizer state has entries {saved}, this method's are {expected}")
        self.synthesizer.load_state_dict(state["synthesizer"])
        plugins = {o.name: o for o in self.objectives if isinstance(o, Plugin)}
        saved = state.get("plugins", {})  # checkpoints written before plug-ins existed have none
        if sorted(saved) != sorted(plugins):
            raise UsageError(
                f"the checkpoint was written with plug-ins {sorted(saved)}, this run has {sorted(plugins)}"
            )
        for name, plugin in plugins.items():
            plugin.load_state_dict(saved[name])

    # --- quality signals ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, student: nn.Module | None = None, **_) -> dict[str, float]:
        """Held-out accuracy of the student (and once of the teacher) and the student-teacher agreement."""
        queries = getattr(self.synthesizer, "queries", None)  # a black-box method's count of teacher queries
        counted = {} if queries is None else {"teacher_queries": float(queries)}
        if not hasattr(self, "eval_images"):
            return counted
        student = self.student if student is None else student
        was_training = student.training
        student.eval()
        predictions = []
        for chunk in self.eval_images.split(256):
            predictions.append(student(chunk).argmax(1))
        student.train(was_training)
        pred = torch.cat(predictions)
        if self._teacher_eval is None or self._teacher_eval["pred"].device != pred.device:
            t_pred = torch.cat([self.teacher(chunk).argmax(1) for chunk in self.eval_images.split(256)])
            self._teacher_eval = {"pred": t_pred}
        t_pred = self._teacher_eval["pred"]
        return {
            **counted,
            "student_accuracy": (pred == self.eval_labels).float().mean().item(),
            "teacher_accuracy": (t_pred == self.eval_labels).float().mean().item(),
            "teacher_agreement": (pred == t_pred).float().mean().item(),
        }

    @torch.no_grad()
    def sample_images(self, **modules) -> torch.Tensor:
        """A grid's worth of synthesized images (B, C, H, W) in [0, 1]."""
        generator = modules.get("generator", getattr(self, "generator", None))
        student = modules.get("student", extract_model_from_parallel(self.student))
        device = next(self.teacher.parameters()).device
        # Grids draw from a fixed seed inside a forked RNG: every grid uses the same noise (the grids show the
        # generator's progress), and writing one never shifts the training's random stream (so a run resumed
        # from a checkpoint written after a grid continues exactly as an uninterrupted run).
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            images = self.synthesizer.preview(16, device, generator=generator, teacher=self.teacher, student=student)
        return images.float().clamp(0, 1)
