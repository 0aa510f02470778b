"""FID Inception-v3 feature throughput in fp32, TF32 and bf16 autocast, and how much bf16 features move FID.

Prints one JSON object (and writes it with --out): the device, images/s of each precision at 299x299 input (median
of timed batches after warm-up, CUDA events on GPUs), and FID between two image sets computed with fp32 features and
with bf16 features of the same images. Images are random (the FID shift depends on the feature precision, not on
the content) unless --images points at a folder. The official weights are needed for meaningful FID values:
--inception-weights PATH (or GENDISTILL_INCEPTION_WEIGHTS); --random-weights uses an untrained net of the official
layout, for smoke runs only.

    python benchmarks/inception_throughput.py --inception-weights pt_inception-2015-12-05-6726825d.pth \\
        --out benchmarks/results/inception_<device>_<date>.json
    python benchmarks/inception_throughput.py --random-weights --tiny   # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import tempfile
from pathlib import Path

import torch

from gendistill.eval import sources
from gendistill.eval.features import InceptionFeatures, save_random_inception
from gendistill.eval.fid import StatsAccumulator, frechet_distance
from gendistill.eval.report import device_description, versions
from gendistill.eval.speed import measure


def precision_context(name: str, device: torch.device):
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
        torch.backends.cudnn.allow_tf32 = name == "tf32"
    if name == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inception-weights", default=None)
    parser.add_argument("--random-weights", action="store_true", help="untrained net of the official layout")
    parser.add_argument("--images", default=None, help="folder of images for the FID shift (default: random)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-images", type=int, default=5000, help="images per set for the FID shift")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: batch 4, 16 images, 2 repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.batch_size, args.num_images, args.repeats = 4, 16, 2
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_random_inception(Path(tmp) / "random.pth") if args.random_weights else args.inception_weights
        extractor = InceptionFeatures(weights).to(device)
    result = {
        "device": device_description(device),
        "date": datetime.date.today().isoformat(),
        "versions": versions(),
        "extractor": extractor.name,
        "batch_size": args.batch_size,
        "input": "uint8 images resized to 299x299 inside the extractor",
        "throughput_images_per_s": {},
    }
    x = torch.rand(args.batch_size, 3, 299, 299, device=device)
    with torch.no_grad():
        for name in ("fp32", "tf32", "bf16"):
            if name == "tf32" and device.type != "cuda":
                continue
            with precision_context(name, device):
                times = measure(lambda: extractor(x), device=device, warmup=2, repeats=args.repeats)
            result["throughput_images_per_s"][name] = args.batch_size / statistics.median(times)

    def image_sets():
        if args.images:
            batches = sources.iter_image_folder(args.images, batch_size=args.batch_size, limit=2 * args.num_images)
            flat = torch.cat(list(batches))
            return flat[: args.num_images], flat[args.num_images :]
        gen = torch.Generator().manual_seed(0)
        a = torch.rand(args.num_images, 3, 64, 64, generator=gen)
        b = (torch.rand(args.num_images, 3, 64, 64, generator=gen) * 0.9 + 0.05).clamp(0, 1)
        return a, b

    a, b = image_sets()
    fids = {}
    with torch.no_grad():
        for name in ("fp32", "bf16"):
            stats = []
            for images in (a, b):
                acc = StatsAccumulator()
                for chunk in images.split(args.batch_size):
                    with precision_context(name, device):
                        acc.update(extractor(chunk.to(device)).float())
                stats.append(acc.stats(extractor=extractor.name, resize=extractor.resize))
            fids[name] = frechet_distance(*stats)
    result["fid_fp32"] = fids["fp32"]
    result["fid_bf16"] = fids["bf16"]
    result["fid_bf16_minus_fp32"] = fids["bf16"] - fids["fp32"]
    result["fid_relative_shift"] = (fids["bf16"] - fids["fp32"]) / max(abs(fids["fp32"]), 1e-12)
    result["fid_images_per_set"] = len(a)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
