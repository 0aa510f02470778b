"""What every DFKD synthesizer provides (one subclass per method, one file each).

A synthesizer decides how the student's images are made. It owns the method's hyper-parameters (a dataclass
``Config`` with one commented field per weight) and any state that outlives a step (an image pool, a feature bank);
the modules it trains live on the task (``build_generator`` makes the generator the task holds as its "generator"
phase), so the training core prepares, wraps and checkpoints them like any other.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from ...task import Phase
from ..generators import ImagePool


@dataclass
class SynthesizerConfig:
    tau: float = 20.0  # temperature of the student's KD loss (tau^2-scaled KL)
    student_steps: int = 1  # student optimizer steps per iteration
    generator_lr: float = 1e-3  # Adam learning rate of the generator (the recipe's lr is the student's)
    nz: int = 256  # generator noise size
    ngf: int = 64  # generator width


class Synthesizer(ABC):
    """Base class. Subclasses set ``name``, ``Config`` and ``needs_batchnorm`` and implement the methods below."""

    name = ""
    Config = SynthesizerConfig
    needs_batchnorm = False  # True: the method's loss uses the teacher's BatchNorm statistics

    def __init__(self, *, num_classes: int, image_shape: tuple[int, int, int], config=None, **overrides):
        if config is None:
            config = self.Config()
        valid = [f.name for f in dataclasses.fields(self.Config)]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} for method {self.name!r}; valid: {', '.join(valid)}"
            )
        self.config = dataclasses.replace(config, **overrides)
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)

    @property
    def tau(self) -> float:
        return self.config.tau

    def check_teacher(self, teacher: nn.Module) -> None:
        """Raise ``ValueError`` when the method needs BatchNorm statistics and the teacher has none."""
        from ..losses import has_batchnorm
        from . import METHODS

        if self.needs_batchnorm and not has_batchnorm(teacher):
            free = sorted(name for name, cls in METHODS.items() if not cls.needs_batchnorm)
            raise ValueError(
                f"method {self.name!r} matches the teacher's BatchNorm statistics, but this teacher has no BatchNorm "
                f"layer; methods that work without BatchNorm: {', '.join(free)}"
            )

    # --- what subclasses implement -------------------------------------------------------------------------
    def build_generator(self) -> nn.Module | None:
        """The generator the task trains in its "generator" phase (None: no generator phase)."""
        return None

    def phases(self) -> list[Phase]:
        return [Phase("student", steps=self.config.student_steps)]

    def generator_batch(self, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Inputs of one generator step, drawn from the global RNG (so resume restores them)."""
        raise ValueError(f"method {self.name!r} has no generator phase")

    def generator_loss(self, batch, *, generator, teacher, student) -> dict[str, torch.Tensor]:
        """The generator's losses; ``"loss"`` is optimized."""
        raise ValueError(f"method {self.name!r} has no generator phase")

    @abstractmethod
    def student_images(self, batch_size: int, device: torch.device, *, teacher, student, generator) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] for one student step."""

    @abstractmethod
    def preview(self, num_images: int, device: torch.device, *, generator, teacher=None, student=None) -> torch.Tensor:
        """Images (n, C, H, W) in [0, 1] for sample grids (inversion methods may synthesize with the networks)."""

    def noise(self, batch_size: int, device: torch.device) -> torch.Tensor:
        return torch.randn(batch_size, self.config.nz, device=device)


def pool_to(pool: ImagePool, device: torch.device) -> None:
    """Move a pool's storage to ``device`` (a run resumed on another device, a preview on the CPU)."""
    if pool.images is not None and pool.images.device != device:
        pool.images = pool.images.to(device)
        if pool.labels is not None:
            pool.labels = pool.labels.to(device)


def sample_pool(pool: ImagePool, num_images: int, device: torch.device) -> torch.Tensor:
    """``num_images`` pool images on ``device`` for a sample grid, drawn without moving the training's random
    stream (runs with another ``sample_every`` must not diverge)."""
    pool_to(pool, device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        images, _ = pool.sample(num_images)
    return images


class PoolSynthesizer(Synthesizer):
    """A method that synthesizes batches in rounds (inside the student phase) into an :class:`ImagePool` the
    student samples from: a round runs at the first student batch and then every ``config.synthesis_every``
    batches (its config has ``synthesis_every``, ``synthesis_batch_size`` and ``pool_size``).

    State: ``pool``, ``calls`` (student batches served, which schedules the rounds), ``last_losses`` (the detached
    loss terms of the latest synthesis step) and the teacher/student of the latest call (so ``preview`` can
    synthesize when the pool is empty). Subclasses implement :meth:`synthesize`.
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
        pool_to(self.pool, device)
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
                raise ValueError(
                    f"{self.name}: nothing synthesized yet; pass teacher= and student= to preview a fresh batch"
                )
            return self.synthesize(num_images, device, teacher=teacher, student=student)
        return sample_pool(self.pool, num_images, device)
