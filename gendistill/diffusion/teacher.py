"""Frozen diffusers teachers: loading, classifier-free guidance and the clean-sample prediction ``f(x_t, t, c)``.

Two kinds share one interface: ``DiffusionTeacher`` (pixel-space ``UNet2DModel``, unconditional or class-conditional)
and ``TextDiffusionTeacher`` (Stable Diffusion 1.x/2.x: latent ``UNet2DConditionModel`` + VAE + CLIP text encoder).
A *condition* is a dict of the UNet's keyword arguments (``{"class_labels": (B,)}``,
``{"encoder_hidden_states": (B, L, D)}``; SDXL would add ``added_cond_kwargs``), so guidance, BOOT and sampling never
branch on the kind of teacher. ``load_teacher`` picks the kind from the folder's UNet class.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import diffusers
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

from ..errors import UsageError
from ..files import error_summary, read_json
from ..pipelines.boot_math import decode_latents, encode_prompts, guided_output, to_x0, unet_pair
from .schedule import NoiseSchedule, check_prediction_type

logger = logging.getLogger(__name__)

# UNet classes of each kind of teacher.
SUPPORTED_UNETS = {"UNet2DModel": UNet2DModel}
TEXT_UNETS = {"UNet2DConditionModel": UNet2DConditionModel}
# transformers classes a text teacher's folder may name (SDXL's second encoder would add CLIPTextModelWithProjection).
TEXT_ENCODERS = ("CLIPTextModel",)
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")


def _read_json(path: Path, what: str) -> dict:
    data = read_json(path, what=what)
    if not isinstance(data, dict):
        raise UsageError(f"{what} {str(path)!r} is not a JSON object")
    return data


def _from_pretrained(cls, source: str, subfolder: str):
    """``cls.from_pretrained(source, subfolder=subfolder)``; any failure to read the component (truncated or corrupt
    weights, weights that do not match its config, files a hub id lacks) is one ``ValueError`` naming it."""
    try:
        return cls.from_pretrained(source, subfolder=subfolder)
    except Exception as err:  # diffusers/transformers raise OSError, ValueError, RuntimeError, safetensors errors...
        raise UsageError(
            f"teacher {source!r}: cannot load {subfolder}/ as a {cls.__name__} ({error_summary(err)}); "
            "expected the files save_pretrained writes"
        ) from None


def _hub_id(path: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", path)) and not path.startswith(".")


def _scheduler_from_config(config: dict):
    """Any diffusers scheduler whose class keeps ``alphas_cumprod`` (DDPM, DDIM, Euler, DPM-Solver, ...)."""
    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if cls is None or not issubclass(cls, diffusers.SchedulerMixin):
        raise UsageError(f"scheduler config names {name!r}, which is not a diffusers scheduler class")
    scheduler = cls.from_config(config)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise UsageError(f"scheduler {name} has no alphas_cumprod; use a DDPM/DDIM-family scheduler config")
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

    unet_classes = SUPPORTED_UNETS

    def __init__(
        self, unet: nn.Module, scheduler, *, prediction_type: str | None = None, null_class_id: int | None = None
    ):
        super().__init__()
        if type(unet).__name__ not in self.unet_classes:
            raise UsageError(
                f"unsupported teacher UNet class {type(unet).__name__} for {type(self).__name__}; "
                f"valid: {', '.join(self.unet_classes)}"
            )
        if not hasattr(scheduler, "alphas_cumprod"):
            raise UsageError(f"scheduler {type(scheduler).__name__} has no alphas_cumprod")
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.prediction_type = check_prediction_type(
            prediction_type or scheduler.config.get("prediction_type", "epsilon")
        )
        self.schedule = NoiseSchedule(scheduler.alphas_cumprod)
        if self.prediction_type == "epsilon" and float(self.schedule.alpha.min()) == 0.0:
            raise UsageError(
                "an epsilon-prediction teacher cannot predict x0 where alpha_t = 0 (zero terminal SNR schedule); "
                "use a v_prediction or sample teacher, or a schedule without rescale_betas_zero_snr"
            )
        num_embeds = unet.config.get("num_class_embeds")
        if num_embeds is None:
            if null_class_id is not None:
                raise UsageError("null_class_id was given but the teacher is unconditional (no num_class_embeds)")
            self.null_class_id = None
        else:
            null = num_embeds - 1 if null_class_id is None else int(null_class_id)
            if not 0 <= null < num_embeds:
                raise UsageError(f"null_class_id {null} is out of range for a teacher with {num_embeds} class embeds")
            self.null_class_id = null

    # --- loading -----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, prediction_type: str | None = None, null_class_id: int | None = None
    ) -> DiffusionTeacher:
        """Load from a DDPMPipeline/DDIMPipeline-style folder or hub id, or any folder with ``unet/`` and
        ``scheduler/`` subfolders."""
        source, unet_config, scheduler_config = _read_unet_and_scheduler(path)
        unet_class = unet_config.get("_class_name")
        if unet_class not in SUPPORTED_UNETS:
            hint = (
                " (a text-to-image teacher: use TextDiffusionTeacher or load_teacher)"
                if unet_class in TEXT_UNETS
                else ""
            )
            raise UsageError(
                f"teacher UNet class {unet_class!r} is not supported here{hint}; valid: {', '.join(SUPPORTED_UNETS)}"
            )
        if prediction_type is None:
            check_prediction_type(scheduler_config.get("prediction_type", "epsilon"))
        unet = _from_pretrained(SUPPORTED_UNETS[unet_class], source, "unet")
        scheduler = _scheduler_from_config(scheduler_config)
        return cls(unet, scheduler, prediction_type=prediction_type, null_class_id=null_class_id)

    # --- properties ----------------------------------------------------------------------------------------
    def train(self, mode: bool = True):  # the teacher stays frozen in eval mode
        return super().train(False)

    @property
    def is_class_conditional(self) -> bool:
        return self.null_class_id is not None

    @property
    def is_text_conditional(self) -> bool:
        return False

    @property
    def is_latent(self) -> bool:
        """Whether samples live in a VAE's latent space (decoded to images only at sampling time)."""
        return False

    @property
    def class_ids(self) -> list[int]:
        """Valid class ids (all embeddings but the null class); empty for an unconditional teacher."""
        if not self.is_class_conditional:
            return []
        return [i for i in range(self.unet.config.num_class_embeds) if i != self.null_class_id]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one sample (of one latent for latent teachers)."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, h, w)

    def check_class_labels(self, class_labels) -> None:
        """Raise ``ValueError`` for labels given to an unconditional teacher, or out-of-range / null ids."""
        if class_labels is None:
            return
        if not self.is_class_conditional:
            raise UsageError("class labels were given but the teacher is unconditional (its UNet has no class embeds)")
        labels = torch.as_tensor(class_labels).flatten().tolist()
        valid = set(self.class_ids)
        bad = [c for c in labels if c not in valid]
        if bad:
            raise UsageError(
                f"class id(s) {bad} out of range: valid ids are 0..{self.unet.config.num_class_embeds - 1} "
                f"except the null class {self.null_class_id}"
            )

    # --- conditions ----------------------------------------------------------------------------------------
    def null_condition(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The "no condition" counterpart of ``cond`` for classifier-free guidance (the null class)."""
        return {"class_labels": torch.full_like(cond["class_labels"], self.null_class_id)}

    # --- prediction ----------------------------------------------------------------------------------------
    def _null_for(self, cond: dict | None, guidance_scale) -> dict | None:
        """The null condition, or None when there is no condition or ``w`` is the Python number 1."""
        if not cond or (not torch.is_tensor(guidance_scale) and guidance_scale == 1.0):
            return None
        return self.null_condition(cond)

    def native_pair(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: dict[str, torch.Tensor] | None = None,
        guidance_scale: float | torch.Tensor = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(u_cond, u_uncond)`` (B, C, H, W) in the UNet's dtype for ``x`` at timesteps ``t`` (B,) under ``cond``
        (the UNet's keyword arguments) from one batched call of size 2B; ``(u, None)`` when there is no condition
        or ``w`` is the Python number 1 (no guidance, one call of size B)."""
        return unet_pair(self.unet, x, t, cond or {}, self._null_for(cond, guidance_scale))

    def guided_native(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: dict[str, torch.Tensor] | None = None,
        guidance_scale: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        """``u_uncond + w (u_cond - u_uncond)`` in float32 from one batched call of size 2B; plain ``u`` when there
        is no condition or ``w`` is the Python number 1. ``guidance_scale``: a number or a (B,) tensor."""
        return guided_output(self.unet, x, t, cond or {}, self._null_for(cond, guidance_scale), guidance_scale)

    def predict_x0(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: dict[str, torch.Tensor] | None = None,
        *,
        guidance_scale: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        """The teacher's clean-sample prediction ``f(x_t, t, c)`` (B, C, H, W) in float32, guidance applied to the
        native output first (docs/boot.md)."""
        u = self.guided_native(x, t, cond, guidance_scale)
        alpha, sigma = self.schedule.coefficients(t, ndim=x.ndim)
        return to_x0(u, x.float(), alpha, sigma, self.prediction_type)

    def decode(self, sample: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] from samples; pixel teachers' samples already are images."""
        return sample


def _read_unet_and_scheduler(path: str | os.PathLike) -> tuple[str, dict, dict]:
    """``(source, unet config, scheduler config)`` of a local diffusers folder or a hub id (one clear error each)."""
    path_str = str(path)
    local = Path(path_str).expanduser()
    if local.exists():
        if not local.is_dir():
            raise UsageError(f"teacher {path_str!r} is a file; expected a diffusers folder (unet/, scheduler/)")
        missing = [sub for sub in ("unet", "scheduler") if not (local / sub).is_dir()]
        if missing:
            raise UsageError(
                f"teacher folder {path_str!r} is not a diffusers teacher: missing subfolder(s) "
                f"{', '.join(missing)} (expected unet/ and scheduler/, as DDPMPipeline.save_pretrained writes)"
            )
        return (
            str(local),
            _read_json(local / "unet" / "config.json", "teacher UNet config"),
            _read_json(local / "scheduler" / "scheduler_config.json", "teacher scheduler config"),
        )
    if _hub_id(path_str):
        # A hub id ("org/name"): diffusers resolves it; offline or unknown ids become one clear error.
        try:
            unet_config = UNet2DModel.load_config(path_str, subfolder="unet")
            scheduler_config = diffusers.DDPMScheduler.load_config(path_str, subfolder="scheduler")
        except OSError as err:
            raise FileNotFoundError(
                f"teacher {path_str!r} is not a local folder and could not be fetched as a hub id ({err})"
            ) from None
        return path_str, unet_config, scheduler_config
    raise FileNotFoundError(f"teacher path {path_str!r} does not exist")


class TextDiffusionTeacher(DiffusionTeacher):
    """A frozen Stable Diffusion teacher (SD 1.x epsilon, SD 2.x v_prediction): latent ``UNet2DConditionModel``, its
    ``AutoencoderKL`` and CLIP text encoder + tokenizer. The null prompt ``""`` is the guidance condition.

    Args:
        unet: the ``UNet2DConditionModel``.
        scheduler: any diffusers scheduler with ``alphas_cumprod``.
        vae: the ``AutoencoderKL`` that decodes latents (for sample grids and the exported pipeline).
        text_encoder: a transformers ``CLIPTextModel``; its last hidden state conditions the UNet.
        tokenizer: its ``CLIPTokenizer``; over-long prompts are truncated to ``model_max_length``.
        prediction_type: overrides ``scheduler.config.prediction_type``.

    Not supported (yet): SDXL (a second text encoder and ``added_cond_kwargs`` would extend ``encode_prompts`` and
    ``null_condition``; nothing else changes), UNets that already take ``timestep_cond``, and ``clip_skip``.
    """

    unet_classes = TEXT_UNETS

    def __init__(
        self,
        unet: nn.Module,
        scheduler,
        *,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer,
        prediction_type: str | None = None,
    ):
        if text_encoder is None or tokenizer is None or vae is None:
            raise UsageError(
                "a text-to-image teacher needs its text encoder, tokenizer and VAE (this one has "
                f"text_encoder={type(text_encoder).__name__}, tokenizer={type(tokenizer).__name__}, "
                f"vae={type(vae).__name__})"
            )
        if unet.config.get("time_cond_proj_dim") is not None:
            raise UsageError("teacher UNets that take timestep_cond (time_cond_proj_dim) are not supported")
        if unet.config.get("addition_embed_type") is not None:
            raise UsageError(
                f"teacher UNet uses addition_embed_type={unet.config.addition_embed_type!r} (SDXL-style added "
                "conditions), which is not supported yet; SD 1.x/2.x teachers are"
            )
        super().__init__(unet, scheduler, prediction_type=prediction_type)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        # The null prompt's embedding (1, L, D): computed once, moved and cast with the module.
        self.register_buffer("null_prompt_embeds", self.encode_prompts([""]), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, prediction_type: str | None = None) -> TextDiffusionTeacher:
        """Load a ``StableDiffusionPipeline`` folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) or hub id."""
        source, unet_config, scheduler_config = _read_unet_and_scheduler(path)
        if unet_config.get("_class_name") not in TEXT_UNETS:
            raise UsageError(
                f"teacher UNet class {unet_config.get('_class_name')!r} is not a text-to-image UNet; "
                f"valid: {', '.join(TEXT_UNETS)}"
            )
        local = Path(source)
        missing = [
            name for name in ("text_encoder", "tokenizer", "vae") if local.is_dir() and not (local / name).is_dir()
        ]
        if missing:
            raise UsageError(
                f"teacher {source!r} has no {', '.join(missing)} subfolder: a text-to-image teacher needs its "
                "text encoder, tokenizer and VAE (a StableDiffusionPipeline folder)"
            )
        if prediction_type is None:
            check_prediction_type(scheduler_config.get("prediction_type", "epsilon"))
        bar = diffusers.utils.logging.is_progress_bar_enabled()
        diffusers.utils.logging.disable_progress_bar()  # the components' loading bar; restored below
        try:  # diffusers reads model_index.json and checks each component's class; the safety checker is skipped
            pipe = diffusers.StableDiffusionPipeline.from_pretrained(
                source, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
        except Exception as err:  # OSError, ValueError, safetensors errors, ... from diffusers and transformers
            raise UsageError(
                f"teacher {source!r}: cannot load it as a StableDiffusionPipeline ({error_summary(err)}); "
                "expected the folder StableDiffusionPipeline.save_pretrained writes"
            ) from None
        finally:
            if bar:
                diffusers.utils.logging.enable_progress_bar()
        for name, valid in (("text_encoder", TEXT_ENCODERS), ("tokenizer", TOKENIZERS)):
            if type(getattr(pipe, name)).__name__ not in valid:
                raise UsageError(
                    f"{name} class {type(getattr(pipe, name)).__name__!r} is not supported; valid: {', '.join(valid)}"
                )
        unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        scheduler = _scheduler_from_config(scheduler_config)
        return cls(
            unet, scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, prediction_type=prediction_type
        )

    @property
    def is_text_conditional(self) -> bool:
        return True

    @property
    def is_latent(self) -> bool:
        return True

    @property
    def max_prompt_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def count_truncated(self, prompts: list[str]) -> int:
        """How many of ``prompts`` are longer than the tokenizer's ``model_max_length`` (and will be truncated)."""
        ids = self.tokenizer(list(prompts), truncation=False).input_ids
        return sum(len(x) > self.max_prompt_length for x in ids)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states (B, L, D) for ``prompts`` (padded/truncated to ``model_max_length``)."""
        return encode_prompts(self.tokenizer, self.text_encoder, prompts, next(self.text_encoder.parameters()).device)

    def condition(self, prompt_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """The UNet condition for prompt embeddings (B, L, D)."""
        return {"encoder_hidden_states": prompt_embeds.to(self.unet.dtype)}

    def null_condition(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        states = cond["encoder_hidden_states"]
        null = self.null_prompt_embeds.to(states.dtype).expand(states.shape[0], -1, -1)
        return {"encoder_hidden_states": null}

    def decode(self, sample: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] from latents (B, C, h, w) through the VAE."""
        return decode_latents(self.vae, sample)


def load_teacher(
    path: str | os.PathLike,
    *,
    prediction_type: str | None = None,
    null_class_id: int | None = None,
) -> DiffusionTeacher:
    """A ``TextDiffusionTeacher`` for a folder/hub id whose UNet is a ``UNet2DConditionModel``, else a
    ``DiffusionTeacher``."""
    _, unet_config, _ = _read_unet_and_scheduler(path)
    if unet_config.get("_class_name") in TEXT_UNETS:
        if null_class_id is not None:
            raise UsageError(
                "null_class_id applies to class-conditional teachers; a text teacher's null is the '' prompt"
            )
        return TextDiffusionTeacher.from_pretrained(path, prediction_type=prediction_type)
    return DiffusionTeacher.from_pretrained(path, prediction_type=prediction_type, null_class_id=null_class_id)
