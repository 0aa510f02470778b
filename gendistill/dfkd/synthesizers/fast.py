"""Fast: Up to 100x Faster Data-free Knowledge Distillation (G. Fang et al., AAAI 2022, arXiv 2112.06253).

A meta-learned generator: instead of inverting every batch from scratch (DeepInversion, CMI), Fast keeps one base
generator G whose weights are a good *starting point* for synthesis. Each iteration

1. clones G into a fast generator G' and draws noise z (B, nz) and random target labels;
2. runs ``g_steps`` Adam steps on (G', z) minimizing

       bn * BN-statistics(T, momentum bn_mmt) + oh * CE(T(aug x), labels) + adv * -KL(T || S)[argmaxes agree]

   on a random crop + flip of x = G'(z) (the student in eval mode; the adversarial term compares the *student* with
   the teacher and is off for the first ``warmup`` iterations);
3. puts the last batch into an :class:`ImagePool` and updates G by a first-order meta step: FOMAML (the sum of the
   inner gradients taken at G') or Reptile (``G - G'``), through the task's "generator" phase optimizer (the
   training core's AdamW at ``g_steps * generator_lr``, so G is checkpointed, resumed and DDP-synchronized with the
   rest of the run);
4. trains the student ``student_steps`` times on batches sampled from the whole pool.

``bn_mmt`` (the reference's BN momentum): the BN-statistics term compares the running statistics with
``bn_mmt * memory + (1 - bn_mmt) * batch statistics``, where the memory is an exponential moving average of the
final batch statistics of earlier iterations (updated once per iteration, as the reference's ``update_mmt``).

Defaults, and each change from the reference with its reason and measurement: docs/dfkd.md, "Fast".


The generator phase's logged ``loss`` is the last inner step's synthesis loss; the gradient it carries is the meta
gradient (``loss = sum_p <p, g_p> - (same).detach() + synthesis_loss.detach()``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ...errors import UsageError
from ...task import Phase
from ..generators import Generator, ImagePool
from ..losses import BNStatsLoss
from .base import (
    Synthesizer,
    SynthesizerConfig,
    detached,
    image_generator,
    inner_optimize,
    sample_pool,
)

INNER_BETAS = (0.5, 0.999)  # the reference's Adam betas of the fast generator and z
META_RULES = ("fomaml", "reptile")


@dataclass
class FastConfig(SynthesizerConfig):
    tau: float = 20.0  # temperature of the student's KD loss (the reference's --T 20)
    bn: float = 10.0  # weight of the teacher's BatchNorm statistics matching (sum over its BN layers)
    oh: float = 0.4  # weight of the teacher's cross-entropy against the iteration's random target labels
    adv: float = 1.1  # weight of the masked adversarial term: minus KL(T || S) where the argmaxes agree
    bn_mmt: float = 0.9  # momentum of the BN statistics memory (0: plain batch statistics)
    g_steps: int = 5  # inner Adam steps of the fast generator per iteration (the paper's Fast-2/5/10)
    generator_lr: float = 2e-3  # inner Adam lr of the fast generator; the meta step uses g_steps * generator_lr
    lr_z: float = 1e-2  # inner Adam lr of the noise z
    meta: str = "fomaml"  # first-order meta update: fomaml (sum of inner gradients) | reptile (G - G')
    warmup: int = 20  # iterations without the adversarial term (the student knows nothing yet)
    student_steps: int = 5  # student steps per iteration (per synthesized batch)
    synthesis_batch_size: int = 0  # images per iteration (0: the recipe's batch size)
    pool_size: int = 50_000  # capacity of the image pool (oldest images dropped first)
    AT_LEAST = {"g_steps": 1, "pool_size": 1, "warmup": 0, "synthesis_batch_size": 0}
    POSITIVE = ("generator_lr", "lr_z")

    def __post_init__(self):
        if self.meta not in META_RULES:
            raise UsageError(f"meta must be one of {', '.join(META_RULES)}, got {self.meta!r}")
        if not 0.0 <= self.bn_mmt < 1.0:
            raise UsageError(f"bn_mmt must be in [0, 1), got {self.bn_mmt}")
        super().__post_init__()


class Fast(Synthesizer):
    """Meta-learned generator; the student samples from the pool of the fast generators' images.

    State (checkpointed): ``pool``, ``bn_memory`` (the BN momentum memory) and ``rounds`` (iterations synthesized,
    for ``warmup``); besides, ``last_losses`` (the detached loss terms of the latest inner step).
    """

    name = "fast"
    Config = FastConfig
    needs_batchnorm = True

    def __init__(self, *, num_classes: int, image_shape: tuple[int, int, int], config=None, **overrides):
        super().__init__(num_classes=num_classes, image_shape=image_shape, config=config, **overrides)
        self.pool = ImagePool(self.config.pool_size)
        self.bn_memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rounds = 0
        self.last_losses: dict[str, torch.Tensor] = {}

    def build_generator(self) -> Generator:
        return image_generator(self.config, self.image_shape)

    def phases(self) -> list[Phase]:
        cfg = self.config
        return [Phase("generator", lr=cfg.generator_lr * cfg.g_steps), Phase("student", steps=cfg.student_steps)]

    def generator_batch(self, batch_size, device):
        size = self.config.synthesis_batch_size or batch_size
        return {
            "z": self.noise(size, device),
            "labels": torch.randint(0, self.num_classes, (size,), device=device),
        }

    def synthesis_loss(self, images, labels, *, teacher, student, bn_stats) -> dict[str, torch.Tensor]:
        """Losses of ``images`` (B, C, H, W) in [0, 1] with target ``labels`` (B,), ``bn_stats`` a
        :class:`BNStatsLoss` installed on the teacher; ``"loss"`` is minimized. One random crop + flip (global RNG)."""
        adv = None if self.rounds >= self.config.warmup else 0.0
        inv = self.inversion(
            images, labels, teacher=teacher, student=student, adv=adv, mask_agreement=True, bn_stats=bn_stats
        )
        return {"loss": inv.loss, **detached(inv.terms)}

    def inner_loop(self, base: torch.nn.Module, z, labels, *, teacher, student):
        """``g_steps`` Adam steps on a copy of ``base`` and on (a copy of) ``z`` (B, nz). Returns (images (B, C, H, W)
        of the last step, detached; the meta gradient of each parameter of ``base``, in order; the last step's
        losses). Updates the BN memory once, from the last step's batch statistics."""
        cfg = self.config
        fast = copy.deepcopy(base).train()
        z = z.detach().clone().requires_grad_(True)
        params = [*fast.parameters(), z]
        optimizer = torch.optim.Adam(
            [{"params": params[:-1]}, {"params": [z], "lr": cfg.lr_z}], lr=cfg.generator_lr, betas=INNER_BETAS
        )
        meta = [torch.zeros_like(p) for p in params[:-1]] if cfg.meta == "fomaml" else None
        momentum = cfg.bn_mmt or None
        memory = {k: (m.to(z.device), v.to(z.device)) for k, (m, v) in self.bn_memory.items()}  # maybe resumed
        with BNStatsLoss(
            teacher, momentum=momentum, update="manual", memory=memory, backend=self.kernel_backend
        ) as bn_stats:

            def step():
                images = fast(z)
                losses = self.synthesis_loss(images, labels, teacher=teacher, student=student, bn_stats=bn_stats)
                return {**losses, "images": images}

            losses = inner_optimize(step, params, optimizer, steps=cfg.g_steps, student=student, grad_sum=meta)
            if momentum is not None:
                bn_stats.commit()
                self.bn_memory = {k: (m.detach(), v.detach()) for k, (m, v) in bn_stats.memory.items()}
        images = losses.pop("images")
        if meta is None:  # Reptile: the meta gradient points from the adapted weights back to the base's
            meta = [b.detach() - p.detach() for b, p in zip(base.parameters(), params)]
        self.last_losses = detached(losses)
        return images.detach(), meta, losses

    def generator_loss(self, batch, *, generator, teacher, student):
        """One iteration's synthesis (the inner loop; its images join the pool) and the meta step's surrogate loss,
        whose gradient w.r.t. each generator parameter is the meta gradient."""
        base = getattr(generator, "module", generator)  # a DDP wrapper holds the same parameters
        images, meta, losses = self.inner_loop(base, batch["z"], batch["labels"], teacher=teacher, student=student)
        self.pool.to(images.device)  # a resumed pool is on the CPU
        self.pool.add(images)
        self.rounds += 1
        surrogate = sum((p * g).sum() for p, g in zip(base.parameters(), meta))
        if generator is not base:  # DDP reduces gradients only after a forward through its wrapper
            surrogate = surrogate + 0.0 * generator(batch["z"][:2]).sum()
        out = {k: v.detach() for k, v in losses.items() if k != "loss"}
        out["loss"] = surrogate - surrogate.detach() + losses["loss"].detach()
        return out

    def student_images(self, batch_size, device, *, teacher, student, generator):
        device = torch.device(device)
        self.pool.to(device)
        if len(self.pool) == 0:
            raise RuntimeError("fast: the pool is empty; the generator phase runs before the student's")
        images, _ = self.pool.sample(batch_size)
        return images

    @torch.no_grad()
    def preview(self, num_images, device, *, generator, teacher=None, student=None):
        """``num_images`` pool images (the training RNG is left untouched), or the base generator's images while the
        pool is empty."""
        device = torch.device(device)
        if len(self.pool) == 0:
            return generator(self.noise(num_images, device))
        return sample_pool(self.pool, num_images, device)

    def state_dict(self) -> dict:
        memory = {layer: list(stats) for layer, stats in self.bn_memory.items()}  # layer -> [mean, var]
        return {"pool": self.pool.state_dict(), "rounds": self.rounds, "bn_memory": memory}

    def load_state_dict(self, state: dict) -> None:
        self.pool.load_state_dict(state["pool"])
        self.rounds = int(state["rounds"])
        self.bn_memory = {layer: (mean, var) for layer, (mean, var) in state["bn_memory"].items()}
