"""What the training core needs to know about a task (an ``nn.Module`` holding a frozen teacher and trainable parts).

A task exposes ``phases()`` (each names the attribute holding one trainable module), ``sample_batch(phase,
batch_size, device)`` (inputs drawn from the global RNG, so checkpoint/resume restores them) and
``forward(phase, batch) -> dict`` of losses whose ``"loss"`` entry is optimized. Optional: ``evaluate(**modules)``
returning metrics, ``sample_images(**modules)`` returning images in [0, 1] for sample grids, and
``extra_state() -> dict`` / ``load_extra_state(dict)`` for state outside the modules that a resumed run needs (nested
dicts and lists of tensors and JSON scalars; checkpointed as ``task_state.safetensors`` + JSON).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Phase:
    """One trainable part of a task and its optimizer schedule."""

    name: str  # the attribute of the task that holds the trainable module
    steps: int = 1  # optimizer steps of this phase per training iteration
    lr: float | None = None  # learning-rate override for this phase (None: the recipe's lr)
    start: int = 0  # the first training iteration (0-based) that runs this phase: the ones before skip it, which
    # warms the other phases up (DFKD: the generator learns alone while its images are still noise)
