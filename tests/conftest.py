"""Shared tiny real components, built from config under a fixed seed (no hub files)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

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


# `gendistill boot` flags for tiny CPU runs: K = 4, batch 4, no evaluation or grids, a log row every step.
BOOT_FAST = [
    "--num-intervals",
    "4",
    "--batch-size",
    "4",
    "--eval-every",
    "0",
    "--sample-every",
    "0",
    "--log-every",
    "1",
    "--num-eval-noises",
    "2",
]


class ToyTask(torch.nn.Module):
    """Training-core tests: fit y = 2x with one linear layer; ``poison`` lists the calls whose loss is NaN."""

    def __init__(self, poison=()):
        super().__init__()
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 4)
        self.poison, self.calls = set(poison), 0

    def phases(self):
        from gendistill.task import Phase

        return [Phase("model")]

    def sample_batch(self, phase, batch_size, device):
        return torch.randn(batch_size, 4, device=device)

    def forward(self, phase, x):
        self.calls += 1
        loss = ((self.model(x) - 2 * x) ** 2).mean()
        return {"loss": loss * float("nan") if self.calls in self.poison else loss}


@contextlib.contextmanager
def killed_after_checkpoint(step: int):
    """Within the block, a training run stops with ``KeyboardInterrupt`` right after writing its checkpoint of
    ``step``, as if killed there (a resumed run must then equal an uninterrupted one, learning-rate schedule
    included: the run is not told that it ends at ``step``)."""
    from gendistill.training.core import Trainer

    original = Trainer.save_checkpoint

    def save_then_die(self):
        folder = original(self)
        if self.counters.step == step:
            raise KeyboardInterrupt(f"killed after the checkpoint of step {step}")
        return folder

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt, match="killed after the checkpoint"):
            yield


def run_fresh_python(script: str, *args, cwd) -> subprocess.CompletedProcess:
    """``python -c script args`` in a fresh interpreter, as a stock-diffusers user would run it: hub offline, an
    empty HF cache, the repository checkout not on the path, one thread. Fails the test with its stderr."""
    env = {**os.environ, "HF_HOME": str(Path(cwd) / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = ""
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


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


# --- a tiny Stable Diffusion, built from config (no hub files) -------------------------------------------------------
TOKENS = list("abcdefghijklmnopqrstuvwxyz0123456789!,.'-")
MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>", "b l", "bl u", "blu e</w>"]
TEXT_LENGTH = 16  # the tiny tokenizer's model_max_length (77 in real CLIP)


def tiny_tokenizer(folder):
    """A CLIPTokenizer made from a small vocab.json/merges.txt written into ``folder``."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in TOKENS:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    for merge in MERGES:
        vocab[merge.replace(" ", "")] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=TEXT_LENGTH
    )


def tiny_sd_components(folder, *, prediction_type: str = "epsilon", seed: int = 0) -> dict:
    """UNet2DConditionModel (4x8x8 latents), AutoencoderKL (factor 2: 16x16 images), CLIPTextModel, CLIPTokenizer and
    a DDIMScheduler with SD's scaled-linear schedule. ``folder`` receives the tokenizer's vocab/merges files."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer(folder / "vocab")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TEXT_LENGTH,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def save_sd_teacher(folder, **kwargs) -> str:
    """A StableDiffusionPipeline folder of the tiny components (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    components = tiny_sd_components(folder.parent / (folder.name + "-files"), **kwargs)
    StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    ).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def sd_teacher_dir(tmp_path_factory):
    return save_sd_teacher(tmp_path_factory.mktemp("sd") / "teacher")


@pytest.fixture(scope="module")
def teacher():
    """DFKD tests: a tiny frozen WRN-16-1 classifier (4 classes, 3x32x32) with non-trivial BatchNorm running
    statistics, as a trained teacher has."""
    from gendistill.dfkd.models import build_classifier

    torch.manual_seed(0)
    model = build_classifier("wrn16_1", num_classes=4, in_channels=3, image_size=32)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 3, 32, 32) * 0.5 + 0.25)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def bn_teacher(tmp_path_factory):
    """DFKD CLI tests: a LeNet-5-BN classifier folder with non-trivial running statistics (untrained: those runs test
    plumbing, not accuracy)."""
    from gendistill.dfkd.models import build_classifier, save_classifier

    torch.manual_seed(0)
    model = build_classifier("lenet5_bn", num_classes=10, in_channels=1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(32, 1, 32, 32))
    out = tmp_path_factory.mktemp("bn_teacher") / "lenet5_bn"
    save_classifier(model.eval(), out)
    return out


@pytest.fixture
def fit_task(tmp_path):
    """DFKD tests: ``fit_task(task, steps, **recipe_overrides)`` trains ``task`` through the real training core
    (batch 8, logging every step, no evaluation, grids, checkpoints or EMA unless overridden) into
    ``tmp_path / "run"``, which it returns."""
    from gendistill.training.core import Trainer
    from gendistill.training.recipes import TrainRecipe

    def fit(task, steps: int, **overrides) -> Path:
        fields = dict(batch_size=8, eval_every=0, sample_every=0, checkpoint_every=0, log_every=1, ema_decay=0)
        recipe = TrainRecipe(output=str(tmp_path / "run"), max_steps=steps, **{**fields, **overrides})
        trainer = Trainer(task, recipe, command="test")
        trainer.fit()
        trainer.end()
        return tmp_path / "run"

    return fit


@pytest.fixture(scope="session")
def random_inception_file(tmp_path_factory):
    """A randomly initialized FID Inception-v3 of the official layout (torch-fidelity's module), saved locally."""
    from gendistill.eval.features import save_random_inception

    return save_random_inception(tmp_path_factory.mktemp("inception") / "random-inception.pth")
