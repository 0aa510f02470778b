"""SiD (and DMD) on a Stable-Diffusion-1.5-sized teacher built from config (random weights cost what the real ones
cost): the cost of one training iteration of `gendistill sid`.

Measures, in one process, and prints JSON (device, versions, date): one iteration of the training core (the fake
score's step: a generator forward without grad, a fake-score forward + backward; then the generator's step: a
generator forward, the guided teacher call of size 2B and the fake score at the noised sample, backward through
both into the generator for SiD, through the sample alone for DMD; clipping, AdamW, EMA) in generated images/s and
peak memory, at each batch size, with and without gradient checkpointing, for a full and a LoRA generator, under
the recipe's mixed precision (bf16 on CUDA). Text embeddings are cached (random, as `--cache-text-embeddings`
would hold them), so the text encoder is not timed. The components and the clock are `boot_sd.py`'s.

    python benchmarks/sid_sd.py --out benchmarks/results/sid_sd_<device>_<date>.json      # CUDA
    python benchmarks/sid_sd.py --tiny --batch-sizes 2 --steps 2 --warmup 1                # CPU smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

import diffusers
import torch

from gendistill.data.prompts import PromptEmbeddings
from gendistill.diffusion.sid import SiDConfig, SiDTask
from gendistill.diffusion.teacher import TextDiffusionTeacher
from gendistill.training.core import Trainer, resolve_mixed_precision
from gendistill.training.sid import SiDRecipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from boot_sd import Clock, sd15_components  # noqa: E402  (the sibling benchmark)


def bench_iteration(components, args, workdir: Path, batch_size: int, checkpointing: bool, lora_rank: int, device):
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
    config = SiDConfig(
        objective=args.objective,
        guidance_scale=4.5,
        gradient_checkpointing=checkpointing,
        lora_rank=lora_rank,
        num_eval_noises=1,
    )
    task = SiDTask(teacher, config, prompts=prompts, prompt_embeddings=cache)
    recipe = SiDRecipe(
        output=str(workdir / f"run_{batch_size}_{checkpointing}_{lora_rank}"),
        batch_size=batch_size,
        lr=1e-5,
        max_steps=10**6,
        checkpoint_every=0,
        eval_every=0,
        sample_every=0,
    )
    if resolve_mixed_precision(recipe) == "bf16" and device.type == "cuda":
        teacher.to(torch.bfloat16)
    trainer = Trainer(task, recipe, command="sid")
    clock = Clock(device)

    def iteration():
        for phase in trainer.phases:
            for _ in range(phase.steps):
                trainer._phase_step(phase, batch_size)

    for _ in range(args.warmup):
        iteration()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [clock(iteration) for _ in range(args.steps)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    trainer.end()
    median = statistics.median(times)
    return {
        "objective": args.objective,
        "batch_size": batch_size,
        "gradient_checkpointing": checkpointing,
        "generator": f"lora rank {lora_rank}" if lora_rank else "full",
        "median_iteration_s": median,
        "images_per_s": batch_size / median,
        "peak_memory_gib": peak,
        "mixed_precision": resolve_mixed_precision(recipe),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny components (CPU smoke run), not SD-1.5 sizes")
    parser.add_argument("--objective", choices=("sid", "dmd"), default="sid")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--lora-rank", type=int, default=64, help="the LoRA generator's rank (0: full only)")
    parser.add_argument("--steps", type=int, default=10, help="timed iterations (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ranks = [0] + ([args.lora_rank] if args.lora_rank and importlib.util.find_spec("peft") is not None else [])
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        components = sd15_components(args.tiny, workdir)
        rows = [
            bench_iteration(components, args, workdir, b, ckpt, rank, device)
            for b in args.batch_sizes
            for ckpt in (False, True)
            for rank in ranks
        ]
    result = {
        "benchmark": "sid_sd",
        "components": "tiny" if args.tiny else "sd15-sized (random init)",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "iterations": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
