"""The teacher's own fast samplers from diffusers (DDIM, DPM-Solver++), with classifier-free guidance: the
baselines a BOOT student is compared with at equal cost.

Both use "trailing" timestep spacing, so the first step starts at the noisiest timestep ``T - 1`` exactly like the
BOOT grid (with diffusers' default "leading" spacing a 1-step DDIM would start at ``t = 0`` and return noise), and
end at the clean sample (DDIM: ``set_alpha_to_one``; DPM-Solver++: ``final_sigmas_type="zero"``). Predicted samples
are not clipped (``clip_sample=False``), as in the BOOT trajectory. DPM-Solver++ is the multistep second-order
solver (Lu et al. 2022, arXiv 2211.01095) with a first-order final step for few steps (diffusers'
``lower_order_final``); its 1-step sample is the 1-step DDIM sample.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from ..errors import UsageError
from .teacher import DiffusionTeacher

SOLVERS = ("ddim", "dpmsolver++")


def make_scheduler(teacher: DiffusionTeacher, solver: str):
    """A fresh diffusers scheduler of kind ``solver`` on the teacher's noise schedule and prediction type."""
    config = dict(teacher.scheduler.config)
    config["prediction_type"] = teacher.prediction_type
    if solver == "ddim":
        return DDIMScheduler.from_config(
            config, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, thresholding=False
        )
    if solver == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(
            config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            timestep_spacing="trailing",
            final_sigmas_type="zero",
            lower_order_final=True,
            thresholding=False,
        )
    raise UsageError(f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")


def solver_settings(solver: str) -> dict:
    """What :func:`make_scheduler` sets, for reports."""
    common = {"timestep_spacing": "trailing", "clip_sample": False}
    if solver == "ddim":
        return {"scheduler": "DDIMScheduler", "eta": 0.0, "set_alpha_to_one": True, **common}
    return {
        "scheduler": "DPMSolverMultistepScheduler",
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "lower_order_final": True,
        "final_sigmas_type": "zero",
        **common,
    }


@torch.no_grad()
def teacher_sample(
    teacher: DiffusionTeacher,
    noise: torch.Tensor,
    *,
    solver: str,
    num_steps: int,
    class_labels: torch.Tensor | None = None,
    prompts: list[str] | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] from ``noise`` (B, C, H, W) (latents for a latent teacher) with ``num_steps``
    steps of ``solver``; one UNet call per step (batch 2B with guidance). ``class_labels`` (B,) for a
    class-conditional teacher, ``prompts`` (B strings) for a text-to-image one."""
    if num_steps < 1:
        raise UsageError(f"num_steps must be positive, got {num_steps}")
    teacher.check_class_labels(class_labels)
    if teacher.is_class_conditional and class_labels is None:
        raise UsageError("a class-conditional teacher needs class_labels")
    if teacher.is_text_conditional and (prompts is None or len(prompts) != len(noise)):
        raise UsageError(f"a text-to-image teacher needs one prompt per noise ({len(noise)}), got {prompts!r:.200}")
    device = noise.device
    scheduler = make_scheduler(teacher, solver)
    scheduler.set_timesteps(num_steps, device=device)
    if teacher.is_text_conditional:
        cond = teacher.condition(teacher.encode_prompts(list(prompts)))
    else:
        cond = None if class_labels is None else {"class_labels": class_labels.to(device)}
    x = noise.float() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        timesteps = t.expand(x.shape[0]).to(device)
        model_input = scheduler.scale_model_input(x, t)
        u = teacher.guided_native(model_input, timesteps, cond, guidance_scale)
        x = scheduler.step(u, t, x).prev_sample.float()
    return teacher.decode(x)
