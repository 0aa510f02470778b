"""CMI: Contrastive Model Inversion for Data-Free Knowledge Transfer (G. Fang et al., IJCAI 2021, arXiv 2105.08584).

DeepInversion-style synthesis through a generator of the synthesizer's own: every round re-initializes the generator
and draws fresh noise z (B, nz) and random labels, then runs ``synthesis_steps`` Adam steps on z, the generator and
a small projection head to minimize

    bn * BN-statistics(T) + oh * CE(T(global), labels) + adv * -KL(T || S)[argmaxes agree] + cr * InfoNCE

on a global view of the images (random crop + flip). The contrastive term makes each round's samples differ from
each other and from earlier rounds': the teacher's penultimate features of a local view (a random resized crop,
scale 0.25-1, upsampled back) and of the global view go through the MLP head; local i's positive is global i, its
negatives the other globals of the batch and up to ``n_neg`` global features of earlier rounds kept in a memory
bank (the round's final global features are added to it when it ends). The finished batch goes to an
:class:`ImagePool` the student samples from; a new round runs every ``synthesis_every`` student batches.

Defaults, and each change from the reference with its reason and measurement: docs/dfkd.md, "CMI".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..generators import Generator, ImagePool, augment
from ..models import FeatureHooks
from .base import PoolConfig, PoolSynthesizer, detached, image_generator, inner_optimize

GENERATOR_BETAS = (0.5, 0.999)  # the reference's optimizer of the generator and z
LOCAL_SCALE = (0.25, 1.0)  # area fraction of the local view's crop (the reference's RandomResizedCrop scale)


@dataclass
class CMIConfig(PoolConfig):
    tau: float = 20.0  # temperature of the student's KD loss (the reference scripts' --T 20)
    adv: float = 0.5  # weight of the adversarial term: minus KL(T || S) on samples whose argmaxes agree
    bn: float = 1.0  # weight of the teacher's BatchNorm statistics matching (sum over its BN layers)
    oh: float = 1.0  # weight of the teacher's cross-entropy against the round's random target labels
    cr: float = 0.8  # weight of the contrastive (InfoNCE) term
    cr_tau: float = 0.2  # temperature of the InfoNCE logits (cosine similarities / cr_tau)
    synthesis_steps: int = 200  # Adam steps per synthesis round
    generator_lr: float = 1e-3  # Adam learning rate of the generator, z and the head in a round (lr_g)
    reset_generator: bool = True  # re-initialize the generator every round (False: keep its weights)
    head_dim: int = 256  # output size of the contrastive MLP head
    bank_size: int = 40960  # capacity of the memory bank of global teacher features (oldest dropped first)
    n_neg: int = 4096  # bank features drawn (without replacement) as negatives per step
    AT_LEAST = {**PoolConfig.AT_LEAST, "synthesis_steps": 0, "n_neg": 0, "bank_size": 1, "head_dim": 1}
    POSITIVE = ("cr_tau",)


def local_view(
    x: torch.Tensor,
    *,
    scale: tuple[float, float] = LOCAL_SCALE,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> torch.Tensor:
    """Random resized crop of each image of ``x`` (B, C, H, W), resampled back to H x W (bilinear), in one batched
    ``grid_sample``. Per sample (global RNG of ``x``'s device): the crop's area fraction is uniform in ``scale``, its
    aspect ratio (width / height) log-uniform in ``ratio`` (torchvision's defaults; a side over the full size is cut
    to it), its position uniform inside the image, and it is mirrored left-right with probability 1/2 when ``flip``.
    Differentiable with respect to ``x``. Returns (B, C, H, W)."""
    batch, device = x.shape[0], x.device
    area = scale[0] + (scale[1] - scale[0]) * torch.rand(batch, device=device)
    low, high = math.log(ratio[0]), math.log(ratio[1])
    log_ratio = low + (high - low) * torch.rand(batch, device=device)
    width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # fractions of the image's width and height
    height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    center_x = (2 * torch.rand(batch, device=device) - 1) * (1 - width)  # in [-1, 1] coordinates, crop inside
    center_y = (2 * torch.rand(batch, device=device) - 1) * (1 - height)
    sign = torch.where(torch.rand(batch, device=device) < 0.5, -1.0, 1.0) if flip else torch.ones(batch, device=device)
    theta = torch.zeros(batch, 2, 3, device=device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = width * sign, center_x  # output x in [-1, 1] reads input cx + w * x
    theta[:, 1, 1], theta[:, 1, 2] = height, center_y
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def contrastive_loss(anchors, positives, bank, *, tau: float) -> torch.Tensor:
    """InfoNCE with in-batch and bank negatives: anchor i (N, D) against its positive i, the other N - 1 positives
    and the M ``bank`` vectors (M, D) (M may be 0). Equals ``info_nce(anchors, positives, negatives_i, tau=tau)``
    with per-anchor negatives ``[positives without i, bank]``, without materializing the (N, N - 1 + M, D) tensor:
    the cross-entropy over the N + M cosine logits of each anchor with target i (the reference's formulation)."""
    anchors, keys = F.normalize(anchors, dim=1), F.normalize(torch.cat([positives, bank]), dim=1)
    logits = anchors @ keys.T / tau  # (N, N + M)
    return F.cross_entropy(logits, torch.arange(len(anchors), device=anchors.device))


def reset_weights(generator: nn.Module) -> None:
    """The reference's ``reset_model``: conv/linear weights N(0, 0.02), biases 0, BatchNorm weights N(1, 0.02)."""
    for m in generator.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class FeatureBank(ImagePool):
    """A ring buffer of feature vectors (capacity, D) (an :class:`ImagePool` of (B, D) rows, no labels) whose
    :meth:`sample` draws without replacement."""

    def sample(self, k: int) -> torch.Tensor | None:
        """Up to ``k`` stored features (k', D) drawn without replacement (``torch.randperm``, global RNG of the
        bank's device); None while the bank is empty."""
        if len(self) == 0:
            return None
        return self.images[torch.randperm(len(self), device=self.images.device)[:k]]


class MLPHead(nn.Module):
    """The contrastive projection head: Linear(D, D) -> ReLU -> Linear(D, head_dim). (N, D) -> (N, head_dim)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(), nn.Linear(dim_in, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CMI(PoolSynthesizer):
    """Generator-per-round inversion with a contrastive memory bank; the student samples from the image pool.

    State (checkpointed): ``pool`` (the synthesized images), ``bank`` (global teacher features of earlier rounds),
    ``head`` (the projection head, built at the first round), ``synthesis_generator`` (the round generator) and
    ``calls`` (student batches served, which schedules the rounds); besides, ``last_losses`` (the detached loss terms
    of the latest step) and the teacher/student of the latest call (so ``preview`` can synthesize when the pool is
    empty).
    """

    name = "cmi"
    Config = CMIConfig
    needs_batchnorm = True

    def __init__(self, *, num_classes: int, image_shape: tuple[int, int, int], config=None, **overrides):
        super().__init__(num_classes=num_classes, image_shape=image_shape, config=config, **overrides)
        self.bank = FeatureBank(self.config.bank_size)
        self.head: MLPHead | None = None
        self.synthesis_generator: Generator | None = None

    def _head(self, teacher, device: torch.device) -> MLPHead:
        """The projection head on ``device``, built at first use: its input size is the teacher's feature size (the
        input size of its final linear layer)."""
        if self.head is None:
            layer = dict(teacher.named_modules())[teacher.feature_layer]
            self.head = MLPHead(layer.in_features, self.config.head_dim)
        return self.head.to(device).train()

    def _generator(self, device: torch.device) -> Generator:
        """The round generator on ``device``, built at the first round."""
        if self.synthesis_generator is None:
            self.synthesis_generator = image_generator(self.config, self.image_shape)
        return self.synthesis_generator.to(device).train()

    def synthesis_loss(self, images, labels, *, teacher, student) -> dict[str, torch.Tensor]:
        """Losses of a batch ``images`` (B, C, H, W) in [0, 1] with target ``labels`` (B,); ``"loss"`` is minimized.
        The global and local views are drawn from the global RNG; ``adv`` or ``cr`` at 0 skip their forwards."""
        cfg = self.config
        head = self._head(teacher, images.device)
        self.bank.to(images.device)
        layer = teacher.feature_layer
        # the global view: the reference pads 4 at 32 x 32
        inv = self.inversion(images, labels, teacher=teacher, student=student, mask_agreement=True, features=[layer])
        loss_cr = torch.zeros((), device=images.device)
        if cfg.cr:
            with FeatureHooks(teacher, [layer], inputs=True) as features:
                teacher(local_view(images))
                local_features = features[layer]
            negatives = self.bank.sample(cfg.n_neg)
            global_features = inv.features[layer]
            with torch.no_grad():  # keys are detached, as in the reference
                keys = head(global_features if negatives is None else torch.cat([global_features, negatives]))
            positives, bank_keys = keys[: len(images)], keys[len(images) :]
            loss_cr = contrastive_loss(head(local_features), positives, bank_keys, tau=cfg.cr_tau)
        return {"loss": inv.loss + cfg.cr * loss_cr, **detached(inv.terms), "loss_cr": loss_cr.detach()}

    def synthesize(self, batch_size: int, device: torch.device, *, teacher, student) -> torch.Tensor:
        """One round: ``synthesis_steps`` Adam steps on (z, generator, head), then the final images' global
        features join the bank. Returns (B, C, H, W) in [0, 1], detached. Gradients are taken w.r.t. z, the
        generator and the head only; the student is in eval mode meanwhile."""
        cfg = self.config
        generator, head = self._generator(device), self._head(teacher, device)
        if cfg.reset_generator:
            reset_weights(generator)
        z = torch.randn(batch_size, cfg.nz, device=device, requires_grad=True)
        labels = torch.randint(0, self.num_classes, (batch_size,), device=device)
        optimizer = torch.optim.Adam(
            [
                {"params": [z, *generator.parameters()], "betas": GENERATOR_BETAS},
                {"params": list(head.parameters())},  # default betas, as the reference's head optimizer
            ],
            lr=cfg.generator_lr,
        )

        def step():
            return self.synthesis_loss(generator(z), labels, teacher=teacher, student=student)

        params = [z, *generator.parameters(), *head.parameters()]
        losses = inner_optimize(step, params, optimizer, steps=cfg.synthesis_steps, student=student)
        if losses is not None:
            self.last_losses = detached(losses)
        with torch.no_grad():
            images = generator(z)
            with FeatureHooks(teacher, [teacher.feature_layer], inputs=True) as features:
                teacher(augment(images, padding=max(1, images.shape[-1] // 8)))
            self.bank.add(features[teacher.feature_layer])
        return images

    def state_dict(self) -> dict:
        head, generator = self.head, self.synthesis_generator
        return {
            **super().state_dict(),
            "bank": self.bank.state_dict(),
            "head": None if head is None else head.state_dict(),
            "generator": None if generator is None else generator.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.bank.load_state_dict(state["bank"])
        head, generator = state["head"], state["generator"]
        with torch.random.fork_rng(devices=[]):  # building the modules must not move the training's random stream
            self.head = None if head is None else MLPHead(head["net.0.weight"].shape[1], self.config.head_dim)
            self.synthesis_generator = None if generator is None else image_generator(self.config, self.image_shape)
        if head is not None:
            self.head.load_state_dict(head)
        if generator is not None:
            self.synthesis_generator.load_state_dict(generator)
