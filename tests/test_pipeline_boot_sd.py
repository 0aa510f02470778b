"""Tests for ``BootPipeline`` in pipelines/pipeline_boot.py: the text-to-image (latent) BOOT sampler on a tiny Stable
Diffusion, its guided teacher refinement, guidance-range students, and its two loaders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TEXT_LENGTH, tiny_sd_components
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding

from gendistill.pipelines import BootPipeline
from gendistill.pipelines.pipeline_boot import guidance_embedding

GRID = [751, 501, 251, 1]  # = the tiny SD scheduler's set_timesteps(4) (steps_offset=1), so diffusers walks it too
PROMPTS = ["a red cat", "a blue dog"]


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    # Tiny UNets run ~50x slower with several intra-op threads on a busy CPU; restore the setting afterwards.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The tiny SD (teacher UNet, VAE, CLIP text encoder and tokenizer, DDIM scheduler), a student UNet with other
    weights, and a guidance-range student (time_cond_proj_dim=16, random non-zero cond_proj)."""
    root = tmp_path_factory.mktemp("sd-parts")
    teacher = tiny_sd_components(root / "teacher", seed=0)
    student = tiny_sd_components(root / "student", seed=1)["unet"]
    # Without the private keys: from_config would reset the keys in "_use_default_values" (time_cond_proj_dim too).
    settings = {k: v for k, v in student.config.items() if not k.startswith("_")}
    torch.manual_seed(2)
    range_student = UNet2DConditionModel.from_config({**settings, "time_cond_proj_dim": 16})
    assert range_student.config.time_cond_proj_dim == 16
    assert range_student.time_embedding.cond_proj.weight.abs().min() > 0
    parts = {**teacher, "teacher_unet": teacher["unet"], "unet": student, "range_unet": range_student}
    for module in ("vae", "text_encoder", "unet", "teacher_unet", "range_unet"):
        parts[module].eval()
    return parts


def make_pipe(parts, prediction_type="epsilon", *, teacher=True, unet="unet", **config) -> BootPipeline:
    if unet == "range_unet":
        config.setdefault("guidance_range", [1.0, 8.0])
    pipe = BootPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=parts[unet],
        scheduler=DDIMScheduler.from_config(parts["scheduler"].config, prediction_type=prediction_type),
        teacher_unet=parts["teacher_unet"] if teacher else None,
        **{"boot_timesteps": GRID, **config},
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(batch_size=2, seed=123, size=8):
    return torch.randn(batch_size, 4, size, size, generator=torch.Generator().manual_seed(seed))


def coefficients(scheduler, t):
    ac = float(scheduler.alphas_cumprod[t])
    return ac**0.5, (1 - ac) ** 0.5


def signal_from_native(u, x, alpha, sigma, prediction_type):
    if prediction_type == "epsilon":
        return (x - sigma * u) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma * u
    return u


def embed(parts, prompts):
    ids = parts["tokenizer"](
        prompts, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    return parts["text_encoder"](ids).last_hidden_state


def manual_student_signal(pipe, parts, prompts, eps, t):
    u = pipe.unet(eps, torch.full((eps.shape[0],), t), encoder_hidden_states=embed(parts, prompts)).sample
    alpha, sigma = coefficients(pipe.scheduler, GRID[0])
    return signal_from_native(u, eps, alpha, sigma, pipe.scheduler.config.prediction_type)


def decode(parts, latents):
    image = parts["vae"].decode(latents / parts["vae"].config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1)


def reference_ddim(pipe, parts, prompts, eps, refine_steps, w):
    """Student jump to t_{K-k} (x = eps at t_0), then diffusers' own guided DDIM steps (eta=0) to t_K, as a signal."""
    reference = DDIMScheduler.from_config(pipe.scheduler.config)
    reference.set_timesteps(len(GRID))
    assert reference.timesteps.tolist() == GRID
    start = len(GRID) - 1 - refine_steps
    if start == 0:
        x = eps
    else:
        alpha, sigma = coefficients(pipe.scheduler, GRID[start])
        x = alpha * manual_student_signal(pipe, parts, prompts, eps, GRID[start]) + sigma * eps
    cond, null = embed(parts, prompts), embed(parts, [""] * len(prompts))
    for t in GRID[start:-1]:
        ts = torch.full((eps.shape[0],), t)
        u_cond = parts["teacher_unet"](x, ts, encoder_hidden_states=cond).sample
        u_null = parts["teacher_unet"](x, ts, encoder_hidden_states=null).sample
        x = reference.step(u_null + w * (u_cond - u_null), t, x, eta=0.0).prev_sample
    alpha, sigma = coefficients(pipe.scheduler, GRID[-1])
    return (x - sigma * eps) / alpha


# --- math --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_one_step_matches_manual_computation(parts, prediction_type):
    pipe = make_pipe(parts, prediction_type, teacher=False)
    eps = noise()
    with torch.no_grad():
        y = manual_student_signal(pipe, parts, PROMPTS, eps, GRID[-1])
        expected = decode(parts, y)
    torch.testing.assert_close(pipe(PROMPTS, latents=eps, output_type="pt").images, expected, atol=1e-5, rtol=1e-5)
    latents = pipe(PROMPTS, latents=eps, output_type="latent").images
    assert latents.shape == (2, 4, 8, 8)
    torch.testing.assert_close(latents, y, atol=1e-5, rtol=1e-5)
    np_images = pipe(PROMPTS, latents=eps, output_type="np").images
    assert np_images.shape == (2, 16, 16, 3) and np_images.dtype == np.float32
    np.testing.assert_allclose(np_images, expected.permute(0, 2, 3, 1).numpy(), atol=1e-5)


@pytest.mark.parametrize("refine_steps", [1, 3])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_refinement_matches_diffusers_guided_ddim(parts, prediction_type, refine_steps):
    # refine_steps = K = 3 is the teacher's own 3-step guided DDIM from x_{t_0} = eps: the student is not used.
    pipe = make_pipe(parts, prediction_type, guidance_scale=3.0)
    eps = noise()
    with torch.no_grad():
        expected = reference_ddim(pipe, parts, PROMPTS, eps, refine_steps, w=3.0)
    out = pipe(PROMPTS, latents=eps, refine_steps=refine_steps, output_type="latent").images
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


# --- call arguments ----------------------------------------------------------------------------------------------
def test_outputs_sizes_and_determinism(parts):
    pipe = make_pipe(parts, teacher=False)
    a = pipe("a red cat", generator=torch.Generator().manual_seed(7), output_type="np").images
    b = pipe("a red cat", generator=torch.Generator().manual_seed(7), output_type="np").images
    c = pipe("a red cat", generator=torch.Generator().manual_seed(8), output_type="np").images
    assert a.shape == (1, 16, 16, 3) and 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    pil = pipe("a red cat").images
    assert len(pil) == 1 and pil[0].size == (16, 16)
    (pt,) = pipe("a red cat", output_type="pt", return_dict=False)
    assert pt.shape == (1, 3, 16, 16)

    # num_images_per_prompt: each prompt's images are adjacent, from their own noises.
    eps = noise(4)
    four = pipe(PROMPTS, num_images_per_prompt=2, latents=eps, output_type="latent").images
    assert four.shape == (4, 4, 8, 8)
    torch.testing.assert_close(
        four[2:], pipe("a blue dog", num_images_per_prompt=2, latents=eps[2:], output_type="latent").images
    )
    assert pipe(PROMPTS, num_images_per_prompt=2, output_type="np").images.shape == (4, 16, 16, 3)

    # Other sizes: latents of (height / 2, width / 2).
    assert pipe("a red cat", height=24, width=24, output_type="latent").images.shape == (1, 4, 12, 12)
    assert pipe("a red cat", height=24, width=24, output_type="np").images.shape == (1, 24, 24, 3)
    assert pipe("a red cat", height=24, width=16, output_type="np").images.shape == (1, 24, 16, 3)


def test_guidance_range_student(parts):
    pipe = make_pipe(parts, unet="range_unet", guidance_scale=4.0)
    assert pipe.config.guidance_range == [1.0, 8.0] and pipe.config.guidance_scale == 4.0

    def image(scale, seed=0):
        return pipe(
            "a red cat", guidance_scale=scale, generator=torch.Generator().manual_seed(seed), output_type="latent"
        ).images

    low, high = image(1.0), image(8.0)
    assert (low - high).abs().max() > 1e-4
    torch.testing.assert_close(image(8.0), high, atol=0, rtol=0)
    torch.testing.assert_close(image(None), image(4.0), atol=0, rtol=0)  # the default scale
    with pytest.raises(
        ValueError, match=r"guidance_scale=9\.0 is outside this student's guidance_range \[1\.0, 8\.0\]"
    ):
        image(9.0)
    # One step: w reaches the student through timestep_cond as the sinusoidal embedding of 1000 w (as in LCM).
    eps = noise()
    w_emb = get_timestep_embedding(torch.tensor([2.0, 2.0]) * 1000, 16, flip_sin_to_cos=False, downscale_freq_shift=1)
    torch.testing.assert_close(guidance_embedding(torch.tensor([2.0, 2.0]), 16), w_emb, atol=0, rtol=0)
    with torch.no_grad():
        timesteps, cond = torch.full((2,), GRID[-1]), embed(parts, PROMPTS)
        u = parts["range_unet"](eps, timesteps, encoder_hidden_states=cond, timestep_cond=w_emb).sample
    alpha, sigma = coefficients(pipe.scheduler, GRID[0])
    out = pipe(PROMPTS, latents=eps, guidance_scale=2.0, output_type="latent").images
    torch.testing.assert_close(out, (eps - sigma * u) / alpha, atol=1e-5, rtol=1e-5)
    # Refinement guides the teacher with the call's scale.
    eps = noise(1)
    with torch.no_grad():
        expected = reference_ddim(pipe, parts, ["a red cat"], eps, 3, w=2.0)
    out = pipe("a red cat", latents=eps, guidance_scale=2.0, refine_steps=3, output_type="latent").images
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_decoding_applies_the_vae_scaling_and_shift_factors(parts):
    settings = {k: v for k, v in parts["vae"].config.items() if not k.startswith("_")}
    vae = AutoencoderKL.from_config({**settings, "scaling_factor": 0.5, "shift_factor": 0.25}).eval()
    vae.load_state_dict(parts["vae"].state_dict())
    pipe = BootPipeline(
        vae, parts["text_encoder"], parts["tokenizer"], parts["unet"], parts["scheduler"], boot_timesteps=GRID
    )
    pipe.set_progress_bar_config(disable=True)
    eps = noise(1)
    latents = pipe("a red cat", latents=eps, output_type="latent").images
    with torch.no_grad():
        expected = (vae.decode(latents / 0.5 + 0.25).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(pipe("a red cat", latents=eps, output_type="pt").images, expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"height": 15}, "height=15 must be a positive multiple of the VAE scale factor 2"),
        ({"width": 0}, "width=0 must be a positive multiple of the VAE scale factor 2"),
        ({"guidance_scale": 5.0}, "distilled at the fixed guidance scale 7.5; changing it needs .* guidance_range"),
        ({"prompt": []}, "prompt must be a str or a non-empty list of str"),
        ({"prompt": ["a cat", 3]}, "prompt must be a str or a non-empty list of str"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt must be a positive int"),
        ({"output_type": "jpg"}, "unsupported output_type 'jpg'; valid: pil, np, pt, latent"),
        ({"refine_steps": 1}, "this folder has no teacher UNet"),
        ({"refine_steps": 4}, r"refine_steps=4 is out of range; valid: 0\.\.3"),
        ({"generator": [torch.Generator()] * 2}, "2 generators were given for a batch of 1"),
        ({"latents": torch.zeros(1, 4, 4, 4)}, r"latents have shape \(1, 4, 4, 4\) but \(1, 4, 8, 8\) was expected"),
    ],
)
def test_call_errors(parts, kwargs, message):
    kwargs = {"prompt": "a red cat", **kwargs}
    with pytest.raises(ValueError, match=message):
        make_pipe(parts, teacher=False)(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"parameterization": "x0"}, "unknown parameterization 'x0'; valid: teacher, raw"),
        ({"boot_timesteps": [1, 500]}, "distinct descending"),
        ({"unet": "range_unet", "guidance_range": None}, r"time_cond_proj_dim=16\), so guidance_range .* is required"),
        ({"guidance_range": [1.0, 8.0]}, "needs a student with a guidance embedding"),
        ({"unet": "range_unet", "guidance_range": [8.0, 1.0]}, r"0 <= w_min < w_max, got \[8\.0, 1\.0\]"),
        ({"unet": "range_unet", "guidance_range": [2.0, 6.0]}, r"guidance_scale 7\.5 .* outside the guidance_range"),
    ],
)
def test_constructor_errors(parts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_pipe(parts, **{"teacher": False, **kwargs})


def test_constructor_checks_the_teacher(parts):
    with pytest.raises(ValueError, match="teacher_unet takes timestep_cond"):
        BootPipeline(
            parts["vae"],
            parts["text_encoder"],
            parts["tokenizer"],
            parts["unet"],
            parts["scheduler"],
            parts["range_unet"],
            boot_timesteps=GRID,
        )
    settings = {k: v for k, v in parts["unet"].config.items() if not k.startswith("_")}
    other = UNet2DConditionModel.from_config({**settings, "cross_attention_dim": 16})
    with pytest.raises(ValueError, match="teacher_unet cross_attention_dim=16 differs from the student's 32"):
        BootPipeline(
            parts["vae"],
            parts["text_encoder"],
            parts["tokenizer"],
            parts["unet"],
            parts["scheduler"],
            other,
            boot_timesteps=GRID,
        )


# --- saving and loading ------------------------------------------------------------------------------------------
def reference_image(pipe, **kwargs):
    return pipe("a red cat", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def saved(parts, tmp_path_factory):
    """A fixed student saved with its teacher and a guidance-range student without, with in-memory reference images."""
    root = tmp_path_factory.mktemp("boot-sd")
    fixed, ranged = make_pipe(parts, "v_prediction"), make_pipe(parts, unet="range_unet", teacher=False)
    fixed.save_pretrained(root / "fixed")
    ranged.save_pretrained(root / "range")
    reference = {
        "fixed": reference_image(fixed),
        "fixed_refined": reference_image(fixed, refine_steps=2),
        "range": reference_image(ranged, guidance_scale=2.0),
    }
    return root, reference


def test_model_index_written_by_save_pretrained(saved):
    root, _ = saved
    index = json.loads((root / "fixed" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_boot", "BootPipeline"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["unet"] == index["teacher_unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"] and index["tokenizer"][0] == "transformers"
    assert index["boot_timesteps"] == GRID and index["parameterization"] == "teacher"
    assert index["guidance_scale"] == 7.5 and index["guidance_range"] is None
    ranged = json.loads((root / "range" / "model_index.json").read_text())
    assert ranged["teacher_unet"] == [None, None] and not (root / "range" / "teacher_unet").exists()
    assert ranged["guidance_range"] == [1.0, 8.0]
    for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler"):
        assert (root / "range" / name).is_dir(), name


def test_gendistill_loader_round_trip(saved):
    # The same weights, but not bit for bit the same images: tensors loaded from safetensors need not be 64-byte
    # aligned, and CPU BLAS then takes another kernel path (differences ~1e-7).
    root, reference = saved
    fixed = BootPipeline.from_pretrained(root / "fixed")
    fixed.set_progress_bar_config(disable=True)
    assert type(fixed) is BootPipeline and fixed.teacher_unet is not None
    np.testing.assert_allclose(reference_image(fixed), reference["fixed"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(reference_image(fixed, refine_steps=2), reference["fixed_refined"], atol=1e-6, rtol=0)
    ranged = BootPipeline.from_pretrained(root / "range")
    ranged.set_progress_bar_config(disable=True)
    assert ranged.teacher_unet is None and ranged.unet.config.time_cond_proj_dim == 16
    assert ranged.config.guidance_range == [1.0, 8.0] and ranged.config.guidance_scale == 7.5
    np.testing.assert_allclose(reference_image(ranged, guidance_scale=2.0), reference["range"], atol=1e-6, rtol=0)


def test_gendistill_loader_never_runs_the_folder_code(saved, tmp_path):
    root, reference = saved
    folder = tmp_path / "planted"
    BootPipeline.from_pretrained(root / "fixed").save_pretrained(folder)
    marker = tmp_path / "marker.txt"
    plant = (
        f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran'); raise RuntimeError('planted code ran')\n"
    )
    code = folder / "pipeline_boot.py"
    code.write_text(plant + code.read_text())
    pipe = BootPipeline.from_pretrained(folder, torch_dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    assert not marker.exists()
    assert type(pipe) is BootPipeline
    dtypes = {pipe.unet.dtype, pipe.teacher_unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype}
    assert dtypes == {torch.float64}
    np.testing.assert_allclose(reference_image(pipe), reference["fixed"], atol=1e-5)
    np.testing.assert_allclose(reference_image(pipe, refine_steps=2), reference["fixed_refined"], atol=1e-5)


# Loading in a fresh interpreter with stock diffusers (trust_remote_code, gendistill not imported) is tested on the
# folder `gendistill boot` exports (tests/test_boot_sd_cli.py), against the in-process pipeline's image.
