"""Every bad user file is one error line naming it, with exit code 2: truncated weights, malformed YAML, truncated
archives, decompression bombs, sizes that cannot fit in memory. Each case runs through ``gendistill.cli.main``."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import save_teacher, tiny_unet
from diffusers import DDIMScheduler
from PIL import Image
from safetensors.torch import save_file
from torchvision.utils import save_image

from gendistill.cli import main
from gendistill.dfkd.models import build_classifier, save_classifier
from gendistill.pipelines import BootImagePipeline

QUICK = ["--eval-every", "0", "--sample-every", "0", "--checkpoint-every", "0", "--log-every", "1"]
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def fails(capsys, argv: list[str], *names: str) -> str:
    """Run the CLI; assert exit code 2 and a single error line on stderr (besides progress bars of loaders) that
    contains every one of ``names``."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not re.search(r"\d+/\d+ \[", line)]  # tqdm bars of transformers
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"gendistill {argv[0]}: error: "), err
    for name in names:
        assert str(name) in lines[0], err
    return lines[0]


def truncate(path) -> None:
    """Cut a file to half its bytes, as an interrupted copy or download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def classifier_dir(teacher, tmp_path_factory):
    """A saved classifier folder (the WRN-16-1 teacher of conftest: 4 classes, 3x32x32)."""
    folder = tmp_path_factory.mktemp("classifier") / "wrn"
    save_classifier(teacher, folder)
    return folder


@pytest.fixture
def truncated_classifier(classifier_dir, tmp_path):
    folder = tmp_path / "truncated-classifier"
    shutil.copytree(classifier_dir, folder)
    truncate(folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A tiny class-conditional BOOT student folder with its teacher UNet (8x8 RGB images, K = 3)."""
    pipe = BootImagePipeline(
        tiny_unet(num_class_embeds=4, channels=3, seed=0),
        DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction"),
        tiny_unet(num_class_embeds=4, channels=3, seed=1),
        boot_timesteps=[750, 500, 250, 0],
        null_class_id=3,
        guidance_scale=2.0,
    )
    folder = tmp_path_factory.mktemp("student") / "boot"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 60 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


# --- 1. truncated safetensors ---------------------------------------------------------------------------------------
def test_truncated_classifier_teacher_of_dfkd(truncated_classifier, tmp_path, capsys):
    argv = ["dfkd", "--teacher", truncated_classifier, "--output", tmp_path / "o", "--iterations", "1", *QUICK]
    fails(capsys, argv, truncated_classifier / "model.safetensors", "not a readable safetensors file")


def test_truncated_classifier_in_eval_accuracy(truncated_classifier, tmp_path, capsys):
    argv = ["eval", "accuracy", "--student", truncated_classifier, "--output", tmp_path / "o", "--device", "cpu"]
    fails(capsys, argv, truncated_classifier / "model.safetensors", "not a readable safetensors file")


def test_truncated_classifier_as_feature_extractor_and_agreement_classifier(
    truncated_classifier, student_dir, image_folder, tmp_path, capsys
):
    base = ["eval", "fid", "--real", image_folder, "--output", tmp_path / "o", "--device", "cpu"]
    weights = truncated_classifier / "model.safetensors"
    fails(capsys, [*base, "--fake", image_folder, "--feature-extractor", truncated_classifier], weights)
    fails(capsys, [*base, "--fake", student_dir, "--classifier", truncated_classifier], weights)


def test_truncated_inception_weights(image_folder, tmp_path, capsys):
    weights = tmp_path / "inception.safetensors"
    save_file({"conv.weight": torch.zeros(64, 64)}, weights)
    truncate(weights)
    argv = ["eval", "fid", "--fake", image_folder, "--real", image_folder, "--output", tmp_path / "o"]
    fails(capsys, [*argv, "--device", "cpu", "--inception-weights", weights], weights, "Inception weights")


def test_truncated_diffusion_teacher_of_boot(tmp_path, capsys):
    teacher = save_teacher(tmp_path / "teacher")
    truncate(tmp_path / "teacher" / UNET_WEIGHTS)
    argv = ["boot", "--teacher", teacher, "--output", tmp_path / "o", "--max-steps", "1", *QUICK]
    fails(capsys, argv, teacher, "unet/", "diffusion_pytorch_model.safetensors")
    assert not (tmp_path / "o").exists()


def test_truncated_boot_student_in_sample_and_eval(student_dir, image_folder, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(student_dir, broken)
    truncate(broken / UNET_WEIGHTS)
    fails(capsys, ["sample", "--model", broken, "--output", tmp_path / "grid.png"], broken)
    argv = ["eval", "fid", "--fake", broken, "--real", image_folder, "--output", tmp_path / "o", "--device", "cpu"]
    fails(capsys, argv, broken)
    # a separate teacher folder whose UNet is truncated
    teacher = save_teacher(tmp_path / "teacher")
    truncate(tmp_path / "teacher" / UNET_WEIGHTS)
    argv = ["eval", "fid", "--fake", student_dir, "--teacher", teacher, "--real", image_folder]
    fails(capsys, [*argv, "--output", tmp_path / "o", "--device", "cpu"], teacher, "UNet")


def test_truncated_prompt_embeddings_cache_on_resume(sd_teacher_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    argv = ["boot", "--teacher", sd_teacher_dir, "--prompts", prompts, "--output", tmp_path / "o"]
    argv += ["--num-intervals", "2", "--batch-size", "2", *QUICK, "--cache-text-embeddings"]
    assert main([str(a) for a in argv] + ["--max-steps", "1"]) == 0
    cache = tmp_path / "o" / "text_embeddings.safetensors"
    truncate(cache)
    fails(capsys, [*argv, "--max-steps", "2", "--resume", "latest"], cache, "not a readable safetensors file")


# --- 2. malformed YAML ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["boot", "dfkd"])
def test_malformed_yaml_config(command, tmp_path, capsys):
    config = tmp_path / "recipe.yaml"
    config.write_text("max_steps: 10\nlr: [1e-3\nbatch_size: 4\n")
    err = fails(capsys, [command, "--config", config, "--output", tmp_path / "o"], config, "not valid YAML")
    assert "line" in err


# --- 3. truncated .npz ----------------------------------------------------------------------------------------------
def test_truncated_fid_statistics(classifier_dir, image_folder, tmp_path, capsys):
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(4), sigma=np.eye(4), count=np.array(10), extractor=np.array("x"), resize=np.array("y"))
    truncate(stats)
    argv = ["eval", "fid", "--fake", image_folder, "--real", stats, "--feature-extractor", classifier_dir]
    fails(capsys, [*argv, "--output", tmp_path / "o", "--device", "cpu"], stats, "truncated")


def test_truncated_classification_npz(classifier_dir, tmp_path, capsys):
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(data, images=rng.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8), labels=np.arange(40) % 4)
    truncate(data)
    argv = ["dfkd", "--teacher", classifier_dir, "--eval-data", data, "--output", tmp_path / "o", "--iterations", "1"]
    fails(capsys, [*argv, *QUICK], data, "truncated")
    argv = ["eval", "accuracy", "--student", classifier_dir, "--data", data, "--output", tmp_path / "a"]
    fails(capsys, [*argv, "--device", "cpu"], data, "truncated")


# --- 4. decompression bombs -----------------------------------------------------------------------------------------
@pytest.fixture
def bomb_folder(tmp_path, monkeypatch):
    """A folder with one good image and one over PIL's pixel limit (lowered here so the file stays tiny)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    folder = tmp_path / "bombs" / "a"  # a class subfolder, for the classification data loader
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "0-good.png")
    Image.new("L", (100, 100)).save(folder / "1-bomb.png")  # 10,000 pixels: over twice the limit
    return folder.parent


def test_decompression_bomb_in_eval_image_folder(bomb_folder, classifier_dir, tmp_path, capsys):
    argv = ["eval", "fid", "--fake", bomb_folder, "--real", bomb_folder, "--feature-extractor", classifier_dir]
    fails(
        capsys, [*argv, "--output", tmp_path / "o", "--device", "cpu"], bomb_folder / "a" / "1-bomb.png", "too large"
    )


def test_decompression_bomb_in_classification_folder(bomb_folder, classifier_dir, tmp_path, capsys):
    argv = ["eval", "accuracy", "--student", classifier_dir, "--data", bomb_folder, "--output", tmp_path / "o"]
    fails(capsys, [*argv, "--device", "cpu"], bomb_folder / "a" / "1-bomb.png", "too large")


# --- 5. gendistill sample: grid sizes, memory, batches and folders -------------------------------------------------
def test_sample_nrow_zero(student_dir, tmp_path, capsys):
    fails(capsys, ["sample", "--model", student_dir, "--output", tmp_path / "g.png", "--nrow", "0"], "--nrow", "0")
    assert not (tmp_path / "g.png").exists()


def test_sample_grid_too_large_for_memory(student_dir, tmp_path, capsys):
    argv = ["sample", "--model", student_dir, "--output", tmp_path / "g.png", "--num-images", str(10**12)]
    fails(capsys, argv, "--num-images", str(10**12), "memory")
    assert not (tmp_path / "g.png").exists()


def test_sample_grid_is_one_pipeline_call_and_batches_only_round(student_dir, tmp_path, capsys):
    # Up to --batch-size images the grid is exactly one pipeline call with a seeded generator (the old behaviour).
    pipe = BootImagePipeline.from_pretrained(student_dir)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=6, generator=torch.Generator().manual_seed(3), output_type="pt").images
    save_image(images, tmp_path / "reference.png", nrow=4)
    argv = ["sample", "--model", student_dir, "--num-images", "6", "--nrow", "4", "--seed", "3"]
    assert main([*map(str, argv), "--output", str(tmp_path / "default.png")]) == 0
    assert (tmp_path / "default.png").read_bytes() == (tmp_path / "reference.png").read_bytes()
    # In batches: the same noises and classes; batched kernels may round a rare pixel differently.
    assert main([*map(str, argv), "--output", str(tmp_path / "batched.png"), "--batch-size", "4"]) == 0
    reference = np.asarray(Image.open(tmp_path / "reference.png"), dtype=np.int16)
    batched = np.asarray(Image.open(tmp_path / "batched.png"), dtype=np.int16)
    assert reference.shape == batched.shape and np.abs(reference - batched).max() <= 1


def test_sample_into_a_folder_writes_one_png_per_image(student_dir, tmp_path, capsys):
    argv = ["sample", "--model", str(student_dir), "--num-images", "5", "--class-labels", "0,2"]
    assert main([*argv, "--output", str(tmp_path / "a"), "--batch-size", "2"]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [f"{i:05d}.png" for i in range(5)]
    # Each image has its own noise: neither the batch size nor the number of images changes it.
    assert main([*argv[:4], "3", *argv[5:], "--output", str(tmp_path / "b"), "--batch-size", "3"]) == 0
    for name in sorted(p.name for p in (tmp_path / "b").iterdir()):
        a = np.asarray(Image.open(tmp_path / "a" / name), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "b" / name), dtype=np.int16)
        assert a.shape == (8, 8, 3) and np.abs(a - b).max() <= 1
    fails(capsys, [*argv, "--output", tmp_path / "a"], "already holds PNG images")
    fails(capsys, [*argv, "--output", tmp_path / "grid.jpg"], "--output must be a .png file")


# --- 6. classifier sizes that cannot be allocated -------------------------------------------------------------------
def test_classifier_config_with_huge_num_classes(classifier_dir, tmp_path, capsys):
    folder = tmp_path / "huge"
    shutil.copytree(classifier_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_classes": 10**10}))
    argv = ["dfkd", "--teacher", folder, "--output", tmp_path / "o", "--iterations", "1", *QUICK]
    fails(capsys, argv, folder / "config.json", "num_classes=10000000000", "memory")
    argv = ["eval", "accuracy", "--student", folder, "--output", tmp_path / "a", "--device", "cpu"]
    fails(capsys, argv, "num_classes=10000000000", "memory")


def test_build_classifier_refuses_huge_num_classes():
    with pytest.raises(ValueError, match="num_classes=10000000000.*memory"):
        build_classifier("lenet5", num_classes=10**10, in_channels=1)
