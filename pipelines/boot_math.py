# Copyright 2025 The gendistill authors. Licensed under the Apache License, Version 2.0.
"""BOOT's diffusion math and a latent teacher's text and VAE steps, written once (derivation: gendistill's
docs/boot.md).

gendistill's training (``gendistill.diffusion``, the fused kernels' reference) and the BOOT pipelines both call
these functions. Like ``pipeline_boot.py`` this file imports only torch and diffusers: ``save_pretrained`` copies
it next to ``pipeline_boot.py``, which imports it relatively, so a saved folder stays self-contained.

Notation: ``alpha_t = sqrt(alphas_cumprod[t])``, ``sigma_t = sqrt(1 - alphas_cumprod[t])``,
``x_t = alpha_t * x0 + sigma_t * eps``; the signal of the trajectory from the noise ``eps`` is
``y_t = (x_t - sigma_t * eps) / alpha_t``. The formulas are elementwise and keep the dtype of their inputs; the
last two functions run a latent teacher's text encoder and VAE as Stable Diffusion's pipeline does.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import get_timestep_embedding

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def to_x0(
    model_output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The clean-sample prediction ``f`` from a network's native output ``u`` at ``x`` and ``(alpha, sigma)``
    (scalars or tensors broadcastable to ``x``): ``(x - sigma u) / alpha`` (epsilon), ``alpha x - sigma u``
    (v_prediction) or ``u`` (sample)."""
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")


def guide(u_cond: torch.Tensor, u_uncond: torch.Tensor | None, scale) -> torch.Tensor:
    """Classifier-free guidance on native outputs: ``u_uncond + w (u_cond - u_uncond)``; ``u_cond`` when there is no
    unconditional output. ``scale``: a number or a tensor broadcastable to the outputs."""
    if u_uncond is None:
        return u_cond
    return u_uncond + scale * (u_cond - u_uncond)


def unet_pair(unet, x: torch.Tensor, timesteps: torch.Tensor, cond: dict, null: dict | None):
    """``(u_cond, u_null)`` in the UNet's dtype from one batched call of size 2B (``x`` and ``cond`` stacked with
    ``null``, the "no condition" keyword arguments); ``(u, None)`` from one call of size B when ``null`` is None.
    Floating-point condition tensors are cast to the UNet's dtype."""
    dtype = unet.dtype
    if null is not None:
        cond = {key: torch.cat([value, null[key]]) for key, value in cond.items()}
        x, timesteps = torch.cat([x, x]), torch.cat([timesteps, timesteps])
    kwargs = {key: value.to(dtype) if value.is_floating_point() else value for key, value in cond.items()}
    u = unet(x.to(dtype), timesteps, **kwargs).sample
    return (u, None) if null is None else tuple(u.chunk(2))


def guided_output(unet, x: torch.Tensor, timesteps: torch.Tensor, cond: dict, null: dict | None, scale):
    """The guided native output ``u_null + w (u_cond - u_null)`` in float32 from one batched call (``unet_pair``);
    the plain output when ``null`` is None. ``scale``: a number or a (B,) tensor."""
    u_cond, u_null = unet_pair(unet, x, timesteps, cond, null)
    if u_null is None:
        return u_cond.float()
    if torch.is_tensor(scale):
        scale = scale.float().view(-1, *([1] * (x.ndim - 1)))
    return guide(u_cond.float(), u_null.float(), scale)


def step_fraction(alpha_t, sigma_t, alpha_s, sigma_s):
    """``d = 1 - exp(lambda_t - lambda_s)`` of a DDIM step from ``t`` to the less noisy ``s``, written as
    ``1 - alpha_t sigma_s / (sigma_t alpha_s)``: exact at the ends (zero terminal SNR, ``alpha_t = 0``, and
    ``sigma_s = 0`` both give ``d = 1``). Compute it in float64."""
    return 1.0 - (alpha_t * sigma_s) / (sigma_t * alpha_s)


def signal_step(y: torch.Tensor, f: torch.Tensor, d) -> torch.Tensor:
    """One exact DDIM (eta = 0) step in signal space: ``y_s = y_t + d (f - y_t)``, with ``f`` the teacher's clean
    prediction at ``x_t = alpha_t y_t + sigma_t eps``."""
    return y + d * (f - y)


def start_signal(eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The exact signal at the start of the trajectory (``x_T = eps``): ``eps (1 - sigma_T) / alpha_T``. With zero
    terminal SNR (``alpha_T = 0``) it is undefined and unused (``d_1 = 1``): callers use zeros."""
    return eps * (1.0 - sigma) / alpha


def guidance_embedding(guidance_scale: torch.Tensor, dim: int) -> torch.Tensor:
    """A guidance-range student's ``timestep_cond`` input (diffusers' ``time_cond_proj_dim``): the sinusoidal
    embedding (B, dim) of ``1000 w`` for the guidance scales ``w`` (B,), as latent consistency models use."""
    return get_timestep_embedding(guidance_scale.float() * 1000.0, dim, flip_sin_to_cos=False, downscale_freq_shift=1)


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Text-encoder hidden states (B, L, D) of ``prompts``, padded and truncated to the tokenizer's
    ``model_max_length`` (as ``StableDiffusionPipeline`` does, without ``clip_skip``)."""
    tokens = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return text_encoder(tokens.input_ids.to(device))[0]


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1], float32, from latents (B, C, h, w) through the VAE (its scaling and, where
    it has one, shift factor)."""
    latents = latents / vae.config.scaling_factor
    shift_factor = vae.config.get("shift_factor")
    if shift_factor is not None:
        latents = latents + shift_factor
    return vae.decode(latents.to(vae.dtype)).sample.float()
