"""The two training tasks of Fair4Free's setting on the shared training core.

``FairVAETask`` (phase "vae"): the negative ELBO of the conditional VAE (Bernoulli pixel likelihood summed over
pixels, KL to N(0, I) summed over latent dimensions, both averaged over the batch) plus ``fair`` x the squared MMD
between the latent codes of the two attribute groups (:func:`gaussian_mmd`): the code must not tell the attribute.
Batches draw the same number of images from each (label, attribute) group (reweighing, Kamiran and Calders 2012):
on biased data the rare combinations are otherwise too few for the decoder to render them.

``LatentDistillTask`` (phase "student"): data-free: latent codes from N(0, I), digits and attributes uniformly and
independently; the smaller student decoder learns the teacher decoder's pixel probabilities (binary cross-entropy
with the teacher's sigmoid outputs as soft targets). Its evaluation: the mean absolute pixel gap to the teacher on a
fixed set of 512 latent draws.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..task import Phase
from .models import NUM_DIGITS, NUM_GROUPS, Decoder, FairVAE


def gaussian_mmd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared MMD (biased V-statistic) between samples ``a`` (N, D) and ``b`` (M, D) with the Gaussian kernel
    ``exp(-|x - y|^2 / (2 D))``: ``mean k(a, a) + mean k(b, b) - 2 mean k(a, b)``."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise UsageError(f"gaussian_mmd needs non-empty (N, D) and (M, D), got {tuple(a.shape)}, {tuple(b.shape)}")

    def kernel(x, y):
        return torch.exp(-torch.cdist(x, y).square() / (2 * x.shape[1]))

    return kernel(a, a).mean() + kernel(b, b).mean() - 2 * kernel(a, b).mean()


class FairVAETask(nn.Module):
    def __init__(self, vae: FairVAE, images, digits, labels, attributes, *, fair: float = 100.0):
        super().__init__()
        self.vae, self.fair = vae, fair
        self.register_buffer("images", images.float(), persistent=False)
        self.register_buffer("digits", digits.long(), persistent=False)
        self.register_buffer("attributes", attributes.long(), persistent=False)
        self.groups = [torch.nonzero((labels == y) & (attributes == s)).flatten() for y in (0, 1) for s in (0, 1)]
        empty = [i for i, g in enumerate(self.groups) if len(g) == 0]
        if empty:
            raise UsageError(f"(label, attribute) groups {empty} have no image; the balanced batches need each")

    def phases(self) -> list[Phase]:
        return [Phase("vae")]

    def sample_batch(self, phase, batch_size, device):
        per = max(1, batch_size // len(self.groups))
        index = torch.cat([g[torch.randint(len(g), (per,))] for g in self.groups])
        return {k: getattr(self, k)[index].to(device) for k in ("images", "digits", "attributes")}

    def forward(self, phase, batch):
        images, digits, attributes = batch["images"], batch["digits"], batch["attributes"]
        mean, log_var = self.vae.encode(images, digits, attributes)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        logits = self.vae.decoder(z, digits, attributes)
        reconstruction = F.binary_cross_entropy_with_logits(logits, images, reduction="sum") / len(images)
        kl = (-0.5 * (1 + log_var - mean.square() - log_var.exp()).sum(1)).mean()
        mmd = gaussian_mmd(z[attributes == 0], z[attributes == 1])
        loss = reconstruction + kl + self.fair * mmd
        return {"loss": loss, "reconstruction": reconstruction.detach(), "kl": kl.detach(), "mmd": mmd.detach()}


def draw_conditions(n: int, z_dim: int, device, generator: torch.Generator | None = None):
    """``n`` latent codes from N(0, I), digits and attributes drawn uniformly and independently."""
    z = torch.randn(n, z_dim, generator=generator).to(device)
    digits = torch.randint(0, NUM_DIGITS, (n,), generator=generator).to(device)
    attributes = torch.randint(0, NUM_GROUPS, (n,), generator=generator).to(device)
    return z, digits, attributes


class LatentDistillTask(nn.Module):
    def __init__(self, teacher: Decoder, student: Decoder):
        super().__init__()
        if teacher.z_dim != student.z_dim:
            raise UsageError(f"the teacher's latent size is {teacher.z_dim}, the student's {student.z_dim}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student.train()
        self.fixed = draw_conditions(512, teacher.z_dim, "cpu", torch.Generator().manual_seed(1234))

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.train(False)
        return self

    def phases(self) -> list[Phase]:
        return [Phase("student")]

    def sample_batch(self, phase, batch_size, device):
        z, digits, attributes = draw_conditions(batch_size, self.teacher.z_dim, device)
        return {"z": z, "digits": digits, "attributes": attributes}

    def forward(self, phase, batch):
        args = (batch["z"], batch["digits"], batch["attributes"])
        with torch.no_grad():
            target = torch.sigmoid(self.teacher(*args))
        return {"loss": F.binary_cross_entropy_with_logits(self.student(*args), target)}

    @torch.no_grad()
    def evaluate(self, student: nn.Module | None = None, **_) -> dict[str, float]:
        student = self.student if student is None else student
        device = next(student.parameters()).device
        args = [t.to(device) for t in self.fixed]
        was_training = student.training
        student.eval()
        gap = (torch.sigmoid(student(*args)) - torch.sigmoid(self.teacher.to(device)(*args))).abs().mean()
        student.train(was_training)
        return {"pixel_gap_to_teacher": float(gap)}

    @torch.no_grad()
    def sample_images(self, **modules) -> torch.Tensor:
        student = modules.get("student", self.student)
        device = next(student.parameters()).device
        args = [t[:16].to(device) for t in self.fixed]
        return torch.cat([torch.sigmoid(self.teacher(*args)), torch.sigmoid(student(*args))])
