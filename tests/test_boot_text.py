"""The Stable Diffusion side of BOOT in the library: text teachers, prompts, guidance ranges, LoRA students."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import shutil

import pytest
import torch
from conftest import save_sd_teacher, tiny_sd_components
from diffusers import DDIMScheduler
from diffusers.models.embeddings import get_timestep_embedding

from gendistill.data.prompts import PromptEmbeddings, load_prompts, prompts_fingerprint
from gendistill.diffusion.boot import BootConfig, BootTask, guidance_embedding, resolve_parameterization
from gendistill.diffusion.teacher import DiffusionTeacher, TextDiffusionTeacher, load_teacher

PROMPTS = ["a red cat", "a blue dog", "a cat", "red", "blue blue dog"]


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    return tiny_sd_components(tmp_path_factory.mktemp("sd-components"))


def make_teacher(components, prediction_type=None) -> TextDiffusionTeacher:
    c = components
    return TextDiffusionTeacher(
        c["unet"],
        c["scheduler"],
        vae=c["vae"],
        text_encoder=c["text_encoder"],
        tokenizer=c["tokenizer"],
        prediction_type=prediction_type,
    )


def encode(components, prompts):
    ids = components["tokenizer"](prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return components["text_encoder"](ids.input_ids).last_hidden_state


# --- teacher ---------------------------------------------------------------------------------------------------
def test_text_teacher_from_stable_diffusion_folder(sd_teacher_dir):
    teacher = load_teacher(sd_teacher_dir)
    assert type(teacher) is TextDiffusionTeacher and teacher.is_text_conditional and teacher.is_latent
    assert teacher.prediction_type == "epsilon" and teacher.sample_shape == (4, 8, 8)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.null_prompt_embeds.shape == (1, 16, 32)
    assert teacher.class_ids == [] and not teacher.is_class_conditional


def test_encode_prompts_and_null_prompt(components):
    teacher = make_teacher(components)
    torch.testing.assert_close(teacher.encode_prompts(["a red cat", "dog"]), encode(components, ["a red cat", "dog"]))
    torch.testing.assert_close(teacher.null_prompt_embeds, encode(components, [""]))
    assert teacher.count_truncated(["a cat", "a red cat " * 10]) == 1


def test_text_guidance_is_one_batched_call_with_per_sample_scales(components):
    teacher = make_teacher(components)
    calls = []
    hook = teacher.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900])
    states = encode(components, ["a cat", "a dog", "red"])
    w = torch.tensor([1.0, 3.0, 7.5])
    got = teacher.guided_native(x, t, teacher.condition(states), guidance_scale=w)
    hook.remove()
    assert calls == [6]
    null = encode(components, [""]).expand(3, -1, -1)
    with torch.no_grad():
        u_c = teacher.unet(x, t, encoder_hidden_states=states).sample
        u_n = teacher.unet(x, t, encoder_hidden_states=null).sample
    torch.testing.assert_close(got, u_n + w.view(3, 1, 1, 1) * (u_c - u_n), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_text_teacher_trajectory_equals_diffusers_ddim_with_guidance(components, prediction_type):
    """K = 3 on 1000 steps: the grid 999, 666, 333 -> 0 is evenly spaced, so diffusers' DDIM step() walks it."""
    teacher = make_teacher(components, prediction_type)
    task = BootTask(teacher, BootConfig(num_intervals=3, guidance_scale=3.0), prompts=PROMPTS)
    assert task.grid == [999, 666, 333, 0]
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    states = encode(components, ["a red cat", "blue"])
    y = task.teacher_trajectory(eps, teacher.condition(states))

    scheduler = DDIMScheduler.from_config(components["scheduler"].config, prediction_type=prediction_type)
    scheduler.set_timesteps(3)  # step() goes from t to t - 1000 // 3
    scheduler.timesteps = torch.tensor([999, 666, 333])
    x, null = eps.clone(), encode(components, [""]).expand(2, -1, -1)
    for t in scheduler.timesteps:
        with torch.no_grad():
            u_c = components["unet"](x, t, encoder_hidden_states=states).sample
            u_n = components["unet"](x, t, encoder_hidden_states=null).sample
        x = scheduler.step(u_n + 3.0 * (u_c - u_n), t, x, eta=0.0).prev_sample
    ac = components["scheduler"].alphas_cumprod[0].double()
    expected = (x.double() - (1 - ac).sqrt() * eps.double()) / ac.sqrt()  # the signal at t = 0
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)


def test_text_teacher_errors(components, tmp_path):
    c = components
    with pytest.raises(ValueError, match="needs its text encoder, tokenizer and VAE"):
        TextDiffusionTeacher(c["unet"], c["scheduler"], vae=c["vae"], text_encoder=None, tokenizer=c["tokenizer"])
    with pytest.raises(ValueError, match="vae=NoneType"):
        TextDiffusionTeacher(
            c["unet"], c["scheduler"], vae=None, text_encoder=c["text_encoder"], tokenizer=c["tokenizer"]
        )
    with pytest.raises(ValueError, match="unsupported teacher UNet class UNet2DConditionModel for DiffusionTeacher"):
        DiffusionTeacher(c["unet"], c["scheduler"])
    folder = save_sd_teacher(tmp_path / "sd")
    shutil.rmtree(tmp_path / "sd" / "text_encoder")
    with pytest.raises(ValueError, match="has no text_encoder subfolder"):
        load_teacher(folder)
    with pytest.raises(ValueError, match="a text-to-image teacher: use TextDiffusionTeacher"):
        DiffusionTeacher.from_pretrained(folder)
    with pytest.raises(ValueError, match="null_class_id applies to class-conditional teachers"):
        load_teacher(save_sd_teacher(tmp_path / "sd2"), null_class_id=0)
    weights = next((tmp_path / "sd2" / "text_encoder").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated: diffusers' loading fails, one clear error
    with pytest.raises(ValueError, match="cannot load it as a StableDiffusionPipeline"):
        load_teacher(tmp_path / "sd2")


# --- prompts -----------------------------------------------------------------------------------------------------
def test_load_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red cat\n\n   \n  a blue dog  \n")
    assert load_prompts(path) == ["a red cat", "a blue dog"]
    assert load_prompts(["x", "", " y "]) == ["x", "y"]
    with pytest.raises(FileNotFoundError, match="prompts file '.*missing.txt' does not exist"):
        load_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="has no prompts"):
        load_prompts(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="prompts must be strings; got int"):
        load_prompts(["a", 3])


@pytest.mark.parametrize("in_memory", [True, False])
def test_prompt_embeddings_cache_round_trip(components, tmp_path, in_memory):
    teacher = make_teacher(components)
    cache = PromptEmbeddings.encode(teacher.encode_prompts, PROMPTS, batch_size=2)
    torch.testing.assert_close(
        cache[torch.tensor([4, 0, 4])], encode(components, [PROMPTS[4], PROMPTS[0], PROMPTS[4]])
    )
    fingerprint = prompts_fingerprint(PROMPTS, "encoder")
    cache.save(tmp_path / "emb.safetensors", fingerprint=fingerprint)
    loaded = PromptEmbeddings.from_file(tmp_path / "emb.safetensors", fingerprint=fingerprint, in_memory=in_memory)
    assert len(loaded) == 5 and loaded.shape == (5, 16, 32)
    index = torch.tensor([3, 1, 3])
    assert torch.equal(loaded[index], cache[index])
    other = prompts_fingerprint(PROMPTS[:-1], "encoder")
    assert PromptEmbeddings.from_file(tmp_path / "emb.safetensors", fingerprint=other) is None


def test_cached_and_live_prompt_batches_agree(components):
    teacher = make_teacher(components)
    cache = PromptEmbeddings.encode(teacher.encode_prompts, PROMPTS)
    live = BootTask(teacher, BootConfig(num_intervals=4, guidance_scale=7.5), prompts=PROMPTS)
    cached = BootTask(
        teacher, BootConfig(num_intervals=4, guidance_scale=7.5), prompts=PROMPTS, prompt_embeddings=cache
    )
    torch.manual_seed(0)
    a = live.sample_batch("student", 6, torch.device("cpu"))
    torch.manual_seed(0)
    b = cached.sample_batch("student", 6, torch.device("cpu"))
    torch.testing.assert_close(a["encoder_hidden_states"], b["encoder_hidden_states"])
    assert torch.equal(a["eps"], b["eps"]) and a["encoder_hidden_states"].shape == (6, 16, 32)


# --- students ----------------------------------------------------------------------------------------------------
def test_guidance_embedding_is_the_lcm_sinusoid():
    w = torch.tensor([1.0, 7.5])
    half = 8
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / (half - 1))
    angles = (w * 1000.0)[:, None] * freqs[None]
    expected = torch.cat([angles.sin(), angles.cos()], dim=1)
    torch.testing.assert_close(guidance_embedding(w, 16), expected)
    assert torch.equal(guidance_embedding(w, 16), get_timestep_embedding(w * 1000, 16, False, 1))


def test_auto_parameterization_reads_an_epsilon_teachers_student_as_the_signal(components):
    teacher = make_teacher(components)  # epsilon prediction, Stable Diffusion's schedule (alpha_T = 0.068)
    task = BootTask(teacher, BootConfig(num_intervals=4, guidance_scale=3.0), prompts=PROMPTS)
    assert task.config.parameterization == "raw" and BootConfig().parameterization == "auto"
    eps, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 333])
    cond = teacher.condition(encode(components, ["a cat", "a dog"]))
    with torch.no_grad():
        u = task.student(eps, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        torch.testing.assert_close(task.student_signal(eps, t, cond), u)
    assert resolve_parameterization("v_prediction") == "teacher" and resolve_parameterization("sample") == "teacher"


def test_guidance_range_student_starts_as_teacher_and_reads_the_scale(components):
    teacher = make_teacher(components)
    config = BootConfig(num_intervals=4, guidance_scale=4.0, guidance_range=(1.0, 8.0), guidance_embedding_dim=16)
    task = BootTask(teacher, dataclasses.replace(config, parameterization="teacher"), prompts=PROMPTS)
    assert task.student.config.time_cond_proj_dim == 16 and teacher.unet.config.time_cond_proj_dim is None
    assert torch.count_nonzero(task.student.time_embedding.cond_proj.weight) == 0
    eps, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 333])
    cond = teacher.condition(encode(components, ["a cat", "a dog"]))
    with torch.no_grad():
        u = teacher.unet(eps, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        y = task.student_signal(eps, t, cond, torch.tensor([2.0, 8.0]))
        ac = components["scheduler"].alphas_cumprod[999]
        torch.testing.assert_close(y, (eps - (1 - ac).sqrt() * u) / ac.sqrt(), rtol=1e-4, atol=1e-4)
        torch.nn.init.normal_(task.student.time_embedding.cond_proj.weight, std=0.1)
        low = task.student_signal(eps, t, cond, torch.tensor([2.0, 2.0]))
        high = task.student_signal(eps, t, cond, torch.tensor([8.0, 8.0]))
    assert (low - high).abs().max() > 1e-3
    batch = task.sample_batch("student", 64, torch.device("cpu"))
    assert batch["guidance_scale"].min() >= 1.0 and batch["guidance_scale"].max() <= 8.0
    assert batch["guidance_scale"].std() > 1.0
    task("student", batch)["loss"].backward()
    assert task.student.time_embedding.cond_proj.weight.grad.abs().sum() > 0


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")
def test_lora_student_trains_only_adapters_and_starts_as_teacher(components):
    teacher = make_teacher(components)
    full = BootTask(teacher, BootConfig(num_intervals=4, guidance_scale=7.5), prompts=PROMPTS)
    lora = BootTask(teacher, BootConfig(num_intervals=4, guidance_scale=7.5, lora_rank=4), prompts=PROMPTS)
    trainable = [n for n, p in lora.student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    num_trainable = sum(p.numel() for p in lora.student.parameters() if p.requires_grad)
    assert num_trainable < 0.5 * sum(p.numel() for p in full.student.parameters())
    eps, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 0])
    cond = teacher.condition(encode(components, ["a cat", "a dog"]))
    with torch.no_grad():
        torch.testing.assert_close(lora.student_signal(eps, t, cond), full.student_signal(eps, t, cond))
    lora("student", lora.sample_batch("student", 4, torch.device("cpu")))["loss"].backward()
    assert all(p.grad is None for n, p in lora.student.named_parameters() if "lora_" not in n)


def test_boot_text_config_errors(components, monkeypatch):
    teacher = make_teacher(components)
    with pytest.raises(ValueError, match="needs prompts to distill on"):
        BootTask(teacher, BootConfig(guidance_scale=7.5))
    with pytest.raises(ValueError, match="outside the guidance_range"):
        BootConfig(guidance_scale=9.0, guidance_range=(1.0, 8.0)).validate()
    with pytest.raises(ValueError, match=r"0 <= w_min < w_max, got \[8.0, 2.0\]"):
        BootConfig(guidance_scale=4.0, guidance_range=(8.0, 2.0)).validate()
    with pytest.raises(ValueError, match="5 prompt embeddings were given for 2 prompts"):
        cache = PromptEmbeddings(torch.zeros(5, 16, 32))
        BootTask(teacher, BootConfig(guidance_scale=7.5), prompts=["a", "b"], prompt_embeddings=cache)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real_find_spec(name, *a)
    )
    with pytest.raises(
        ValueError, match=r"lora_rank=4 needs peft, which is not installed: pip install 'gendistill\[lora\]'"
    ):
        BootConfig(lora_rank=4).validate()


def test_guidance_range_needs_a_conditional_unet():
    from conftest import tiny_unet
    from diffusers import DDPMScheduler

    teacher = DiffusionTeacher(tiny_unet(num_class_embeds=4), DDPMScheduler())
    config = BootConfig(guidance_scale=2.0, guidance_range=(1.0, 3.0))
    with pytest.raises(ValueError, match="a guidance range needs a UNet that takes timestep_cond"):
        BootTask(teacher, config)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(components):
    teacher = make_teacher(components)
    plain = BootTask(teacher, BootConfig(num_intervals=4, guidance_scale=3.0), prompts=PROMPTS)
    ckpt = BootTask(
        teacher, BootConfig(num_intervals=4, guidance_scale=3.0, gradient_checkpointing=True), prompts=PROMPTS
    )
    assert ckpt.student.is_gradient_checkpointing and not plain.student.is_gradient_checkpointing
    torch.manual_seed(0)
    batch = plain.sample_batch("student", 4, torch.device("cpu"))
    losses = [task("student", batch)["loss"] for task in (plain, ckpt)]
    torch.testing.assert_close(losses[0], losses[1])
    for loss in losses:
        loss.backward()
    for a, b in zip(plain.student.parameters(), ckpt.student.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
