"""BOOT: data-free distillation of a diffusion teacher by bootstrapping (Gu et al., arXiv 2306.05544).

The student ``g(eps, t, c)`` reads pure noise ``eps`` and returns the signal ``y_t = (x_t - sigma_t eps) / alpha_t``
of the teacher's DDIM trajectory from ``eps``. Derivation and objective: docs/boot.md.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.prompts import PromptEmbeddings
from ..errors import UsageError
from ..kernels import boot_guided_loss
from ..pipelines.boot_math import guidance_embedding, signal_step, start_signal, to_x0
from ..task import Phase
from .schedule import boot_grid
from .teacher import DiffusionTeacher

PARAMETERIZATIONS = ("teacher", "raw")
# "auto": "raw" for an epsilon teacher, "teacher" otherwise (see ``resolve_parameterization``).
PARAMETERIZATION_CHOICES = ("auto", *PARAMETERIZATIONS)
# Layers of a diffusers UNet that a LoRA student adapts (attention, feed-forward, resnet convs, time projections).
LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "time_emb_proj",
)
CONDITION_KEYS = ("class_labels", "encoder_hidden_states")  # batch entries that are UNet condition kwargs


def resolve_parameterization(prediction_type: str) -> str:
    """What ``parameterization="auto"`` means for a teacher: ``"raw"`` (the student's output is the signal) for an
    epsilon teacher, whose prediction read at ``x_T`` gives ``y = (x_T - sigma_T u) / alpha_T``: with Stable
    Diffusion's schedule ``alpha_T`` is 0.068, so every error of ``u`` is amplified 15 times (and ``alpha_T = 0`` is
    undefined); ``"teacher"`` (a start that nearly meets the boundary condition) for v- and sample-prediction
    teachers."""
    return "raw" if prediction_type == "epsilon" else "teacher"


@dataclass
class BootConfig:
    num_intervals: int = 50  # K: DDIM intervals of the teacher trajectory the student learns
    guidance_scale: float = 1.0  # teacher CFG scale baked into the student (1 = none); the default within a range
    guidance_range: tuple[float, float] | None = None  # [w_min, w_max]: one student for every scale (text teachers)
    guidance_embedding_dim: int = 256  # size of the student's guidance embedding (time_cond_proj_dim)
    parameterization: str = "auto"  # "teacher": output read as the teacher's prediction type at x_T; "raw": y;
    # "auto": "raw" for an epsilon teacher (reading eps at x_T divides by alpha_T), "teacher" otherwise
    boundary_fraction: float = 0.25  # share of each batch spent on the boundary interval k = 1
    boundary_weight: float = 1.0  # lambda_bound: weight of the boundary loss L_1
    class_ids: tuple[int, ...] | None = None  # classes drawn for a class-conditional teacher (None: all)
    num_eval_noises: int = 16  # fixed noises (and classes/prompts) on which the trajectory error is measured
    eval_seed: int = 1234  # seed of that fixed set (independent of the training RNG)
    gradient_checkpointing: bool = False  # recompute student activations in backward (less memory, ~30% slower)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on a frozen copy of the teacher (needs peft)
    lora_alpha: float | None = None  # LoRA scaling numerator (default: the rank, i.e. scale 1)

    def validate(self) -> None:
        if self.num_intervals < 1:
            raise UsageError(f"num_intervals (K) must be positive, got {self.num_intervals}")
        if self.parameterization not in PARAMETERIZATION_CHOICES:
            raise UsageError(
                f"unknown parameterization {self.parameterization!r}; valid: {', '.join(PARAMETERIZATION_CHOICES)}"
            )
        if not 0.0 <= self.boundary_fraction < 1.0:
            raise UsageError(f"boundary_fraction must be in [0, 1), got {self.boundary_fraction}")
        if self.guidance_scale < 0:
            raise UsageError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.guidance_range is not None:
            if len(self.guidance_range) != 2 or not 0 <= self.guidance_range[0] < self.guidance_range[1]:
                raise UsageError(
                    f"guidance_range must be [w_min, w_max] with 0 <= w_min < w_max, got {list(self.guidance_range)}"
                )
            w_min, w_max = self.guidance_range
            if not w_min <= self.guidance_scale <= w_max:
                raise UsageError(
                    f"guidance_scale {self.guidance_scale} (the default scale) is outside the "
                    f"guidance_range [{w_min}, {w_max}]"
                )
            if self.guidance_embedding_dim < 2:
                raise UsageError(f"guidance_embedding_dim must be >= 2, got {self.guidance_embedding_dim}")
        if self.num_eval_noises < 1:
            raise UsageError(f"num_eval_noises must be positive, got {self.num_eval_noises}")
        check_lora(self.lora_rank, self.lora_alpha)


def check_lora(rank: int, alpha: float | None) -> None:
    """Raise a ``UsageError`` for LoRA settings that cannot work (a negative rank, an alpha without a rank, peft
    missing)."""
    if rank < 0:
        raise UsageError(f"lora_rank must be >= 0 (0: full student), got {rank}")
    if alpha is not None and rank == 0:
        raise UsageError("lora_alpha was given but lora_rank is 0 (no LoRA student)")
    if rank > 0 and importlib.util.find_spec("peft") is None:
        raise UsageError(
            f"lora_rank={rank} needs peft, which is not installed: pip install 'gendistill[lora]' "
            "(or use lora_rank 0 for a full student)"
        )


def add_lora(unet: nn.Module, rank: int, alpha: float | None = None) -> nn.Module:
    """Freeze ``unet`` and add trainable LoRA adapters of ``rank`` (scale ``alpha / rank``, default 1) on its
    ``LORA_TARGETS`` layers, initialized so that the adapted UNet computes what it did (peft's B = 0)."""
    from peft import LoraConfig  # optional extra: check_lora says how to install it

    names = [name for name, _ in unet.named_modules()]
    targets = [t for t in LORA_TARGETS if any(n == t or n.endswith("." + t) for n in names)]
    if not targets:
        raise UsageError(f"the teacher {type(unet).__name__} has none of the LoRA target layers {LORA_TARGETS}")
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha or rank,
            init_lora_weights="gaussian",  # B = 0: the adapted student starts as the teacher
            target_modules=targets,
        )
    )
    return unet


def build_student(teacher: DiffusionTeacher, config: BootConfig) -> nn.Module:
    """The student: a float32 copy of the teacher UNet (docs/boot.md, "The student"), with a zero-initialized guidance
    embedding for a guidance range, LoRA adapters on a frozen copy for ``lora_rank > 0``, and gradient
    checkpointing when asked. At initialization its output equals the teacher's in every case."""
    unet = teacher.unet
    if config.guidance_range is not None:
        if "time_cond_proj_dim" not in unet.config:
            raise UsageError(
                f"a guidance range needs a UNet that takes timestep_cond (UNet2DConditionModel); this teacher's "
                f"{type(unet).__name__} does not: use a fixed guidance_scale"
            )
        # Without the private keys: "_use_default_values" would reset time_cond_proj_dim to its default.
        settings = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        student = type(unet).from_config({**settings, "time_cond_proj_dim": config.guidance_embedding_dim})
        missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
        if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
            raise RuntimeError(f"copying the teacher into the student left {missing} missing, {unexpected} unexpected")
        nn.init.zeros_(student.time_embedding.cond_proj.weight)  # so the student starts as the teacher
    else:
        student = copy.deepcopy(unet)
    student = student.float().train()
    if config.lora_rank > 0:
        add_lora(student, config.lora_rank, config.lora_alpha)
        if config.guidance_range is not None:
            student.time_embedding.cond_proj.requires_grad_(True)
    else:
        student.requires_grad_(True)
    if config.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    return student


class PromptConditions:
    """What a task distilled on a text teacher's prompts shares: ``self.teacher``, ``self.prompts`` (a list, or
    None for other teachers) and ``self.prompt_embeddings`` (a ``PromptEmbeddings`` cache, or None)."""

    teacher: DiffusionTeacher
    prompts: list[str] | None
    prompt_embeddings: PromptEmbeddings | None

    def set_conditions(self, teacher: DiffusionTeacher, prompts, prompt_embeddings, class_ids) -> None:
        """Set ``prompts``, ``prompt_embeddings`` and ``class_ids`` (None: all of the teacher's classes) after checking
        them against the teacher's kind."""
        if teacher.is_text_conditional:
            if not prompts:
                raise UsageError("a text-to-image teacher needs prompts to distill on (a prompts file or list)")
            if class_ids is not None:
                raise UsageError("class_ids were given but the teacher is text-conditional")
        elif prompts is not None or prompt_embeddings is not None:
            raise UsageError("prompts were given but the teacher is not text-conditional")
        self.prompts = list(prompts) if prompts is not None else None
        self.prompt_embeddings = None
        if prompt_embeddings is not None:
            self.use_prompt_embeddings(prompt_embeddings)
        if class_ids is not None:
            if not class_ids:
                raise UsageError("class_ids is empty; give at least one class or leave it unset for all classes")
            teacher.check_class_labels(list(class_ids))
        self.class_ids = list(class_ids) if class_ids is not None else teacher.class_ids

    def use_prompt_embeddings(self, embeddings: PromptEmbeddings) -> None:
        """Draw prompt conditions from ``embeddings`` (one row per prompt, in order) instead of the text encoder."""
        if len(embeddings) != len(self.prompts or []):
            raise UsageError(f"{len(embeddings)} prompt embeddings were given for {len(self.prompts or [])} prompts")
        self.prompt_embeddings = embeddings

    def prompt_states(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Encoder hidden states (B, L, D) of prompts ``index`` (B,): from the cache, else by the text encoder."""
        if self.prompt_embeddings is not None:
            return self.prompt_embeddings[index].to(device, non_blocking=True)
        return self.teacher.encode_prompts([self.prompts[i] for i in index.tolist()]).to(device)

    @staticmethod
    def condition(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The UNet condition kwargs held in a batch."""
        return {key: batch[key] for key in CONDITION_KEYS if key in batch}

    def draw_conditions(
        self, n: int, device: torch.device, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """``n`` conditions drawn uniformly: class labels (``self.class_ids``, a device tensor
        ``self.class_id_tensor``) and/or prompt states. Without ``generator`` the classes come from the device's global
        RNG and the prompt indices from the CPU's (training batches, restored on resume); with it (a CPU generator),
        both come from it (fixed evaluation sets)."""
        cond = {}
        if self.class_ids:
            if generator is None:
                ids = self.class_id_tensor.to(device)
                cond["class_labels"] = ids[torch.randint(len(ids), (n,), device=device)]
            else:
                ids = torch.tensor(self.class_ids)
                cond["class_labels"] = ids[torch.randint(len(ids), (n,), generator=generator)].to(device)
        if self.prompts is not None:
            index = torch.randint(len(self.prompts), (n,), generator=generator)  # CPU: indexes a host-side cache
            cond["encoder_hidden_states"] = self.prompt_states(index, device)
        return cond


class BootTask(PromptConditions, nn.Module):
    """Frozen teacher + trainable student; ``forward("student", batch)`` returns the BOOT losses.

    Args:
        teacher: a ``DiffusionTeacher`` (pixel) or ``TextDiffusionTeacher`` (Stable Diffusion).
        config: the objective's settings.
        prompts: the prompts a text teacher is distilled on (required for text teachers, refused otherwise).
        prompt_embeddings: their encoder hidden states, computed once (``PromptEmbeddings``); without them each batch
            runs the text encoder.
        kernel_backend: the loss kernel's backend (``gendistill.kernels``): None picks the fused Triton kernel for
            CUDA tensors, ``"torch"`` the reference (the recipes' ``fused_kernels: false``).
    """

    def __init__(
        self,
        teacher: DiffusionTeacher,
        config: BootConfig | None = None,
        *,
        prompts: Sequence[str] | None = None,
        prompt_embeddings: PromptEmbeddings | None = None,
        kernel_backend: str | None = None,
    ):
        super().__init__()
        self.kernel_backend = kernel_backend
        config = config or BootConfig()
        config.validate()
        if config.parameterization == "auto":
            config = dataclasses.replace(config, parameterization=resolve_parameterization(teacher.prediction_type))
        self.config = config
        self.teacher = teacher
        if config.guidance_scale != 1.0 and not (teacher.is_class_conditional or teacher.is_text_conditional):
            raise UsageError(
                f"guidance_scale {config.guidance_scale} needs a class- or text-conditional teacher; this one is "
                "unconditional"
            )
        self.set_conditions(teacher, prompts, prompt_embeddings, config.class_ids)
        self.student = build_student(teacher, config)
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

    @property
    def guidance_embedding_dim(self) -> int | None:
        return self.config.guidance_embedding_dim if self.config.guidance_range is not None else None

    # --- the student ---------------------------------------------------------------------------------------
    def student_signal(
        self,
        eps: torch.Tensor,
        timesteps: torch.Tensor,
        cond: dict[str, torch.Tensor] | None = None,
        guidance_scale: torch.Tensor | None = None,
        student=None,
    ) -> torch.Tensor:
        """``g(eps, t, c, w)``: the student's estimate of the trajectory signal ``y_t`` (B, C, H, W), float32.

        ``guidance_scale`` (B,) feeds a guidance-range student; a fixed-guidance student ignores it."""
        student = self.student if student is None else student
        dtype = next(student.parameters()).dtype
        kwargs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in (cond or {}).items()}
        if self.guidance_embedding_dim is not None:
            if guidance_scale is None:
                guidance_scale = torch.full((eps.shape[0],), self.config.guidance_scale, device=eps.device)
            kwargs["timestep_cond"] = guidance_embedding(guidance_scale, self.guidance_embedding_dim).to(dtype)
        u = student(eps.to(dtype), timesteps, **kwargs).sample.float()
        if self.config.parameterization == "raw":
            return u
        # Read u as the teacher's native prediction at x_{t_0} = eps, so y ~ f(eps, t_0) at initialization.
        t0 = torch.full_like(timesteps, self.grid[0])
        alpha, sigma = self.teacher.schedule.coefficients(t0, ndim=eps.ndim)
        return to_x0(u, eps.float(), alpha, sigma, self.teacher.prediction_type)

    def start_signal(self, eps: torch.Tensor) -> torch.Tensor:
        """The exact ``y_T = eps (1 - sigma_T) / alpha_T``; zero when ``alpha_T = 0`` (then ``d_1 = 1``)."""
        if self._zero_terminal_snr:
            return torch.zeros_like(eps, dtype=torch.float32)
        t0 = torch.full((eps.shape[0],), self.grid[0], device=eps.device, dtype=torch.long)
        alpha, sigma = self.teacher.schedule.coefficients(t0, ndim=eps.ndim)
        return start_signal(eps.float(), alpha, sigma)

    def teacher_step(
        self,
        y: torch.Tensor,
        eps: torch.Tensor,
        k: torch.Tensor,
        cond: dict[str, torch.Tensor] | None = None,
        guidance_scale: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The teacher's DDIM step on interval ``k`` (from ``t_{k-1}`` to ``t_k``), in signal space."""
        t_prev, alpha, sigma, x, d = self._interval(y, eps, k)
        w = self.config.guidance_scale if guidance_scale is None else guidance_scale
        return signal_step(y, self.teacher.predict_x0(x, t_prev, cond, guidance_scale=w), d)

    def _interval(self, y: torch.Tensor, eps: torch.Tensor, k: torch.Tensor):
        """Interval ``k``'s start ``t_{k-1}`` (B,), its ``(alpha, sigma)``, the teacher's input
        ``x = alpha y + sigma eps`` and the step fraction ``d`` to ``t_k`` (each (B, 1, ..., 1) or like ``y``)."""
        grid = self.grid_timesteps.to(eps.device)
        t_prev = grid[k - 1]
        alpha, sigma = self.teacher.schedule.coefficients(t_prev, ndim=eps.ndim)
        d = self.teacher.schedule.step_fraction(t_prev, grid[k], ndim=eps.ndim)
        return t_prev, alpha, sigma, alpha * y + sigma * eps.float(), d

    # --- training ------------------------------------------------------------------------------------------
    def sample_batch(self, phase: str, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Noise, intervals and conditions for one batch, drawn from the global RNG (so resume restores them).

        The first ``round(B * boundary_fraction)`` rows use the boundary interval ``k = 1``; the rest draw ``k``
        uniformly in ``1..K``. Classes and prompts are drawn uniformly; with a guidance range, ``w`` uniformly in it.
        """
        c, h, w = self.teacher.sample_shape
        eps = torch.randn(batch_size, c, h, w, device=device)
        k = torch.randint(1, self.config.num_intervals + 1, (batch_size,), device=device)
        num_boundary = round(batch_size * self.config.boundary_fraction)
        k[:num_boundary] = 1
        boundary = torch.zeros(batch_size, dtype=torch.bool, device=device)
        boundary[:num_boundary] = True
        batch = {"eps": eps, "k": k, "boundary": boundary, **self.draw_conditions(batch_size, device)}
        if self.config.guidance_range is not None:
            w_min, w_max = self.config.guidance_range
            batch["guidance_scale"] = w_min + (w_max - w_min) * torch.rand(batch_size, device=device)
        return batch

    def forward(self, phase: str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        eps, k, boundary = batch["eps"], batch["k"], batch["boundary"]
        cond, w = self.condition(batch), batch.get("guidance_scale")
        grid = self.grid_timesteps.to(eps.device)
        with torch.no_grad():
            # y_prev: exact start y_T for k = 1, else the student's own (stop-grad) estimate at t_{k-1}.
            y_start = self.start_signal(eps)
            y_boot = self.student_signal(eps, grid[k - 1], cond, w)
            y_prev = torch.where((k == 1).view(-1, 1, 1, 1), y_start, y_boot)
            # The teacher's DDIM step from t_{k-1} (teacher_step), split so that the guidance combine, the x0
            # conversion, the signal step and the loss run as one fused kernel on CUDA (gendistill.kernels).
            t_prev, alpha, sigma, x, d = self._interval(y_prev, eps, k)
            scale = self.config.guidance_scale if w is None else w
            u_cond, u_uncond = self.teacher.native_pair(x, t_prev, cond, scale)
        y = self.student_signal(eps, grid[k], cond, w)
        # L_k = ||g(eps, t_k) - target||^2 / d_k^2, mean over elements (per sample first).
        per_sample = boot_guided_loss(
            y,
            y_prev,
            x,
            u_cond,
            u_uncond,
            torch.as_tensor(scale, dtype=torch.float32, device=eps.device).expand(eps.shape[0]),
            alpha.flatten().expand(eps.shape[0]),
            sigma.flatten().expand(eps.shape[0]),
            d.flatten().expand(eps.shape[0]),
            self.teacher.prediction_type,
            backend=self.kernel_backend,
        )
        regular, bound = per_sample[~boundary], per_sample[boundary]
        loss_regular = regular.mean() if regular.numel() else per_sample.new_zeros(())
        loss_boundary = bound.mean() if bound.numel() else per_sample.new_zeros(())
        loss = loss_regular + self.config.boundary_weight * loss_boundary
        return {"loss": loss, "loss_bootstrap": loss_regular.detach(), "loss_boundary": loss_boundary.detach()}

    # --- quality signals -----------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_trajectory(
        self,
        eps: torch.Tensor,
        cond: dict[str, torch.Tensor] | None = None,
        guidance_scale: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The teacher's K-step DDIM output ``y_{t_K}`` (B, C, H, W) from noise ``eps``."""
        y = self.start_signal(eps)
        for k in range(1, self.config.num_intervals + 1):
            ks = torch.full((eps.shape[0],), k, device=eps.device, dtype=torch.long)
            y = self.teacher_step(y, eps, ks, cond, guidance_scale)
        return y

    def eval_set(self, device: torch.device) -> dict:
        """Fixed noises and conditions (classes or prompts) and the teacher's K-step outputs on them, at the default
        guidance scale (computed once, then cached)."""
        if self._eval_set is None or self._eval_set["eps"].device != torch.device(device):
            gen = torch.Generator().manual_seed(self.config.eval_seed)
            n = self.config.num_eval_noises
            eps = torch.randn(n, *self.teacher.sample_shape, generator=gen).to(device)
            cond = self.draw_conditions(n, device, generator=gen)
            target = self.teacher_trajectory(eps, cond)
            self._eval_set = {"eps": eps, "cond": cond, "target": target}
        return self._eval_set

    @torch.no_grad()
    def one_step(
        self,
        eps: torch.Tensor,
        cond: dict[str, torch.Tensor] | None = None,
        guidance_scale: torch.Tensor | None = None,
        student=None,
    ) -> torch.Tensor:
        """The student's one-step sample ``g(eps, t_K, c)`` (B, C, H, W)."""
        t = torch.full((eps.shape[0],), self.grid[-1], device=eps.device, dtype=torch.long)
        return self.student_signal(eps, t, cond, guidance_scale, student=student)

    @torch.no_grad()
    def evaluate(self, student=None) -> dict[str, float]:
        """Trajectory error: MSE between the one-step sample and the teacher's K-step DDIM output."""
        device = self.grid_timesteps.device
        data = self.eval_set(device)
        pred = self.one_step(data["eps"], data["cond"], student=student)
        return {"trajectory_error": F.mse_loss(pred, data["target"]).item()}

    @torch.no_grad()
    def sample_images(self, student=None) -> torch.Tensor:
        """Teacher K-step (top row) and student one-step (bottom row) samples from the fixed noises, in [0, 1]
        (latents decoded by the teacher's VAE)."""
        device = self.grid_timesteps.device
        data = self.eval_set(device)
        pred = self.one_step(data["eps"], data["cond"], student=student)
        images = self.teacher.decode(torch.cat([data["target"], pred]))
        return (images / 2 + 0.5).clamp(0, 1)
