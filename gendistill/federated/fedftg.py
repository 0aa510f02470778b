"""FedFTG (Zhang et al., CVPR 2022, "Fine-tuning Global Model via Data-Free Knowledge Distillation for Non-IID
Federated Learning").

Clients train as in FedAvg. On the server, after averaging, the global model is fine-tuned by data-free knowledge
distillation from the clients' models: for ``iterations`` rounds of

1. ``generator_steps`` steps of a class-conditional image generator ``G(z, y)`` (the DFKD zoo's, kept across
   rounds) minimizing ``CE(E(x), y) - adv * KL(E(x) || global(x)) + diversity * div(z, x)`` on ``x = G(z, y)``:
   images the clients' ensemble ``E`` labels ``y`` (fidelity), on which the global model still disagrees with the
   ensemble (hard-sample mining), and that vary with the noise;
2. ``distill_steps`` steps of the global model minimizing ``tau^2 KL(E(x) / tau || global(x) / tau)`` on fresh
   generated images;

with the paper's two ways of using what the server knows about the label skew: **customized label sampling**
(``y`` drawn in proportion to the clients' total examples per class) and the **class-level ensemble** (for an
image of class ``y``, ``E = sum_k w_k(y) logits_k`` with ``w_k(y)`` client k's share of the examples of y).

Choices of this implementation: SGD for the fine-tuning (momentum 0.9, the clients' learning rate), one batch
size for both steps, and no BatchNorm-statistics term (the LeNet-5 family the federated apps use has no BN).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..dfkd.generators import Generator
from ..errors import UsageError
from .base import ClientData, ClientReply, FederatedMethod, build_model, train_locally
from .fedgen import class_weights
from .losses import diversity_loss


@dataclass
class FedFTGConfig:
    iterations: int = 10  # server fine-tuning rounds per federated round
    start_round: int = 1  # the first federated round whose global model is fine-tuned (before: FedAvg alone)
    generator_steps: int = 1
    distill_steps: int = 5
    batch_size: int = 64
    noise_dim: int = 100
    generator_width: int = 32  # ngf of the zoo generator
    generator_lr: float = 1e-3
    distill_lr: float = 0.01
    adv: float = 1.0  # weight of the hard-sample (disagreement) term
    diversity: float = 1.0
    tau: float = 1.0  # temperature of the distillation KL

    def __post_init__(self):
        for name in ("iterations", "batch_size", "noise_dim", "generator_width"):
            if getattr(self, name) < 1:
                raise UsageError(f"fedftg {name} must be >= 1, got {getattr(self, name)}")
        if self.tau <= 0:
            raise UsageError(f"fedftg tau must be > 0, got {self.tau}")


def class_level_ensemble(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``E_i = sum_k weights[k, y_i] logits[k, i]``: logits (clients, B, K), labels (B,), weights (clients,
    classes) -> (B, K)."""
    return (weights[:, labels].unsqueeze(-1) * logits).sum(0)


def kl_to(target_logits: torch.Tensor, logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``tau^2 KL(softmax(target / tau) || softmax(logits / tau))``, batch mean."""
    return F.kl_div(
        F.log_softmax(logits / tau, dim=1), F.log_softmax(target_logits / tau, dim=1), reduction="batchmean",
        log_target=True,
    ) * tau**2  # fmt: skip


class FedFTG(FederatedMethod):
    name = "fedftg"
    Config = FedFTGConfig

    def __init__(self, config, setup, *, num_classes, channels):
        super().__init__(config, setup, num_classes=num_classes, channels=channels)
        torch.manual_seed(setup.seed + 1)
        self.generator = Generator(
            nz=config.noise_dim, ngf=config.generator_width, img_size=setup.image_size, channels=channels,
            num_classes=num_classes,
        )  # fmt: skip
        self.generator_optimizer = torch.optim.Adam(self.generator.parameters(), lr=config.generator_lr)

    def client_update(self, server_round, arrays, extra, data: ClientData, state, generator) -> ClientReply:
        model = build_model(self.setup, self.num_classes, self.channels)
        model.load_state_dict(arrays)
        loss = train_locally(model, data, self.setup, generator=generator)
        return ClientReply(model.state_dict(), len(data.labels), data.counts, metrics={"train_loss": loss})

    def server_update(self, server_round, arrays, replies):
        averaged = super().server_update(server_round, arrays, replies)
        if server_round < self.config.start_round:
            return averaged
        global_model = build_model(self.setup, self.num_classes, self.channels)
        global_model.load_state_dict(averaged)
        clients = []
        for reply in replies:
            model = build_model(self.setup, self.num_classes, self.channels)
            model.load_state_dict(reply.arrays)
            clients.append(model.eval().requires_grad_(False))
        counts = np.stack([r.counts for r in replies])
        self.fine_tune(global_model, clients, counts)
        return global_model.state_dict()

    def fine_tune(self, global_model, clients, counts: np.ndarray) -> dict[str, float]:
        """The server's data-free fine-tuning of ``global_model`` (in place; module docstring)."""
        cfg = self.config
        weights = class_weights(counts)
        label_p = torch.from_numpy(counts.sum(0) / counts.sum()).float()
        optimizer = torch.optim.SGD(global_model.parameters(), lr=cfg.distill_lr, momentum=0.9)

        def draw():
            z = torch.randn(cfg.batch_size, cfg.noise_dim)
            return z, torch.multinomial(label_p, cfg.batch_size, replacement=True)

        def ensemble(x, y):
            return class_level_ensemble(torch.stack([m(x) for m in clients]), y, weights)

        losses = {}
        for _ in range(cfg.iterations):
            self.generator.train()
            global_model.eval()
            for _ in range(cfg.generator_steps):
                z, y = draw()
                x = self.generator(z, y)
                e = ensemble(x, y)
                fidelity = F.cross_entropy(e, y)
                hard = kl_to(e, global_model(x), cfg.tau)
                loss = fidelity - cfg.adv * hard + cfg.diversity * diversity_loss(z, x)
                self.generator_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.generator_optimizer.step()
                losses.update(fidelity=fidelity.item(), hard=hard.item())
            self.generator.eval()
            global_model.train()
            for _ in range(cfg.distill_steps):
                z, y = draw()
                with torch.no_grad():
                    x = self.generator(z, y)
                    e = ensemble(x, y)
                loss = kl_to(e, global_model(x), cfg.tau)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses["distill"] = loss.item()
        global_model.zero_grad(set_to_none=True)
        return losses
