"""CLIP score of text-to-image samples: ``100 * max(cos(image_emb, text_emb), 0)`` averaged over samples, with
OpenAI's CLIP through clip-anytorch (default ViT-L/14), and ``gendistill eval clip``: the COCO-style protocol
(captions file in, one sample per caption, CLIP score + FID against reference statistics out).

The model is a clip-anytorch name or a local file. A name loads OpenAI's release file, downloaded by clip-anytorch to
``~/.cache/clip`` and checked against the sha256 in its URL before every load; that file is a TorchScript archive,
which clip-anytorch loads with ``torch.jit.load`` (running the archive's code: OpenAI's, pinned by the checksum).
A local file is a ``.safetensors`` file or a plain ``torch.save``-d state dict, read without running code or
unpickling objects; a local TorchScript archive (e.g. OpenAI's ``ViT-L-14.pt`` copied from another machine) is
loaded only with ``--allow-torchscript`` (``allow_torchscript=True``), because ``torch.jit.load`` runs code from
the archive; only its state dict is kept. Images reach CLIP as OpenAI's preprocessing does
(PIL bicubic resize of the short side, center crop, CLIP's normalization) from the 8-bit image a user would save.
Protocols differ between papers; everything that decides the number is stored next to it.
"""

from __future__ import annotations

import argparse
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gendistill.errors import UsageError
from gendistill.files import error_summary

from . import sources
from .features import _to_uint8_rgb, load_feature_extractor, read_state_dict, sha256_of
from .fid import StatsAccumulator, frechet_distance
from .generative import _stats_of_source
from .report import Report, check_report_folder

DEFAULT_MODEL = "ViT-L/14"
SCALE = 100.0


def _clip():
    try:
        import clip
    except ImportError as err:  # clip-anytorch imports pkg_resources (setuptools < 81)
        raise UsageError(
            f"CLIP score needs clip-anytorch: pip install 'gendistill[clip]' (clip-anytorch, setuptools<81); {err}"
        ) from err
    return clip


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def load_clip(
    name_or_path: str = DEFAULT_MODEL, *, device: str | torch.device = "cpu", allow_torchscript: bool = False
):
    """``(model, preprocess, description)`` for a clip-anytorch model name or a local weights file.

    A local TorchScript archive is refused (``ValueError``) unless ``allow_torchscript``: loading one runs code from
    the archive. Safetensors and plain state-dict files load without running code.
    """
    clip = _clip()
    device = torch.device(device)
    path = Path(name_or_path).expanduser()
    if name_or_path in clip.available_models():
        try:
            model, preprocess = clip.load(name_or_path, device=device, jit=False)
        except Exception as err:  # offline, proxy, checksum...
            raise FileNotFoundError(
                f"could not load CLIP {name_or_path!r} ({err}); download OpenAI's weights on a machine with network "
                "access and pass the file with --clip-model PATH"
            ) from err
        return model.eval(), preprocess, f"openai/{name_or_path}"
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP model {name_or_path!r} is neither a local file nor one of {', '.join(clip.available_models())}"
        )
    if _is_torchscript(path):
        if not allow_torchscript:
            raise UsageError(
                f"CLIP model {str(path)!r} is a TorchScript archive, and loading one runs code from the archive; "
                "pass --allow-torchscript (allow_torchscript=True) only for a file you trust, or convert it once to "
                "a .safetensors file or a plain torch.save-d state dict, which load without running code"
            )
        try:
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError as err:
            raise UsageError(f"{path} is not a readable TorchScript archive ({error_summary(err)})") from err
    else:
        state = read_state_dict(path)
    try:
        model = clip.model.build_model(dict(state))
    except (KeyError, RuntimeError, IndexError) as err:
        raise UsageError(f"{path} is not an OpenAI CLIP state dict ({type(err).__name__}: {err})") from err
    if device.type == "cpu":
        model = model.float()  # build_model converts to fp16, as OpenAI's release runs on GPUs
    model = model.to(device).eval()
    preprocess = clip.clip._transform(model.visual.input_resolution)
    return model, preprocess, f"{path.name} (sha256 {sha256_of(path)[:12]})"


class ClipScorer:
    """Accumulates per-sample CLIP scores of images (B, 3, H, W) in [0, 1] and their texts; the model is loaded by
    :func:`load_clip` (``allow_torchscript``: see there)."""

    def __init__(
        self,
        name_or_path: str = DEFAULT_MODEL,
        *,
        device: str | torch.device = "cpu",
        prefix: str = "",
        allow_torchscript: bool = False,
    ):
        self.model, self.preprocess, self.name = load_clip(
            name_or_path, device=device, allow_torchscript=allow_torchscript
        )
        self.device, self.prefix = torch.device(device), prefix
        self.scores: list[float] = []

    def _pil(self, images: torch.Tensor) -> list[Image.Image]:
        return [Image.fromarray(a) for a in _to_uint8_rgb(images).permute(0, 2, 3, 1).cpu().numpy()]

    @torch.no_grad()
    def update(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Scores (B,) of one batch; also kept for :meth:`compute`."""
        if images.dim() != 4 or len(images) != len(texts):
            raise UsageError(f"need images (B, C, H, W) and B texts, got {tuple(images.shape)} and {len(texts)} texts")
        clip = _clip()
        dtype = self.model.visual.conv1.weight.dtype
        pixels = torch.stack([self.preprocess(img) for img in self._pil(images)]).to(self.device, dtype)
        tokens = clip.tokenize(
            [self.prefix + t for t in texts], context_length=self.model.context_length, truncate=True
        ).to(self.device)
        image_emb = self.model.encode_image(pixels).float()
        text_emb = self.model.encode_text(tokens).float()
        cos = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)
        scores = SCALE * cos.clamp_min(0)
        self.scores.extend(scores.cpu().tolist())
        return scores

    def compute(self) -> dict[str, float]:
        if not self.scores:
            raise UsageError("no samples were scored")
        values = np.asarray(self.scores, dtype=np.float64)
        return {"mean": float(values.mean()), "std": float(values.std()), "count": len(values)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gendistill eval clip", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--fake",
        required=True,
        help="a text-to-image BOOT student folder, or a folder of images (sorted; image i belongs to caption i)",
    )
    parser.add_argument("--captions", required=True, help="captions file, one per line (e.g. COCO-30k val captions)")
    parser.add_argument("--output", default="eval-clip", help="report folder")
    parser.add_argument("--num-samples", type=int, default=None, help="first N captions (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="noise seed: batch i uses seed + i")
    parser.add_argument("--guidance-scale", type=float, default=None, help="guidance-range students only")
    parser.add_argument("--refine-steps", type=int, default=0, help="teacher steps after the jump (default 0)")
    parser.add_argument(
        "--clip-model",
        default=DEFAULT_MODEL,
        help="clip-anytorch name or local weights file (.safetensors or a torch.save-d state dict)",
    )
    parser.add_argument(
        "--allow-torchscript",
        action="store_true",
        help="also load a local TorchScript --clip-model archive (e.g. OpenAI's .pt file); this runs code from the "
        "archive, so pass it only for a file you trust",
    )
    parser.add_argument("--prefix", default="", help="text put before every caption (some papers: 'A photo of ')")
    parser.add_argument("--real", default=None, help="reference statistics .npz or real image folder for FID")
    parser.add_argument("--inception-weights", default=None, help="local FID Inception weights")
    parser.add_argument("--check-sha256", action="store_true", help="refuse unofficial Inception weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def run(args: argparse.Namespace) -> dict:
    from gendistill.data.prompts import load_prompts

    captions = load_prompts(args.captions)
    n = len(captions) if args.num_samples is None else args.num_samples
    if not 1 <= n <= len(captions):
        raise UsageError(f"--num-samples must be in 1..{len(captions)} (the captions in the file), got {n}")
    captions = captions[:n]
    check_report_folder(args.output)  # refuse a folder we may not write before loading or sampling anything
    device = torch.device(args.device)
    fake = Path(args.fake)
    if (fake / "model_index.json").is_file():
        pipe = sources.load_student_pipeline(fake, device=device)
        if not isinstance(pipe, sources.BootPipeline):
            raise UsageError(f"{args.fake} is not a text-to-image student; CLIP score needs prompts")
        settings = sources.SampleSettings(
            num_samples=n,
            batch_size=args.batch_size,
            seed=args.seed,
            prompts=captions,
            guidance_scale=args.guidance_scale,
            refine_steps=args.refine_steps,
        )
        batches = (images for images, _ in sources.iter_pipeline(pipe, settings, desc="CLIP samples"))
        sampling = settings.as_dict()
    elif fake.is_dir():
        count = sources.count_images(fake)
        if count < n:
            raise UsageError(f"{args.fake} holds {count} images for {n} captions; give one image per caption")
        batches = sources.iter_image_folder(fake, batch_size=args.batch_size, limit=n)
        sampling = {"num_samples": n, "images": str(fake)}
    else:
        raise FileNotFoundError(f"--fake {args.fake!r} is neither a student folder nor a folder of images")
    scorer = ClipScorer(args.clip_model, device=device, prefix=args.prefix, allow_torchscript=args.allow_torchscript)
    extractor = real = None
    if args.real is not None:
        extractor = load_feature_extractor(
            "inception", inception_weights=args.inception_weights, check_sha256=args.check_sha256
        ).to(device)
        kind = "stats" if Path(args.real).suffix == ".npz" else "folder"
        real = _stats_of_source(args.real, kind, extractor, args, keep=False)
    report = Report(args.output, title=f"gendistill eval clip: {fake.name}", command="eval clip", device=device)
    acc = StatsAccumulator()
    grid, done = [], 0
    for images in batches:
        scorer.update(images, captions[done : done + len(images)])
        if extractor is not None:
            acc.update(extractor(images.to(device)))
        if done < 16:
            grid.append(images[: 16 - done].cpu())
        done += len(images)
    clip_result = scorer.compute()
    report.add_grid("samples", torch.cat(grid), "the first samples with their captions (table below)", nrow=4)
    report.add_table(
        "First captions",
        [{"#": i, "caption": c, "CLIP score": s} for i, (c, s) in enumerate(zip(captions[:16], scorer.scores))],
    )
    protocol = {
        "clip_model": scorer.name,
        "definition": f"{SCALE:g} * max(cos(image, text), 0), mean over samples",
        "preprocess": "OpenAI CLIP (PIL bicubic resize, center crop) of the 8-bit image",
        "prefix": args.prefix,
        "captions": str(args.captions),
        **sampling,
    }
    report.add_metric("clip_score", clip_result, **protocol)
    summary = {"clip_score": clip_result["mean"]}
    if extractor is not None:
        fake_stats = acc.stats(extractor=extractor.name, resize=extractor.resize)
        fid = frechet_distance(fake_stats, real)
        report.add_metric(
            "fid",
            fid,
            feature_extractor=extractor.name,
            resize=extractor.resize,
            num_fake=fake_stats.count,
            num_real=real.count,
            real=str(args.real),
            **sampling,
        )
        summary["fid"] = fid
    report.save()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = run(args)
    print(", ".join(f"{k} {v:.4g}" for k, v in summary.items() if math.isfinite(v)))
    print(f"wrote {os.path.join(args.output, 'report.md')} and metrics.json")
    return 0
