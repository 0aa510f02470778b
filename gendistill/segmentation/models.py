"""Segmentation teachers and students: U-Nets of ``segmentation-models-pytorch`` (``pip install
'gendistill[segmentation]'``), saved and loaded as a folder of ``model.safetensors`` + ``config.json``.

    unet-resnet34        ResNet-34 encoder (3 stages), decoder 64/32/16: the MNIST benchmark's teacher (1.54M)
    unet-resnet18        ResNet-18 encoder (3 stages), decoder 64/32/16: the benchmark's student (57% of it)
    unet-mobilenet_v2    MobileNetV2 encoder (3 stages), decoder 32/16/8: a very small student (92k weights)

The encoders are built without pretrained weights (nothing is downloaded) and keep 3 of their stages (a 32x32 image
reaches 4x4); the stages a 3-stage encoder never calls are removed when the model is built, so the parameter count
and the saved weights are the model's own. A :class:`Segmenter` takes images (B, C, H, W) in [0, 1] (normalized by
its config's mean/std) and returns per-pixel class logits (B, K, H, W).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import UsageError
from ..files import read_json, read_safetensors

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
ARCHITECTURES = {  # name: (smp encoder, encoder depth, decoder channels)
    "unet-resnet34": ("resnet34", 3, (64, 32, 16)),
    "unet-resnet18": ("resnet18", 3, (64, 32, 16)),
    "unet-mobilenet_v2": ("mobilenet_v2", 3, (32, 16, 8)),
}


@dataclass
class SegmenterConfig:
    arch: str  # one of ARCHITECTURES
    num_classes: int  # classes per pixel, background included
    in_channels: int = 1
    image_size: int = 32  # the size it was trained at (any multiple of 8 runs)
    mean: list[float] | None = None  # per-channel input normalization (None: the pixels as they are)
    std: list[float] | None = None


def _smp():
    try:
        import segmentation_models_pytorch as smp
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "segmentation needs segmentation-models-pytorch: pip install 'gendistill[segmentation]'",
            name="segmentation_models_pytorch",
        ) from None
    return smp


def _check(config: SegmenterConfig) -> None:
    if config.arch not in ARCHITECTURES:
        raise UsageError(f"unknown segmenter architecture {config.arch!r}; valid: {', '.join(ARCHITECTURES)}")
    if config.num_classes < 2:
        raise UsageError(f"a segmenter needs >= 2 classes (background included), got {config.num_classes}")
    if config.in_channels not in (1, 3):
        raise UsageError(f"in_channels must be 1 or 3, got {config.in_channels}")
    if config.image_size < 8 or config.image_size % 8:
        raise UsageError(f"image_size must be a multiple of 8 (3 encoder stages), got {config.image_size}")
    for name in ("mean", "std"):
        value = getattr(config, name)
        if value is not None and len(value) != config.in_channels:
            raise UsageError(f"{name} needs {config.in_channels} values, got {value}")


def _drop_unused(net: nn.Module, shape: tuple[int, ...]) -> None:
    """Replace, in place, the outermost submodules whose parameters the output does not depend on (none receives a
    gradient from a forward and backward of a ``shape`` input) by ``nn.Identity``: the encoder stages a 3-stage U-Net
    never uses, which smp builds anyway (and whose output its MobileNet computes and discards)."""
    was_training = net.training
    net.eval()
    probe = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    net(probe).sum().backward()
    with torch.no_grad():
        before = net(probe)
    unused = {
        name
        for name, module in net.named_modules()
        if name and any(True for _ in module.parameters()) and all(p.grad is None for p in module.parameters())
    }
    net.zero_grad(set_to_none=True)
    for name in sorted(unused):
        parent, _, child = name.rpartition(".")
        if parent not in unused:  # the outermost unused module
            setattr(net.get_submodule(parent) if parent else net, child, nn.Identity())
    with torch.no_grad():
        if not torch.equal(net(probe), before):
            raise RuntimeError("removing the unused layers changed the segmenter's output")  # a defect, not input
    net.train(was_training)


class Segmenter(nn.Module):
    """``forward(x) = net((x - mean) / std)``: images (B, C, H, W) in [0, 1] -> logits (B, K, H, W)."""

    def __init__(self, net: nn.Module, config: SegmenterConfig):
        super().__init__()
        self.net, self.config = net, config
        mean = None if config.mean is None else torch.tensor(config.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = None if config.std is None else torch.tensor(config.std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)  # config.json holds them
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return self.net(x)


def build_segmenter(
    arch: str,
    *,
    num_classes: int,
    in_channels: int = 1,
    image_size: int = 32,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> Segmenter:
    """A freshly initialized segmenter of ``arch`` (from the global RNG)."""
    config = SegmenterConfig(arch, num_classes, in_channels, image_size, mean=mean, std=std)
    _check(config)
    encoder, depth, decoder = ARCHITECTURES[arch]
    net = _smp().Unet(
        encoder_name=encoder,
        encoder_weights=None,
        encoder_depth=depth,
        decoder_channels=decoder,
        in_channels=in_channels,
        classes=num_classes,
    )
    _drop_unused(net, (1, in_channels, image_size, image_size))
    return Segmenter(net, config)


def save_segmenter(model: Segmenter, folder: str | os.PathLike) -> None:
    """``folder/model.safetensors`` (the net's state dict) and ``folder/config.json``, each written under a
    temporary name and renamed, the config last (a folder with a config.json holds its weights)."""
    if not isinstance(model, Segmenter):
        raise UsageError(f"save_segmenter takes a Segmenter, got {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).unlink(missing_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    tmp = folder / f".{WEIGHTS_NAME}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / WEIGHTS_NAME)
    tmp = folder / f".{CONFIG_NAME}.tmp"
    tmp.write_text(json.dumps(dataclasses.asdict(model.config), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / CONFIG_NAME)


def load_segmenter(folder: str | os.PathLike) -> Segmenter:
    """The segmenter ``save_segmenter`` wrote into ``folder``, in eval mode, on the CPU."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"segmenter folder {str(folder)!r} does not exist")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{str(folder / name)!r} is missing: a segmenter folder holds {WEIGHTS_NAME} and {CONFIG_NAME} "
                "(`gendistill teach segmenter` writes them)"
            )
    values = read_json(folder / CONFIG_NAME, what="segmenter config")
    fields = [f.name for f in dataclasses.fields(SegmenterConfig)]
    if not isinstance(values, dict) or "arch" not in values or "num_classes" not in values:
        raise UsageError(f"{str(folder / CONFIG_NAME)!r} is not a segmenter config (fields {', '.join(fields)})")
    try:
        config = SegmenterConfig(**values)
    except TypeError as err:
        raise UsageError(f"{str(folder / CONFIG_NAME)!r} is not a segmenter config: {err}") from None
    model = build_segmenter(
        config.arch,
        num_classes=config.num_classes,
        in_channels=config.in_channels,
        image_size=config.image_size,
        mean=config.mean,
        std=config.std,
    )
    state = read_safetensors(folder / WEIGHTS_NAME, what="segmenter weights")
    expected = model.net.state_dict()
    wrong = sorted(set(state) ^ set(expected)) + [
        k for k in expected if k in state and state[k].shape != expected[k].shape
    ]
    if wrong:
        raise UsageError(
            f"the weights in {str(folder / WEIGHTS_NAME)!r} do not match {config.arch!r} with "
            f"{config.num_classes} classes (first mismatches: {', '.join(wrong[:5])})"
        )
    model.net.load_state_dict(state, strict=True)
    return model.eval()
