"""Tests for pipelines/pipeline_boot.py: the BOOT one-step sampler, its refinement and its two loaders."""

from __future__ import annotations

import ast
import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import run_fresh_python
from conftest import tiny_unet as conftest_unet
from diffusers import DDIMScheduler, UNet2DModel

from gendistill.pipelines import BootImagePipeline

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
NULL = 3  # the null class of the tiny class-conditional UNets (num_class_embeds=4)
GRID = [750, 500, 250, 0]  # = DDIMScheduler().set_timesteps(4) ("leading"), so diffusers' step walks the same grid


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    # Tiny UNets run ~50x slower with several intra-op threads on a busy CPU; restore the setting afterwards.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def tiny_unet(seed: int = 0, *, num_class_embeds: int | None = 4) -> UNet2DModel:
    return conftest_unet(num_class_embeds=num_class_embeds, channels=3, seed=seed).eval()


def make_pipe(prediction_type="epsilon", *, parameterization="teacher", teacher=True, guidance_scale=2.0, grid=GRID):
    pipe = BootImagePipeline(
        tiny_unet(0),
        DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type),
        tiny_unet(1) if teacher else None,
        boot_timesteps=grid,
        parameterization=parameterization,
        null_class_id=NULL,
        guidance_scale=guidance_scale,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(batch_size=2, seed=123):
    return torch.randn(batch_size, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def coefficients(scheduler, t):
    ac = float(scheduler.alphas_cumprod[t])
    return ac**0.5, (1 - ac) ** 0.5


def signal_from_native(u, x, alpha, sigma, prediction_type):
    if prediction_type == "epsilon":
        return (x - sigma * u) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma * u
    return u


def student_signal(pipe, eps, t, labels):
    ts = torch.full((eps.shape[0],), t)
    u = pipe.unet(eps, ts, class_labels=labels).sample
    if pipe.config.parameterization == "raw":
        return u
    alpha, sigma = coefficients(pipe.scheduler, pipe.config.boot_timesteps[0])
    return signal_from_native(u, eps, alpha, sigma, pipe.scheduler.config.prediction_type)


def guided_native(teacher, x, t, labels, w):
    ts = torch.full((x.shape[0],), t)
    if labels is None or w == 1.0:
        return teacher(x, ts, class_labels=labels).sample
    u_c = teacher(x, ts, class_labels=labels).sample
    u_n = teacher(x, ts, class_labels=torch.full_like(labels, NULL)).sample
    return u_n + w * (u_c - u_n)


def reference_ddim(pipe, eps, labels, refine_steps, reference_scheduler):
    """Student jump to t_{K-k} (x = eps at t_0), then diffusers' own DDIM steps (eta=0) to t_K, read as a signal."""
    grid, sched = pipe.config.boot_timesteps, pipe.scheduler
    start = len(grid) - 1 - refine_steps
    if start == 0:
        x = eps
    else:
        alpha, sigma = coefficients(sched, grid[start])
        x = alpha * student_signal(pipe, eps, grid[start], labels) + sigma * eps
    for t in grid[start:-1]:
        u = guided_native(pipe.teacher_unet, x, t, labels, pipe.config.guidance_scale)
        x = reference_scheduler.step(u, t, x, eta=0.0).prev_sample
    alpha, sigma = coefficients(sched, grid[-1])
    return (x - sigma * eps) / alpha


def images(pipe, **kwargs):
    return pipe(output_type="pt", **kwargs).images


# --- math --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parameterization", ["teacher", "raw"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_one_step_matches_manual_computation(prediction_type, parameterization):
    pipe = make_pipe(prediction_type, parameterization=parameterization, teacher=False)
    eps, labels = noise(), torch.tensor([0, 2])
    expected = (student_signal(pipe, eps, GRID[-1], labels) / 2 + 0.5).clamp(0, 1)
    out = images(pipe, class_labels=labels, latents=eps)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("refine_steps", [1, 2, 3])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_refinement_matches_diffusers_ddim_step(prediction_type, refine_steps):
    pipe = make_pipe(prediction_type, guidance_scale=2.0)
    reference = DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    reference.set_timesteps(len(GRID))
    assert reference.timesteps.tolist() == GRID
    eps, labels = noise(), torch.tensor([1, 0])
    expected = (reference_ddim(pipe, eps, labels, refine_steps, reference) / 2 + 0.5).clamp(0, 1)
    out = images(pipe, class_labels=labels, latents=eps, refine_steps=refine_steps)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_full_refinement_is_teacher_ddim_in_x_space_and_ignores_the_student():
    # Unconditional (no guidance); DDIM written in x-space: x_s = alpha_s f + sigma_s (x_t - alpha_t f) / sigma_t.
    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    teacher = tiny_unet(1, num_class_embeds=None)
    grid = [999, 600, 300, 50, 10]
    eps = noise()
    x = eps
    for t, s in zip(grid[:-1], grid[1:]):
        (alpha_t, sigma_t), (alpha_s, sigma_s) = coefficients(scheduler, t), coefficients(scheduler, s)
        f = signal_from_native(teacher(x, torch.full((2,), t)).sample, x, alpha_t, sigma_t, "v_prediction")
        x = alpha_s * f + sigma_s * (x - alpha_t * f) / sigma_t
    alpha, sigma = coefficients(scheduler, grid[-1])
    expected = (((x - sigma * eps) / alpha) / 2 + 0.5).clamp(0, 1)
    for student_seed in (0, 5):
        student = tiny_unet(student_seed, num_class_embeds=None)
        pipe = BootImagePipeline(student, scheduler, teacher, boot_timesteps=grid)
        pipe.set_progress_bar_config(disable=True)
        torch.testing.assert_close(
            images(pipe, batch_size=2, latents=eps, refine_steps=4), expected, atol=1e-4, rtol=0
        )


def test_zero_terminal_snr_grid():
    scheduler = DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)
    assert float(scheduler.alphas_cumprod[999]) == 0.0
    with pytest.raises(ValueError, match="zero terminal SNR"):
        BootImagePipeline(tiny_unet(0), scheduler, boot_timesteps=[999, 0], null_class_id=NULL)
    reference = DDIMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    reference.set_timesteps(4)
    grid = reference.timesteps.tolist()  # [999, 749, 499, 249]
    pipe = BootImagePipeline(tiny_unet(0), reference, tiny_unet(1), boot_timesteps=grid, null_class_id=NULL)
    pipe.set_progress_bar_config(disable=True)
    eps, labels = noise(), torch.tensor([0, 1])
    one_step = images(pipe, class_labels=labels, latents=eps)
    assert torch.isfinite(one_step).all()
    expected = (reference_ddim(pipe, eps, labels, 3, reference) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(
        images(pipe, class_labels=labels, latents=eps, refine_steps=3), expected, atol=1e-4, rtol=0
    )


# --- call arguments ----------------------------------------------------------------------------------------------
def test_outputs_and_determinism():
    pipe = make_pipe(teacher=False)
    a = pipe(batch_size=3, generator=torch.Generator().manual_seed(7), output_type="np").images
    b = pipe(batch_size=3, generator=torch.Generator().manual_seed(7), output_type="np").images
    c = pipe(batch_size=3, generator=torch.Generator().manual_seed(8), output_type="np").images
    assert a.shape == (3, 8, 8, 3) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    gens = lambda: [torch.Generator().manual_seed(i) for i in (4, 5)]  # noqa: E731
    per_image = images(pipe, batch_size=2, generator=gens())
    torch.testing.assert_close(per_image, images(pipe, batch_size=2, generator=gens()))
    torch.testing.assert_close(per_image[1:], images(pipe, generator=[torch.Generator().manual_seed(5)]))
    pil = pipe(batch_size=2, generator=torch.Generator().manual_seed(7)).images
    assert len(pil) == 2 and pil[0].size == (8, 8)
    (pt,) = pipe(class_labels=[0, 1, 2, 2], output_type="pt", return_dict=False)
    assert pt.shape == (4, 3, 8, 8)
    # An int label is broadcast to batch_size; the same noise gives the same images as the explicit list.
    gen = torch.Generator().manual_seed(1)
    broadcast = images(pipe, batch_size=2, class_labels=2, generator=gen)
    torch.testing.assert_close(
        broadcast, images(pipe, class_labels=[2, 2], generator=torch.Generator().manual_seed(1))
    )


def test_random_labels_skip_the_null_class_and_follow_the_generator():
    pipe = make_pipe(teacher=False)
    draw = lambda seed: pipe.prepare_class_labels(300, None, torch.Generator().manual_seed(seed), torch.device("cpu"))  # noqa: E731
    labels = draw(0)
    assert set(labels.tolist()) == {0, 1, 2}
    assert torch.equal(labels, draw(0)) and not torch.equal(labels, draw(1))


def test_unconditional_student():
    pipe = BootImagePipeline(
        tiny_unet(0, num_class_embeds=None), DDIMScheduler(), boot_timesteps=GRID, parameterization="raw"
    )
    assert pipe(batch_size=2, output_type="np").images.shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match="this student is unconditional"):
        pipe(class_labels=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"refine_steps": 4}, r"refine_steps=4 is out of range; valid: 0\.\.3"),
        ({"refine_steps": -1}, r"refine_steps=-1 is out of range"),
        ({"class_labels": 4}, r"class id\(s\) \[4\] cannot be requested; valid: 0\.\.3 except the null class 3"),
        ({"class_labels": [0, NULL]}, r"class id\(s\) \[3\]"),
        ({"class_labels": [0, 1], "batch_size": 3}, "batch_size=3 disagrees with the 2 class_labels"),
        ({"class_labels": 0.5}, "must be an int or a 1-D sequence"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"latents": torch.zeros(1, 3, 4, 4)}, r"latents have shape \(1, 3, 4, 4\) but \(1, 3, 8, 8\) was expected"),
        ({"output_type": "latent"}, "unsupported output_type 'latent'; valid: pil, np, pt"),
        ({"batch_size": 3, "generator": [torch.Generator()] * 2}, "2 generators were given for a batch of 3"),
    ],
)
def test_call_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_pipe()(**kwargs)


def test_refine_without_teacher_errors():
    with pytest.raises(ValueError, match="this folder has no teacher UNet"):
        make_pipe(teacher=False)(refine_steps=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"parameterization": "x0"}, "unknown parameterization 'x0'; valid: teacher, raw"),
        ({"boot_timesteps": None}, "boot_timesteps is required"),
        ({"boot_timesteps": [0, 500, 999]}, "distinct descending"),
        ({"boot_timesteps": [999, 500, 500]}, "distinct descending"),
        ({"boot_timesteps": [1000, 0]}, r"in 0\.\.999"),
        ({"boot_timesteps": [999]}, "at least 2"),
        ({"null_class_id": 4}, r"null_class_id=4 is out of range; valid: 0\.\.3"),
        ({"null_class_id": None}, "guidance_scale=2.0 needs the teacher's null_class_id"),
    ],
)
def test_constructor_errors(kwargs, message):
    config = {"boot_timesteps": GRID, "null_class_id": NULL, "guidance_scale": 2.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        BootImagePipeline(tiny_unet(0), DDIMScheduler(), **config)


def test_constructor_errors_on_components():
    with pytest.raises(ValueError, match="unsupported scheduler prediction_type 'flow'"):
        BootImagePipeline(tiny_unet(0), DDIMScheduler(prediction_type="flow"), boot_timesteps=GRID)
    with pytest.raises(ValueError, match="null_class_id=0 was given but the student is unconditional"):
        BootImagePipeline(tiny_unet(0, num_class_embeds=None), DDIMScheduler(), boot_timesteps=GRID, null_class_id=0)
    with pytest.raises(ValueError, match="teacher_unet num_class_embeds=None differs"):
        BootImagePipeline(tiny_unet(0), DDIMScheduler(), tiny_unet(1, num_class_embeds=None), boot_timesteps=GRID)


# --- saving and loading ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folders saved with and without the teacher, and reference images from the in-memory pipelines."""
    root = tmp_path_factory.mktemp("boot")
    with_teacher, without_teacher = make_pipe("v_prediction"), make_pipe("v_prediction", teacher=False)
    with_teacher.save_pretrained(root / "with_teacher")
    without_teacher.save_pretrained(root / "without_teacher")
    seed = torch.Generator().manual_seed(0)
    reference = {
        "with_teacher": images(with_teacher, batch_size=2, generator=seed, refine_steps=2).numpy(),
        "without_teacher": images(without_teacher, batch_size=2, generator=torch.Generator().manual_seed(0)).numpy(),
    }
    return root, reference


def test_model_index_written_by_save_pretrained(saved):
    root, _ = saved
    index = json.loads((root / "without_teacher" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_boot", "BootImagePipeline"]
    assert index["teacher_unet"] == [None, None]
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["boot_timesteps"] == GRID and index["parameterization"] == "teacher"
    assert index["null_class_id"] == NULL and index["guidance_scale"] == 2.0
    assert not (root / "without_teacher" / "teacher_unet").exists()
    with_teacher = json.loads((root / "with_teacher" / "model_index.json").read_text())
    assert with_teacher["teacher_unet"] == ["diffusers", "UNet2DModel"]
    # The copied source runs under stock diffusers: it may import only the standard library, torch, diffusers and,
    # relatively, the files saved beside it (the BOOT math).
    allowed = {"torch", "diffusers", "numpy", "PIL", *sys.stdlib_module_names}
    for source in ("pipeline_boot.py", "boot_math.py"):
        tree = ast.parse((root / "with_teacher" / source).read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert {name.split(".")[0] for name in imported} <= allowed, (source, imported)
        beside = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
        assert all((root / "with_teacher" / f"{name}.py").is_file() for name in beside), (source, beside)


@pytest.mark.parametrize("name", ["with_teacher", "without_teacher"])
def test_gendistill_loader_round_trip(saved, name):
    root, reference = saved
    pipe = BootImagePipeline.from_pretrained(root / name)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe) is BootImagePipeline
    assert (pipe.teacher_unet is None) == (name == "without_teacher")
    assert pipe.config.boot_timesteps == GRID and pipe.config.null_class_id == NULL
    refine_steps = 2 if name == "with_teacher" else 0
    out = images(pipe, batch_size=2, generator=torch.Generator().manual_seed(0), refine_steps=refine_steps)
    np.testing.assert_array_equal(out.numpy(), reference[name])


def test_gendistill_loader_never_runs_the_folder_code(saved, tmp_path):
    root, reference = saved
    folder = tmp_path / "planted"
    BootImagePipeline.from_pretrained(root / "with_teacher").save_pretrained(folder)
    marker = tmp_path / "marker.txt"
    plant = (
        f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran'); raise RuntimeError('planted code ran')\n"
    )
    code = folder / "pipeline_boot.py"
    code.write_text(plant + code.read_text())
    pipe = BootImagePipeline.from_pretrained(folder, torch_dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    assert not marker.exists()
    assert type(pipe) is BootImagePipeline and pipe.unet.dtype == pipe.teacher_unet.dtype == torch.float64
    out = images(pipe, batch_size=2, generator=torch.Generator().manual_seed(0), refine_steps=2)
    np.testing.assert_allclose(out.numpy(), reference["with_teacher"], atol=1e-5)


def test_gendistill_loader_errors(saved, tmp_path):
    root, _ = saved
    with pytest.raises(FileNotFoundError, match="no such pipeline folder"):
        BootImagePipeline.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):
        BootImagePipeline.from_pretrained(tmp_path)
    index = json.loads((root / "with_teacher" / "model_index.json").read_text())
    for change, message in [
        ({"_class_name": "DDPMPipeline"}, "describes pipeline 'DDPMPipeline', not BootImagePipeline"),
        ({"unet": ["peft", "LoraModel"]}, "library 'peft'; loadable: diffusers, transformers"),
        ({"unet": ["diffusers", "DDPMPipeline"]}, "'DDPMPipeline', which is not a diffusers subclass of ModelMixin"),
        ({"unet": ["diffusers", "os.system"]}, "'os.system', which is not"),
        ({"unet": [None, None]}, r"required component\(s\) \['unet'\]"),
        ({"vae": ["diffusers", "AutoencoderKL"]}, "unexpected entry 'vae'"),
    ]:
        (tmp_path / "model_index.json").write_text(json.dumps({**index, **change}))
        with pytest.raises(ValueError, match=message):
            BootImagePipeline.from_pretrained(tmp_path)


STOCK_LOAD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    out = {}
    for name, refine_steps in (("with_teacher", 2), ("without_teacher", 0)):
        pipe = DiffusionPipeline.from_pretrained(sys.argv[1] + "/" + name, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe).__name__ == "BootImagePipeline", type(pipe)
        assert (pipe.teacher_unet is None) == (name == "without_teacher")
        assert pipe.config.boot_timesteps == [750, 500, 250, 0] and pipe.config.guidance_scale == 2.0
        runs = [
            pipe(batch_size=2, generator=torch.Generator().manual_seed(0), refine_steps=refine_steps, output_type="np")
            .images
            for _ in range(2)
        ]
        assert runs[0].shape == (2, 8, 8, 3)
        assert np.array_equal(runs[0], runs[1])
        out[name] = runs[0]
    assert not any(m.startswith("gendistill") for m in sys.modules), "gendistill was imported"
    np.savez(sys.argv[2], **out)
    """
)


@pytest.mark.slow  # ~10 s: a fresh interpreter imports torch and diffusers
def test_stock_diffusers_loads_the_folder_in_a_fresh_process(saved, tmp_path):
    root, reference = saved
    run_fresh_python(STOCK_LOAD, root, tmp_path / "out.npz", cwd=tmp_path)
    out = np.load(tmp_path / "out.npz")
    for name in ("with_teacher", "without_teacher"):
        np.testing.assert_allclose(out[name], reference[name].transpose(0, 2, 3, 1), atol=1e-6)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_library_and_pipeline_compute_the_same_numbers(prediction_type, tmp_path):
    # The training task and the exported pipeline share one implementation of the math (boot_math): the start
    # signal, the student's signal at every grid point and a guided teacher step agree bit for bit.
    from conftest import save_teacher

    from gendistill.diffusion.boot import BootConfig, BootTask
    from gendistill.diffusion.teacher import load_teacher
    from gendistill.training.boot import build_pipeline

    teacher = load_teacher(save_teacher(tmp_path / "teacher", prediction_type=prediction_type))
    torch.manual_seed(0)
    task = BootTask(teacher, BootConfig(num_intervals=4, guidance_scale=2.0))
    with torch.no_grad():
        for p in task.student.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a student that is not the teacher
        pipe = build_pipeline(task, task.student, save_teacher=True)
        eps, labels = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
        cond = {"class_labels": labels}
        assert torch.equal(pipe.start_signal(eps), task.start_signal(eps))
        for t in task.grid[1:]:
            timesteps = torch.full((2,), t, dtype=torch.long)
            assert torch.equal(pipe.student_signal(eps, t, labels), task.student_signal(eps, timesteps, cond)), t
        k = len(task.grid) - 1
        y = task.student_signal(eps, torch.full((2,), task.grid[k - 1], dtype=torch.long), cond)
        refined = pipe.refine(y, eps, refine_steps=1, teacher_x0=lambda x, t: pipe.teacher_x0(x, t, labels))
        stepped = task.teacher_step(y, eps, torch.full((2,), k), cond)
    torch.testing.assert_close(refined, stepped, rtol=0, atol=0)
