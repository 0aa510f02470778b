"""Triton kernels (imported only when Triton is installed). Set ``TRITON_INTERPRET=1`` before importing this module to
run them on CPU tensors through Triton's interpreter (how the CI tests them without a GPU)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import PREDICTION_TYPES

STATS_BLOCK = 1024
LOSS_BLOCK = 1024


# --- per-channel statistics -------------------------------------------------------------------------------------
@triton.jit
def _channel_sums_kernel(x_ptr, sums_ptr, shift_ptr, total, C, L, BLOCK: tl.constexpr):
    """One program per channel c of x (N, C, L), contiguous: sums of (x - shift) and (x - shift)^2 over (N, L) in
    float32, shifted by the channel's first element against cancellation."""
    c = tl.program_id(0)
    shift = tl.load(x_ptr + c * L).to(tl.float32)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, total, BLOCK):
        i = start + tl.arange(0, BLOCK)  # flat index over (N, L)
        mask = i < total
        n = i // L
        offset = n * C * L + c * L + (i - n * L)
        v = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        v = tl.where(mask, v - shift, 0.0)
        acc1 += v
        acc2 += v * v
    tl.store(sums_ptr + 2 * c, tl.sum(acc1, axis=0))
    tl.store(sums_ptr + 2 * c + 1, tl.sum(acc2, axis=0))
    tl.store(shift_ptr + c, shift)


@triton.jit
def _channel_stats_backward_kernel(
    x_ptr, mean_ptr, g_mean_ptr, g_var_ptr, grad_ptr, numel, C, L, inv_m, BLOCK: tl.constexpr
):
    """grad_x = g_mean[c] / M + g_var[c] * 2 (x - mean[c]) / M, elementwise over x (N, C, L)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    c = (i // L) % C
    x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=mask, other=0.0)
    g_mean = tl.load(g_mean_ptr + c, mask=mask, other=0.0)
    g_var = tl.load(g_var_ptr + c, mask=mask, other=0.0)
    grad = (g_mean + 2.0 * g_var * (x - mean)) * inv_m
    tl.store(grad_ptr + i, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _as_ncl(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(x.shape[0], x.shape[1], -1)


class ChannelStats(torch.autograd.Function):
    """(mean, biased var) (C,) float32 of x (N, C, *); differentiable with respect to x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        x3 = _as_ncl(x)
        n, c, length = x3.shape
        total = n * length
        sums = torch.empty(c, 2, device=x.device, dtype=torch.float32)
        shift = torch.empty(c, device=x.device, dtype=torch.float32)
        _channel_sums_kernel[(c,)](x3, sums, shift, total, c, length, BLOCK=STATS_BLOCK)
        s1, s2 = sums[:, 0] / total, sums[:, 1] / total
        mean = shift + s1
        var = (s2 - s1 * s1).clamp_min(0.0)
        ctx.save_for_backward(x3, mean)
        ctx.input_shape = x.shape
        return mean, var

    @staticmethod
    def backward(ctx, g_mean, g_var):
        x3, mean = ctx.saved_tensors
        n, c, length = x3.shape
        zeros = None
        if g_mean is None or g_var is None:
            zeros = torch.zeros(c, device=x3.device, dtype=torch.float32)
        g_mean = zeros if g_mean is None else g_mean.float().contiguous()
        g_var = zeros if g_var is None else g_var.float().contiguous()
        grad = torch.empty_like(x3)
        numel = x3.numel()
        grid = (triton.cdiv(numel, STATS_BLOCK),)
        _channel_stats_backward_kernel[grid](
            x3, mean, g_mean, g_var, grad, numel, c, length, 1.0 / (n * length), BLOCK=STATS_BLOCK
        )
        return grad.view(ctx.input_shape)


# --- BOOT guided bootstrap loss -----------------------------------------------------------------------------------
@triton.jit
def _boot_loss_kernel(
    student_ptr,
    y_prev_ptr,
    x_ptr,
    u_cond_ptr,
    u_uncond_ptr,
    coef_ptr,  # (B, 4) float32: guidance, alpha, sigma, d
    diff_ptr,  # out (B, P) float32: (student - target) / d^2 * 2 / P, the gradient of the per-sample loss
    loss_ptr,  # out (B,) float32, accumulated with atomics
    P,
    HAS_UNCOND: tl.constexpr,
    PRED: tl.constexpr,  # 0 epsilon, 1 v_prediction, 2 sample
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < P
    offset = b * P + j
    w = tl.load(coef_ptr + 4 * b)
    a = tl.load(coef_ptr + 4 * b + 1)
    s = tl.load(coef_ptr + 4 * b + 2)
    d = tl.load(coef_ptr + 4 * b + 3)
    u = tl.load(u_cond_ptr + offset, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        uu = tl.load(u_uncond_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        u = uu + w * (u - uu)
    x = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
    if PRED == 0:
        f = (x - s * u) / a
    elif PRED == 1:
        f = a * x - s * u
    else:
        f = u
    y = tl.load(y_prev_ptr + offset, mask=mask, other=0.0).to(tl.float32)
    target = y + d * (f - y)
    g = tl.load(student_ptr + offset, mask=mask, other=0.0).to(tl.float32)
    diff = tl.where(mask, g - target, 0.0)
    scale = 1.0 / (d * d * P)
    tl.store(diff_ptr + offset, 2.0 * diff * scale, mask=mask)
    tl.atomic_add(loss_ptr + b, tl.sum(diff * diff, axis=0) * scale)


class BootGuidedLoss(torch.autograd.Function):
    """Per-sample BOOT loss (B,) float32 (see ``reference.boot_guided_loss``); gradient only to ``student``."""

    @staticmethod
    def forward(ctx, student, y_prev, x, u_cond, u_uncond, guidance, alpha, sigma, d, prediction_type):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
        batch = student.shape[0]
        P = student[0].numel()
        tensors = [t.contiguous() for t in (student, y_prev, x, u_cond)]
        uncond = u_uncond.contiguous() if u_uncond is not None else tensors[3]
        coef = torch.stack([t.float().reshape(batch) for t in (guidance, alpha, sigma, d)], dim=1).contiguous()
        diff = torch.empty(batch, P, device=student.device, dtype=torch.float32)
        loss = torch.zeros(batch, device=student.device, dtype=torch.float32)
        grid = (batch, triton.cdiv(P, LOSS_BLOCK))
        _boot_loss_kernel[grid](
            *tensors,
            uncond,
            coef,
            diff,
            loss,
            P,
            HAS_UNCOND=u_uncond is not None,
            PRED=PREDICTION_TYPES.index(prediction_type),
            BLOCK=LOSS_BLOCK,
        )
        ctx.save_for_backward(diff)
        ctx.student_shape, ctx.student_dtype = student.shape, student.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (diff,) = ctx.saved_tensors
        grad = (diff * grad_loss.float()[:, None]).view(ctx.student_shape).to(ctx.student_dtype)
        return grad, None, None, None, None, None, None, None, None, None
