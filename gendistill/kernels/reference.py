"""The plain-torch references of the fused kernels (the CPU path, and what every kernel is tested against)."""

from __future__ import annotations

import torch

from ..pipelines.boot_math import PREDICTION_TYPES, guide, signal_step, to_x0


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance (C,) in float32 of ``x`` (N, C, *) over every dimension but the channel one."""
    x = x.float()
    dims = [0, *range(2, x.dim())]
    return x.mean(dim=dims), x.var(dim=dims, correction=0)


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
) -> torch.Tensor:
    """Per-sample BOOT loss (B,) float32: ``mean((student - target)^2) / d^2`` over each sample's elements, where

    ``u = u_uncond + w (u_cond - u_uncond)`` (``u = u_cond`` when ``u_uncond`` is None), ``f = x0(u, x, alpha,
    sigma)`` for the prediction type, and ``target = y_prev + d (f - y_prev)`` (the teacher's DDIM step in signal
    space, no gradient). Tensors are (B, C, H, W); ``guidance``, ``alpha``, ``sigma``, ``d`` are (B,).
    Only ``student`` receives a gradient.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
    shape = (-1,) + (1,) * (student.dim() - 1)
    w, a, s, dd = (t.float().view(shape) for t in (guidance, alpha, sigma, d))
    with torch.no_grad():
        u = guide(u_cond.float(), None if u_uncond is None else u_uncond.float(), w)
        target = signal_step(y_prev.float(), to_x0(u, x.float(), a, s, prediction_type), dd)
    return ((student.float() - target) ** 2 / dd**2).flatten(1).mean(1)
