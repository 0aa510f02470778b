"""``gendistill sample``: a PNG grid from a saved BOOT student folder (loaded without running the folder's code)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torchvision.utils import save_image

from gendistill.pipelines import BootPipeline, load_boot_pipeline


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--class-labels must be integers separated by commas, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gendistill sample", description=__doc__)
    parser.add_argument("--model", required=True, help="a BOOT student folder (gendistill boot --output)")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--num-images", type=int, default=16, help="images in the grid (default: 16)")
    parser.add_argument(
        "--class-labels",
        type=_int_list,
        default=None,
        help="comma-separated class ids, cycled over the grid (default: random classes)",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="prompt of a text-to-image student; repeat for several, cycled over the grid",
    )
    parser.add_argument(
        "--guidance-scale", type=float, default=None, help="guidance scale of a guidance-range text student"
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    parser.add_argument("--refine-steps", type=int, default=0, help="teacher DDIM steps after the jump (default: 0)")
    parser.add_argument("--nrow", type=int, default=8, help="images per grid row (default: 8)")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        raise ValueError(f"--num-images must be positive, got {args.num_images}")
    if not args.output.lower().endswith(".png"):
        raise ValueError(f"--output must be a .png file, got {args.output!r}")
    pipe = load_boot_pipeline(args.model)
    generator = torch.Generator().manual_seed(args.seed)
    if isinstance(pipe, BootPipeline):
        if args.class_labels is not None:
            raise ValueError("--class-labels applies to class-conditional students; this one takes --prompt")
        if not args.prompt:
            raise ValueError("this student is text-to-image: give --prompt TEXT (repeat for several prompts)")
        prompts = [args.prompt[i % len(args.prompt)] for i in range(args.num_images)]
        images = pipe(
            prompts,
            guidance_scale=args.guidance_scale,
            generator=generator,
            refine_steps=args.refine_steps,
            output_type="pt",
        ).images
    else:
        if args.prompt or args.guidance_scale is not None:
            raise ValueError("--prompt and --guidance-scale apply to text-to-image students; this one is not")
        labels = None
        if args.class_labels is not None:
            if not args.class_labels:
                raise ValueError("--class-labels is empty")
            labels = [args.class_labels[i % len(args.class_labels)] for i in range(args.num_images)]
        images = pipe(
            batch_size=args.num_images,
            class_labels=labels,
            generator=generator,
            refine_steps=args.refine_steps,
            output_type="pt",
        ).images
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    save_image(images, tmp, nrow=args.nrow)
    os.replace(tmp, out)
    print(f"wrote {out} ({args.num_images} images, refine_steps={args.refine_steps})")
    return 0
