"""Frozen diffusers teachers: loading, classifier-free guidance and the clean-sample prediction ``f(x_t, t, c)``."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import diffusers
import torch
from diffusers import UNet2DModel
from torch import nn

from .schedule import NoiseSchedule, check_prediction_type, predicted_x0

logger = logging.getLogger(__name__)

# UNet classes a pixel-space teacher may have (the text-conditioned UNet2DConditionModel is the SD issue's).
SUPPORTED_UNETS = {"UNet2DModel": UNet2DModel}


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _scheduler_from_config(config: dict):
    """Any diffusers scheduler whose class keeps ``alphas_cumprod`` (DDPM, DDIM, Euler, DPM-Solver, ...)."""
    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if cls is None or not issubclass(cls, diffusers.SchedulerMixin):
        raise ValueError(f"scheduler config names {name!r}, which is not a diffusers scheduler class")
    scheduler = cls.from_config(config)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"scheduler {name} has no alphas_cumprod; use a DDPM/DDIM-family scheduler config")
    return scheduler


class DiffusionTeacher(nn.Module):
    """A frozen pixel-space diffusers UNet with its noise schedule.

    Args:
        unet: a ``UNet2DModel``, unconditional or class-conditional (``num_class_embeds``).
        scheduler: any diffusers scheduler (its config supplies ``alphas_cumprod`` and ``prediction_type``).
        prediction_type: overrides ``scheduler.config.prediction_type`` when given.
        null_class_id: the class id used as "no class" for classifier-free guidance; defaults to the last
            embedding of a class-conditional UNet. Never a valid requested class.
    """

    def __init__(
        self, unet: nn.Module, scheduler, *, prediction_type: str | None = None, null_class_id: int | None = None
    ):
        super().__init__()
        if type(unet).__name__ not in SUPPORTED_UNETS:
            raise ValueError(
                f"unsupported teacher UNet class {type(unet).__name__}; valid: {', '.join(SUPPORTED_UNETS)}"
            )
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(f"scheduler {type(scheduler).__name__} has no alphas_cumprod")
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.prediction_type = check_prediction_type(
            prediction_type or scheduler.config.get("prediction_type", "epsilon")
        )
        self.schedule = NoiseSchedule(scheduler.alphas_cumprod)
        if self.prediction_type == "epsilon" and float(self.schedule.alpha.min()) == 0.0:
            raise ValueError(
                "an epsilon-prediction teacher cannot predict x0 where alpha_t = 0 (zero terminal SNR schedule); "
                "use a v_prediction or sample teacher, or a schedule without rescale_betas_zero_snr"
            )
        num_embeds = unet.config.get("num_class_embeds")
        if num_embeds is None:
            if null_class_id is not None:
                raise ValueError("null_class_id was given but the teacher is unconditional (no num_class_embeds)")
            self.null_class_id = None
        else:
            null = num_embeds - 1 if null_class_id is None else int(null_class_id)
            if not 0 <= null < num_embeds:
                raise ValueError(f"null_class_id {null} is out of range for a teacher with {num_embeds} class embeds")
            self.null_class_id = null

    # --- loading -----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, prediction_type: str | None = None, null_class_id: int | None = None
    ) -> DiffusionTeacher:
        """Load from a DDPMPipeline/DDIMPipeline-style folder or hub id, or any folder with ``unet/`` and
        ``scheduler/`` subfolders."""
        path_str = str(path)
        local = Path(path_str).expanduser()
        if local.exists():
            if not local.is_dir():
                raise ValueError(f"teacher {path_str!r} is a file; expected a diffusers folder (unet/, scheduler/)")
            missing = [sub for sub in ("unet", "scheduler") if not (local / sub).is_dir()]
            if missing:
                raise ValueError(
                    f"teacher folder {path_str!r} is not a diffusers teacher: missing subfolder(s) "
                    f"{', '.join(missing)} (expected unet/ and scheduler/, as DDPMPipeline.save_pretrained writes)"
                )
            unet_config = _read_json(local / "unet" / "config.json")
            scheduler_config = _read_json(local / "scheduler" / "scheduler_config.json")
            source = str(local)
        elif re.fullmatch(r"[\w.-]+/[\w.-]+", path_str) and not path_str.startswith("."):
            # A hub id ("org/name"): diffusers resolves it; offline or unknown ids become one clear error.
            try:
                unet_config = UNet2DModel.load_config(path_str, subfolder="unet")
                scheduler_config = diffusers.DDPMScheduler.load_config(path_str, subfolder="scheduler")
            except OSError as err:
                raise FileNotFoundError(
                    f"teacher {path_str!r} is not a local folder and could not be fetched as a hub id ({err})"
                ) from None
            source = path_str
        else:
            raise FileNotFoundError(f"teacher path {path_str!r} does not exist")
        unet_class = unet_config.get("_class_name")
        if unet_class not in SUPPORTED_UNETS:
            raise ValueError(
                f"teacher UNet class {unet_class!r} is not supported here; valid: {', '.join(SUPPORTED_UNETS)}"
            )
        if prediction_type is None:
            check_prediction_type(scheduler_config.get("prediction_type", "epsilon"))
        unet = SUPPORTED_UNETS[unet_class].from_pretrained(source, subfolder="unet")
        scheduler = _scheduler_from_config(scheduler_config)
        return cls(unet, scheduler, prediction_type=prediction_type, null_class_id=null_class_id)

    # --- properties ----------------------------------------------------------------------------------------
    def train(self, mode: bool = True):  # the teacher stays frozen in eval mode
        return super().train(False)

    @property
    def is_class_conditional(self) -> bool:
        return self.null_class_id is not None

    @property
    def class_ids(self) -> list[int]:
        """Valid class ids (all embeddings but the null class); empty for an unconditional teacher."""
        if not self.is_class_conditional:
            return []
        return [i for i in range(self.unet.config.num_class_embeds) if i != self.null_class_id]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, h, w)

    def check_class_labels(self, class_labels) -> None:
        """Raise ``ValueError`` for labels given to an unconditional teacher, or out-of-range / null ids."""
        if class_labels is None:
            return
        if not self.is_class_conditional:
            raise ValueError("class labels were given but the teacher is unconditional (its UNet has no class embeds)")
        labels = torch.as_tensor(class_labels).flatten().tolist()
        valid = set(self.class_ids)
        bad = [c for c in labels if c not in valid]
        if bad:
            raise ValueError(
                f"class id(s) {bad} out of range: valid ids are 0..{self.unet.config.num_class_embeds - 1} "
                f"except the null class {self.null_class_id}"
            )

    # --- prediction ----------------------------------------------------------------------------------------
    def native(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's native output ``u`` (B, C, H, W) for ``x`` (B, C, H, W) at timesteps ``t`` (B,)."""
        return self.unet(x, t, class_labels=class_labels).sample

    def guided_native(
        self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """``u_uncond + w (u_cond - u_uncond)`` from one batched call of size 2B; plain ``u`` when w == 1."""
        if guidance_scale == 1.0 or class_labels is None:
            return self.native(x, t, class_labels)
        null = torch.full_like(class_labels, self.null_class_id)
        u = self.native(torch.cat([x, x]), torch.cat([t, t]), torch.cat([class_labels, null]))
        u_cond, u_uncond = u.chunk(2)
        return u_uncond + guidance_scale * (u_cond - u_uncond)

    def predict_x0(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        class_labels: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """The teacher's clean-sample prediction ``f(x_t, t, c)`` (B, C, H, W), guidance applied to ``u`` first."""
        u = self.guided_native(x, t, class_labels, guidance_scale).float()
        alpha, sigma = self.schedule.coefficients(t, ndim=x.ndim)
        return predicted_x0(u, x.float(), alpha, sigma, self.prediction_type)
