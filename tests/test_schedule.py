"""Golden tests: the signal-space DDIM step against diffusers' DDIMScheduler.step(eta=0)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from gendistill.diffusion.schedule import NoiseSchedule, boot_grid, check_prediction_type
from gendistill.pipelines.boot_math import signal_step, to_x0


@pytest.mark.parametrize(
    ("prediction_type", "zero_snr"),
    # An epsilon network cannot give x0 at zero terminal SNR (alpha_T = 0), so that pair is not a valid teacher.
    [("epsilon", False), ("v_prediction", False), ("sample", False), ("v_prediction", True), ("sample", True)],
)
def test_signal_step_equals_diffusers_ddim(prediction_type, zero_snr):
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear" if zero_snr else "linear",
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,  # the final step then lands on alphas_cumprod[0], an integer timestep
        rescale_betas_zero_snr=zero_snr,
        timestep_spacing="trailing" if zero_snr else "leading",
    )
    scheduler.set_timesteps(10)
    schedule = NoiseSchedule(scheduler.alphas_cumprod)
    gen = torch.Generator().manual_seed(0)
    timesteps = list(scheduler.timesteps)
    for i, t in enumerate(timesteps):
        s = int(timesteps[i + 1]) if i + 1 < len(timesteps) else 0
        x_t = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
        u = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
        eps = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
        expected = scheduler.step(u, int(t), x_t, eta=0.0).prev_sample

        tt, ss = torch.tensor([int(t)]), torch.tensor([s])
        alpha_t, sigma_t = schedule.coefficients(tt, dtype=torch.float64)
        alpha_s, sigma_s = schedule.coefficients(ss, dtype=torch.float64)
        f = to_x0(u, x_t, alpha_t, sigma_t, prediction_type)
        d = schedule.step_fraction(tt, ss, dtype=torch.float64)
        if float(alpha_t) == 0.0:
            # Zero terminal SNR: the trajectory starts at x_T = eps exactly, y_T drops out because d = 1.
            assert float(d) == 1.0
            eps = x_t
            y_t = torch.zeros_like(x_t)
        else:
            y_t = (x_t - sigma_t * eps) / alpha_t
        y_s = signal_step(y_t, f, d)
        got = alpha_s * y_s + sigma_s * eps
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_step_fraction_matches_log_snr_formula():
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    schedule = NoiseSchedule(scheduler.alphas_cumprod)
    ac = scheduler.alphas_cumprod.double()
    lam = 0.5 * torch.log(ac / (1 - ac))  # half log-SNR, computed independently
    t, s = torch.tensor([900, 500, 20]), torch.tensor([850, 100, 0])
    expected = 1 - torch.exp(lam[t] - lam[s])
    got = schedule.step_fraction(t, s, ndim=1, dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    assert bool(((got > 0) & (got < 1)).all())


def test_boot_grid():
    assert boot_grid(1000, 4) == [999, 749, 500, 250, 0]
    grid = boot_grid(1000, 50)
    assert len(grid) == 51 and grid[0] == 999 and grid[-1] == 0 and len(set(grid)) == 51
    assert all(a > b for a, b in zip(grid, grid[1:]))
    with pytest.raises(ValueError, match="K must be positive"):
        boot_grid(1000, 0)
    with pytest.raises(ValueError, match="K=1000"):
        boot_grid(1000, 1000)


def test_unknown_prediction_type():
    with pytest.raises(ValueError, match="'flow'.*epsilon, v_prediction, sample"):
        check_prediction_type("flow")
