"""BOOT on a Stable-Diffusion-1.5-sized teacher built from config (random weights cost what the real ones cost).

Measures, side by side in one process, and prints JSON (device, versions, date):
- the BOOT training step of `gendistill boot` (the training core's optimizer step: student forward without grad,
  guided teacher call of size 2B, student forward + backward, clipping, AdamW, EMA) in images/s and peak memory, at
  each batch size, with and without gradient checkpointing, under the recipe's mixed precision (bf16 on CUDA);
- each step naive (``fused_kernels`` off) and with the fused BOOT loss kernel, side by side;
- latency at batch 1, VAE decode included: the teacher's 50-step guided DDIM vs the student's one step.
Text embeddings are cached (random, as `--cache-text-embeddings` would hold them), so the text encoder is not timed.

    python benchmarks/boot_sd.py --out benchmarks/results/boot_sd_<device>_<date>.json      # CUDA
    python benchmarks/boot_sd.py --tiny --batch-sizes 2 --steps 2 --warmup 1                # CPU smoke run

Naive H100 reference (issue 3): 28.5 img/s at batch 8 with 24.2 GiB, 40 img/s at batch 16 with 33.6 GiB;
teacher 1,789 ms vs student 30 ms + VAE 23 ms.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from gendistill.data.prompts import PromptEmbeddings
from gendistill.diffusion.boot import BootConfig, BootTask
from gendistill.diffusion.teacher import TextDiffusionTeacher
from gendistill.training.boot import BootRecipe
from gendistill.training.core import Trainer, resolve_mixed_precision


def sd15_components(tiny: bool, workdir: Path) -> dict:
    """SD 1.5's UNet/VAE/text-encoder configs (or tiny ones), random weights; a small written tokenizer."""
    vocab = {
        "<|startoftext|>": 0,
        "<|endoftext|>": 1,
        **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")},
    }
    (workdir / "vocab.json").write_text(json.dumps(vocab))
    (workdir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        vocab=str(workdir / "vocab.json"), merges=str(workdir / "merges.txt"), model_max_length=77
    )
    if tiny:
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8,
            sample_size=16,
        )
        text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    else:  # stable-diffusion-v1-5 shapes: 860M UNet at 64x64 latents, 84M VAE, 123M CLIP ViT-L/14 text encoder
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
            scaling_factor=0.18215,
        )
        text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    text.vocab_size, text.max_position_embeddings = len(tokenizer), 77
    text.bos_token_id, text.eos_token_id, text.pad_token_id = 0, 1, 1
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": CLIPTextModel(text),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


class Clock:
    """Wall time of a callable: CUDA events on CUDA (no host sync inside the timed region), perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0
        tic = time.perf_counter()
        fn()
        return time.perf_counter() - tic


def bench_step(
    components, args, workdir: Path, batch_size: int, checkpointing: bool, device, fused: bool = True
) -> dict:
    teacher = TextDiffusionTeacher(
        components["unet"],
        components["scheduler"],
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
    )
    prompts = [f"prompt {i}" for i in range(64)]
    dim = components["text_encoder"].config.hidden_size
    cache = PromptEmbeddings(torch.randn(len(prompts), 77, dim, generator=torch.Generator().manual_seed(0)))
    config = BootConfig(num_intervals=50, guidance_scale=7.5, gradient_checkpointing=checkpointing, num_eval_noises=1)
    task = BootTask(teacher, config, prompts=prompts, prompt_embeddings=cache)
    recipe = BootRecipe(
        output=str(workdir / f"run_{batch_size}_{checkpointing}_{fused}"),
        fused_kernels=fused,
        batch_size=batch_size,
        lr=1e-5,
        max_steps=10**6,
        checkpoint_every=0,
        eval_every=0,
        sample_every=0,
    )
    if resolve_mixed_precision(recipe) == "bf16" and device.type == "cuda":
        teacher.to(torch.bfloat16)
    trainer = Trainer(task, recipe, command="boot")
    phase = trainer.phases[0]
    clock = Clock(device)
    for _ in range(args.warmup):
        trainer._phase_step(phase, batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [clock(lambda: trainer._phase_step(phase, batch_size)) for _ in range(args.steps)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    trainer.end()
    median = statistics.median(times)
    result = {
        "batch_size": batch_size,
        "gradient_checkpointing": checkpointing,
        "variant": "fused" if fused else "naive",
        "median_step_s": median,
        "images_per_s": batch_size / median,
        "peak_memory_gib": peak,
        "mixed_precision": resolve_mixed_precision(recipe),
    }
    return result


@torch.no_grad()
def bench_latency(components, args, device) -> dict:
    """Batch 1: the teacher's 50-step DDIM with guidance (2B UNet calls) + VAE vs one student call + VAE."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    unet, vae = components["unet"].to(device, dtype).eval(), components["vae"].to(device, dtype).eval()
    scheduler = DDIMScheduler.from_config(components["scheduler"].config)
    size = unet.config.sample_size
    states = torch.randn(2, 77, components["text_encoder"].config.hidden_size, device=device, dtype=dtype)
    eps = torch.randn(1, 4, size, size, device=device, dtype=dtype)
    clock = Clock(device)

    def decode(latents):
        return vae.decode(latents / vae.config.scaling_factor).sample

    def teacher():
        scheduler.set_timesteps(50)
        x = eps
        for t in scheduler.timesteps:
            u_c, u_n = unet(torch.cat([x, x]), t, encoder_hidden_states=states).sample.chunk(2)
            x = scheduler.step(u_n + 7.5 * (u_c - u_n), t, x).prev_sample
        return decode(x)

    def student_unet():
        return unet(eps, torch.tensor([0], device=device), encoder_hidden_states=states[:1]).sample

    def runs(fn, n):
        for _ in range(args.warmup):
            fn()
        return statistics.median(clock(fn) for _ in range(n))

    latents = student_unet()
    result = {
        "dtype": str(dtype),
        "teacher_50_step_guided_ms": 1000 * runs(teacher, max(1, args.steps // 5)),
        "student_unet_ms": 1000 * runs(student_unet, args.steps),
        "vae_decode_ms": 1000 * runs(lambda: decode(latents), args.steps),
    }
    if args.compile:
        # torch.compile with CUDA graphs ("reduce-overhead") for the launch-bound batch-1 path; compile time recorded.
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        compiled_unet, compiled_vae = torch.compile(unet, mode=mode), torch.compile(vae.decode, mode=mode)
        t = torch.tensor([0], device=device)
        tic = time.perf_counter()
        for _ in range(3):
            compiled_unet(eps, t, encoder_hidden_states=states[:1])
            compiled_vae(latents / vae.config.scaling_factor)
        result["compile_mode"] = mode
        result["compile_seconds"] = time.perf_counter() - tic
        result["student_unet_compiled_ms"] = 1000 * runs(
            lambda: compiled_unet(eps, t, encoder_hidden_states=states[:1]).sample, args.steps
        )
        result["vae_decode_compiled_ms"] = 1000 * runs(
            lambda: compiled_vae(latents / vae.config.scaling_factor).sample, args.steps
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny components (CPU smoke run), not SD-1.5 sizes")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--steps", type=int, default=20, help="timed repetitions (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time the batch-1 path under torch.compile")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        components = sd15_components(args.tiny, workdir)
        steps = [
            bench_step(components, args, workdir, b, ckpt, device, fused)
            for b in args.batch_sizes
            for ckpt in (False, True)
            for fused in (False, True)
        ]
        latency = bench_latency(components, args, device)
    result = {
        "benchmark": "boot_sd",
        "components": "tiny" if args.tiny else "sd15-sized (random init)",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "boot_step": steps,
        "latency_batch1": latency,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
