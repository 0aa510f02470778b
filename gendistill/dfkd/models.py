"""The DFKD model zoo: small classifiers the data-free KD papers distill between (docs/dfkd.md, "Model zoo").

Every classifier here takes images in [0, 1] (B, C, H, W): the ``Classifier`` wrapper holds the per-channel
normalization (mean/std) and the architecture's config, and is saved as ``model.safetensors`` + ``config.json``.
Any other ``nn.Module`` classifier (torchvision, timm, your own) can be wrapped in ``Classifier`` too.
Intermediate features are taken with forward hooks by module name (``FeatureHooks``), never by rewriting a model.

Architectures (CIFAR-style: 3x3 stem, no max-pool, adaptive average pooling before the last linear layer):
    lenet5, lenet5_half        LeNet-5 as in DAFL's ``lenet.py`` (exactly 32x32 input) and its half-width student
    resnet18, resnet34         He et al., CVPR 2016, CIFAR variant (as in DFAD / Fast / CMI)
    resnet8, resnet20, resnet56  He et al.'s 3-stage CIFAR family (16/32/64 channels, 6n + 2 layers), the teachers
                               and students of DFKD papers' small benchmarks (Fast-Datafree's ``resnet_tiny``)
    wrn16_1 ... wrn40_2        Zagoruyko & Komodakis, BMVC 2016 (wide residual networks, dropout 0)
    vgg11_bn                   Simonyan & Zisserman, ICLR 2015, with BatchNorm, CIFAR variant
    mobilenetv2                Sandler et al., CVPR 2018, CIFAR variant (stride-1 stem, width 1.0)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..errors import UsageError
from ..files import check_fits_in_memory, read_json, read_safetensors

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


# --- LeNet-5 ----------------------------------------------------------------------------------------------------
class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998) as in DAFL's reference ``lenet.py``: three 5x5 convs (ReLU, 2x2 max-pool after
    the first two), fc, fc. A 32x32 input is reduced to 1x1 by the third conv, hence exactly 32x32 images.

    ``channels=(6, 16, 120), hidden=84`` is LeNet-5; ``(3, 8, 60), 42`` is DAFL's LeNet-5-half student.
    ``batchnorm=True`` (``lenet5_bn``) adds BatchNorm after each conv: a LeNet-5 teacher for the methods that match
    BatchNorm statistics (DeepInversion, DFQ, CMI, Fast, NAYER, CAE-DFKD), which plain LeNet-5 cannot serve.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        channels: tuple[int, int, int] = (6, 16, 120),
        hidden=84,
        batchnorm: bool = False,
    ):
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.conv3 = nn.Conv2d(c2, c3, 5)
        norm = nn.BatchNorm2d if batchnorm else lambda c: nn.Identity()
        self.bn1, self.bn2, self.bn3 = norm(c1), norm(c2), norm(c3)
        self.fc1 = nn.Linear(c3, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def batchnorm_folded_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict of the same function in eval mode without BatchNorm: each ``bnK`` folded into ``convK``
        (``w * g``, ``(b - mean) * g + beta`` with ``g = gamma / sqrt(var + eps)``); the ``bnK`` entries are dropped.
        Without BatchNorm: the state dict as it is."""
        state = {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("bn")}
        for i in (1, 2, 3):
            conv, bn = getattr(self, f"conv{i}"), getattr(self, f"bn{i}")
            if isinstance(bn, nn.BatchNorm2d):
                g = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
                state[f"conv{i}.weight"] = conv.weight.detach() * g.view(-1, 1, 1, 1)
                state[f"conv{i}.bias"] = (conv.bias.detach() - bn.running_mean) * g + bn.bias.detach()
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, 32, 32) normalized images -> logits (B, K)."""
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # (B, c1, 14, 14)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # (B, c2, 5, 5)
        x = F.relu(self.bn3(self.conv3(x))).flatten(1)  # (B, c3): DAFL's "feature"
        return self.fc2(F.relu(self.fc1(x)))


# --- CIFAR ResNet -----------------------------------------------------------------------------------------------
def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _init_weights(model: nn.Module) -> None:
    """He-normal convs (fan_out) and unit BatchNorm, as the reference implementations initialize."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _stage(block: type[nn.Module], cin: int, cout: int, n: int, *, stride: int) -> nn.Sequential:
    """``n`` blocks; the first changes the channels and the stride, the others keep the shape."""
    return nn.Sequential(*[block(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (He et al. 2016, Fig. 2); 1x1 conv + BN shortcut on a shape change.

    ReLUs are not in-place so hooks on any module see the tensor the module produced.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stride-1 stem (no max-pool), four stages of BasicBlocks (64/128/256/512 channels,
    strides 1/2/2/2), adaptive average pool, linear. (B, C, H, W) -> (B, K); H, W are reduced 8x before pooling."""

    def __init__(self, blocks: tuple[int, int, int, int], *, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(in_channels, 64), nn.BatchNorm2d(64)
        self.layer1 = _stage(BasicBlock, 64, 64, blocks[0], stride=1)
        self.layer2 = _stage(BasicBlock, 64, 128, blocks[1], stride=2)
        self.layer3 = _stage(BasicBlock, 128, 256, blocks[2], stride=2)
        self.layer4 = _stage(BasicBlock, 256, 512, blocks[3], stride=2)
        self.fc = nn.Linear(512, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TinyResNet(nn.Module):
    """He et al.'s CIFAR ResNet-(6n + 2) (Sec. 4.2): 3x3 stem with 16 channels, three stages of ``n`` BasicBlocks
    (16/32/64 channels, strides 1/2/2), adaptive average pool, linear. ResNet-8/20/56 are n = 1/3/9. Shortcuts on a
    shape change are 1x1 conv + BN (the paper's option B, as Fast-Datafree's ``resnet_tiny``), not zero padding.
    (B, C, H, W) -> (B, K); H, W are reduced 4x before pooling."""

    def __init__(self, n: int, *, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(in_channels, 16), nn.BatchNorm2d(16)
        self.layer1 = _stage(BasicBlock, 16, 16, n, stride=1)
        self.layer2 = _stage(BasicBlock, 16, 32, n, stride=2)
        self.layer3 = _stage(BasicBlock, 32, 64, n, stride=2)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# --- Wide ResNet ------------------------------------------------------------------------------------------------
class WideBlock(nn.Module):
    """Pre-activation block of WRN (Zagoruyko & Komodakis 2016, "basic" B(3,3)): BN-ReLU-conv3x3-BN-ReLU-conv3x3.
    As in the reference code, on a channel change the 1x1 shortcut conv takes the pre-activated input."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.shortcut = None
        if cin != cout or stride != 1:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))  # dropout 0: the DFKD references' teachers
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """WRN-depth-width: 3x3 stem (16 channels), three groups of (depth - 4) / 6 WideBlocks with 16w/32w/64w
    channels (strides 1/2/2), BN-ReLU, adaptive average pool, linear. (B, C, H, W) -> (B, K)."""

    def __init__(self, depth: int, width: int, *, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise UsageError(f"WRN depth must be 6n + 4, got {depth}")
        n, (c1, c2, c3) = (depth - 4) // 6, (16 * width, 32 * width, 64 * width)
        self.conv1 = _conv3x3(in_channels, 16)
        self.block1 = _stage(WideBlock, 16, c1, n, stride=1)
        self.block2 = _stage(WideBlock, c1, c2, n, stride=2)
        self.block3 = _stage(WideBlock, c2, c3, n, stride=2)
        self.bn = nn.BatchNorm2d(c3)
        self.fc = nn.Linear(c3, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1).flatten(1))


# --- VGG-11-BN --------------------------------------------------------------------------------------------------
VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """VGG with BatchNorm, CIFAR variant (Simonyan & Zisserman 2015, config A): 3x3 conv-BN-ReLU stacks with 2x2
    max-pools ("M"), adaptive average pool, one linear layer. (B, C, H, W) -> (B, K)."""

    def __init__(self, cfg: tuple = VGG11_CFG, *, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers, cin = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


# --- MobileNetV2 ------------------------------------------------------------------------------------------------
class InvertedResidual(nn.Module):
    """MobileNetV2 block (Sandler et al. 2018, Table 1): 1x1 expansion (skipped when t = 1), 3x3 depthwise,
    linear 1x1 projection; ReLU6; residual only when the shape is kept (stride 1, same channels)."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers = []
        if expansion != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2, width 1.0, CIFAR variant: stride-1 3x3 stem and the 24-channel stage at stride 1 (so the
    input is reduced 8x, not 32x), 1x1 conv to 1280, adaptive average pool, linear. (B, C, H, W) -> (B, K)."""

    # (expansion t, channels c, blocks n, stride s) of Sandler et al. Table 2; second stage's stride 2 -> 1
    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, *, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(in_channels, 32), nn.BatchNorm2d(32)
        cin, blocks = 32, []
        for t, c, n, s in self.SETTINGS:
            for j in range(n):
                blocks.append(InvertedResidual(cin, c, s if j == 0 else 1, t))
                cin = c
        self.layers = nn.Sequential(*blocks)
        self.conv2, self.bn2 = nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280)
        self.fc = nn.Linear(1280, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu6(self.bn1(self.conv1(x))))
        x = F.relu6(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# --- the zoo ----------------------------------------------------------------------------------------------------
# Each constructor takes keyword arguments num_classes and in_channels.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "lenet5": LeNet5,
    "lenet5_half": partial(LeNet5, channels=(3, 8, 60), hidden=42),
    "resnet18": partial(ResNet, (2, 2, 2, 2)),
    "resnet34": partial(ResNet, (3, 4, 6, 3)),
    "wrn16_1": partial(WideResNet, 16, 1),
    "wrn16_2": partial(WideResNet, 16, 2),
    "wrn40_1": partial(WideResNet, 40, 1),
    "wrn40_2": partial(WideResNet, 40, 2),
    "vgg11_bn": VGG,
    "mobilenetv2": MobileNetV2,
    "lenet5_bn": partial(LeNet5, batchnorm=True),
    "resnet8": partial(TinyResNet, 1),
    "resnet20": partial(TinyResNet, 3),
    "resnet56": partial(TinyResNet, 9),
}
FIXED_32 = ("lenet5", "lenet5_half", "lenet5_bn")  # the third 5x5 conv reduces exactly a 32x32 input to 1x1


def canonical_arch(arch: str, *, what: str = "architecture") -> str:
    """The zoo name of ``arch``, with hyphens read as underscores (``lenet5-half`` is ``lenet5_half``); a
    ``ValueError`` naming it as ``what`` lists the valid names otherwise."""
    name = arch.replace("-", "_") if isinstance(arch, str) else arch
    if name not in ARCHITECTURES:
        raise UsageError(f"unknown {what} {arch!r}; valid: {', '.join(ARCHITECTURES)} (hyphens work too)")
    return name


def _check_arch(arch: str) -> None:
    canonical_arch(arch)


def check_image_size(arch: str, image_size: int) -> None:
    """Raise ``ValueError`` unless ``arch`` (a zoo name) takes square images of side ``image_size``."""
    _check_arch(arch)
    if arch in FIXED_32:
        if image_size != 32:
            raise UsageError(
                f"architecture {arch!r} takes exactly 32x32 images (pad MNIST's 28x28 to 32), "
                f"got image_size={image_size}"
            )
    elif not isinstance(image_size, int) or image_size < 32 or image_size % 8:
        raise UsageError(
            f"architecture {arch!r} takes image sizes that are multiples of 8 and at least 32 (32, 40, 48, 64, ...), "
            f"got image_size={image_size}"
        )


@dataclass
class ClassifierConfig:
    arch: str  # model zoo architecture (a key of ARCHITECTURES), or any name for a wrapped user model
    num_classes: int = 10  # number of classes K (logits (B, K))
    in_channels: int = 3  # image channels C (1 for MNIST)
    image_size: int = 32  # square image side the classifier takes
    mean: list[float] | None = None  # per-channel mean subtracted from [0, 1] images (None: no normalization)
    std: list[float] | None = None  # per-channel std the centered images are divided by (None: no normalization)
    # Quantization-aware weights (gendistill.dfkd.quantize): the bit width of the fake-quantized conv/linear weights,
    # and whether the first conv and the last linear layer stay full precision. Both None for a full-precision
    # classifier, whose config.json leaves them out (files written before they existed load as full precision).
    quant_bits: int | None = None
    quant_skip_first_last: bool | None = None


QUANT_BITS = (1, 2, 4, 8)  # the weight bit widths a quantized classifier takes
_QUANT_FIELDS = ("quant_bits", "quant_skip_first_last")


def _check_config(config: ClassifierConfig) -> None:
    """Input checks shared by ``Classifier``, ``build_classifier`` and ``load_classifier``."""
    if isinstance(config.num_classes, bool) or not isinstance(config.num_classes, int) or config.num_classes < 2:
        raise UsageError(f"num_classes must be an integer >= 2, got {config.num_classes!r}")
    if isinstance(config.in_channels, bool) or not isinstance(config.in_channels, int) or config.in_channels < 1:
        raise UsageError(f"in_channels must be an integer >= 1, got {config.in_channels!r}")
    if (config.mean is None) != (config.std is None):
        raise UsageError(f"give both mean and std or neither, got mean={config.mean} and std={config.std}")
    if config.mean is not None:
        for name, values in (("mean", config.mean), ("std", config.std)):
            if len(values) != config.in_channels:
                raise UsageError(f"{name} needs one value per input channel ({config.in_channels}), got {values}")
        if min(config.std) <= 0:
            raise UsageError(f"std must be positive, got {config.std}")
    bits, skip = config.quant_bits, config.quant_skip_first_last
    if bits is None:
        if skip is not None:
            raise UsageError(
                f"quant_skip_first_last={skip!r} needs quant_bits (one of {', '.join(map(str, QUANT_BITS))}); "
                "a full-precision classifier has neither"
            )
    elif isinstance(bits, bool) or bits not in QUANT_BITS:
        raise UsageError(
            f"quant_bits must be one of {', '.join(map(str, QUANT_BITS))} (or None: full precision), got {bits!r}"
        )
    elif not isinstance(skip, bool):
        raise UsageError(f"quant_skip_first_last must be true or false for a quantized classifier, got {skip!r}")


def _last_linear(module: nn.Module) -> str | None:
    names = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


class Classifier(nn.Module):
    """A classifier of [0, 1] images: ``forward(x) = net((x - mean) / std)``, (B, C, H, W) -> logits (B, K).

    Args:
        net: any ``nn.Module`` mapping normalized images (B, C, H, W) to logits (B, K); a zoo net or your own.
        config: its ``ClassifierConfig`` (saved as ``config.json``; mean/std None: the images go in unchanged).
            With ``quant_bits`` set, the net's ``nn.Conv2d``/``nn.Linear`` layers are replaced, in place, by layers
            that fake-quantize their weights in forward (``gendistill.dfkd.quantize``); names and parameters stay.
        feature_layer: module name (in ``self.named_modules()``) of the final linear layer, whose INPUT is the
            penultimate feature (B, D); default: the last ``nn.Linear``, e.g. ``"net.fc"``.
    """

    def __init__(self, net: nn.Module, config: ClassifierConfig, *, feature_layer: str | None = None):
        super().__init__()
        _check_config(config)
        if config.quant_bits is not None:
            from .quantize import _quantize_layers  # quantize.py imports this module

            net = _quantize_layers(net, config.quant_bits, skip_first_last=config.quant_skip_first_last)
        self.net = net
        self.config = config
        self.initialized_from: str | None = None  # "teacher" / "teacher-slices" once init_from_teacher copied
        mean = None if config.mean is None else torch.tensor(config.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = None if config.std is None else torch.tensor(config.std, dtype=torch.float32).view(1, -1, 1, 1)
        # Not persistent: config.json holds them; the safetensors file is the net's state dict alone.
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        if feature_layer is None:
            feature_layer = _last_linear(self)
            if feature_layer is None:
                raise UsageError("the net has no nn.Linear layer; pass feature_layer= (a module name of the net)")
        elif feature_layer not in dict(self.named_modules()):
            raise UsageError(f"feature_layer {feature_layer!r} is not a module name of this classifier")
        self.feature_layer = feature_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> logits (B, K)."""
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return self.net(x)


def build_classifier(
    arch: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    quant_bits: int | None = None,
    quant_skip_first_last: bool = True,
) -> Classifier:
    """A freshly initialized zoo classifier (initialization follows the global torch RNG).

    ``quant_bits`` (1, 2, 4 or 8) makes it quantization-aware (``gendistill.dfkd.quantize.quantize_classifier``):
    its conv/linear layers fake-quantize their weights in forward, the first conv and the last linear layer
    excepted when ``quant_skip_first_last``.

    A ``ValueError`` says so before allocating when the parameters would not fit in the memory available now.
    """
    arch = canonical_arch(arch)
    config = ClassifierConfig(
        arch=arch,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=None if mean is None else [float(v) for v in mean],
        std=None if std is None else [float(v) for v in std],
        quant_bits=quant_bits,
        quant_skip_first_last=None if quant_bits is None else quant_skip_first_last,
    )
    check_image_size(arch, image_size)
    _check_config(config)
    check_fits_in_memory(
        _parameter_bytes(arch, num_classes=num_classes, in_channels=in_channels),
        f"a {arch} classifier with num_classes={num_classes} and in_channels={in_channels}",
    )
    return Classifier(ARCHITECTURES[arch](num_classes=num_classes, in_channels=in_channels), config)


STUDENT_INITS = ("auto", "teacher", "random")


def init_from_teacher(student: Classifier, teacher: Classifier, how: str = "auto") -> list[str]:
    """Initialize ``student`` from ``teacher`` by weight selection (Xu et al., ICLR 2024, "Initializing Models with
    Larger Ones"): each student tensor takes the leading slice of the teacher's tensor of the same name (its first
    channels, features and inputs; the whole tensor where the shapes agree). Returns the names copied (parameters and
    buffers, BatchNorm statistics included).

    Selecting the same leading channels in every layer keeps the copied filters connected as they were: a shallower
    model of the teacher's family (ResNet-8 from ResNet-20) gets the stem, the first block of each stage and the
    classifier, and a narrower one (LeNet-5-half from LeNet-5) the first half of every layer's filters. A teacher
    with BatchNorm after its convolutions where the student has none (LeNet-5-BN) is folded first
    (``LeNet5.batchnorm_folded_state_dict``: exact in eval mode).

    ``how``: ``"teacher"`` selects and raises ``UsageError`` unless every student tensor has a teacher tensor of the
    same name, number of dimensions and no smaller size; ``"auto"`` selects only in that case (else copies nothing);
    ``"random"`` copies nothing. The student's input normalization must be the teacher's (``UsageError`` otherwise).
    Sets ``student.initialized_from`` when it copied: ``"teacher"`` when every tensor was whole (a shallower student,
    whose logits are on the teacher's scale), ``"teacher-slices"`` when some were cut (a narrower one).
    """
    if how not in STUDENT_INITS:
        raise UsageError(f"student init {how!r} is not valid; valid: {', '.join(STUDENT_INITS)}")
    if how == "random":
        return []
    target = student.net.state_dict()
    source = teacher.net.state_dict()
    fold = getattr(teacher.net, "batchnorm_folded_state_dict", None)
    if fold is not None and any(k not in target for k in source if k.startswith("bn")):
        source = fold()

    def fits(name: str, tensor: torch.Tensor) -> bool:
        other = source.get(name)
        return (
            other is not None
            and other.dim() == tensor.dim()
            and all(a >= b for a, b in zip(other.shape, tensor.shape))
        )

    unmatched = [
        f"{k} {tuple(v.shape)}" + ("" if k not in source else f" (teacher: {tuple(source[k].shape)})")
        for k, v in target.items()
        if not fits(k, v)
    ]
    if unmatched:
        if how == "auto":
            return []
        raise UsageError(
            f"cannot initialize a {student.config.arch} student from a {teacher.config.arch} teacher: "
            f"{len(unmatched)} of its {len(target)} tensors have no teacher tensor of the same name and at least "
            f"its size ({_first(unmatched, 3)}); use student init 'random' (or 'auto', which falls back to it)"
        )
    if (student.config.mean, student.config.std) != (teacher.config.mean, teacher.config.std):
        raise UsageError(
            "a student initialized from its teacher needs the teacher's input normalization; student "
            f"mean/std {student.config.mean}/{student.config.std}, teacher {teacher.config.mean}/{teacher.config.std}"
        )
    with torch.no_grad():
        for name, tensor in target.items():
            tensor.copy_(source[name][tuple(slice(0, n) for n in tensor.shape)])
    whole = all(source[name].shape == tensor.shape for name, tensor in target.items())
    student.initialized_from = "teacher" if whole else "teacher-slices"
    return list(target)


def _parameter_bytes(arch: str, *, num_classes: int, in_channels: int) -> int:
    """Bytes of the parameters and buffers of zoo net ``arch``, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        net = ARCHITECTURES[arch](num_classes=num_classes, in_channels=in_channels)
    tensors = [*net.parameters(), *net.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


# --- saving and loading -----------------------------------------------------------------------------------------
def save_classifier(model: Classifier, folder: str | os.PathLike) -> None:
    """Write ``folder/model.safetensors`` (the net's state dict) and ``folder/config.json``.

    A quantized classifier's state dict holds its float weights (the trained parameters; the quantized ones follow
    from them) and its config.json ``quant_bits`` and ``quant_skip_first_last``; a full-precision one's config.json
    has no quantization entry.

    Each file is written under a temporary name and renamed; an old config.json is removed first and the new one
    written last, so a folder with a config.json always holds the weights that go with it.
    """
    if not isinstance(model, Classifier):
        raise UsageError(f"save_classifier takes a Classifier, got {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    config_path.unlink(missing_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    tmp = folder / f".{WEIGHTS_NAME}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, weights_path)
    tmp = folder / f".{CONFIG_NAME}.tmp"
    values = dataclasses.asdict(model.config)
    if model.config.quant_bits is None:
        for name in _QUANT_FIELDS:
            del values[name]
    tmp.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, config_path)


def _first(keys: Iterable[str], n: int = 5) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_classifier(folder: str | os.PathLike, *, num_classes: int | None = None, weights: bool = True) -> Classifier:
    """The zoo classifier saved in ``folder`` by ``save_classifier``, in eval mode, on the CPU (``weights=False``:
    built from its config.json only, freshly initialized, without reading the weights).

    Raises ``FileNotFoundError`` for a missing folder or file and ``ValueError`` for an unknown architecture, a
    ``num_classes`` other than the saved one, or weights that do not match the architecture.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"classifier folder {str(folder)!r} does not exist")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(path)!r} is missing: a classifier folder holds {WEIGHTS_NAME} and {CONFIG_NAME} "
                "(save_classifier or `gendistill teach classifier` writes them)"
            )
    fields = ", ".join(f.name for f in dataclasses.fields(ClassifierConfig))
    values = read_json(config_path, what="classifier config")
    if not isinstance(values, dict):
        raise UsageError(
            f"{str(config_path)!r} is not a classifier config: expected a JSON object with fields {fields}"
        )
    try:
        config = ClassifierConfig(**values)
    except TypeError as err:
        raise UsageError(f"{str(config_path)!r} is not a classifier config with fields {fields}: {err}") from None
    _check_arch(config.arch)
    if num_classes is not None and num_classes != config.num_classes:
        raise UsageError(
            f"num_classes={num_classes} was asked for but the classifier in {str(folder)!r} has {config.num_classes}"
        )
    try:
        _check_config(config)
        model = build_classifier(
            config.arch,
            num_classes=config.num_classes,
            in_channels=config.in_channels,
            image_size=config.image_size,
            mean=config.mean,
            std=config.std,
            quant_bits=config.quant_bits,
            quant_skip_first_last=config.quant_skip_first_last,
        )
    except ValueError as err:
        raise UsageError(f"classifier config {str(config_path)!r}: {err}") from None
    if not weights:
        return model.eval()
    state = read_safetensors(weights_path, what="classifier weights")
    expected = model.net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{what}: {_first(keys)}"
        for what, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes (file vs model)", wrong),
        )
        if keys
    ]
    if not problems:
        try:
            model.net.load_state_dict(state, strict=True)
        except RuntimeError as err:  # e.g. a dtype that cannot be copied; shapes were checked above
            problems = [str(err).splitlines()[0]]
    if problems:
        raise UsageError(
            f"the weights in {str(weights_path)!r} do not match architecture {config.arch!r} with "
            f"num_classes={config.num_classes}, in_channels={config.in_channels}; " + "; ".join(problems)
        )
    return model.eval()


# --- features by module name ------------------------------------------------------------------------------------
class FeatureHooks:
    """Capture module outputs (or inputs) by name with forward hooks, for as long as the ``with`` block lasts.

        with FeatureHooks(teacher, [teacher.feature_layer], inputs=True) as feats:
            logits = teacher(x)
        feats[teacher.feature_layer]  # (B, D): the input of the final linear layer

    The dict maps each name to the tensor of the module's latest call (its output, or its first positional input
    when ``inputs=True``), with autograd history. The hooks are removed on exit (or by ``remove()``); the model is
    not changed.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], *, inputs: bool = False):
        modules = dict(model.named_modules())
        names = list(names)
        unknown = [n for n in names if n not in modules]
        if unknown:
            valid = [n for n in modules if n]
            raise UsageError(
                f"unknown module name(s) {', '.join(map(repr, unknown))}; valid names include {_first(valid, 12)}"
            )
        self.features: dict[str, torch.Tensor] = {}
        self.inputs = inputs
        self._handles = [modules[n].register_forward_hook(partial(self._hook, n)) for n in names]

    def _hook(self, name: str, module: nn.Module, args: tuple, output) -> None:
        self.features[name] = args[0] if self.inputs else output

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> dict[str, torch.Tensor]:
        return self.features

    def __exit__(self, *exc) -> None:
        self.remove()
