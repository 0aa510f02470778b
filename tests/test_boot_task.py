"""The BOOT objective and the diffusion teacher, against independent computations."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import save_teacher, tiny_unet
from diffusers import DDIMScheduler, DDPMScheduler

from gendistill.diffusion.boot import BootConfig, BootTask
from gendistill.diffusion.teacher import DiffusionTeacher


# --- teacher loading -------------------------------------------------------------------------------------------
def test_teacher_from_pipeline_folder(class_teacher_dir):
    teacher = DiffusionTeacher.from_pretrained(class_teacher_dir)
    assert teacher.prediction_type == "v_prediction"
    assert teacher.null_class_id == 3 and teacher.class_ids == [0, 1, 2]
    assert teacher.sample_shape == (1, 8, 8)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.unet.training


def test_teacher_from_unet_and_scheduler_subfolders(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "t" / "unet")
    DDIMScheduler(prediction_type="sample").save_pretrained(tmp_path / "t" / "scheduler")
    teacher = DiffusionTeacher.from_pretrained(tmp_path / "t")
    assert teacher.prediction_type == "sample" and not teacher.is_class_conditional
    assert DiffusionTeacher.from_pretrained(tmp_path / "t", prediction_type="epsilon").prediction_type == "epsilon"


def test_teacher_from_objects_and_configured_null_class():
    teacher = DiffusionTeacher(tiny_unet(num_class_embeds=5), DDPMScheduler(), null_class_id=0)
    assert teacher.class_ids == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="null_class_id 7 is out of range"):
        DiffusionTeacher(tiny_unet(num_class_embeds=5), DDPMScheduler(), null_class_id=7)


def test_teacher_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DiffusionTeacher.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers teacher: missing subfolder"):
        DiffusionTeacher.from_pretrained(tmp_path / "empty")
    folder = save_teacher(tmp_path / "flow")
    config_path = tmp_path / "flow" / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "flow"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported prediction type 'flow'"):
        DiffusionTeacher.from_pretrained(folder)
    teacher = DiffusionTeacher(tiny_unet(), DDPMScheduler())
    with pytest.raises(ValueError, match="teacher is unconditional"):
        teacher.check_class_labels([0])
    cond = DiffusionTeacher(tiny_unet(num_class_embeds=4), DDPMScheduler())
    with pytest.raises(ValueError, match=r"\[3, 9\] out of range"):
        cond.check_class_labels([0, 3, 9])


def test_guidance_is_one_batched_call_and_matches_formula():
    teacher = DiffusionTeacher(tiny_unet(num_class_embeds=4), DDPMScheduler(prediction_type="epsilon"))
    calls = []
    teacher.unet.register_forward_hook(lambda m, args, kwargs_out: calls.append(args[0].shape[0]))
    x, t, c = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([0, 1, 2])
    got = teacher.guided_native(x, t, {"class_labels": c}, guidance_scale=3.0)
    assert calls == [6]
    with torch.no_grad():
        u_c = teacher.unet(x, t, class_labels=c).sample
        u_n = teacher.unet(x, t, class_labels=torch.full_like(c, 3)).sample
    torch.testing.assert_close(got, u_n + 3.0 * (u_c - u_n), rtol=1e-5, atol=1e-5)


# --- the BOOT objective --------------------------------------------------------------------------------------
def _independent_target(teacher, y_prev, eps, t, s, labels, w):
    """One DDIM step written in x-space: x_s = alpha_s f + sigma_s (x_t - alpha_t f) / sigma_t."""
    ac = teacher.scheduler.alphas_cumprod.double()
    a_t, s_t, a_s, s_s = ac[t].sqrt(), (1 - ac[t]).sqrt(), ac[s].sqrt(), (1 - ac[s]).sqrt()
    x_t = (a_t * y_prev.double() + s_t * eps.double()).float()
    with torch.no_grad():
        u_c = teacher.unet(x_t[None], torch.tensor([t]), class_labels=torch.tensor([labels])).sample[0].double()
        u_n = teacher.unet(x_t[None], torch.tensor([t]), class_labels=torch.tensor([teacher.null_class_id])).sample
        u = u_n[0].double() + w * (u_c - u_n[0].double())
    f = a_t * x_t.double() - s_t * u  # v_prediction
    x_s = a_s * f + s_s * (x_t.double() - a_t * f) / s_t
    return (x_s - s_s * eps.double()) / a_s


def test_boot_loss_golden():
    torch.manual_seed(0)
    teacher = DiffusionTeacher(tiny_unet(num_class_embeds=4), DDPMScheduler(prediction_type="v_prediction"))
    task = BootTask(teacher, BootConfig(num_intervals=5, guidance_scale=2.0, boundary_fraction=0.25))
    # Perturb the student so that it differs from the teacher.
    with torch.no_grad():
        for p in task.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = task.sample_batch("student", 8, torch.device("cpu"))
    assert batch["k"][:2].tolist() == [1, 1] and batch["boundary"].sum() == 2
    losses = task("student", batch)

    ac = teacher.scheduler.alphas_cumprod.double()
    grid = task.grid
    alpha_0, sigma_0 = ac[grid[0]].sqrt(), (1 - ac[grid[0]]).sqrt()
    per_sample = []
    for i in range(8):
        eps, k, c = batch["eps"][i], int(batch["k"][i]), int(batch["class_labels"][i])

        def g(t, eps=eps, c=c):
            with torch.no_grad():
                u = task.student(eps[None], torch.tensor([t]), class_labels=torch.tensor([c])).sample[0].double()
            return alpha_0 * eps.double() - sigma_0 * u  # "teacher" parameterization, v-prediction at x_T

        y_prev = eps.double() * (1 - sigma_0) / alpha_0 if k == 1 else g(grid[k - 1])
        target = _independent_target(teacher, y_prev, eps, grid[k - 1], grid[k], c, 2.0)
        lam = lambda t: 0.5 * math.log(ac[t] / (1 - ac[t]))  # noqa: E731
        d = 1 - math.exp(lam(grid[k - 1]) - lam(grid[k]))
        per_sample.append(((g(grid[k]) - target) ** 2).mean() / d**2)
    per_sample = torch.stack(per_sample)
    expected = per_sample[2:].mean() + 1.0 * per_sample[:2].mean()
    torch.testing.assert_close(losses["loss"].double(), expected, rtol=2e-4, atol=1e-7)


def test_boot_student_initialization_and_grad():
    teacher = DiffusionTeacher(tiny_unet(), DDPMScheduler(prediction_type="epsilon"))
    task = BootTask(teacher, BootConfig(num_intervals=4))
    for a, b in zip(task.student.parameters(), teacher.unet.parameters()):
        assert torch.equal(a, b) and a.requires_grad and not b.requires_grad
    loss = task("student", task.sample_batch("student", 4, torch.device("cpu")))["loss"]
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.student.parameters())


def test_teacher_trajectory_matches_x_space_ddim_loop():
    """The K-step trajectory in signal space equals plain DDIM in x-space over the same grid."""
    teacher = DiffusionTeacher(tiny_unet(), DDIMScheduler(prediction_type="epsilon", clip_sample=False))
    task = BootTask(teacher, BootConfig(num_intervals=4))
    eps = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    y = task.teacher_trajectory(eps)
    ac = teacher.scheduler.alphas_cumprod.double()
    x = eps.double()
    for t, s in zip(task.grid[:-1], task.grid[1:]):
        with torch.no_grad():
            u = teacher.unet(x.float(), t).sample.double()
        f = (x - (1 - ac[t]).sqrt() * u) / ac[t].sqrt()
        x = ac[s].sqrt() * f + (1 - ac[s]).sqrt() * (x - ac[t].sqrt() * f) / (1 - ac[t]).sqrt()
    expected = (x - (1 - ac[0]).sqrt() * eps.double()) / ac[0].sqrt()
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)


def test_boot_config_errors():
    teacher = DiffusionTeacher(tiny_unet(), DDPMScheduler())
    with pytest.raises(ValueError, match="needs a class- or text-conditional teacher"):
        BootTask(teacher, BootConfig(guidance_scale=2.0))
    with pytest.raises(ValueError, match="unknown parameterization 'x0'"):
        BootTask(teacher, BootConfig(parameterization="x0"))
    with pytest.raises(ValueError, match="must be positive"):
        BootTask(teacher, BootConfig(num_intervals=0))
    cond = DiffusionTeacher(tiny_unet(num_class_embeds=4), DDPMScheduler())
    with pytest.raises(ValueError, match=r"\[5\] out of range"):
        BootTask(cond, BootConfig(class_ids=(0, 5)))
