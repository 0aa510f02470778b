"""The teacher's noise schedule by timestep, the BOOT grid and the prediction-type check.

Notation follows docs/boot.md: ``alpha_t = sqrt(alphas_cumprod[t])``, ``sigma_t = sqrt(1 - alphas_cumprod[t])``,
half log-SNR ``lambda_t = log(alpha_t / sigma_t)`` and ``x_t = alpha_t * x0 + sigma_t * eps``. The formulas
themselves (clean prediction, guidance, DDIM step fraction, signal step) live once in ``gendistill.pipelines.
boot_math``, which the saved students' pipelines carry: the one module of ``gendistill.pipelines`` the library
imports (it imports only torch and diffusers).
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from ..pipelines.boot_math import PREDICTION_TYPES, step_fraction


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise UsageError(f"unsupported prediction type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
    return prediction_type


def boot_grid(num_train_timesteps: int, num_intervals: int) -> list[int]:
    """The BOOT grid ``T = t_0 > t_1 > ... > t_K = 0``: ``K + 1`` distinct teacher timesteps, evenly spaced.

    ``t_0 = num_train_timesteps - 1`` is the noisiest timestep, where the trajectory starts at ``x_T = eps``
    (the "trailing" spacing of diffusers' schedulers); ``t_K = 0`` is where the one-step sample is read.
    """
    if num_intervals < 1:
        raise UsageError(f"the number of intervals K must be positive, got {num_intervals}")
    if num_intervals > num_train_timesteps - 1:
        raise UsageError(
            f"K={num_intervals} intervals need {num_intervals + 1} distinct timesteps but the teacher has only "
            f"{num_train_timesteps}; use K <= {num_train_timesteps - 1}"
        )
    grid = torch.linspace(num_train_timesteps - 1, 0, num_intervals + 1).round().long()
    return [int(t) for t in grid]


class NoiseSchedule:
    """``alpha_t``, ``sigma_t`` and ``lambda_t`` by integer timestep, from a scheduler's ``alphas_cumprod``."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = alphas_cumprod.detach().to(torch.float64).clamp(0.0, 1.0)
        self.alphas_cumprod = ac
        self.alpha = ac.sqrt()
        self.sigma = (1.0 - ac).sqrt()
        self._device_tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) tables (float64 where supported) on ``device``, cached: lookups never sync with the host."""
        key = str(device)
        if key not in self._device_tables:
            dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64  # MPS has no float64
            self._device_tables[key] = (self.alpha.to(device, dtype), self.sigma.to(device, dtype))
        return self._device_tables[key]

    def coefficients(self, timesteps: torch.Tensor, *, ndim: int = 4, dtype=torch.float32):
        """``(alpha, sigma)`` for ``timesteps`` (B,), shaped (B, 1, ..., 1) with ``ndim`` dims."""
        alpha, sigma = self._tables(timesteps.device)
        idx = timesteps.detach().long()
        shape = (-1,) + (1,) * (ndim - 1)
        return alpha[idx].to(dtype).view(shape), sigma[idx].to(dtype).view(shape)

    def step_fraction(self, t: torch.Tensor, s: torch.Tensor, *, ndim: int = 4, dtype=torch.float32) -> torch.Tensor:
        """``d = 1 - exp(lambda_t - lambda_s)`` for a DDIM step from ``t`` to the less noisy ``s``.

        Computed as ``1 - (alpha_t sigma_s) / (sigma_t alpha_s)`` in float64, which is exact at the ends:
        ``alpha_t = 0`` (zero terminal SNR) gives ``d = 1`` and ``sigma_s = 0`` gives ``d = 1``.
        """
        alpha, sigma = self._tables(t.device)
        t_idx, s_idx = t.detach().long(), s.detach().long().to(t.device)
        d = step_fraction(alpha[t_idx], sigma[t_idx], alpha[s_idx], sigma[s_idx])
        return d.to(dtype).view((-1,) + (1,) * (ndim - 1))
