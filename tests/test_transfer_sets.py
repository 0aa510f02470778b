"""Transfer sets drawn from a diffusion model (``--method unlabeled --method-options data=generated:FOLDER``): the
images are the pipeline's own samples for the classes it knows, reproducible from the seed, and a run on them
distills, resumes exactly and refuses bad sources before writing anything."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_teacher, tiny_unet
from diffusers import DDIMScheduler
from test_dfkd_state import straight_and_resumed

from gendistill.diffusion.sampling import teacher_sample
from gendistill.diffusion.teacher import load_teacher
from gendistill.errors import UsageError
from gendistill.training.transfer import generate_transfer_set, generated_source


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    """A tiny class-conditional DDPMPipeline teacher: 3 classes + the null class, 1 x 8 x 8."""
    return save_teacher(tmp_path_factory.mktemp("transfer") / "ddpm", num_class_embeds=4)


@pytest.fixture(scope="module")
def boot_folder(tmp_path_factory):
    """A tiny one-step BOOT student folder (3 classes + the null class, 1 x 8 x 8)."""
    from gendistill.pipelines import BootImagePipeline

    pipe = BootImagePipeline(
        tiny_unet(num_class_embeds=4, seed=1).eval(),
        DDIMScheduler(num_train_timesteps=1000, prediction_type="epsilon"),
        None,
        boot_timesteps=[999, 500, 0],
        null_class_id=3,
    )
    folder = tmp_path_factory.mktemp("transfer") / "boot"
    pipe.save_pretrained(folder)
    return str(folder)


def test_a_teacher_folder_gives_its_ddim_samples_for_every_class_in_turn(ddpm_folder):
    images, info = generate_transfer_set(ddpm_folder, num_images=7, steps=3, seed=2, batch_size=4)
    assert images.shape == (7, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert info["pipeline"] == "DDPMPipeline" and info["classes_asked"] == [0, 1, 2] and info["steps"] == 3
    # Independently: the second batch (images 4..6) from its own noise seed, classes 1, 2, 0, mapped to [0, 1].
    teacher = load_teacher(ddpm_folder)
    noise = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(2 * 1_000_003 + 4))
    expected = teacher_sample(teacher, noise, solver="ddim", num_steps=3, class_labels=torch.tensor([1, 2, 0]))
    torch.testing.assert_close(images[4:], ((expected + 1) / 2).clamp(0, 1))
    again, _ = generate_transfer_set(ddpm_folder, num_images=7, steps=3, seed=2, batch_size=4)
    other, _ = generate_transfer_set(ddpm_folder, num_images=7, steps=3, seed=3, batch_size=4)
    assert torch.equal(images, again) and not torch.equal(images, other)


def test_a_boot_student_folder_gives_its_one_step_samples(boot_folder):
    from gendistill.pipelines import load_boot_pipeline

    images, info = generate_transfer_set(boot_folder, num_images=5, steps=7, seed=0, batch_size=5)
    assert info["pipeline"] == "BootImagePipeline" and info["steps"] == 1 and info["classes_asked"] == [0, 1, 2]
    pipe = load_boot_pipeline(boot_folder)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        batch_size=5, class_labels=[0, 1, 2, 0, 1], generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    torch.testing.assert_close(images, expected.clamp(0, 1))


@pytest.mark.parametrize(("source", "method"), [("ddpm", "unlabeled"), ("boot", "unlabeled"), ("boot", "kd3")])
def test_a_run_on_a_generated_set_distills_and_resumes_exactly(
    source, method, ddpm_folder, boot_folder, bn_teacher, tmp_path
):
    folder = ddpm_folder if source == "ddpm" else boot_folder
    options = [f"data=generated:{folder}", "generated_images=12", "generated_steps=2", "crop=true"]
    straight, resumed = straight_and_resumed(bn_teacher, tmp_path, method, options)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert results["method"] == method and results["steps"] == 4
    record = results["transfer_set"]
    assert record["images"] == 12 and record["source"] == folder and record["classes_asked"] == [0, 1, 2]
    assert record["pipeline"] == ("DDPMPipeline" if source == "ddpm" else "BootImagePipeline")


def test_generated_sources_are_checked_before_anything_is_written(bn_teacher, ddpm_folder, tmp_path, capsys):
    from gendistill.cli import main

    (tmp_path / "plain").mkdir()
    out = tmp_path / "o"
    base = ["dfkd", "--method", "unlabeled", "--teacher", str(bn_teacher), "--max-steps", "1", "--output", str(out)]
    cases = [
        ("data=generated:", "names no folder"),
        (f"data=generated:{tmp_path / 'missing'}", "no such folder"),
        (f"data=generated:{tmp_path / 'plain'}", "no model_index.json; expected a diffusers pipeline folder"),
        (f"data=generated:{ddpm_folder},generated_images=0", "generated_images must be >= 1, got 0"),
    ]
    for options, message in cases:
        assert main([*base, "--method-options", options]) == 2, options
        assert message in capsys.readouterr().err, (options, message)
    assert not out.exists()
    assert generated_source("mnist5k") is None and generated_source("generated:x") == "x"


def test_the_library_takes_generated_images_only_from_its_caller():
    from gendistill.dfkd.synthesizers import get_method

    cls = get_method("unlabeled")
    with pytest.raises(UsageError, match="must be passed as images=\\(N, C, H, W\\)"):
        cls(num_classes=10, image_shape=(1, 32, 32), data="generated:somewhere")
    method = cls(num_classes=10, image_shape=(1, 32, 32), data="generated:x", images=torch.rand(5, 3, 8, 8))
    assert method.images.shape == (5, 1, 32, 32)  # resized and converted like every other source
    with pytest.raises(UsageError, match="images= is for data='generated:...'"):
        cls(num_classes=10, image_shape=(1, 32, 32), data="mnist5k", images=torch.rand(5, 1, 32, 32))
