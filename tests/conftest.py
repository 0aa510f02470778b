"""Shared tiny real components, built from config under a fixed seed (no hub files)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel


def pytest_configure(config):
    # The test models are tiny: one thread is faster than two and does not collapse when the machine is busy.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_unet(*, num_class_embeds: int | None = None, channels: int = 1, size: int = 8, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=num_class_embeds,
    )


def save_teacher(folder, *, prediction_type: str = "v_prediction", num_class_embeds: int | None = 4) -> str:
    """A DDPMPipeline-style teacher folder (unet/ + scheduler/ + model_index.json)."""
    unet = tiny_unet(num_class_embeds=num_class_embeds)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def class_teacher_dir(tmp_path):
    return save_teacher(tmp_path / "teacher")


@pytest.fixture
def ddim_scheduler():
    return DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
