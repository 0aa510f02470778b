"""Losses the federated methods share."""

from __future__ import annotations

import torch


def diversity_loss(noise: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """The generators' diversity term of FedGen and FedFTG: ``exp(-mean_ij D_out[i, j] * D_z[i, j])`` over all
    pairs (i, j) of the batch (the diagonal included), with ``D_out`` the mean absolute difference of the flattened
    outputs and ``D_z`` the mean squared difference of the noise vectors. Near 1 when different noises give the
    same output (mode collapse), small when the outputs spread with the noise."""
    b = noise.shape[0]
    out = outputs.reshape(b, -1)
    d_out = (out[:, None, :] - out[None, :, :]).abs().mean(2)
    d_z = (noise.reshape(b, -1)[:, None, :] - noise.reshape(b, -1)[None, :, :]).pow(2).mean(2)
    return torch.exp(-(d_out * d_z).mean())
