"""Fused kernels, each with the plain-torch reference it is tested against.

- :func:`channel_stats`: per-channel mean and biased variance of a BatchNorm input in one pass (the BN-statistics
  loss of DFQ, DeepInversion, CMI, Fast, NAYER, CAE-DFKD), float32 accumulation from any float input.
- :func:`boot_guided_loss`: BOOT's guided bootstrap target (guidance combine, clean-sample conversion, DDIM signal
  step) and the per-sample weighted squared error against the student's signal, in one elementwise pass in float32
  from bf16/fp32 inputs.

Backends: ``"triton"`` (CUDA tensors; on CPU only under Triton's interpreter, ``TRITON_INTERPRET=1`` set before
this package is imported) and ``"torch"`` (the reference). ``None`` picks Triton for CUDA tensors when Triton is
installed and fused kernels are enabled (:func:`set_fused`, the recipes' ``fused_kernels`` flag), else torch.
"""

from __future__ import annotations

from .api import BACKENDS, boot_guided_loss, channel_stats, fused_enabled, set_fused, triton_available

__all__ = ["BACKENDS", "boot_guided_loss", "channel_stats", "fused_enabled", "set_fused", "triton_available"]
