"""Score identity Distillation (SiD: Zhou et al., ICML 2024, arXiv 2404.04057) and Distribution Matching
Distillation (DMD: Yin et al., CVPR 2024, arXiv 2311.18828; DMD2, NeurIPS 2024, arXiv 2405.14867): data-free
one-step generators that match the teacher's distribution through a second, "fake" score network.

Two networks train in turn. The *fake score* ``f_psi`` (a copy of the teacher) learns the generator's own
distribution by denoising score matching on its samples, in the teacher's prediction type. The *generator*
``G_theta(z)`` (a copy of the teacher, or a BOOT student) maps noise to an image in one call; its sample ``x_g`` is
noised, ``x_t = alpha_t x_g + sigma_t eps``, and both denoisers' clean predictions ``f_phi`` (the teacher, with
classifier-free guidance) and ``f_psi`` at ``x_t`` give the loss:

- SiD: ``(f_phi - f_psi) . ((f_phi - x_g) - alpha (f_phi - f_psi)) / w``, through ``x_t`` into both denoisers
  (their weights frozen for this step); ``alpha`` 1.2 and the weight ``w = mean |x_g - f_phi|`` (no gradient)
  as in the paper's code;
- DMD: ``0.5 || x_g - stopgrad(x_g - (f_psi - f_phi) / w) ||^2``: the distribution-matching gradient
  ``(f_psi - f_phi) / w`` applied to ``x_g`` alone (no gradient through the denoisers). DMD's regression loss,
  which needs teacher samples, is left out as DMD2 does.

Teachers: pixel-space ``UNet2DModel`` (unconditional or class-conditional) and Stable Diffusion (latent, from
prompts only, with LoRA generators as BOOT's). Every loss is a mean over elements (the references sum; the scale
only changes what a learning rate means). Derivation, the choices that differ from the papers and measurements:
docs/sid.md.

The generator reads its noise ``z`` as the teacher's input at ``read_timestep`` and its network output as the
teacher's prediction type there (``parameterization`` "teacher"), with the network told ``input_timestep``: from
a teacher copy both are ``init_timestep`` (by default where ``sigma/alpha`` is 2.5, SiD's ``sigma_init``), so the
generator starts as the teacher's one-step clean prediction from pure noise; from a BOOT student they are its grid's
``t_0`` and ``t_K``, so it starts as that student. The exported folder is a BOOT pipeline folder either way.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.prompts import PromptEmbeddings
from ..errors import UsageError
from ..pipelines.boot_math import to_x0
from ..task import Phase, weights_frozen
from .boot import PARAMETERIZATIONS, PromptConditions, add_lora, check_lora
from .teacher import DiffusionTeacher

OBJECTIVES = ("sid", "dmd")
SID_SIGMA_INIT = 2.5  # SiD's generator noise level sigma_init (EDM units: sigma/alpha), for data in [-1, 1]


# --- the losses ----------------------------------------------------------------------------------------------
def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def _weight(x_g: torch.Tensor, f_real: torch.Tensor) -> torch.Tensor:
    """SiD's and DMD's per-sample normalization ``mean |x_g - f_phi|`` (B, 1, ..., 1), without gradient."""
    w = (x_g.detach() - f_real.detach()).abs().flatten(1).mean(1).clamp_min(1e-5)
    return w.view(-1, *([1] * (x_g.ndim - 1)))


def sid_generator_loss(
    x_g: torch.Tensor, f_real: torch.Tensor, f_fake: torch.Tensor, *, alpha: float = 1.2
) -> torch.Tensor:
    """SiD's generator loss per sample (B,): ``mean((f_real - f_fake) ((f_real - x_g) - alpha (f_real - f_fake)))
    / mean|x_g - f_real|``. ``f_real`` and ``f_fake`` are the teacher's and the fake score's clean predictions at
    ``x_t`` made from ``x_g`` (with their graphs through ``x_t``); equals ``(1 - alpha) ||f_real - f_fake||^2 +
    (f_real - f_fake) . (f_fake - x_g)`` (the paper's Eq. for the loss), normalized."""
    diff = f_real - f_fake
    return _per_sample_mean(diff * ((f_real - x_g) - alpha * diff)) / _weight(x_g, f_real).flatten()


def dmd_generator_loss(x_g: torch.Tensor, f_real: torch.Tensor, f_fake: torch.Tensor) -> torch.Tensor:
    """DMD's generator loss per sample (B,): ``0.5 mean (x_g - stopgrad(x_g - g))^2`` with the distribution-matching
    gradient ``g = (f_fake - f_real) / mean|x_g - f_real|``; its gradient w.r.t. ``x_g`` is ``g / numel`` per
    sample. ``f_real``/``f_fake`` carry no gradient (they are detached here)."""
    grad = (f_fake.detach() - f_real.detach()) / _weight(x_g, f_real)
    grad = torch.nan_to_num(grad)
    return 0.5 * _per_sample_mean((x_g - (x_g - grad).detach()) ** 2)


def denoising_target(x0: torch.Tensor, eps: torch.Tensor, alpha, sigma, prediction_type: str) -> torch.Tensor:
    """The regression target of denoising score matching in a prediction type: ``eps`` (epsilon), ``alpha eps -
    sigma x0`` (v_prediction) or ``x0`` (sample)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "sample":
        return x0
    raise UsageError(f"unsupported prediction type {prediction_type!r}; valid: epsilon, v_prediction, sample")


def _cast(cond: dict | None, dtype: torch.dtype) -> dict:
    """UNet condition kwargs with their floating-point tensors (prompt embeddings) in ``dtype``."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in (cond or {}).items()}


def init_timestep_for(alphas_cumprod: torch.Tensor, sigma_over_alpha: float = SID_SIGMA_INIT) -> int:
    """The timestep whose noise-to-signal ratio ``sigma_t / alpha_t`` is closest to ``sigma_over_alpha``."""
    ac = alphas_cumprod.detach().double().clamp(1e-12, 1.0)
    ratio = ((1 - ac) / ac).sqrt()
    return int((ratio.log() - math.log(sigma_over_alpha)).abs().argmin())


# --- the task ------------------------------------------------------------------------------------------------
@dataclass
class SiDConfig:
    objective: str = "sid"  # "sid" (score identity) or "dmd" (distribution-matching gradient)
    alpha: float = 1.2  # SiD's alpha (the paper's default; 1 is the plain Fisher-divergence loss)
    timestep_range: tuple[float, float] = (0.02, 0.98)  # timesteps drawn uniformly in this fraction of [0, T)
    guidance_scale: float = 1.0  # classifier-free guidance of the teacher's (real) score; 1: none
    fake_steps: int = 1  # fake-score steps per generator step (DMD2 uses 5; SiD 1)
    fake_lr: float | None = None  # the fake score's learning rate (None: the recipe's, as the generator's)
    init_timestep: int | None = None  # teacher init: the generator's noise level (None: sigma/alpha = 2.5)
    class_ids: tuple[int, ...] | None = None  # classes drawn for a class-conditional teacher (None: all)
    num_eval_noises: int = 16  # fixed noises (and classes) of the sample grids and the evaluation
    eval_seed: int = 1234  # seed of that fixed set (independent of the training RNG)
    gradient_checkpointing: bool = False  # recompute activations of the generator and fake score in backward
    lora_rank: int = 0  # > 0: the generator trains LoRA adapters of this rank on its frozen start (needs peft)
    lora_alpha: float | None = None  # LoRA scaling numerator (default: the rank, i.e. scale 1)

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UsageError(f"objective {self.objective!r} is not valid; valid: {', '.join(OBJECTIVES)}")
        low, high = self.timestep_range
        if not 0.0 <= low < high <= 1.0:
            raise UsageError(f"timestep_range must be [low, high] with 0 <= low < high <= 1, got {[low, high]}")
        if self.guidance_scale < 0:
            raise UsageError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.fake_steps < 1:
            raise UsageError(f"fake_steps must be positive, got {self.fake_steps}")
        if self.num_eval_noises < 1:
            raise UsageError(f"num_eval_noises must be positive, got {self.num_eval_noises}")
        if self.fake_lr is not None and not self.fake_lr > 0:
            raise UsageError(f"fake_lr must be positive, got {self.fake_lr}")
        check_lora(self.lora_rank, self.lora_alpha)


@dataclass
class GeneratorInit:
    """Where the generator starts: a UNet (the teacher's class and config) and how it reads noise.

    ``read_timestep``: the timestep at which the noise is the teacher's input and the network's output is read as
    the teacher's prediction (``parameterization`` "teacher"; "raw": the output is the image); ``input_timestep``:
    the timestep the network is told. ``grid``: the BOOT grid of a BOOT student (exported as is), else None."""

    unet: nn.Module
    read_timestep: int
    input_timestep: int
    parameterization: str = "teacher"
    grid: list[int] | None = None


def teacher_init(teacher: DiffusionTeacher, init_timestep: int | None = None) -> GeneratorInit:
    """A float32 copy of the teacher UNet reading its noise at ``init_timestep`` (default: sigma/alpha = 2.5)."""
    t = init_timestep_for(teacher.schedule.alphas_cumprod) if init_timestep is None else int(init_timestep)
    if not 1 <= t < teacher.schedule.num_train_timesteps:  # 0 would leave no noise to read
        raise UsageError(f"init_timestep {t} is out of range; valid: 1..{teacher.schedule.num_train_timesteps - 1}")
    return GeneratorInit(copy.deepcopy(teacher.unet).float(), read_timestep=t, input_timestep=t)


class SiDTask(PromptConditions, nn.Module):
    """Frozen teacher, trainable fake score (phase "fake_score", first) and one-step generator (phase "student").

    Args:
        teacher: a pixel ``DiffusionTeacher`` (unconditional or class-conditional) or a ``TextDiffusionTeacher``
            (Stable Diffusion, latent).
        config: the objective's settings.
        init: the generator's start (default: :func:`teacher_init`).
        prompts: the prompts a text teacher is distilled on (required for text teachers, refused otherwise).
        prompt_embeddings: their encoder hidden states, computed once (``PromptEmbeddings``).
    """

    def __init__(
        self,
        teacher: DiffusionTeacher,
        config: SiDConfig | None = None,
        *,
        init: GeneratorInit | None = None,
        prompts: list[str] | None = None,
        prompt_embeddings: PromptEmbeddings | None = None,
    ):
        super().__init__()
        self.config = config = config or SiDConfig()
        config.validate()
        if config.guidance_scale != 1.0 and not (teacher.is_class_conditional or teacher.is_text_conditional):
            raise UsageError(f"guidance_scale {config.guidance_scale} needs a class- or text-conditional teacher")
        self.teacher = teacher
        self.set_conditions(teacher, prompts, prompt_embeddings, config.class_ids)
        init = init or teacher_init(teacher, config.init_timestep)
        if init.parameterization not in PARAMETERIZATIONS:
            raise UsageError(f"parameterization {init.parameterization!r} is not valid; valid: {PARAMETERIZATIONS}")
        self.read_timestep, self.input_timestep = init.read_timestep, init.input_timestep
        self.parameterization, self.boot_grid = init.parameterization, init.grid
        self.student = init.unet.float().train()
        if config.lora_rank > 0:
            add_lora(self.student, config.lora_rank, config.lora_alpha)
        else:
            self.student.requires_grad_(True)
        self.fake_score = copy.deepcopy(teacher.unet).float().train().requires_grad_(True)
        if config.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
            self.fake_score.enable_gradient_checkpointing()
        num = teacher.schedule.num_train_timesteps
        low, high = config.timestep_range
        self.t_min, self.t_max = int(round(low * (num - 1))), max(int(round(high * (num - 1))), 1)
        self.register_buffer("class_id_tensor", torch.tensor(self.class_ids, dtype=torch.long), persistent=False)
        self._eval_set: dict[str, torch.Tensor] | None = None

    def phases(self) -> list[Phase]:
        return [Phase("fake_score", steps=self.config.fake_steps, lr=self.config.fake_lr), Phase("student")]

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.train(False)
        return self

    # --- the networks ------------------------------------------------------------------------------------------
    def generate(self, z: torch.Tensor, cond: dict | None = None, student=None) -> torch.Tensor:
        """``G(z, c)``: one generator call, (B, C, H, W) float32 images in the teacher's sample space."""
        student = self.student if student is None else student
        t_in = torch.full((z.shape[0],), self.input_timestep, device=z.device, dtype=torch.long)
        dtype = next(student.parameters()).dtype
        u = student(z.to(dtype), t_in, **_cast(cond, dtype)).sample.float()
        if self.parameterization == "raw":
            return u
        t_read = torch.full_like(t_in, self.read_timestep)
        alpha, sigma = self.teacher.schedule.coefficients(t_read, ndim=z.ndim)
        return to_x0(u, z.float(), alpha, sigma, self.teacher.prediction_type)

    def fake_x0(
        self, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None, *, network: nn.Module | None = None
    ) -> torch.Tensor:
        """The fake score's clean prediction (B, C, H, W) float32 at ``x`` (no guidance)."""
        network = self.fake_score if network is None else network
        u = network(x, t, **_cast(cond, torch.float32)).sample.float()
        alpha, sigma = self.teacher.schedule.coefficients(t, ndim=x.ndim)
        return to_x0(u, x, alpha, sigma, self.teacher.prediction_type)

    # --- training ------------------------------------------------------------------------------------------
    def sample_batch(self, phase: str, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Generator noise ``z``, diffusion noise ``eps``, timesteps ``t`` and classes or prompts (uniformly), from
        the global RNG."""
        shape = (batch_size, *self.teacher.sample_shape)
        batch = {
            "z": torch.randn(shape, device=device),
            "eps": torch.randn(shape, device=device),
            "t": torch.randint(self.t_min, self.t_max + 1, (batch_size,), device=device),
        }
        return {**batch, **self.draw_conditions(batch_size, device)}

    def forward(self, phase: str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        z, eps, t, cond = batch["z"], batch["eps"], batch["t"], self.condition(batch)
        alpha, sigma = self.teacher.schedule.coefficients(t, ndim=z.ndim)
        if phase == "fake_score":
            # Denoising score matching on the generator's samples, in the teacher's prediction type.
            with torch.no_grad():
                x_g = self.generate(z, cond)
            x_t = alpha * x_g + sigma * eps
            u = self.fake_score(x_t, t, **_cast(cond, torch.float32)).sample.float()
            target = denoising_target(x_g, eps, alpha, sigma, self.teacher.prediction_type)
            loss = F.mse_loss(u, target)
            return {"loss": loss, "loss_fake_score": loss.detach()}
        if phase != "student":
            raise UsageError(f"unknown phase {phase!r}; valid: fake_score, student")
        x_g = self.generate(z, cond)
        x_t = alpha * x_g + sigma * eps
        w = self.config.guidance_scale
        if self.config.objective == "dmd":
            with torch.no_grad():
                f_real = self.teacher.predict_x0(x_t, t, cond, guidance_scale=w)
                f_fake = self.fake_x0(x_t, t, cond)
            per_sample = dmd_generator_loss(x_g, f_real, f_fake)
        else:
            f_real = self.teacher.predict_x0(x_t, t, cond, guidance_scale=w)
            # The gradient reaches the generator through the fake score's input only: its weights (trained in their
            # own phase, which starts from zero gradients) get none, which saves their share of the backward pass.
            with weights_frozen(self.fake_score) as fake_score:
                f_fake = self.fake_x0(x_t, t, cond, network=fake_score)
            per_sample = sid_generator_loss(x_g, f_real, f_fake, alpha=self.config.alpha)
        loss = per_sample.mean()
        gap = (f_real - f_fake).detach().pow(2).mean()
        return {"loss": loss, f"loss_{self.config.objective}": loss.detach(), "score_gap": gap}

    # --- quality signals -----------------------------------------------------------------------------------
    def eval_set(self, device: torch.device) -> dict:
        """Fixed noises and classes or prompts (computed once, from ``eval_seed``)."""
        if self._eval_set is None or self._eval_set["z"].device != torch.device(device):
            gen = torch.Generator().manual_seed(self.config.eval_seed)
            n = self.config.num_eval_noises
            z = torch.randn(n, *self.teacher.sample_shape, generator=gen).to(device)
            self._eval_set = {"z": z, "cond": self.draw_conditions(n, device, generator=gen)}
        return self._eval_set

    @torch.no_grad()
    def evaluate(self, student=None, fake_score=None) -> dict[str, float]:
        """The teacher's denoising error on the generator's fixed samples, noised at the middle of the range
        (``mean (f_phi(x_t) - x_g)^2``): it falls as the samples move where the teacher is sure of them."""
        device = self.class_id_tensor.device
        data = self.eval_set(device)
        x_g = self.generate(data["z"], data["cond"], student=student)
        gen = torch.Generator(device="cpu").manual_seed(self.config.eval_seed + 1)
        eps = torch.randn(x_g.shape, generator=gen).to(device)
        t = torch.full((len(x_g),), (self.t_min + self.t_max) // 2, device=device, dtype=torch.long)
        alpha, sigma = self.teacher.schedule.coefficients(t, ndim=x_g.ndim)
        f = self.teacher.predict_x0(
            alpha * x_g + sigma * eps, t, data["cond"], guidance_scale=self.config.guidance_scale
        )
        return {"teacher_denoising_error": F.mse_loss(f, x_g).item()}

    @torch.no_grad()
    def sample_images(self, student=None, fake_score=None) -> torch.Tensor:
        """The generator's samples from the fixed noises, in [0, 1] (latents decoded by the teacher's VAE)."""
        data = self.eval_set(self.class_id_tensor.device)
        images = self.teacher.decode(self.generate(data["z"], data["cond"], student=student))
        return (images / 2 + 0.5).clamp(0, 1)
