"""The teacher's diffusers samplers (checked against a DDIM loop written out here) and the same-noise sampler
comparison (class agreement counted by hand, shared noises, padding)."""

from __future__ import annotations

import pytest
import torch
from conftest import save_teacher
from diffusers import DDPMScheduler
from torch import nn

from gendistill.diffusion.sampling import make_scheduler, teacher_sample
from gendistill.diffusion.teacher import DiffusionTeacher
from gendistill.errors import UsageError
from gendistill.eval.compare import Judge, Sampler, noise_batches, pad_to, run_samplers, to_judge
from gendistill.eval.features import ModuleFeatures
from gendistill.eval.fid import compute_stats


@pytest.fixture(scope="module")
def class_teacher(tmp_path_factory):
    folder = save_teacher(tmp_path_factory.mktemp("teacher"), prediction_type="v_prediction", num_class_embeds=4)
    return DiffusionTeacher.from_pretrained(folder)


def _hand_ddim(teacher: DiffusionTeacher, noise, labels, steps: int, guidance: float) -> torch.Tensor:
    """Deterministic DDIM (eta 0) written out: trailing timesteps round(T - i T / n) - 1, final alpha_bar 1,
    v-prediction converted with x0 = a x - s v, eps = s x + a v, guidance on the native output."""
    acp = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction").alphas_cumprod.double()
    total = len(acp)
    timesteps = [round(total - i * total / steps) - 1 for i in range(steps)]
    x = noise.double()
    null = torch.full_like(labels, teacher.null_class_id)
    for i, t in enumerate(timesteps):
        tt = torch.full((len(x),), t)
        v_c = teacher.unet(x.float(), tt, class_labels=labels).sample.double()
        v_u = teacher.unet(x.float(), tt, class_labels=null).sample.double()
        v = v_u + guidance * (v_c - v_u)
        a, s = acp[t].sqrt(), (1 - acp[t]).sqrt()
        x0, eps = a * x - s * v, s * x + a * v
        a_prev = acp[timesteps[i + 1]] if i + 1 < steps else torch.tensor(1.0, dtype=torch.float64)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x.float()


# Step counts dividing T: diffusers' DDIM steps to t - T // n, which is the next trailing timestep only then.
@pytest.mark.parametrize("steps", [1, 4])
def test_teacher_ddim_matches_a_hand_written_loop(class_teacher, steps):
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        ours = teacher_sample(
            class_teacher, noise, solver="ddim", num_steps=steps, class_labels=labels, guidance_scale=2.0
        )
        hand = _hand_ddim(class_teacher, noise, labels, steps, 2.0)
    torch.testing.assert_close(ours, hand, rtol=1e-4, atol=1e-4)


def test_dpm_solver_is_ddim_for_first_order_steps_only(class_teacher):
    """With lower_order_final, 1 and 2 steps are first-order (= DDIM on the same timesteps); 4 steps use 2M."""
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([1, 0])

    def run(solver, steps):
        return teacher_sample(
            class_teacher, noise, solver=solver, num_steps=steps, class_labels=labels, guidance_scale=1.5
        )

    for steps in (1, 2):
        torch.testing.assert_close(run("dpmsolver++", steps), run("ddim", steps), rtol=1e-4, atol=1e-4)
    assert (run("dpmsolver++", 4) - run("ddim", 4)).abs().max() > 1e-3
    first = make_scheduler(class_teacher, "dpmsolver++")
    first.set_timesteps(4)
    assert int(first.timesteps[0]) == 999  # trailing: starts at the noisiest timestep like the BOOT grid


def test_teacher_sample_rejects_bad_input(class_teacher):
    noise = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown solver 'euler'; valid: ddim, dpmsolver\\+\\+"):
        teacher_sample(class_teacher, noise, solver="euler", num_steps=2, class_labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="num_steps must be positive, got 0"):
        teacher_sample(class_teacher, noise, solver="ddim", num_steps=0, class_labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="needs class_labels"):
        teacher_sample(class_teacher, noise, solver="ddim", num_steps=1)
    with pytest.raises(ValueError, match="out of range"):
        teacher_sample(class_teacher, noise, solver="ddim", num_steps=1, class_labels=torch.tensor([3]))


def test_pad_to_centers_and_refuses_larger_images():
    x = torch.rand(2, 1, 28, 28)
    padded = pad_to(x, 32)
    assert padded.shape == (2, 1, 32, 32)
    torch.testing.assert_close(padded[..., 2:30, 2:30], x)
    assert padded.sum() == pytest.approx(x.sum().item())
    assert pad_to(x, 28) is x
    with pytest.raises(ValueError, match="do not fit"):
        pad_to(x, 16)


class _PixelJudge(nn.Module):
    """Logits: the mean brightness of four horizontal bands of an 8x8 image (two rows each)."""

    def forward(self, x):
        bands = x.flatten(2).mean(1).view(len(x), 4, -1).mean(-1)
        return bands


def test_run_samplers_counts_agreement_and_shares_noises():
    judge_model = _PixelJudge()
    judge_model.config = type("C", (), {"image_size": 8, "in_channels": 1})()
    real = torch.rand(40, 1, 8, 8)
    extractor = ModuleFeatures(nn.Flatten(), name="pixels")
    judge = Judge(
        folder=None,
        model=judge_model,
        extractor=extractor,
        real_stats=compute_stats([real], extractor, device=torch.device("cpu")),
        real_description="rand",
    )
    seen = {}

    def band_images(key, wrong):
        def fn(eps, y):
            seen.setdefault(key, []).append(eps.clone())
            x = torch.rand(len(y), 1, 6, 6, generator=torch.Generator().manual_seed(len(seen[key]))) * 0.1
            for i, c in enumerate(y.tolist()):
                band = (c + 1) % 4 if wrong(i) else c  # the judge sees the next class where wrong(i)
                x[i].view(-1)[band * 9 : band * 9 + 9] = 1.0
            return x

        return fn

    samplers = [
        Sampler("a", "always right", "student", 1, 1, band_images("a", lambda i: False)),
        Sampler("b", "wrong every 4th", "teacher", 2, 4, band_images("b", lambda i: i % 4 == 0)),
    ]
    results, images = run_samplers(
        samplers, judge, sample_shape=(1, 6, 6), num_classes=4, eval_samples=130, seed=3, device=torch.device("cpu")
    )
    # padded images: 6x6 -> 8x8, band c lit. Hand count: judged class == requested class.
    for key in ("a", "b"):
        requested = torch.arange(130) % 4
        predicted = judge_model(images[key]).argmax(1)
        assert results[key]["class_agreement"] == pytest.approx((predicted == requested).float().mean().item())
    assert results["a"]["class_agreement"] == 1.0
    # batch 0 (100) and batch 1 (30): in each, indices 0, 4, 8, ... are wrong
    assert results["b"]["class_agreement"] == pytest.approx(1 - (25 + 8) / 130)
    assert images["a"].shape == (130, 1, 8, 8)
    assert all(torch.equal(x, y) for x, y in zip(seen["a"], seen["b"]))  # the same noises for every sampler
    expected = [eps for eps, _ in noise_batches(130, (1, 6, 6), 3, torch.device("cpu"), 4)]
    assert all(torch.equal(x, y) for x, y in zip(seen["a"], expected))
    assert results["b"]["unet_evaluations_per_image"] == 4 and results["a"]["seconds_per_image"] > 0
    assert results["a"]["fid_lenet"] > 0


def test_to_judge_averages_rgb_for_a_gray_judge_and_pads():
    judge = type("J", (), {})()
    judge.model = type("M", (), {"config": type("C", (), {"image_size": 6, "in_channels": 1})()})()
    judge.image_size = 6
    rgb = torch.rand(2, 3, 4, 4)
    out = to_judge(rgb, judge)
    assert out.shape == (2, 1, 6, 6) and out[:, :, 0].abs().sum() == 0 and out[:, :, :, 0].abs().sum() == 0
    torch.testing.assert_close(out[:, 0, 1:5, 1:5], (rgb[:, 0] + rgb[:, 1] + rgb[:, 2]) / 3)
    with pytest.raises(UsageError, match="2 channels"):
        to_judge(torch.rand(1, 2, 4, 4), judge)


def test_the_teachers_samplers_and_a_student_take_prompts_for_a_text_to_image_teacher(tmp_path):
    from conftest import save_sd_teacher

    from gendistill.diffusion.boot import BootConfig, BootTask
    from gendistill.diffusion.teacher import load_teacher
    from gendistill.eval.compare import boot_samplers
    from gendistill.pipelines import BootPipeline

    teacher = load_teacher(save_sd_teacher(tmp_path / "sd"))
    eps, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 1])
    names = ["a red cat", "a blue dog"]
    images = teacher_sample(teacher, eps, solver="ddim", num_steps=2, prompts=names, guidance_scale=3.0)
    # The same two DDIM steps written out with the teacher's guided prediction and the latent decode.
    scheduler = make_scheduler(teacher, "ddim")
    scheduler.set_timesteps(2)
    cond, x = teacher.condition(teacher.encode_prompts(names)), eps.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(teacher.guided_native(x, t.expand(2), cond, 3.0), t, x).prev_sample
    torch.testing.assert_close(images, teacher.decode(x))
    with pytest.raises(UsageError, match="one prompt per noise"):
        teacher_sample(teacher, eps, solver="ddim", num_steps=1, prompts=names[:1])

    task = BootTask(teacher, BootConfig(num_intervals=2, guidance_scale=3.0), prompts=names)
    pipe = BootPipeline(
        vae=teacher.vae,
        text_encoder=teacher.text_encoder,
        tokenizer=teacher.tokenizer,
        unet=task.student,
        scheduler=teacher.scheduler,
        boot_timesteps=task.grid,
        parameterization=task.config.parameterization,
        guidance_scale=3.0,
    )
    pipe.set_progress_bar_config(disable=True)
    samplers = boot_samplers(pipe, teacher, solvers={"ddim": (2,)}, prompts_for=lambda y: [names[int(c)] for c in y])
    teacher_fn, student_fn = samplers[0].fn, samplers[1].fn
    torch.testing.assert_close(teacher_fn(eps, y), images.add(1).div(2).clamp(0, 1))
    expected = pipe(prompt=names, latents=eps, output_type="pt").images
    torch.testing.assert_close(student_fn(eps, y), expected)
