"""``gendistill sample``: images from a saved BOOT student folder (loaded without running the folder's code).

``--output grid.png`` writes one PNG grid. The noises (and random classes) of all images are drawn first, exactly
as one pipeline call of ``--num-images`` draws them, and the images are then generated ``--batch-size`` at a time
(memory is checked before sampling starts). Up to ``--batch-size`` images, this is that one call: the same PNG as
earlier versions of this command. Beyond it, the images come from the same noises and classes, but a UNet call on a
batch of another size may round differently in the last float bits (CPU and GPU kernels are not batch-invariant),
which can move a rare pixel by one level of 255.

``--output FOLDER`` writes each image as its own PNG (``00000.png``, ...) as soon as its batch is generated, so
memory does not grow with ``--num-images``. Image ``i`` is drawn from its own generator, seeded from ``--seed``
and ``i``: its noise does not depend on the batch size or on the number of images (but differs from image ``i``
of a grid).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from gendistill.data.images import IMAGE_EXTENSIONS
from gendistill.errors import UsageError, as_usage_errors
from gendistill.files import check_fits_in_memory, check_output_not_input
from gendistill.pipelines import BootPipeline, load_boot_pipeline

GRID_PADDING = 2  # torchvision's save_image default, kept so grids are byte-identical to earlier versions


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"--class-labels must be integers separated by commas, got {text!r}") from None


def _image_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` in folder mode: distinct for every (seed, index) pair."""
    return int(np.random.SeedSequence([seed % 2**64, index]).generate_state(1, dtype=np.uint64)[0])


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> uint8 on the CPU, rounded as torchvision's ``save_image`` rounds."""
    return images.mul(255).add_(0.5).clamp_(0, 255).to("cpu", torch.uint8)


def _save_png(array: np.ndarray, path: Path) -> None:
    """An (H, W, 3) or (H, W) uint8 array as a PNG, written under a hidden temporary name and renamed (readers of
    image folders skip hidden files, so an interrupted run never leaves a half-written image among the others)."""
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)


def _check_output(args) -> bool:
    """Validate ``--output``; True for a grid file, False for a folder of images."""
    out = Path(args.output)
    if out.suffix.lower() == ".png":
        return True
    if out.suffix.lower() in IMAGE_EXTENSIONS:
        raise UsageError(f"--output must be a .png file (a grid) or a folder (one PNG per image), got {args.output!r}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {args.output!r} is a file; give a .png file (a grid) or a folder")
    if out.is_dir() and any(p.suffix.lower() == ".png" for p in out.iterdir()):
        raise UsageError(f"--output folder {args.output!r} already holds PNG images; choose a new or empty folder")
    check_output_not_input(out, {"--model": args.model})
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gendistill sample", description=__doc__)
    parser.add_argument("--model", required=True, help="a BOOT student folder (gendistill boot --output)")
    parser.add_argument(
        "--output", required=True, help="PNG file of the grid, or a folder: one PNG per image, written as generated"
    )
    parser.add_argument("--num-images", type=int, default=16, help="images to generate (default: 16)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="images per pipeline call (default: 16); the noises do not depend on it",
    )
    parser.add_argument(
        "--class-labels",
        type=_int_list,
        default=None,
        help="comma-separated class ids, cycled over the images (default: random classes)",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="prompt of a text-to-image student; repeat for several, cycled over the images",
    )
    parser.add_argument(
        "--guidance-scale", type=float, default=None, help="guidance scale of a guidance-range text student"
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    parser.add_argument("--refine-steps", type=int, default=0, help="teacher DDIM steps after the jump (default: 0)")
    parser.add_argument("--nrow", type=int, default=8, help="images per grid row (default: 8)")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        raise UsageError(f"--num-images must be positive, got {args.num_images}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    if args.nrow < 1:
        raise UsageError(f"--nrow must be a positive number of images per grid row, got {args.nrow}")
    if args.class_labels is not None and not args.class_labels:
        raise UsageError("--class-labels is empty")
    grid = _check_output(args)
    with as_usage_errors():
        pipe = load_boot_pipeline(args.model)
    num = args.num_images

    # 1. What one image needs: its noise shape, its image shape, and the pipeline's conditioning arguments
    if isinstance(pipe, BootPipeline):
        if args.class_labels is not None:
            raise UsageError("--class-labels applies to class-conditional students; this one takes --prompt")
        if not args.prompt:
            raise UsageError("this student is text-to-image: give --prompt TEXT (repeat for several prompts)")
        height, width = pipe.default_size()
        factor = pipe.vae_scale_factor
        noise_shape = (pipe.unet.config.in_channels, height // factor, width // factor)
        image_shape = (3, height, width)
    else:
        if args.prompt or args.guidance_scale is not None:
            raise UsageError("--prompt and --guidance-scale apply to text-to-image students; this one is not")
        noise_shape = image_shape = pipe.sample_shape()

    def generate(start: int, stop: int, latents: torch.Tensor | None, generator, labels) -> torch.Tensor:
        """Images ``start:stop`` as uint8 (B, C, H, W) on the CPU."""
        common = {"generator": generator, "latents": latents, "refine_steps": args.refine_steps, "output_type": "pt"}
        if isinstance(pipe, BootPipeline):
            prompts = [args.prompt[i % len(args.prompt)] for i in range(start, stop)]
            with as_usage_errors():
                images = pipe(prompts, guidance_scale=args.guidance_scale, **common).images
        else:
            if labels is None and args.class_labels is not None:
                labels = [args.class_labels[i % len(args.class_labels)] for i in range(start, stop)]
            with as_usage_errors():
                images = pipe(batch_size=stop - start, class_labels=labels, **common).images
        return _to_uint8(images)

    def batches():
        """``(start, stop)`` of each pipeline call, with a progress bar when there are several."""
        with tqdm(total=num, desc="sampling", unit="image", disable=num <= args.batch_size) as progress:
            for start in range(0, num, args.batch_size):
                stop = min(start + args.batch_size, num)
                yield start, stop
                progress.update(stop - start)

    out = Path(args.output)
    if not grid:
        # 2a. Folder: each image from its own generator, written as soon as its batch is done
        digits = max(5, len(str(num - 1)))
        for start, stop in batches():
            generators = [torch.Generator().manual_seed(_image_seed(args.seed, i)) for i in range(start, stop)]
            images = generate(start, stop, None, generators, None)
            out.mkdir(parents=True, exist_ok=True)
            for i, image in zip(range(start, stop), images):
                array = image.permute(1, 2, 0).numpy()
                _save_png(array[..., 0] if array.shape[-1] == 1 else array, out / f"{i:0{digits}d}.png")
        print(f"wrote {num} images to {out}/ (refine_steps={args.refine_steps})")
        return 0

    # 2b. Grid: check its memory, draw every noise (and random class) as one pipeline call of `num` images would,
    # then generate in batches. Memory per image: its float32 noise, its class, its uint8 image and their
    # concatenation (grey images are made RGB for the grid); the grid itself is held three times (the tensor, its
    # contiguous copy and PIL's image).
    channels, height, width = image_shape
    cols = min(args.nrow, num)
    rows = math.ceil(num / cols)
    grid_bytes = 3 * (rows * (height + GRID_PADDING) + GRID_PADDING) * (cols * (width + GRID_PADDING) + GRID_PADDING)
    per_image = 4 * math.prod(noise_shape) + 8 + 2 * channels * height * width + 3 * height * width
    check_fits_in_memory(
        num * per_image + 3 * grid_bytes, f"a grid of --num-images {num} images of {channels}x{height}x{width}"
    )
    generator = torch.Generator().manual_seed(args.seed)
    eps = randn_tensor((num, *noise_shape), generator=generator, device=torch.device("cpu"), dtype=torch.float32)
    labels = None
    if not isinstance(pipe, BootPipeline) and args.class_labels is None:
        labels = pipe.prepare_class_labels(num, None, generator, torch.device("cpu"))
    images = []
    for start, stop in batches():
        batch_labels = None if labels is None else labels[start:stop]
        images.append(generate(start, stop, eps[start:stop], None, batch_labels))
    del eps
    tiled = make_grid(torch.cat(images), nrow=args.nrow, padding=GRID_PADDING)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_png(tiled.permute(1, 2, 0).numpy(), out)
    print(f"wrote {out} ({num} images, refine_steps={args.refine_steps})")
    return 0
