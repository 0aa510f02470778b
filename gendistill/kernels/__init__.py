"""Fused kernels, each with the plain-torch reference it is tested against.

- :func:`channel_stats`: per-channel mean and biased variance of a BatchNorm input in one pass (the BN-statistics
  loss of DFQ, DeepInversion, CMI, Fast, NAYER, CAE-DFKD), float32 accumulation from any float input.
- :func:`boot_guided_loss`: BOOT's guided bootstrap target (guidance combine, clean-sample conversion, DDIM signal
  step) and the per-sample weighted squared error against the student's signal, in one elementwise pass in float32
  from bf16/fp32 inputs.

Backends: ``"triton"`` (CUDA tensors; on CPU only under Triton's interpreter, ``TRITON_INTERPRET=1`` set before
this package is imported) and ``"torch"`` (the reference). ``None`` picks Triton for CUDA tensors when Triton is
installed, else torch. Callers pass the backend explicitly (the recipes' ``fused_kernels`` flag becomes
:func:`backend_for`'s value, handed to the task that calls the kernels): there is no process-wide switch, so two
runs in one process each get what their recipe says.
"""

from __future__ import annotations

from .api import BACKENDS, backend_for, boot_guided_loss, channel_stats, triton_available

__all__ = ["BACKENDS", "backend_for", "boot_guided_loss", "channel_stats", "triton_available"]
