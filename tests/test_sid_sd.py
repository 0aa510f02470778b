"""``gendistill sid`` on a tiny Stable Diffusion teacher (built from config): prompts only, a LoRA generator, the
text-to-image pipeline folder in stock diffusers, exact resume with cached text embeddings, two processes."""

from __future__ import annotations

import importlib.util
import json
import textwrap

import numpy as np
import pytest
import torch
from conftest import run_fresh_python, save_sd_teacher
from diffusers import UNet2DConditionModel

from gendistill.cli import main
from gendistill.diffusion.sid import SiDConfig, SiDTask
from gendistill.diffusion.teacher import load_teacher
from gendistill.pipelines import BootPipeline, load_boot_pipeline

PROMPTS = ["a red cat", "a blue dog", "a cat", "red", "blue blue dog", "dog"]
FAST = ["--batch-size", "2", "--eval-every", "0", "--sample-every", "0", "--log-every", "1", "--num-eval-noises", "2"]
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")


@pytest.fixture(scope="module")
def sd_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sid-sd")
    save_sd_teacher(root / "teacher", prediction_type="v_prediction")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def _sid(sd_root, out, *extra):
    base = ["sid", "--teacher", str(sd_root / "teacher"), "--prompts", str(sd_root / "prompts.txt")]
    return [*base, "--output", str(out), *FAST, *extra]


STOCK = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "BootPipeline", type(pipe)
    images = pipe("a red cat", generator=torch.Generator().manual_seed(0), output_type="np").images
    assert not any(m == "gendistill" or m.startswith("gendistill.") for m in sys.modules), "gendistill was imported"
    np.save(sys.argv[2], images)
    """
)


@needs_peft
@pytest.mark.parametrize("objective", ["sid", "dmd"])
def test_a_lora_generator_from_prompts_exports_a_text_to_image_folder(objective, sd_root, tmp_path):
    out = tmp_path / objective
    argv = _sid(sd_root, out, "--objective", objective, "--max-steps", "3", "--lr", "1e-2", "--ema-decay", "0")
    assert main([*argv, "--lora-rank", "4", "--guidance-scale", "3"]) == 0
    pipe = load_boot_pipeline(out)
    assert (
        isinstance(pipe, BootPipeline)
        and pipe.config.student_timestep == json.loads((out / "sid.json").read_text())["input_timestep"]
    )
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())  # the adapter is fused in
    # The folder's latent is the generator's: the fused UNet equals the teacher UNet + the saved adapter.
    teacher = load_teacher(str(sd_root / "teacher"))
    task = SiDTask(teacher, SiDConfig(guidance_scale=3.0), prompts=PROMPTS)
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a red cat", "a blue dog"]
    cond = teacher.condition(teacher.encode_prompts(prompts))
    latents = pipe(prompts, latents=eps, output_type="latent").images
    unet = UNet2DConditionModel.from_pretrained(sd_root / "teacher", subfolder="unet")
    unet.load_lora_adapter(str(out / "lora"), weight_name="pytorch_lora_weights.safetensors", prefix=None)
    torch.testing.assert_close(task.generate(eps, cond, student=unet), latents, rtol=1e-4, atol=1e-4)
    assert (task.generate(eps, cond) - latents).abs().max() > 1e-4  # training moved the generator

    if objective == "sid":  # the folder is written the same way for both objectives: one fresh interpreter (~8 s)
        image = tmp_path / "image.npy"
        run_fresh_python(STOCK, out, image, cwd=tmp_path)
        expected = pipe("a red cat", generator=torch.Generator().manual_seed(0), output_type="np").images
        np.testing.assert_allclose(np.load(image), expected, atol=1e-5)


def test_resume_with_cached_embeddings_is_exact(sd_root, tmp_path):
    base = ["--lr", "1e-3", "--checkpoint-every", "2", "--cache-text-embeddings"]
    assert main(_sid(sd_root, tmp_path / "straight", *base, "--max-steps", "4")) == 0
    assert main(_sid(sd_root, tmp_path / "resumed", *base, "--max-steps", "2")) == 0
    assert main(_sid(sd_root, tmp_path / "resumed", *base, "--max-steps", "4", "--resume", "latest")) == 0
    assert (tmp_path / "resumed" / "text_embeddings.safetensors").is_file()
    a = load_boot_pipeline(tmp_path / "straight").unet.state_dict()
    b = load_boot_pipeline(tmp_path / "resumed").unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_text_teachers_need_prompts_and_pixel_teachers_refuse_them(sd_root, class_teacher_dir, tmp_path, capsys):
    teacher = str(sd_root / "teacher")
    assert main(["sid", "--teacher", teacher, "--output", str(tmp_path / "a"), *FAST]) == 2
    assert "is text-to-image: give --prompts FILE" in capsys.readouterr().err
    argv = ["sid", "--teacher", class_teacher_dir, "--prompts", str(sd_root / "prompts.txt")]
    assert main([*argv, "--output", str(tmp_path / "b"), *FAST]) == 2
    assert "--prompts was given but teacher" in capsys.readouterr().err
    argv = ["sid", "--teacher", class_teacher_dir, "--cache-text-embeddings", "--output", str(tmp_path / "c")]
    assert main([*argv, *FAST]) == 2
    assert "--cache-text-embeddings applies to text-to-image teachers only" in capsys.readouterr().err


# Two processes (accelerate launch) are tested on `gendistill boot` with cached text embeddings
# (tests/test_boot_sd_cli.py) and on `gendistill dfkd`, whose generator's loss runs through the DDP-wrapped student as
# SiD's generator loss runs through the fake score network (tests/test_dfkd_cli.py): the same core paths.
