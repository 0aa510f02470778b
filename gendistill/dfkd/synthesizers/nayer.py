"""NAYER: Noisy Layer Data Generation for Efficient and Effective Data-free Knowledge Distillation (M.-T. Tran et
al., CVPR 2024, arXiv 2310.00258).

The generator's input is not noise but a fixed *label embedding* per class, passed through a BatchNorm and a
"noisy layer" (a linear layer re-drawn from N(0, 1) before every synthesis loop) into the usual generator body. The
noisy layer makes each loop's images differ although the labels' embeddings never change, and since the label
information is fixed the generator needs only a few steps per loop. Each synthesis round runs ``loops`` loops (the
first ``warmup`` rounds ``warmup_loops`` and no adversarial term); a loop re-draws the noisy layer, draws balanced
labels (every class ``B // K`` times, the rest at random) and runs ``synthesis_steps`` Adam steps on the generator
(noisy layer included) minimizing

    bn * BN-statistics(T) + oh * CE(T(aug x), labels) + adv * -KL(T || S)[argmaxes agree]

on a random crop + flip of the images; the loop's last batch joins an :class:`ImagePool` the student samples from.
The whole generator is re-initialized every ``g_life`` rounds. A round runs at the first student batch and then
every ``synthesis_every`` batches.

Defaults, and each change from the reference with its reason and measurement: docs/dfkd.md, "NAYER".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ...errors import UsageError
from ..generators import Generator
from .base import PoolConfig, PoolSynthesizer, detached, inner_optimize

GENERATOR_BETAS = (0.5, 0.999)  # the reference's Adam betas


@dataclass
class NAYERConfig(PoolConfig):
    tau: float = 20.0  # temperature of the student's KD loss
    bn: float = 10.0  # weight of the teacher's BatchNorm statistics matching (sum over its BN layers)
    oh: float = 0.5  # weight of the teacher's cross-entropy against the loop's balanced labels
    adv: float = 1.33  # weight of the masked adversarial term: minus KL(T || S) where the argmaxes agree
    synthesis_steps: int = 40  # Adam steps per loop (the reference's g_steps)
    generator_lr: float = 4e-3  # Adam learning rate of the generator and its noisy layer (lr_g)
    loops: int = 2  # loops per synthesis round after the warm-up (g_loops)
    warmup: int = 20  # rounds with warmup_loops loops and no adversarial term
    warmup_loops: int = 10  # loops per warm-up round (gwp_loops)
    g_life: int = 10  # rounds between re-initializations of the whole generator
    embed_dim: int = 512  # size of the label embeddings (the paper: CLIP text embeddings)
    nz: int = 256  # output size of the noisy layer, the generator body's input
    noisy_group: int = 100  # samples sharing one noisy layer (the reference's nl)
    AT_LEAST = {
        **PoolConfig.AT_LEAST,
        **dict.fromkeys(("synthesis_steps", "loops", "g_life", "embed_dim", "noisy_group"), 1),
        **dict.fromkeys(("warmup", "warmup_loops"), 0),
    }


class NoisyLayerGenerator(nn.Module):
    """Label embedding (buffer, (num_classes, embed_dim)) -> BatchNorm1d -> noisy Linear(embed_dim, nz) -> the
    :class:`Generator` body (``self.body``). Samples ``[g * group, (g + 1) * group)`` of a batch share noisy layer
    ``g``; ``num_noisy`` layers serve batches of up to ``num_noisy * group`` samples.

    forward(labels (B,)) -> images (B, channels, img_size, img_size) in [0, 1].
    """

    def __init__(
        self,
        label_embeddings: torch.Tensor,
        *,
        nz: int,
        ngf: int,
        img_size: int,
        channels: int,
        group: int,
        num_noisy: int,
    ):
        super().__init__()
        embed_dim = label_embeddings.shape[1]
        self.group = group
        self.register_buffer("label_embeddings", label_embeddings.detach().clone())
        self.norm = nn.BatchNorm1d(embed_dim)
        self.noisy = nn.ModuleList(nn.Linear(embed_dim, nz) for _ in range(num_noisy))
        self.body = Generator(nz=nz, ngf=ngf, img_size=img_size, channels=channels)
        self.redraw_noise()

    @torch.no_grad()
    def redraw_noise(self) -> None:
        """Re-draw every noisy layer: weights N(0, 1), biases 0 (global RNG)."""
        for layer in self.noisy:
            layer.weight.normal_(0.0, 1.0)
            layer.bias.zero_()

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.dim() != 1 or len(labels) > len(self.noisy) * self.group:
            raise UsageError(
                f"labels must be (B,) with B <= {len(self.noisy) * self.group}, got shape {tuple(labels.shape)}"
            )
        embedded = self.norm(self.label_embeddings[labels])
        chunks = embedded.split(self.group)
        return self.body(torch.cat([layer(chunk) for layer, chunk in zip(self.noisy, chunks)]))


def balanced_labels(batch_size: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """(batch_size,) labels with every class ``batch_size // num_classes`` times and the remainder drawn uniformly
    (global RNG), shuffled (``torch.randperm``) so each noisy-layer group sees many classes."""
    rest = torch.randint(0, num_classes, (batch_size % num_classes,), device=device)
    labels = torch.cat([torch.arange(num_classes, device=device).repeat(batch_size // num_classes), rest])
    return labels[torch.randperm(batch_size, device=device)]


class NAYER(PoolSynthesizer):
    """Noisy-layer generator over fixed label embeddings; the student samples from the pool.

    State (checkpointed, besides :class:`PoolSynthesizer`'s): ``label_embeddings`` (num_classes, embed_dim),
    ``synthesis_generator`` (the current life's generator, with its number of noisy layers) and ``rounds``
    (synthesis rounds run).
    """

    name = "nayer"
    Config = NAYERConfig
    needs_batchnorm = True

    def __init__(self, *, num_classes: int, image_shape: tuple[int, int, int], config=None, **overrides):
        super().__init__(num_classes=num_classes, image_shape=image_shape, config=config, **overrides)
        self.label_embeddings = nn.init.orthogonal_(torch.empty(num_classes, self.config.embed_dim))
        self.synthesis_generator: NoisyLayerGenerator | None = None
        self.rounds = 0

    def _new_generator(self, num_noisy: int) -> NoisyLayerGenerator:
        cfg = self.config
        shape = tuple(self.label_embeddings.shape)
        if shape != (self.num_classes, cfg.embed_dim):
            raise UsageError(f"label_embeddings must be ({self.num_classes}, {cfg.embed_dim}), got {shape}")
        c, h, _ = self.image_shape
        embeddings = self.label_embeddings.float()
        return NoisyLayerGenerator(
            embeddings, nz=cfg.nz, ngf=cfg.ngf, img_size=h, channels=c, group=cfg.noisy_group, num_noisy=num_noisy
        )

    def synthesis_loss(self, images, labels, *, teacher, student, adversarial: bool) -> dict[str, torch.Tensor]:
        """Losses of ``images`` (B, C, H, W) in [0, 1] with target ``labels`` (B,); ``"loss"`` is minimized."""
        adv = None if adversarial else 0.0
        inv = self.inversion(images, labels, teacher=teacher, student=student, adv=adv, mask_agreement=True)
        return {"loss": inv.loss, **detached(inv.terms)}

    def _loop_losses(self, generator, labels, *, teacher, student, adversarial: bool) -> dict[str, torch.Tensor]:
        """One step's losses of ``generator(labels)``, and its images under ``"images"``."""
        images = generator(labels)
        losses = self.synthesis_loss(images, labels, teacher=teacher, student=student, adversarial=adversarial)
        return {**losses, "images": images}

    def synthesize(self, batch_size: int, device: torch.device, *, teacher, student) -> torch.Tensor:
        """One round: (warmup_)loops loops of ``synthesis_steps`` steps. Returns every loop's last batch,
        concatenated ((loops * B, C, H, W) in [0, 1], detached); gradients reach the generator only."""
        cfg = self.config
        generator = self.synthesis_generator
        needed = math.ceil(batch_size / cfg.noisy_group)
        if generator is None or self.rounds % cfg.g_life == 0 or len(generator.noisy) < needed:
            generator = self.synthesis_generator = self._new_generator(needed)
        generator.to(device).train()
        warm = self.rounds < cfg.warmup
        batches = []
        for _ in range(cfg.warmup_loops if warm else cfg.loops):
            generator.redraw_noise()
            labels = balanced_labels(batch_size, self.num_classes, device)
            params = list(generator.parameters())
            optimizer = torch.optim.Adam(params, lr=cfg.generator_lr, betas=GENERATOR_BETAS)
            step = partial(
                self._loop_losses, generator, labels, teacher=teacher, student=student, adversarial=not warm
            )
            losses = inner_optimize(step, params, optimizer, steps=cfg.synthesis_steps, student=student)
            batches.append(losses.pop("images").detach())
            self.last_losses = detached(losses)
        self.rounds += 1
        if not batches:  # warmup_loops = 0: one fresh batch so the pool is never empty
            with torch.no_grad():
                batches.append(generator(balanced_labels(batch_size, self.num_classes, device)))
        return torch.cat(batches)

    def state_dict(self) -> dict:
        generator = self.synthesis_generator
        saved = None if generator is None else {"num_noisy": len(generator.noisy), "weights": generator.state_dict()}
        return {
            **super().state_dict(),
            "rounds": self.rounds,
            "label_embeddings": self.label_embeddings,
            "generator": saved,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rounds, self.label_embeddings = int(state["rounds"]), state["label_embeddings"]
        saved, self.synthesis_generator = state["generator"], None
        if saved is not None:
            with torch.random.fork_rng(devices=[]):  # building it must not move the training's random stream
                self.synthesis_generator = self._new_generator(int(saved["num_noisy"]))
            self.synthesis_generator.load_state_dict(saved["weights"])
