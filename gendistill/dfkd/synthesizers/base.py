"""What every DFKD synthesizer provides (one subclass per method, one file each), and what the methods share.

A synthesizer decides how the student's images are made. It owns the method's hyper-parameters (a dataclass
``Config`` with one commented field per weight) and the state that outlives a step (an image pool, a feature bank, a
student memory, counters): ``state_dict()`` returns that state as JSON scalars and tensors, which the training core
checkpoints (through ``DFKDTask.extra_state``), so a resumed run continues exactly. The modules it trains live on the
task (``build_generator`` makes the generator the task holds as its "generator" phase), so the training core
prepares, wraps and checkpoints them like any other.

The methods come in three shapes: :class:`GeneratorSynthesizer` (DAFL, DFAD, ZSKT, DFQ, CAE-DFKD: a generator trained
in its own phase, the student learns on its samples), :class:`PoolSynthesizer` (DeepInversion, CMI, NAYER: synthesis
rounds inside the student phase fill an image pool the student samples from) and Fast (a meta-learned generator
phase that fills a pool). The inversion methods share :func:`inversion_loss` and :func:`inner_optimize`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import UsageError
from ...task import Phase
from ..generators import Generator, ImagePool, augment
from ..losses import BNStatsLoss, adversarial_loss, batchnorm_layer_count, kd_loss, one_hot_loss
from ..models import FeatureHooks


@dataclass
class SynthesizerConfig:
    tau: float = 20.0  # temperature of the student's KD loss (tau^2-scaled KL)
    student_steps: int = 1  # student optimizer steps per iteration
    student_lr: float = 2e-3  # the student's AdamW learning rate when the recipe gives none (--lr)
    batch_size: int = 64  # images per generator and student step when the recipe gives none (--batch-size)
    max_steps: int = 1000  # iterations of a run when the recipe gives none (--max-steps)
    generator_lr: float = 1e-3  # Adam learning rate of the generator (the recipe's lr is the student's)
    nz: int = 256  # generator noise size
    ngf: int = 64  # generator width

    # Valid values, checked at construction (subclasses extend them): the smallest value of some fields, and the
    # fields that must be positive; an option left at None (resolved later, e.g. from the teacher) is not checked.
    AT_LEAST = {}
    POSITIVE = ()

    def __post_init__(self):
        for name, minimum in self.AT_LEAST.items():
            if getattr(self, name) is not None and getattr(self, name) < minimum:
                raise UsageError(f"{name} must be >= {minimum}, got {getattr(self, name)}")
        for name in self.POSITIVE:
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise UsageError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class GeneratorConfig(SynthesizerConfig):
    generator_steps: int = 1  # generator steps per iteration
    memory_batches: int = 0  # 0: the student learns on fresh samples; N: on the last N generator batches + logits
    # (1: every student step of an iteration reuses that iteration's generator batch)
    student_start: int = 0  # iterations of generator steps alone before the student's steps start
    generator_beta1: float | None = None  # the generator's Adam beta1 (None: the recipe's adam_beta1, 0.9 by
    # default, torch's Adam default, which DAFL's, DFAD's and ZSKT's reference code use)
    memory_balance: float | None = 0.0  # the student's draws from the memory: each image with probability
    # proportional to n_c ** -memory_balance, n_c the number of memory images the teacher puts in its class c
    # (0: uniform; 1: every class as often, as far as the memory holds it)
    AT_LEAST = {"generator_steps": 1, "memory_batches": 0, "student_start": 0, "memory_balance": 0}

    def __post_init__(self):
        super().__post_init__()
        if self.generator_beta1 is not None and not 0.0 <= self.generator_beta1 < 1.0:
            raise UsageError(f"generator_beta1 must be in [0, 1), got {self.generator_beta1}")


@dataclass
class PoolConfig(SynthesizerConfig):
    synthesis_every: int = 400  # student batches between synthesis rounds (the first batch always synthesizes)
    synthesis_batch_size: int = 0  # images per synthesis round (NAYER: per loop) (0: the student's batch size)
    pool_size: int = 50_000  # capacity of the image pool (oldest images dropped first)
    AT_LEAST = {"synthesis_every": 1, "synthesis_batch_size": 0, "pool_size": 1}


def detached(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in losses.items()}


def image_generator(
    config: SynthesizerConfig, image_shape: tuple[int, int, int], *, output: str = "sigmoid", normalization=None
) -> Generator:
    """The DAFL / Fast :class:`Generator` of ``config.nz`` and ``config.ngf`` for ``image_shape`` (C, H, W) images."""
    c, h, _ = image_shape
    return Generator(nz=config.nz, ngf=config.ngf, img_size=h, channels=c, output=output, normalization=normalization)


class Synthesizer(ABC):
    """Base class. Subclasses set ``name``, ``Config`` and ``needs_batchnorm`` and implement the methods below."""

    name = ""
    Config = SynthesizerConfig
    needs_batchnorm = False  # True: the method's loss uses the teacher's BatchNorm statistics
    exposes_generator_tensors = False  # True: generator_loss records its tensors (the task's generator terms)
    data_free = True  # False: the method learns on real (unlabeled) images it is given
    black_box = False  # True: the method reads the teacher only through counted queries (DFME); no plug-ins
    owns_student_loss = False  # True: student_losses makes the student phase's whole loss (KD^3); no plug-ins

    def __init__(
        self,
        *,
        num_classes: int,
        image_shape: tuple[int, int, int],
        config=None,
        normalization: tuple[Sequence[float], Sequence[float]] | None = None,
        kernel_backend: str | None = None,
        **overrides,
    ):
        """``normalization``: the teacher's input normalization (mean, std), for generators whose output lives in
        the normalized space (DFAD's); None: the teacher takes its pixels as they are. ``kernel_backend``: the
        BN-statistics kernel's backend (``gendistill.kernels``; None: fused on CUDA, ``"torch"``: the reference)."""
        if config is None:
            config = self.Config()
        valid = [f.name for f in dataclasses.fields(self.Config)]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise UsageError(
                f"unknown option(s) {', '.join(unknown)} for method {self.name!r}; valid: {', '.join(valid)}"
            )
        self.requested_config = dataclasses.replace(config, **overrides)  # as asked for (options may be None)
        self.config = self.config_for_teacher(self.requested_config, None)  # resolved (adapt_to_teacher)
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)
        self.normalization = normalization
        self.kernel_backend = kernel_backend
        # Objectives whose synthesis_terms join every inversion step's loss (set by the DFKD task for methods
        # whose generator phase is not a loss on generated images, and for the inversion methods).
        self.synthesis_objectives: list = []

    @property
    def tau(self) -> float:
        return self.config.tau

    def student_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The student's distillation loss on logits (B, K): ``tau^2 KL`` at ``tau`` (methods may override)."""
        return kd_loss(student_logits, teacher_logits, tau=self.tau)

    def inversion(self, images, labels, *, teacher, student, adv: float | None = None, **kwargs) -> Inversion:
        """:func:`inversion_loss` with this method's ``bn``, ``oh`` and ``adv`` weights (``adv`` overrides the
        configured one) and kernel backend, plus the terms of the ``synthesis_objectives`` (each one's
        ``synthesis_terms(images=views, teacher_logits=...)``, with graphs, added to the loss and to ``terms``);
        other keywords pass through."""
        cfg = self.config
        adv = cfg.adv if adv is None else adv
        inv = inversion_loss(
            images,
            labels,
            teacher=teacher,
            student=student,
            bn=cfg.bn,
            oh=cfg.oh,
            adv=adv,
            kernel_backend=self.kernel_backend,
            **kwargs,
        )
        for objective in self.synthesis_objectives:
            for name, term in objective.synthesis_terms(images=inv.views, teacher_logits=inv.teacher_logits).items():
                if name in inv.terms:
                    raise UsageError(f"{type(objective).__name__}.synthesis_terms returns {name!r}, already a term")
                inv.loss = inv.loss + term
                inv.terms[name] = term
        return inv

    def check_teacher(self, teacher: nn.Module) -> None:
        """Raise ``ValueError`` when the method needs BatchNorm statistics and the teacher has none."""
        from ..losses import has_batchnorm
        from . import METHODS

        if self.needs_batchnorm and not has_batchnorm(teacher):
            free = sorted(name for name, cls in METHODS.items() if not cls.needs_batchnorm)
            raise UsageError(
                f"method {self.name!r} matches the teacher's BatchNorm statistics, but this teacher has no BatchNorm "
                f"layer; methods that work without BatchNorm: {', '.join(free)}"
            )

    @classmethod
    def config_for_teacher(cls, config, teacher_bn_layers: int | None):
        """``config`` with the settings that depend on the teacher resolved, from the number of BatchNorm layers
        of the teacher (None: unknown). The base method has none: ``config`` as it is."""
        return config

    def adapt_to_teacher(self, teacher: nn.Module) -> None:
        """Resolve the settings that depend on ``teacher`` (:meth:`config_for_teacher`) from the options asked for;
        the DFKD task calls this before ``build_generator`` and ``phases``."""
        self.config = self.config_for_teacher(self.requested_config, batchnorm_layer_count(teacher))

    def adapt_to_student(self, student: nn.Module) -> None:
        """Build what depends on the student (KD^3's feature projector); the DFKD task calls this after
        :meth:`adapt_to_teacher`, with the student it trains. The base method needs nothing."""
        return None

    def student_losses(self, batch: dict, *, teacher, student) -> dict[str, torch.Tensor]:
        """The student phase's losses (``"loss"`` is optimized) of a method that makes them itself
        (``owns_student_loss``), from the batch of :meth:`student_batch`. ``student`` is the task's, possibly wrapped
        for distributed training: call it once per step (batch perturbed copies with the originals)."""
        raise TypeError(f"method {self.name!r} leaves the student's loss to the task (owns_student_loss is False)")

    # --- what subclasses implement -------------------------------------------------------------------------
    def build_generator(self) -> nn.Module | None:
        """The generator the task trains in its "generator" phase (None: no generator phase)."""
        return None

    def phases(self) -> list[Phase]:
        return [Phase("student", steps=self.config.student_steps)]

    # A method with a generator phase (build_generator returns a module, phases lists "generator") also has
    # generator_batch(batch_size, device) -> its inputs, drawn from the global RNG (so resume restores them), and
    # generator_loss(batch, *, generator, teacher, student) -> its losses ("loss" is optimized): GeneratorSynthesizer
    # declares them; Fast, which derives from this base, defines both.

    @abstractmethod
    def student_images(self, batch_size: int, device: torch.device, *, teacher, student, generator) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] for one student step."""

    def student_batch(self, batch_size: int, device: torch.device, *, teacher, student, generator) -> dict:
        """One student step's batch: ``"images"`` (B, C, H, W) in [0, 1] and, when the synthesizer already holds the
        teacher's logits on them, ``"teacher_logits"`` (B, K) (the task then runs no teacher forward)."""
        return {
            "images": self.student_images(batch_size, device, teacher=teacher, student=student, generator=generator)
        }

    @abstractmethod
    def preview(self, num_images: int, device: torch.device, *, generator, teacher=None, student=None) -> torch.Tensor:
        """Images (n, C, H, W) in [0, 1] for sample grids (inversion methods may synthesize with the networks)."""

    def noise(self, batch_size: int, device: torch.device) -> torch.Tensor:
        return torch.randn(batch_size, self.config.nz, device=device)

    def pop_generator_tensors(self) -> dict[str, torch.Tensor | None] | None:
        """The images and teacher/student logits (with their graphs) of the latest ``generator_loss``, forgotten
        once read; None for methods that do not record them (``exposes_generator_tensors``)."""
        return None

    def state_dict(self) -> dict:
        """The state that outlives a step, as JSON scalars and tensors (nested dicts and lists)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (tensors may be on the CPU; they move to the device at use)."""
        if state:
            raise UsageError(f"method {self.name!r} keeps no state, got {sorted(state)}")


class GeneratorSynthesizer(Synthesizer):
    """A generator (``build_generator``: a :class:`Generator` of ``nz``/``ngf``) trained in a "generator" phase of
    ``generator_steps`` steps at ``generator_lr``, and a "student" phase of ``student_steps`` steps from iteration
    ``student_start`` on, the generator's first unless ``student_first``. Subclasses set ``Config`` (a
    :class:`GeneratorConfig`) and implement :meth:`generator_loss`, which calls :meth:`remember` with the images and
    logits it computed.

    The student learns on fresh generator samples (B, C, H, W) of fresh noise (``generator_batch``: ``{"z": (B,
    nz)}``). With ``memory_batches`` N > 0 it learns instead on images drawn from the last N generator batches with
    the teacher's logits stored beside them: a student step then runs neither the generator nor the teacher. Draws
    are without replacement while the memory holds a batch's worth (so with N = 1 and the generator's batch size,
    every student step sees the latest generator batch, shuffled). While that memory is empty (DFAD's first student
    steps) the student takes fresh samples.

    State: the student memory (``memory``: an :class:`ImagePool` of ``memory_batches`` batches with the teacher's
    logits as labels, made at the first generator step; None before and when ``memory_batches`` is 0).
    """

    Config = GeneratorConfig
    student_first = False  # True: each iteration runs the student's steps before the generator's (DFAD)
    generator_output = "sigmoid"  # the Generator's output: "sigmoid" or DFAD's "standardized"
    exposes_generator_tensors = True

    def __init__(self, *, num_classes: int, image_shape: tuple[int, int, int], config=None, **overrides):
        super().__init__(num_classes=num_classes, image_shape=image_shape, config=config, **overrides)
        self.memory: ImagePool | None = None
        self._generator_tensors: dict[str, torch.Tensor | None] | None = None

    def build_generator(self) -> nn.Module:
        return image_generator(
            self.config, self.image_shape, output=self.generator_output, normalization=self.normalization
        )

    def phases(self) -> list[Phase]:
        cfg = self.config
        generator = Phase("generator", steps=cfg.generator_steps, lr=cfg.generator_lr, adam_beta1=cfg.generator_beta1)
        student = Phase("student", steps=cfg.student_steps, start=cfg.student_start)
        return [student, generator] if self.student_first else [generator, student]

    @abstractmethod
    def generator_loss(self, batch, *, generator, teacher, student) -> dict[str, torch.Tensor]:
        """The generator's losses on one ``generator_batch``; ``"loss"`` is optimized."""

    def generator_batch(self, batch_size, device):
        return {"z": self.noise(batch_size, device)}

    def remember(self, images, teacher_logits, student_logits=None, *, keep: bool = True) -> None:
        """Record one generator step: ``images`` (B, C, H, W) and the ``teacher_logits``/``student_logits`` (B, K)
        its loss used, with their graphs, for the task's generator terms; with ``keep`` and a student memory, the
        images and teacher logits also join the memory, detached (``keep=False``: the images are augmented views;
        the caller adds the raw images itself)."""
        self._generator_tensors = {
            "images": images,
            "teacher_logits": teacher_logits,
            "student_logits": student_logits,
        }
        if keep:
            self.add_to_memory(images, teacher_logits)

    def add_to_memory(self, images: torch.Tensor, teacher_logits: torch.Tensor) -> None:
        """With ``memory_batches``, store a generator batch and the teacher's logits on it, detached."""
        if self.config.memory_batches and self.memory is None:
            self.memory = ImagePool(self.config.memory_batches * len(images))
        if self.memory is not None:
            self.memory.to(images.device)  # a resumed memory is on the CPU
            self.memory.add(images, teacher_logits)

    def pop_generator_tensors(self):
        tensors, self._generator_tensors = self._generator_tensors, None
        return tensors

    def student_batch(self, batch_size, device, *, teacher, student, generator):
        if self.memory is None:
            return super().student_batch(batch_size, device, teacher=teacher, student=student, generator=generator)
        self.memory.to(torch.device(device))
        replace = batch_size > len(self.memory)
        images, logits = self.memory.sample(batch_size, replace=replace, weights=self.memory_weights())
        return {"images": images, "teacher_logits": logits}

    def memory_weights(self) -> torch.Tensor | None:
        """The student's draw weights over the memory (``memory_balance``): ``n_c ** -memory_balance`` for an image
        the teacher puts in class c (the argmax of its stored logits), ``n_c`` that class's count in the memory;
        None (uniform) at 0."""
        if not self.config.memory_balance:
            return None
        classes = self.memory.labels[: len(self.memory)].argmax(dim=1)
        counts = torch.bincount(classes, minlength=self.memory.labels.shape[1]).float()
        return counts[classes] ** -self.config.memory_balance

    @torch.no_grad()
    def student_images(self, batch_size, device, *, teacher, student, generator):
        return generator(self.noise(batch_size, device))

    @torch.no_grad()
    def preview(self, num_images, device, *, generator, teacher=None, student=None):
        return generator(self.noise(num_images, device))

    def state_dict(self) -> dict:
        return {"memory": None if self.memory is None else self.memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        saved, self.memory = state["memory"], None
        if saved is not None and not self.config.memory_batches:
            raise UsageError("the state holds a student memory but memory_batches is 0")
        if saved is not None:
            self.memory = ImagePool(int(saved["capacity"]))
            self.memory.load_state_dict(saved)


@dataclass
class Inversion:
    """What :func:`inversion_loss` computed, with autograd history."""

    loss: torch.Tensor  # bn * loss_bn + oh * loss_oh + adv * loss_adv (scalar)
    terms: dict[str, torch.Tensor]  # "loss_bn", "loss_oh", "loss_adv" (scalars)
    views: torch.Tensor  # the augmented images (B, C, H, W) both networks saw
    teacher_logits: torch.Tensor  # (B, K)
    student_logits: torch.Tensor | None  # (B, K); None when adv is 0 (no student forward)
    features: dict[str, torch.Tensor]  # the inputs of the requested teacher modules


def inversion_loss(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher: nn.Module,
    student: nn.Module,
    bn: float,
    oh: float,
    adv: float,
    adv_kind: str = "kl",
    adv_tau: float = 1.0,
    mask_agreement: bool = False,
    bn_stats: BNStatsLoss | None = None,
    bn_kind: str = "norm",
    features: Sequence[str] = (),
    padding: int | None = None,
    kernel_backend: str | None = None,
) -> Inversion:
    """The loss the inversion methods share (DeepInversion, CMI, Fast, NAYER, CAE-DFKD), on one random crop + flip
    (``augment``, global RNG) of ``images`` (B, C, H, W) in [0, 1] with target ``labels`` (B,):

        bn * BN-statistics(T) + oh * CE(T(view), labels) + adv * adversarial_loss(S(view), T(view))

    ``padding`` defaults to 1/8 of the image width (the references pad 4 pixels at 32 x 32). ``bn_stats``: a
    :class:`BNStatsLoss` already installed on the teacher (Fast's momentum memory), else one of ``bn_kind`` is
    installed for the forward (on ``kernel_backend``). ``features``: teacher modules whose inputs are returned (the
    penultimate features by ``teacher.feature_layer``). ``adv`` 0 skips the student forward (``loss_adv``: 0)."""
    views = augment(images, padding=max(1, images.shape[-1] // 8) if padding is None else padding)
    with contextlib.ExitStack() as hooks:
        if bn_stats is None:
            bn_stats = hooks.enter_context(BNStatsLoss(teacher, kind=bn_kind, backend=kernel_backend))
        hooked = hooks.enter_context(FeatureHooks(teacher, features, inputs=True)) if features else {}
        teacher_logits = teacher(views)
        loss_bn = bn_stats.loss()
    loss_oh = one_hot_loss(teacher_logits, labels)
    student_logits, loss_adv = None, torch.zeros((), device=images.device)
    if adv:
        student_logits = student(views)
        loss_adv = adversarial_loss(
            student_logits, teacher_logits, kind=adv_kind, tau=adv_tau, mask_agreement=mask_agreement
        )
    loss = bn * loss_bn + oh * loss_oh + adv * loss_adv
    terms = {"loss_bn": loss_bn, "loss_oh": loss_oh, "loss_adv": loss_adv}
    return Inversion(loss, terms, views, teacher_logits, student_logits, dict(hooked))


def inner_optimize(
    loss_fn: Callable[[], dict[str, torch.Tensor]],
    params: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    student: nn.Module,
    grad_sum: list[torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor] | None:
    """The inner loop of a synthesis round: ``steps`` times, ``losses = loss_fn()``, the gradients of
    ``losses["loss"]`` w.r.t. ``params`` alone (``torch.autograd.grad``: the teacher and the student get none) set
    as their ``.grad`` and added to ``grad_sum`` (Fast's FOMAML: one buffer per leading parameter), ``optimizer``
    steps, then ``after_step()`` (DeepInversion's clamp). Runs under ``enable_grad`` (previews run under no_grad)
    with ``student`` in eval mode (it judges the images; its BN statistics must not move), restored after; the
    parameters' gradients are cleared at the end. Returns the last step's ``losses`` (None when ``steps`` is 0)."""
    losses = None
    was_training = student.training
    student.eval()
    try:
        with torch.enable_grad():
            for _ in range(steps):
                losses = loss_fn()
                grads = torch.autograd.grad(losses["loss"], params)
                for p, g in zip(params, grads):
                    p.grad = g
                for total, g in zip(grad_sum or [], grads):
                    total.add_(g)
                optimizer.step()
                if after_step is not None:
                    after_step()
    finally:
        student.train(was_training)
        for p in params:
            p.grad = None
    return losses


def sample_pool(pool: ImagePool, num_images: int, device: torch.device) -> torch.Tensor:
    """``num_images`` pool images on ``device`` for a sample grid, drawn without moving the training's random
    stream (runs with another ``sample_every`` must not diverge)."""
    pool.to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        images, _ = pool.sample(num_images)
    return images


class PoolSynthesizer(Synthesizer):
    """A method that synthesizes batches in rounds (inside the student phase) into an :class:`ImagePool` the
    student samples from: a round runs at the first student batch and then every ``config.synthesis_every``
    batches (its config has ``synthesis_every``, ``synthesis_batch_size`` and ``pool_size``).

    State: ``pool``, ``calls`` (student batches served, which schedules the rounds), ``last_losses`` (the detached
    loss terms of the latest synthesis step, not checkpointed) and the teacher/student of the latest call (so
    ``preview`` can synthesize when the pool is empty). Subclasses implement :meth:`synthesize`.
    """

    def __init__(self, *, num_classes: int, image_shape: tuple[int, int, int], config=None, **overrides):
        super().__init__(num_classes=num_classes, image_shape=image_shape, config=config, **overrides)
        self.pool = ImagePool(self.config.pool_size)
        self.calls = 0
        self.last_losses: dict[str, torch.Tensor] = {}
        self._models = None  # (teacher, student) of the latest student_images call

    @abstractmethod
    def synthesize(self, batch_size: int, device: torch.device, *, teacher, student) -> torch.Tensor:
        """One round: (B, C, H, W) images in [0, 1], detached."""

    def student_images(self, batch_size, device, *, teacher, student, generator=None):
        """(B, C, H, W) in [0, 1] sampled from the pool, after a synthesis round every ``synthesis_every`` calls."""
        device = torch.device(device)
        self._models = (teacher, student)
        self.pool.to(device)
        if self.calls % self.config.synthesis_every == 0 or len(self.pool) == 0:
            size = self.config.synthesis_batch_size or batch_size
            self.pool.add(self.synthesize(size, device, teacher=teacher, student=student))
        self.calls += 1
        images, _ = self.pool.sample(batch_size)
        return images

    def preview(self, num_images, device, *, generator=None, teacher=None, student=None):
        """``num_images`` pool images (the training RNG is left untouched), or a fresh round when the pool is empty
        (with ``teacher``/``student``, else those of the latest ``student_images`` call)."""
        device = torch.device(device)
        if len(self.pool) == 0:
            if teacher is None and self._models is not None:
                teacher, student = self._models
            if teacher is None or student is None:
                raise UsageError(
                    f"{self.name}: nothing synthesized yet; pass teacher= and student= to preview a fresh batch"
                )
            return self.synthesize(num_images, device, teacher=teacher, student=student)
        return sample_pool(self.pool, num_images, device)

    def state_dict(self) -> dict:
        return {"calls": self.calls, "pool": self.pool.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
        self.pool.load_state_dict(state["pool"])
