"""Feature extractors for FID/KID: the standard FID Inception-v3 (torch-fidelity's port of the TensorFlow
2015-12-05 graph, wrapped, not forked) or any ``nn.Module`` mapping images to features.

Every extractor takes images (B, C, H, W) in [0, 1] and returns float32 features (B, D); ``name`` identifies it
(reference statistics remember it, so features of different extractors are never compared) and ``resize`` says how
images reach its input size (it decides comparability: docs/evaluation.md).

Inception weights cannot be downloaded in every environment. They are looked up in this order: the ``weights``
argument (``--inception-weights PATH``), the ``GENDISTILL_INCEPTION_WEIGHTS`` environment variable, torch hub's
cache (where torch-fidelity keeps its download), then the torch-fidelity release URL. The official file is
``pt_inception-2015-12-05-6726825d.pth`` (sha256 below); ``check_sha256=True`` refuses any other file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gendistill.dfkd.models import FeatureHooks, load_classifier
from gendistill.errors import UsageError
from gendistill.files import read_safetensors

INCEPTION_ENV = "GENDISTILL_INCEPTION_WEIGHTS"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_RESIZE = "torch-fidelity bilinear (TensorFlow 1.x compatible) to 299x299 from uint8"
HOW_TO_GET = (
    f"download {INCEPTION_URL} (sha256 {INCEPTION_SHA256}) on a machine with network access and pass it with "
    f"--inception-weights PATH or the {INCEPTION_ENV} environment variable"
)


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | os.PathLike, *, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save``-d state dict, never unpickling arbitrary objects.

    A truncated or corrupt file is a ``ValueError`` naming it (``what`` says what the file is for).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path, what=what)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors have many types; name the file and what is accepted
        raise UsageError(
            f"{what} {str(path)!r} is not a safetensors file or a plain torch state dict ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{what} {str(path)!r} does not hold a state dict (a mapping of names to tensors)")
    return state


def find_inception_weights(weights: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """The local Inception weights file (see the module docstring for the search order)."""
    for source, candidate in (("--inception-weights", weights), (INCEPTION_ENV, os.environ.get(INCEPTION_ENV))):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"Inception weights {str(path)!r} (from {source}) do not exist; {HOW_TO_GET}")
            return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(INCEPTION_URL).name
    if cached.is_file():
        return cached
    if download:
        part = cached.with_suffix(".part")
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, str(part), hash_prefix=INCEPTION_SHA256)
            os.replace(part, cached)
            return cached
        except Exception as err:  # no network, proxy, HTTP error...
            part.unlink(missing_ok=True)
            raise FileNotFoundError(
                f"no Inception weights found and the download failed ({err}); {HOW_TO_GET}"
            ) from err
    raise FileNotFoundError(f"no Inception weights found; {HOW_TO_GET}")


def save_random_inception(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Save a randomly initialized FID Inception-v3 of the official layout (torch-fidelity's module) to ``path``:
    for tests and smoke runs where the real weights cannot be downloaded. Its features are NOT the FID features."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fe

    cls = fe.FeatureExtractorInceptionV3
    # Build the real module, skipping only the download and the loading of weights.
    with (
        torch.random.fork_rng(),
        mock.patch.object(fe, "load_state_dict_from_url", return_value={}),
        mock.patch.object(cls, "load_state_dict", return_value=None),
    ):
        torch.manual_seed(seed)
        net = cls("inception-v3-compat", ["2048"])
        for module in net.modules():  # He init keeps activations alive through 40+ layers (the default vanishes)
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = Path(path)
    torch.save(net.state_dict(), path)
    return path


def _to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] with C = 1 or 3 -> (B, 3, H, W) uint8, rounded as when saving a PNG."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise UsageError(f"expected images (B, 1 or 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


class InceptionFeatures(nn.Module):
    """The FID Inception-v3 pool features (2048-d). Runs in float32 (TF32 if the caller enabled it)."""

    resize = INCEPTION_RESIZE
    dim = 2048

    def __init__(self, weights: str | os.PathLike | None = None, *, check_sha256: bool = False, download: bool = True):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = find_inception_weights(weights, download=download)
        digest = sha256_of(path)
        if check_sha256 and digest != INCEPTION_SHA256:
            raise UsageError(
                f"{path} has sha256 {digest}, not the official FID Inception weights' {INCEPTION_SHA256}; {HOW_TO_GET}"
            )
        state = read_state_dict(path, what="Inception weights")
        # torch-fidelity unpickles its weights file; give it a copy holding nothing but the tensors read above.
        with tempfile.TemporaryDirectory() as tmp:
            clean = Path(tmp) / "inception.pth"
            torch.save(state, clean)
            try:
                self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(clean))
            except RuntimeError as err:  # load_state_dict: missing/unexpected keys or shapes
                raise UsageError(f"{path} is not an FID Inception-v3 state dict: {str(err)[:300]}") from err
        self.sha256 = digest
        self.official = digest == INCEPTION_SHA256
        tag = "official" if self.official else "UNOFFICIAL weights"
        self.name = f"inception-v3-fid ({tag}, sha256 {digest[:12]})"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        (features,) = self.net(_to_uint8_rgb(images))
        return features.float()


class ModuleFeatures(nn.Module):
    """Any module mapping images to features, e.g. a LeNet trained on MNIST for an MNIST FID.

    ``module`` takes (B, channels, size, size) in [0, 1] and returns (B, D) (more dims are flattened). Images are
    converted to ``channels`` (grey <-> RGB) and, when ``size`` is given and differs, resized with antialiased
    bilinear interpolation. ``layer``: take the INPUT of this named submodule as the features instead of the
    module's output (e.g. a classifier's final linear layer -> penultimate features).
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        name: str,
        channels: int | None = None,
        size: int | None = None,
        layer: str | None = None,
    ):
        super().__init__()
        self.module = module.eval().requires_grad_(False)
        self.name, self.channels, self.size, self.layer = name, channels, size, layer
        self.resize = "none" if size is None else f"bilinear antialias to {size}x{size}"
        if layer is not None and layer not in dict(module.named_modules()):
            raise UsageError(f"layer {layer!r} is not a submodule of {name}")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if self.channels == 1 and x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        elif self.channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.size is not None and x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        if self.layer is None:
            return self.module(x).flatten(1).float()
        with FeatureHooks(self.module, [self.layer], inputs=True) as captured:
            self.module(x)
        return captured[self.layer].flatten(1).float()


def classifier_features(folder: str | os.PathLike) -> ModuleFeatures:
    """Penultimate features of a gendistill classifier folder (``model.safetensors`` + ``config.json``)."""
    model = load_classifier(folder)
    digest = sha256_of(Path(folder) / "model.safetensors")[:12]
    config = model.config
    name = f"classifier {config.arch} penultimate ({Path(folder).name}, sha256 {digest})"
    return ModuleFeatures(
        model, name=name, channels=config.in_channels, size=config.image_size, layer=model.feature_layer
    )


def load_feature_extractor(
    spec: str | None = None, *, inception_weights: str | None = None, check_sha256: bool = False
) -> nn.Module:
    """``None``/``"inception"``: the FID Inception; a classifier folder: its penultimate features."""
    if spec in (None, "inception"):
        return InceptionFeatures(inception_weights, check_sha256=check_sha256)
    path = Path(spec)
    if path.is_dir() and (path / "model.safetensors").is_file():
        return classifier_features(path)
    raise UsageError(
        f"feature extractor {spec!r} is neither 'inception' nor a classifier folder (model.safetensors + config.json)"
    )
