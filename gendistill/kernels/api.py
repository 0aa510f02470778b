"""Backend selection for the fused kernels (see the package docstring)."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..errors import UsageError
from . import reference

BACKENDS = ("triton", "torch")


def backend_for(fused: bool) -> str | None:
    """The ``backend`` argument for a recipe's ``fused_kernels`` flag: None (automatic: Triton for CUDA tensors when
    it is installed) when fused kernels are wanted, ``"torch"`` (the reference everywhere) when they are not."""
    return None if fused else "torch"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _resolve(backend: str | None, tensor: torch.Tensor) -> str:
    if backend is None:
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if backend not in BACKENDS:
        raise UsageError(f"unknown kernel backend {backend!r}; valid: {', '.join(BACKENDS)} (or None: automatic)")
    if backend == "triton":
        if not triton_available():
            raise UsageError("backend 'triton' needs the triton package (pip install triton)")
        if not tensor.is_cuda and not _interpreting():
            raise UsageError(
                f"backend 'triton' needs CUDA tensors, got a {tensor.device.type} tensor "
                "(set TRITON_INTERPRET=1 before importing gendistill to run Triton's interpreter on the CPU)"
            )
    return backend


def channel_stats(x: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance (C,) float32 of ``x`` (N, C, *) over all dimensions but the channel one; one pass
    with float32 accumulation on the Triton backend. Differentiable with respect to ``x``."""
    if x.dim() < 2 or x.shape[0] == 0:
        raise UsageError(f"channel_stats expects (N, C, ...) with N > 0, got shape {tuple(x.shape)}")
    if _resolve(backend, x) == "torch":
        return reference.channel_stats(x)
    from .triton_kernels import ChannelStats

    return ChannelStats.apply(x)


def boot_guided_loss(
    student: torch.Tensor,
    y_prev: torch.Tensor,
    x: torch.Tensor,
    u_cond: torch.Tensor,
    u_uncond: torch.Tensor | None,
    guidance: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    d: torch.Tensor,
    prediction_type: str,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """BOOT's per-sample loss (B,) float32 with the guided bootstrap target (``reference.boot_guided_loss``)."""
    shape = student.shape
    for name, t in (("y_prev", y_prev), ("x", x), ("u_cond", u_cond), ("u_uncond", u_uncond)):
        if t is not None and t.shape != shape:
            raise UsageError(f"{name} has shape {tuple(t.shape)} but the student's signal {tuple(shape)}")
    for name, t in (("guidance", guidance), ("alpha", alpha), ("sigma", sigma), ("d", d)):
        if t.numel() != shape[0]:
            raise UsageError(f"{name} must hold one value per sample ({shape[0]}), got shape {tuple(t.shape)}")
    args = (student, y_prev, x, u_cond, u_uncond, guidance, alpha, sigma, d, prediction_type)
    if _resolve(backend, student) == "torch":
        return reference.boot_guided_loss(*args)
    from .triton_kernels import BootGuidedLoss

    return BootGuidedLoss.apply(*args)
