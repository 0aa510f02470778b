"""SiD and DMD: the losses against hand computations, convergence on a Gaussian teacher whose denoiser is known in
closed form, and ``gendistill sid`` end to end on a tiny UNet teacher (export, exact resume, BOOT init, errors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_fresh_python, save_teacher
from diffusers import DDPMScheduler

from gendistill.cli import main
from gendistill.diffusion.sid import (
    SiDConfig,
    SiDTask,
    denoising_target,
    dmd_generator_loss,
    init_timestep_for,
    sid_generator_loss,
    teacher_init,
)
from gendistill.diffusion.teacher import load_teacher
from gendistill.pipelines import load_boot_pipeline
from gendistill.pipelines.boot_math import to_x0
from gendistill.training.sid import SiDRecipe, build_pipeline, build_task

FAST = ["--batch-size", "4", "--eval-every", "0", "--sample-every", "0", "--checkpoint-every", "0", "--log-every", "1"]


# --- the losses against hand computations ----------------------------------------------------------------------
def test_sid_gradient_equals_a_hand_computation_with_linear_denoisers():
    """Linear denoisers f_real = A x_t + a, f_fake = B x_t + b at x_t = s x_g + r eps: the gradient of one sample's
    loss (1/n) (d.(f_real - x_g) - alpha d.d) / w, d = f_real - f_fake, w fixed, by the chain rule in numpy."""
    rng = np.random.default_rng(0)
    n, alpha, s, r = 5, 1.2, 0.7, 0.6
    A, B = rng.normal(size=(n, n)), rng.normal(size=(n, n))
    a, b, x_g, eps = (rng.normal(size=n) for _ in range(4))
    x_t = s * x_g + r * eps
    f_real, f_fake = A @ x_t + a, B @ x_t + b
    d, rr = f_real - f_fake, f_real - x_g
    w = np.abs(x_g - f_real).mean()
    expected_loss = (d @ rr - alpha * d @ d) / n / w
    D = (A - B) * s  # d(d)/d(x_g)
    R = A * s - np.eye(n)  # d(f_real - x_g)/d(x_g)
    expected_grad = (D.T @ rr + R.T @ d - 2 * alpha * D.T @ d) / n / w

    xg = torch.tensor(x_g, requires_grad=True)
    xt = s * xg + r * torch.tensor(eps)
    fr, ff = torch.tensor(A) @ xt + torch.tensor(a), torch.tensor(B) @ xt + torch.tensor(b)
    loss = sid_generator_loss(xg[None], fr[None], ff[None], alpha=alpha)
    (grad,) = torch.autograd.grad(loss.sum(), xg)
    np.testing.assert_allclose(loss.item(), expected_loss, rtol=1e-10)
    np.testing.assert_allclose(grad.numpy(), expected_grad, rtol=1e-9, atol=1e-12)
    # The paper's form: (1 - alpha) ||d||^2 + d.(f_fake - x_g), normalized the same way.
    np.testing.assert_allclose(expected_loss, ((1 - alpha) * d @ d + d @ (f_fake - x_g)) / n / w, rtol=1e-10)


def test_dmd_gradient_is_the_normalized_score_difference():
    rng = np.random.default_rng(1)
    x_g, f_real, f_fake = (rng.normal(size=(3, 2, 4, 4)) for _ in range(3))
    xg = torch.tensor(x_g, requires_grad=True)
    loss = dmd_generator_loss(xg, torch.tensor(f_real), torch.tensor(f_fake)).mean()
    (grad,) = torch.autograd.grad(loss, xg)
    w = np.abs(x_g - f_real).reshape(3, -1).mean(1).reshape(3, 1, 1, 1)
    expected = (f_fake - f_real) / w / x_g[0].size / len(x_g)  # mean over elements, then over the batch
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-10)
    # no gradient reaches the denoisers' outputs
    fr = torch.tensor(f_real, requires_grad=True)
    dmd_generator_loss(xg, fr, torch.tensor(f_fake)).sum().backward()
    assert fr.grad is None


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoising_target_is_what_the_clean_prediction_inverts(prediction_type):
    """A network that outputs the target exactly predicts x0 exactly (``to_x0``, the teacher's conversion)."""
    torch.manual_seed(0)
    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    ac = torch.rand(4, 1) * 0.9 + 0.05
    alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
    target = denoising_target(x0, eps, alpha, sigma, prediction_type)
    torch.testing.assert_close(to_x0(target, alpha * x0 + sigma * eps, alpha, sigma, prediction_type), x0)


def test_the_default_init_timestep_is_where_sigma_over_alpha_is_2_5():
    ac = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    t = init_timestep_for(ac)
    ratios = [float(((1 - a) / a).sqrt()) for a in ac.double()]
    assert t == min(range(1000), key=lambda i: abs(np.log(ratios[i]) - np.log(2.5)))
    assert ratios[t - 1] < 2.5 < ratios[t + 1]


# --- convergence on a Gaussian teacher -------------------------------------------------------------------------
MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
COV = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)


def gaussian_x0(x_t, alpha, sigma, mean, cov):
    """E[x0 | x_t] for x0 ~ N(mean, cov), x_t = alpha x0 + sigma eps: mean + alpha cov (alpha^2 cov + sigma^2 I)^-1
    (x_t - alpha mean), per row (x_t: (B, n); alpha, sigma: (B, 1))."""
    eye = torch.eye(len(mean), dtype=x_t.dtype)
    a, s = alpha.view(-1, 1, 1), sigma.view(-1, 1, 1)
    gain = a * cov @ torch.linalg.inv(a * a * cov + s * s * eye)  # (B, n, n)
    return mean + (gain @ (x_t - alpha * mean).unsqueeze(-1)).squeeze(-1)


def distill_gaussian(objective: str, steps: int = 2000, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-step generator x = m + L z learns N(MEAN, COV) from the closed-form teacher denoiser; the fake score
    is a Gaussian denoiser (mean, Cholesky factor) trained by denoising score matching (epsilon type) on its
    samples. Returns the generator's mean and covariance."""
    torch.manual_seed(0)
    ac = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    gen_mean = torch.tensor([-1.0, 1.0], dtype=torch.float64, requires_grad=True)
    gen_factor = (0.3 * torch.eye(2, dtype=torch.float64)).requires_grad_(True)
    fake_mean = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    fake_factor = torch.eye(2, dtype=torch.float64).requires_grad_(True)
    opt_g = torch.optim.Adam([gen_mean, gen_factor], lr=1e-2, betas=(0.0, 0.999))
    opt_f = torch.optim.Adam([fake_mean, fake_factor], lr=3e-2, betas=(0.0, 0.999))

    def schedule(n):
        t = torch.randint(20, 981, (n,))
        return ac[t].sqrt().unsqueeze(1), (1 - ac[t]).sqrt().unsqueeze(1)

    def fake_cov():
        lower = torch.tril(fake_factor)
        return lower @ lower.T + 1e-4 * torch.eye(2, dtype=torch.float64)

    for step in range(steps):
        if step == steps - steps // 4:  # a smaller step at the end, so the estimate is not dominated by noise
            for group in (*opt_g.param_groups, *opt_f.param_groups):
                group["lr"] /= 10
        # the fake score: DSM on the generator's samples, the network predicting eps
        with torch.no_grad():
            x_g = gen_mean + torch.randn(batch, 2, dtype=torch.float64) @ gen_factor.T
        alpha, sigma = schedule(batch)
        eps = torch.randn_like(x_g)
        x_t = alpha * x_g + sigma * eps
        eps_pred = (x_t - alpha * gaussian_x0(x_t, alpha, sigma, fake_mean, fake_cov())) / sigma
        fake_loss = (eps_pred - denoising_target(x_g, eps, alpha, sigma, "epsilon")).pow(2).mean()
        opt_f.zero_grad()
        fake_loss.backward()
        opt_f.step()
        # the generator
        x_g = gen_mean + torch.randn(batch, 2, dtype=torch.float64) @ gen_factor.T
        alpha, sigma = schedule(batch)
        x_t = alpha * x_g + sigma * torch.randn_like(x_g)
        f_real = gaussian_x0(x_t, alpha, sigma, MEAN, COV)
        f_fake = gaussian_x0(x_t, alpha, sigma, fake_mean, fake_cov())
        if objective == "sid":
            loss = sid_generator_loss(x_g, f_real, f_fake, alpha=1.2).mean()
        else:
            loss = dmd_generator_loss(x_g, f_real, f_fake).mean()
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
    with torch.no_grad():
        return gen_mean.clone(), gen_factor @ gen_factor.T


@pytest.mark.parametrize("objective", ["sid", "dmd"])
def test_a_generator_started_away_converges_to_the_gaussian_teacher(objective):
    mean, cov = distill_gaussian(objective)
    assert torch.linalg.norm(mean - MEAN) < 0.02, mean  # it starts 2.5 away
    assert torch.linalg.norm(cov - COV) < 0.05, cov  # Frobenius; it starts 0.54 away


# --- the task on a tiny UNet teacher ---------------------------------------------------------------------------
def test_the_teacher_initialized_generator_is_the_teachers_clean_prediction_at_its_noise_level(tmp_path):
    teacher = load_teacher(save_teacher(tmp_path / "teacher", prediction_type="epsilon"))
    task = SiDTask(teacher, SiDConfig(guidance_scale=1.0))
    assert task.read_timestep == task.input_timestep == init_timestep_for(teacher.schedule.alphas_cumprod)
    z, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    t = torch.full((3,), task.read_timestep)
    expected = teacher.predict_x0(z, t, {"class_labels": labels})
    torch.testing.assert_close(task.generate(z, {"class_labels": labels}), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("objective", ["sid", "dmd"])
def test_each_phase_updates_only_its_network(objective, tmp_path):
    teacher = load_teacher(save_teacher(tmp_path / "teacher"))
    task = SiDTask(teacher, SiDConfig(objective=objective))
    assert [p.name for p in task.phases()] == ["fake_score", "student"]
    for phase, trained, frozen in (("fake_score", task.fake_score, task.student), ("student", task.student, None)):
        for module in (task.student, task.fake_score):
            module.zero_grad(set_to_none=True)
        losses = task(phase, task.sample_batch(phase, 4, torch.device("cpu")))
        losses["loss"].backward()
        assert all(p.grad is not None for p in trained.parameters())
        if frozen is not None:
            assert all(p.grad is None for p in frozen.parameters())
        assert not any(p.grad is not None for p in teacher.unet.parameters())


def _sid(teacher, out, *extra):
    return ["sid", "--teacher", teacher, "--output", str(out), *FAST, *extra]


@pytest.mark.parametrize("objective", ["sid", "dmd"])
def test_the_cli_exports_a_boot_pipeline_folder_that_samples(objective, tmp_path):
    teacher = save_teacher(tmp_path / "teacher")
    out = tmp_path / objective
    assert main(_sid(teacher, out, "--objective", objective, "--max-steps", "2", "--lr", "1e-4")) == 0
    pipe = load_boot_pipeline(out)
    info = json.loads((out / "sid.json").read_text())
    assert info["objective"] == objective and pipe.config.student_timestep == info["input_timestep"]
    # the folder's one-step sample is the task's generator on the same noise
    task = SiDTask(load_teacher(teacher), SiDConfig(objective=objective, guidance_scale=2.0))
    task.student.load_state_dict(pipe.unet.state_dict())
    eps, labels = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    images = pipe(class_labels=labels, latents=eps, output_type="pt").images
    expected = (task.generate(eps, {"class_labels": labels}) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-5)
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2


STOCK = """
import sys, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
assert not any(m == "gendistill" or m.startswith("gendistill.") for m in sys.modules), "gendistill was imported"
eps = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
images = pipe(class_labels=[1, 2], latents=eps, output_type="pt").images
print(type(pipe).__name__, pipe.config.student_timestep, float(images.sum()))
"""


@pytest.mark.slow
def test_stock_diffusers_samples_the_folder_in_a_fresh_process(tmp_path):
    teacher = save_teacher(tmp_path / "teacher")
    out = tmp_path / "sid"
    assert main(_sid(teacher, out, "--max-steps", "1")) == 0
    result = run_fresh_python(STOCK, out, cwd=tmp_path)
    name, timestep, total = result.stdout.split()
    pipe = load_boot_pipeline(out)
    eps = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    images = pipe(class_labels=[1, 2], latents=eps, output_type="pt").images
    assert (name, int(timestep)) == ("BootImagePipeline", pipe.config.student_timestep)
    assert float(total) == pytest.approx(float(images.sum()), rel=1e-5)


def test_resume_is_exact(tmp_path):
    teacher = save_teacher(tmp_path / "teacher")
    base = ["--lr", "1e-3", "--checkpoint-every", "2", "--fake-steps", "2"]
    assert main(_sid(teacher, tmp_path / "straight", *base, "--max-steps", "4")) == 0
    assert main(_sid(teacher, tmp_path / "resumed", *base, "--max-steps", "2")) == 0
    assert main(_sid(teacher, tmp_path / "resumed", *base, "--max-steps", "4", "--resume", "latest")) == 0
    a = load_boot_pipeline(tmp_path / "straight").unet.state_dict()
    b = load_boot_pipeline(tmp_path / "resumed").unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_boot_student_is_the_generators_start(tmp_path):
    teacher = save_teacher(tmp_path / "teacher")
    boot = tmp_path / "boot"
    argv = ["boot", "--teacher", teacher, "--output", str(boot), "--num-intervals", "4", *FAST, "--max-steps", "2"]
    assert main(argv) == 0
    boot_pipe = load_boot_pipeline(boot)
    recipe = SiDRecipe(teacher=teacher, output=str(tmp_path / "sid"), init=f"boot:{boot}")
    task = build_task(recipe)
    assert task.config.guidance_scale == boot_pipe.config.guidance_scale
    pipe = build_pipeline(task, task.student, save_teacher=False)  # the folder the run would export at step 0
    assert pipe.config.boot_timesteps == boot_pipe.config.boot_timesteps
    assert pipe.config.student_timestep == boot_pipe.config.boot_timesteps[-1]
    eps, labels = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    expected = boot_pipe(class_labels=labels, latents=eps, output_type="pt").images
    torch.testing.assert_close(pipe(class_labels=labels, latents=eps, output_type="pt").images, expected)
    torch.testing.assert_close((task.generate(eps, {"class_labels": labels}) / 2 + 0.5).clamp(0, 1), expected)


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    teacher = save_teacher(tmp_path / "teacher")

    def fails(argv, needle):
        assert main(argv) == 2
        assert needle in capsys.readouterr().err

    fails(_sid(teacher, tmp_path / "a", "--objective", "gan"), "objective 'gan' is not valid; valid: sid, dmd")
    fails(_sid(teacher, tmp_path / "b", "--init", "student"), "--init 'student' is not valid")
    fails(_sid(teacher, tmp_path / "c", "--init", f"boot:{tmp_path}/nothing"), "no model_index.json")
    fails(_sid(teacher, tmp_path / "d", "--timestep-range", "0.9,0.1"), "timestep_range must be [low, high]")
    fails(_sid(teacher, tmp_path / "e", "--init", "boot:x", "--init-timestep", "5"), "--init-timestep applies")
    fails(_sid(teacher, tmp_path / "f", "--init-timestep", "1000"), "init_timestep 1000 is out of range; valid: 1..")
    fails(_sid(teacher, tmp_path / "g", "--init-timestep", "0"), "init_timestep 0 is out of range")
    fails(_sid(teacher, tmp_path / "teacher" / "unet"), "")
    for name in "abcdefg":
        assert not (tmp_path / name / "model_index.json").exists()


def test_the_generator_init_is_a_float32_copy(tmp_path):
    teacher = load_teacher(save_teacher(tmp_path / "teacher"))
    init = teacher_init(teacher, 500)
    assert init.unet is not teacher.unet and init.read_timestep == init.input_timestep == 500
    assert all(p.dtype == torch.float32 for p in init.unet.parameters())


@pytest.mark.parametrize("bad", [1000, -1, 2.5, True])
def test_the_pipeline_refuses_a_student_timestep_outside_the_schedule(bad):
    from conftest import tiny_unet
    from diffusers import DDIMScheduler

    from gendistill.pipelines import BootImagePipeline

    with pytest.raises(ValueError, match=r"student_timestep=.* is not valid; valid: an int in 0\.\.999 or None"):
        BootImagePipeline(
            tiny_unet(), DDIMScheduler(num_train_timesteps=1000), boot_timesteps=[999, 0], student_timestep=bad
        )
