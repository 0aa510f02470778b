"""What the training core needs to know about a task (an ``nn.Module`` holding a frozen teacher and trainable parts).

A task exposes ``phases()`` (each names the attribute holding one trainable module), ``sample_batch(phase,
batch_size, device)`` (inputs drawn from the global RNG, so checkpoint/resume restores them) and
``forward(phase, batch) -> dict`` of losses whose ``"loss"`` entry is optimized. Optional: ``evaluate(**modules)``
returning metrics, ``sample_images(**modules)`` returning images in [0, 1] for sample grids, and
``extra_state() -> dict`` / ``load_extra_state(dict)`` for state outside the modules that a resumed run needs (nested
dicts and lists of tensors and JSON scalars; checkpointed as ``task_state.safetensors`` + JSON), and ``example_unit``
(default ``"images"``): what one example of a batch is, for the throughput the progress bar and the logs show
(``images_per_s``, ``texts_per_s``, ...).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from torch import nn

from gendistill.errors import UsageError


@contextlib.contextmanager
def weights_frozen(module: nn.Module):
    """``module`` (unwrapped from DDP, whose gradient hooks must not wait for weights that get no gradient) with
    ``requires_grad`` off on its trainable parameters inside the block, restored after; autograd still differentiates
    through its input. For a phase whose loss runs through another phase's module: that module's weight gradients
    would be thrown away (each phase starts from zeroed gradients), so they are not computed."""
    inner = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
    params = [p for p in inner.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield inner
    finally:
        for p in params:
            p.requires_grad_(True)


@dataclass
class Phase:
    """One trainable part of a task and its optimizer schedule."""

    name: str  # the attribute of the task that holds the trainable module
    steps: int = 1  # optimizer steps of this phase per training iteration
    lr: float | None = None  # learning-rate override for this phase (None: the recipe's lr)
    start: int = 0  # the first training iteration (0-based) that runs this phase: the ones before skip it, which
    # warms the other phases up (DFKD: the generator learns alone while its images are still noise)
    stop: int | None = None  # the first training iteration that no longer runs this phase (None: it runs to the end);
    # a stage that must finish before the next starts (a text-to-image teacher: the autoencoder, then the denoiser)
    ema: bool = True  # keep an EMA of this phase's weights when the recipe asks for one (export and sample grids use
    # it); False: the live weights are final (an autoencoder whose latents a later phase was trained on)
    adam_beta1: float | None = None  # this phase's Adam beta1 (None: the recipe's adam_beta1); a GAN-style
    # generator's reference is often 0.5

    def __post_init__(self):
        if self.start < 0:
            raise UsageError(f"phase {self.name!r}: start must be >= 0, got {self.start}")
        if self.adam_beta1 is not None and not 0.0 <= self.adam_beta1 < 1.0:
            raise UsageError(f"phase {self.name!r}: adam_beta1 must be in [0, 1), got {self.adam_beta1}")
        if self.stop is not None and self.stop <= self.start:
            raise UsageError(f"phase {self.name!r}: stop ({self.stop}) must be after start ({self.start})")

    def runs_at(self, step: int) -> bool:
        """Whether training iteration ``step`` (0-based) runs this phase."""
        return step >= self.start and (self.stop is None or step < self.stop)

    def num_steps(self, max_steps: int) -> int:
        """The iterations of ``0..max_steps-1`` that run this phase (its learning-rate schedule's length)."""
        end = max_steps if self.stop is None else min(self.stop, max_steps)
        return max(0, end - self.start)
