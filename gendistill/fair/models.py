"""The fair VAE teacher and its decoders: ``decoder(z, digit, attribute) -> pixel logits (B, 1, 32, 32)``.

The encoder sees the image with its digit and sensitive attribute (a conditional VAE), so the latent code need not
carry them, and the fairness penalty keeps it independent of the attribute; generation then draws the attribute
independently of the digit. A decoder of width ``w`` is a linear layer to 2w x 8 x 8 and two transposed
convolutions; the student is the same at a smaller width (saved as ``decoder.safetensors`` + ``decoder.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..errors import UsageError
from ..files import read_json, read_safetensors

NUM_DIGITS, NUM_GROUPS = 10, 2


def _conditions(digits: torch.Tensor, attributes: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.one_hot(digits, NUM_DIGITS), F.one_hot(attributes, NUM_GROUPS)], 1).float()


class Decoder(nn.Module):
    def __init__(self, width: int = 32, z_dim: int = 8):
        super().__init__()
        if width < 1 or z_dim < 1:
            raise UsageError(f"decoder width and z_dim must be >= 1, got {width}, {z_dim}")
        self.width, self.z_dim = width, z_dim
        self.fc = nn.Linear(z_dim + NUM_DIGITS + NUM_GROUPS, 2 * width * 64)
        self.net = nn.Sequential(
            nn.ReLU(), nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(width, 1, 4, 2, 1)
        )

    def forward(self, z, digits, attributes):
        h = self.fc(torch.cat([z, _conditions(digits, attributes)], 1)).view(-1, 2 * self.width, 8, 8)
        return self.net(h)


class FairVAE(nn.Module):
    def __init__(self, width: int = 32, z_dim: int = 8):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, width, 4, 2, 1), nn.ReLU(), nn.Conv2d(width, 2 * width, 4, 2, 1), nn.ReLU(), nn.Flatten()
        )
        self.head = nn.Linear(2 * width * 64 + NUM_DIGITS + NUM_GROUPS, 2 * z_dim)
        self.decoder = Decoder(width, z_dim)

    def encode(self, images, digits, attributes) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and log-variance (B, z_dim) each."""
        return self.head(torch.cat([self.encoder(images), _conditions(digits, attributes)], 1)).chunk(2, 1)


def save_decoder(decoder: Decoder, folder: str | os.PathLike) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "decoder.json").unlink(missing_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}
    save_file(state, str(folder / ".decoder.tmp"), metadata={"format": "pt"})
    os.replace(folder / ".decoder.tmp", folder / "decoder.safetensors")
    (folder / ".decoder.json.tmp").write_text(json.dumps({"width": decoder.width, "z_dim": decoder.z_dim}) + "\n")
    os.replace(folder / ".decoder.json.tmp", folder / "decoder.json")


def load_decoder(folder: str | os.PathLike) -> Decoder:
    folder = Path(folder)
    config = read_json(folder / "decoder.json", what="decoder config")
    if not isinstance(config, dict) or set(config) != {"width", "z_dim"}:
        raise UsageError(f"{folder / 'decoder.json'} is not a decoder config (width, z_dim)")
    decoder = Decoder(**config)
    try:
        decoder.load_state_dict(read_safetensors(folder / "decoder.safetensors", what="decoder weights"))
    except RuntimeError as err:
        raise UsageError(
            f"{folder / 'decoder.safetensors'} does not match {config}: {str(err).splitlines()[0]}"
        ) from None
    return decoder.eval()
