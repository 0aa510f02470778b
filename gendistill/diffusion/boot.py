"""BOOT: data-free distillation of a diffusion teacher by bootstrapping (Gu et al., arXiv 2306.05544).

The student ``g(eps, t, c)`` reads pure noise ``eps`` and returns the signal ``y_t = (x_t - sigma_t eps) / alpha_t``
of the teacher's DDIM trajectory from ``eps``. Derivation and objective: spec/BOOT.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..task import Phase
from .schedule import boot_grid, ddim_signal_step, predicted_x0
from .teacher import DiffusionTeacher

PARAMETERIZATIONS = ("teacher", "raw")


@dataclass
class BootConfig:
    num_intervals: int = 50  # K: DDIM intervals of the teacher trajectory the student learns
    guidance_scale: float = 1.0  # teacher classifier-free guidance baked into the student (1 = none)
    parameterization: str = "teacher"  # "teacher": output read as the teacher's prediction type at x_T; "raw": y
    boundary_fraction: float = 0.25  # share of each batch spent on the boundary interval k = 1
    boundary_weight: float = 1.0  # lambda_bound: weight of the boundary loss L_1
    class_ids: tuple[int, ...] | None = None  # classes drawn for a class-conditional teacher (None: all)
    num_eval_noises: int = 16  # fixed noises (and classes) on which the trajectory error is measured
    eval_seed: int = 1234  # seed of that fixed set (independent of the training RNG)

    def validate(self) -> None:
        if self.num_intervals < 1:
            raise ValueError(f"num_intervals (K) must be positive, got {self.num_intervals}")
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"unknown parameterization {self.parameterization!r}; valid: {', '.join(PARAMETERIZATIONS)}"
            )
        if not 0.0 <= self.boundary_fraction < 1.0:
            raise ValueError(f"boundary_fraction must be in [0, 1), got {self.boundary_fraction}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.num_eval_noises < 1:
            raise ValueError(f"num_eval_noises must be positive, got {self.num_eval_noises}")


class BootTask(nn.Module):
    """Frozen teacher + trainable student; ``forward("student", batch)`` returns the BOOT losses."""

    def __init__(self, teacher: DiffusionTeacher, config: BootConfig | None = None):
        super().__init__()
        self.config = config = config or BootConfig()
        config.validate()
        self.teacher = teacher
        if config.guidance_scale != 1.0 and not teacher.is_class_conditional:
            raise ValueError(
                f"guidance_scale {config.guidance_scale} needs a class-conditional teacher; this one is unconditional"
            )
        if config.class_ids is not None:
            if not config.class_ids:
                raise ValueError("class_ids is empty; give at least one class or leave it unset for all classes")
            teacher.check_class_labels(list(config.class_ids))
        self.class_ids = list(config.class_ids) if config.class_ids is not None else teacher.class_ids
        # The student starts as an exact copy of the teacher network (spec/BOOT.md "Student").
        self.student = copy.deepcopy(teacher.unet).requires_grad_(True).train()
        self.grid = boot_grid(teacher.schedule.num_train_timesteps, config.num_intervals)
        # Device copies of the grid and class ids (moved by .to()), so a training step does no host->device copy.
        self.register_buffer("grid_timesteps", torch.tensor(self.grid), persistent=False)
        self.register_buffer("class_id_tensor", torch.tensor(self.class_ids, dtype=torch.long), persistent=False)
        # Zero terminal SNR (alpha_T = 0): y_T drops out (d_1 = 1); decided once, not by a sync every step.
        self._zero_terminal_snr = float(teacher.schedule.alpha[self.grid[0]]) == 0.0
        self._eval_set: dict[str, torch.Tensor] | None = None

    def phases(self) -> list[Phase]:
        return [Phase("student")]

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.train(False)
        return self

    # --- the student ---------------------------------------------------------------------------------------
    def student_signal(
        self, eps: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None, student=None
    ) -> torch.Tensor:
        """``g(eps, t, c)``: the student's estimate of the trajectory signal ``y_t`` (B, C, H, W)."""
        student = self.student if student is None else student
        u = student(eps, timesteps, class_labels=class_labels).sample.float()
        if self.config.parameterization == "raw":
            return u
        # Read u as the teacher's native prediction at x_{t_0} = eps, so y ~ f(eps, t_0) at initialization.
        t0 = torch.full_like(timesteps, self.grid[0])
        alpha, sigma = self.teacher.schedule.coefficients(t0, ndim=eps.ndim)
        return predicted_x0(u, eps.float(), alpha, sigma, self.teacher.prediction_type)

    def start_signal(self, eps: torch.Tensor) -> torch.Tensor:
        """The exact ``y_T = eps (1 - sigma_T) / alpha_T``; zero when ``alpha_T = 0`` (then ``d_1 = 1``)."""
        if self._zero_terminal_snr:
            return torch.zeros_like(eps, dtype=torch.float32)
        t0 = torch.full((eps.shape[0],), self.grid[0], device=eps.device, dtype=torch.long)
        alpha, sigma = self.teacher.schedule.coefficients(t0, ndim=eps.ndim)
        return eps.float() * (1.0 - sigma) / alpha

    def teacher_step(self, y: torch.Tensor, eps: torch.Tensor, k: torch.Tensor, class_labels=None) -> torch.Tensor:
        """The teacher's DDIM step on interval ``k`` (from ``t_{k-1}`` to ``t_k``), in signal space."""
        grid = self.grid_timesteps.to(eps.device)
        t_prev, t_next = grid[k - 1], grid[k]
        alpha, sigma = self.teacher.schedule.coefficients(t_prev, ndim=eps.ndim)
        x = alpha * y + sigma * eps.float()
        f = self.teacher.predict_x0(
            x.to(eps.dtype), t_prev, class_labels=class_labels, guidance_scale=self.config.guidance_scale
        )
        d = self.teacher.schedule.step_fraction(t_prev, t_next, ndim=eps.ndim)
        return ddim_signal_step(y, f, d)

    # --- training ------------------------------------------------------------------------------------------
    def sample_batch(self, phase: str, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Noise, intervals and classes for one batch, drawn from the global RNG (so resume restores them).

        The first ``round(B * boundary_fraction)`` rows use the boundary interval ``k = 1``; the rest draw ``k``
        uniformly in ``1..K``.
        """
        c, h, w = self.teacher.sample_shape
        eps = torch.randn(batch_size, c, h, w, device=device)
        k = torch.randint(1, self.config.num_intervals + 1, (batch_size,), device=device)
        num_boundary = round(batch_size * self.config.boundary_fraction)
        k[:num_boundary] = 1
        boundary = torch.zeros(batch_size, dtype=torch.bool, device=device)
        boundary[:num_boundary] = True
        batch = {"eps": eps, "k": k, "boundary": boundary}
        if self.class_ids:
            ids = self.class_id_tensor.to(device)
            batch["class_labels"] = ids[torch.randint(len(ids), (batch_size,), device=device)]
        return batch

    def forward(self, phase: str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        eps, k, boundary = batch["eps"], batch["k"], batch["boundary"]
        labels = batch.get("class_labels")
        grid = self.grid_timesteps.to(eps.device)
        with torch.no_grad():
            # y_prev: exact start y_T for k = 1, else the student's own (stop-grad) estimate at t_{k-1}.
            y_start = self.start_signal(eps)
            y_boot = self.student_signal(eps, grid[k - 1], labels)
            y_prev = torch.where((k == 1).view(-1, 1, 1, 1), y_start, y_boot)
            target = self.teacher_step(y_prev, eps, k, labels)
            d = self.teacher.schedule.step_fraction(grid[k - 1], grid[k], ndim=eps.ndim)
        y = self.student_signal(eps, grid[k], labels)
        # L_k = ||g(eps, t_k) - target||^2 / d_k^2, mean over elements (per sample first).
        per_sample = ((y - target) ** 2 / d**2).flatten(1).mean(1)
        regular, bound = per_sample[~boundary], per_sample[boundary]
        loss_regular = regular.mean() if regular.numel() else per_sample.new_zeros(())
        loss_boundary = bound.mean() if bound.numel() else per_sample.new_zeros(())
        loss = loss_regular + self.config.boundary_weight * loss_boundary
        return {"loss": loss, "loss_bootstrap": loss_regular.detach(), "loss_boundary": loss_boundary.detach()}

    # --- quality signals -----------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_trajectory(self, eps: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's K-step DDIM output ``y_{t_K}`` (B, C, H, W) from noise ``eps``."""
        y = self.start_signal(eps)
        for k in range(1, self.config.num_intervals + 1):
            ks = torch.full((eps.shape[0],), k, device=eps.device, dtype=torch.long)
            y = self.teacher_step(y, eps, ks, class_labels)
        return y

    def eval_set(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Fixed noises/classes and the teacher's K-step outputs on them (computed once, then cached)."""
        if self._eval_set is None or self._eval_set["eps"].device != torch.device(device):
            gen = torch.Generator().manual_seed(self.config.eval_seed)
            n = self.config.num_eval_noises
            eps = torch.randn(n, *self.teacher.sample_shape, generator=gen).to(device)
            labels = None
            if self.class_ids:
                ids = torch.tensor(self.class_ids)
                labels = ids[torch.randint(len(ids), (n,), generator=gen)].to(device)
            self._eval_set = {"eps": eps, "class_labels": labels, "target": self.teacher_trajectory(eps, labels)}
        return self._eval_set

    @torch.no_grad()
    def one_step(self, eps: torch.Tensor, class_labels=None, student=None) -> torch.Tensor:
        """The student's one-step sample ``g(eps, t_K, c)`` (B, C, H, W)."""
        t = torch.full((eps.shape[0],), self.grid[-1], device=eps.device, dtype=torch.long)
        return self.student_signal(eps, t, class_labels, student=student)

    @torch.no_grad()
    def evaluate(self, student=None) -> dict[str, float]:
        """Trajectory error: MSE between the one-step sample and the teacher's K-step DDIM output."""
        device = next(self.teacher.parameters()).device
        data = self.eval_set(device)
        pred = self.one_step(data["eps"], data["class_labels"], student=student)
        return {"trajectory_error": F.mse_loss(pred, data["target"]).item()}

    @torch.no_grad()
    def sample_images(self, student=None) -> torch.Tensor:
        """Teacher K-step (top row) and student one-step (bottom row) samples from the fixed noises, in [0, 1]."""
        device = next(self.teacher.parameters()).device
        data = self.eval_set(device)
        pred = self.one_step(data["eps"], data["class_labels"], student=student)
        return (torch.cat([data["target"], pred]) / 2 + 0.5).clamp(0, 1)
