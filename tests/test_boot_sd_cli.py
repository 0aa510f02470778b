"""``gendistill boot`` on a tiny Stable Diffusion teacher: prompts only, exported text-to-image pipeline, bad input."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_fresh_python, save_sd_teacher
from diffusers import UNet2DConditionModel

from gendistill.cli import main
from gendistill.pipelines import BootPipeline
from gendistill.training.boot import BootRecipe, build_task, run
from gendistill.training.recipes import build_recipe

PROMPTS = ["a red cat", "a blue dog", "a cat", "red", "blue blue dog", "dog", "cat", "a red dog"]
FAST = ["--num-intervals", "4", "--batch-size", "4", "--eval-every", "0", "--sample-every", "0", "--log-every", "1"]


@pytest.fixture(scope="module")
def sd_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("boot-sd")
    save_sd_teacher(root / "teacher", prediction_type="v_prediction")  # SD 2.x style
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    return root


@pytest.fixture(scope="module")
def distilled(sd_root):
    """100 CPU steps of BOOT at guidance 4 and lr 2e-3 on the prompts file, text embeddings cached up front (the
    trajectory error, 0.67 at the start, was 0.28 after them, 0.29 for the EMA: half is 0.34; at lr 1e-3, 100 steps
    left 0.34 and 200 steps 0.26)."""
    out = sd_root / "student"
    code = main(
        [
            "boot",
            "--teacher",
            str(sd_root / "teacher"),
            "--prompts",
            str(sd_root / "prompts.txt"),
            "--output",
            str(out),
            "--max-steps",
            "100",
            "--batch-size",
            "16",
            "--num-intervals",
            "8",
            "--lr",
            "2e-3",
            "--guidance-scale",
            "4",
            "--cache-text-embeddings",
            "--save-teacher",
            "--num-eval-noises",
            "8",
            "--eval-every",
            "100",
            "--checkpoint-every",
            "0",
            "--sample-every",
            "0",
            "--log-every",
            "50",
        ]
    )
    assert code == 0
    return out


@pytest.mark.slow
def test_sd_boot_halves_trajectory_error(distilled):
    results = json.loads((distilled / "results.json").read_text())
    assert results["steps"] == 100
    assert results["trajectory_error"] <= 0.5 * results["initial_trajectory_error"], results
    assert results["ema/trajectory_error"] <= 0.5 * results["initial_trajectory_error"], results
    index = json.loads((distilled / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_boot", "BootPipeline"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"] and index["vae"][1] == "AutoencoderKL"
    assert index["guidance_scale"] == 4.0 and index["guidance_range"] is None
    assert (distilled / "text_embeddings.safetensors").is_file()
    assert (distilled / "samples" / "step_000100.png").is_file()  # teacher vs student, decoded by the VAE


@pytest.mark.slow
def test_sd_student_prompt_to_image_same_seed_same_image(distilled):
    pipe = BootPipeline.from_pretrained(distilled)
    pipe.set_progress_bar_config(disable=True)
    first = pipe("a red cat", generator=torch.Generator().manual_seed(0), output_type="np").images
    again = pipe("a red cat", generator=torch.Generator().manual_seed(0), output_type="np").images
    other = pipe("a red cat", generator=torch.Generator().manual_seed(1), output_type="np").images
    assert first.shape == (1, 16, 16, 3) and np.array_equal(first, again) and not np.array_equal(first, other)
    refined = pipe("a red cat", generator=torch.Generator().manual_seed(0), refine_steps=2, output_type="np").images
    assert refined.shape == (1, 16, 16, 3) and not np.array_equal(first, refined)


STOCK_LOAD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "BootPipeline", type(pipe)
    runs = [pipe("a red cat", generator=torch.Generator().manual_seed(0), output_type="np").images for _ in range(2)]
    assert runs[0].shape == (1, 16, 16, 3), runs[0].shape
    assert np.array_equal(runs[0], runs[1])
    assert not any(m == "gendistill" or m.startswith("gendistill.") for m in sys.modules), "gendistill was imported"
    np.save(sys.argv[2], runs[0])
    """
)


@pytest.mark.slow
def test_sd_student_loads_in_stock_diffusers_fresh_process(distilled, tmp_path):
    run_fresh_python(STOCK_LOAD, distilled, tmp_path / "image.npy", cwd=tmp_path)
    pipe = BootPipeline.from_pretrained(distilled)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a red cat", generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_allclose(np.load(tmp_path / "image.npy"), expected, atol=1e-5)


def _short_run(sd_root, name, *extra):
    """A few steps without EMA (the exported student is then the live one); returns (task, output folder)."""
    out = sd_root / name
    values = {
        "teacher": str(sd_root / "teacher"),
        "prompts": str(sd_root / "prompts.txt"),
        "output": str(out),
        "max_steps": 15,
        "batch_size": 4,
        "num_intervals": 4,
        "lr": 1e-2,
        "ema_decay": 0,
        "eval_every": 0,
        "sample_every": 0,
        "num_eval_noises": 2,
        **dict(extra),
    }
    recipe = build_recipe(BootRecipe, values, method="boot")
    task = build_task(recipe)
    run(recipe, task)
    return task, out


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")
def test_lora_student_round_trip(sd_root):
    task, out = _short_run(sd_root, "lora", ("lora_rank", 4), ("guidance_scale", 3.0))
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a red cat", "a blue dog"]
    cond = task.teacher.condition(task.teacher.encode_prompts(prompts))
    live = task.one_step(eps, cond)
    assert (live - task.one_step(eps, cond, student=task.teacher.unet)).abs().max() > 1e-4  # LoRA moved the student

    # The folder's UNet has the adapter fused in: no peft needed to sample, same outputs as the live LoRA student.
    pipe = BootPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())
    latents = pipe(prompts, latents=eps, output_type="latent").images
    torch.testing.assert_close(latents, live, rtol=1e-4, atol=1e-4)

    # The adapter alone (lora/) on the teacher's UNet gives the same student.
    weights = out / "lora" / "pytorch_lora_weights.safetensors"
    assert (
        weights.is_file()
        and weights.stat().st_size < 0.5 * (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    )
    unet = UNet2DConditionModel.from_pretrained(sd_root / "teacher", subfolder="unet")
    unet.load_lora_adapter(str(out / "lora"), weight_name="pytorch_lora_weights.safetensors", prefix=None)
    torch.testing.assert_close(task.one_step(eps, cond, student=unet), live, rtol=1e-4, atol=1e-4)


def test_guidance_range_student_serves_every_scale(sd_root):
    _, out = _short_run(sd_root, "range", ("guidance_range", [2.0, 8.0]), ("guidance_embedding_dim", 16))
    index = json.loads((out / "model_index.json").read_text())
    assert index["guidance_range"] == [2.0, 8.0] and index["guidance_scale"] == 7.5  # the default, inside the range
    pipe = BootPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.time_cond_proj_dim == 16

    def image(scale):
        return pipe("a red cat", guidance_scale=scale, generator=torch.Generator().manual_seed(0), output_type="np")

    low, high = image(2.0).images, image(8.0).images
    assert np.abs(low - high).max() > 1e-4
    assert np.array_equal(high, image(8.0).images)
    with pytest.raises(ValueError, match=r"2\.0.*8\.0"):
        image(9.0)


def test_over_long_prompts_warn_once(sd_root, tmp_path, caplog):
    prompts = tmp_path / "long.txt"
    prompts.write_text("a red cat\n" + "a red cat " * 20 + "\n" + "blue dog " * 30 + "\n")
    recipe = BootRecipe(teacher=str(sd_root / "teacher"), prompts=str(prompts), output=str(tmp_path / "o"))
    with caplog.at_level(logging.WARNING, logger="gendistill.training.boot"):
        task = build_task(recipe)
    warnings = [r.getMessage() for r in caplog.records if r.name == "gendistill.training.boot"]
    assert warnings == ["2 of 3 prompts are longer than the tokenizer's 16 tokens and are truncated"]
    assert task.config.guidance_scale == 7.5  # the SD default
    batch = task.sample_batch("student", 3, torch.device("cpu"))
    assert batch["encoder_hidden_states"].shape == (3, 16, 32)


def _fails(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    return err


def test_sd_bad_input(sd_root, tmp_path, capsys, monkeypatch):
    teacher, prompts = str(sd_root / "teacher"), str(sd_root / "prompts.txt")
    base = ["boot", "--teacher", teacher, "--output", str(tmp_path / "o"), *FAST]
    _fails(capsys, [*base, "--prompts", str(tmp_path / "missing.txt")], "missing.txt' does not exist")
    (tmp_path / "empty.txt").write_text("\n   \n")
    _fails(capsys, [*base, "--prompts", str(tmp_path / "empty.txt")], "has no prompts (blank lines are skipped)")
    _fails(capsys, base, "is text-to-image: give --prompts FILE")
    _fails(capsys, [*base, "--prompts", prompts, "--guidance-range", "8,2"], "0 <= w_min < w_max, got [8.0, 2.0]")
    _fails(
        capsys,
        [*base, "--prompts", prompts, "--guidance-range", "2,8", "--guidance-scale", "9"],
        "guidance_scale 9.0 (the default scale) is outside the guidance_range [2.0, 8.0]",
    )
    _fails(capsys, [*base, "--prompts", prompts, "--attention", "flash"], "attention 'flash' is not valid")
    if importlib.util.find_spec("xformers") is None:
        _fails(capsys, [*base, "--prompts", prompts, "--attention", "xformers"], "xformers is not installed")
    if importlib.util.find_spec("bitsandbytes") is None:
        _fails(capsys, [*base, "--prompts", prompts, "--optimizer", "adamw8bit"], "needs bitsandbytes")

    no_encoder = Path(save_sd_teacher(tmp_path / "no-encoder"))
    for sub in ("text_encoder", "tokenizer"):
        for f in (no_encoder / sub).iterdir():
            f.unlink()
        (no_encoder / sub).rmdir()
    _fails(
        capsys,
        ["boot", "--teacher", str(no_encoder), "--prompts", prompts, "--output", str(tmp_path / "o2"), *FAST],
        "has no text_encoder, tokenizer subfolder",
    )

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real_find_spec(name, *a)
    )
    _fails(capsys, [*base, "--prompts", prompts, "--lora-rank", "4"], "lora_rank=4 needs peft, which is not installed")
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_pixel_teacher_refuses_text_options(class_teacher_dir, sd_root, tmp_path, capsys):
    base = ["boot", "--teacher", class_teacher_dir, "--output", str(tmp_path / "o"), *FAST]
    _fails(capsys, [*base, "--prompts", str(sd_root / "prompts.txt")], "is not text-to-image")
    _fails(capsys, [*base, "--guidance-range", "1,3"], "a guidance range needs a UNet that takes timestep_cond")
    _fails(capsys, [*base, "--cache-text-embeddings"], "applies to text-to-image teachers only")


def test_shipped_sd_recipe_parses():
    from gendistill.training.recipes import load_yaml

    values = load_yaml(Path(__file__).resolve().parents[1] / "training" / "recipes" / "boot_sd15.yaml")
    recipe = build_recipe(BootRecipe, {**values, "teacher": "t", "prompts": "p.txt"}, method="boot")
    assert recipe.guidance_scale == 7.5 and recipe.cache_text_embeddings and recipe.lr == 1e-5


@pytest.mark.slow
def test_sample_command_with_prompts(distilled, tmp_path, capsys):
    from PIL import Image

    grid = tmp_path / "grid.png"
    argv = ["sample", "--model", str(distilled), "--output", str(grid), "--num-images", "4", "--nrow", "2"]
    assert main([*argv, "--prompt", "a red cat", "--prompt", "a blue dog"]) == 0
    assert Image.open(grid).size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # torchvision's grid: 2 px padding
    _fails(capsys, argv, "this student is text-to-image: give --prompt TEXT")
    _fails(capsys, [*argv, "--prompt", "cat", "--class-labels", "1"], "--class-labels applies to class-conditional")
    _fails(capsys, [*argv, "--prompt", "cat", "--guidance-scale", "5"], "fixed")


def test_broken_xformers_is_refused_up_front(sd_root, tmp_path, capsys, monkeypatch):
    """An xformers whose CUDA extension does not load (xformers 0.0.35 with torch 2.11) stops the run before any
    loading, with the reason, instead of crashing mid-run."""
    fake = tmp_path / "site" / "xformers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "ops.py").write_text("raise ImportError('_C.so: undefined symbol: _ZN3c10fake')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    argv = ["boot", "--teacher", str(sd_root / "teacher"), "--prompts", str(sd_root / "prompts.txt")]
    err = _fails(capsys, [*argv, "--output", str(tmp_path / "o"), "--attention", "xformers", *FAST], "xformers is")
    assert "its CUDA kernels do not run with torch" in err and "undefined symbol" in err and "--attention sdpa" in err


def test_resume_with_cached_embeddings_is_exact(sd_root, tmp_path):
    from safetensors.torch import load_file

    def boot(out, *extra):
        argv = ["boot", "--teacher", str(sd_root / "teacher"), "--prompts", str(sd_root / "prompts.txt")]
        assert main([*argv, "--output", str(out), *FAST, "--cache-text-embeddings", "--ema-decay", "0", *extra]) == 0

    boot(tmp_path / "straight", "--max-steps", "6")
    boot(tmp_path / "resumed", "--max-steps", "3")
    cache = tmp_path / "resumed" / "text_embeddings.safetensors"
    stamp = cache.stat().st_mtime_ns
    boot(tmp_path / "resumed", "--max-steps", "6", "--resume", "latest")
    assert cache.stat().st_mtime_ns == stamp  # reused, not re-encoded
    weights = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "straight" / weights), load_file(tmp_path / "resumed" / weights)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_accelerate_launch_two_processes_with_cached_embeddings(sd_root, tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    env.pop("GENDISTILL_DEBUG", None)
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines"]
    launch += ["1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gendistill", "boot"]
    args = ["--teacher", str(sd_root / "teacher"), "--prompts", str(sd_root / "prompts.txt"), "--output", str(out)]
    args += [*FAST, "--max-steps", "3", "--cache-text-embeddings", "--guidance-range", "2,8"]
    args += ["--checkpoint-every", "2"]
    result = subprocess.run([*launch, *args], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "text_embeddings.safetensors").is_file()
    # (also the pixel BOOT command's DDP test: one checkpoint per checkpoint step, written once, no export leftovers)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_0", "checkpoint_1"]
    assert not (out / ".export-tmp").exists()
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and any(r.get("images_per_s", 0) > 0 for r in rows)
    pipe = BootPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(["a cat", "a dog"], guidance_scale=5.0, output_type="np").images.shape == (2, 16, 16, 3)


@pytest.mark.gpu
def test_cuda_run_keeps_teacher_in_bf16_and_student_in_fp32(sd_root, tmp_path):
    recipe = build_recipe(
        BootRecipe,
        {
            "teacher": str(sd_root / "teacher"),
            "prompts": str(sd_root / "prompts.txt"),
            "output": str(tmp_path / "cuda"),
            "max_steps": 3,
            "batch_size": 4,
            "num_intervals": 4,
            "eval_every": 0,
            "sample_every": 0,
            "cache_text_embeddings": True,
        },
        method="boot",
    )
    task = build_task(recipe)
    summary = run(recipe, task)
    assert summary["steps"] == 3 and math.isfinite(summary["trajectory_error"])
    assert task.teacher.unet.dtype == task.teacher.vae.dtype == torch.bfloat16
    assert next(task.teacher.unet.parameters()).is_cuda
    assert all(p.dtype == torch.float32 for p in task.student.parameters())
    assert not next(task.teacher.text_encoder.parameters()).is_cuda  # off the GPU once the prompts are cached
