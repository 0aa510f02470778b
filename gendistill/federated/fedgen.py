"""FedGen (Zhu, Hong and Zhou, ICML 2021, "Data-Free Knowledge Distillation for Heterogeneous Federated
Learning").

The server learns, without any data, a small label-conditioned generator ``G(z, y)`` of *features* (the input of
the classifier head) that the clients' heads agree on: after averaging the clients' weights as FedAvg does, it
trains ``G`` for ``generator_steps`` steps to minimize

    sum_k w_k(y) CE(head_k(G(z, y)), y) + diversity * exp(-mean_ij |G_i - G_j|_1 |z_i - z_j|^2)

over labels ``y`` drawn uniformly from the classes some client holds, with ``w_k(y)`` client k's share of the
examples of class y (the heads of clients that know a class speak for it). ``G`` goes to the clients with the
global model, and each client adds, to its cross-entropy, the knowledge it carries about the classes it lacks:

    alpha_t * CE(head(G(z, y')), y')  +  beta_t * KL(softmax(head(G(z, y))) || softmax(model(x)))

for labels ``y'`` drawn like the server's and the batch's own labels ``y``; ``alpha_t = alpha * decay^t`` and
``beta_t`` likewise (the reference decays both per round). Only the head sees generated features; the client's
feature extractor learns from its data alone.

Choices of this implementation: the generator's output passes a ReLU (the head's input is a ReLU output in the
LeNet-5 family), the generator and its Adam persist across rounds on the server, and the number of generated
samples per client batch equals the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from .base import (
    ClientData,
    ClientReply,
    FederatedMethod,
    Tensors,
    build_model,
    stage_modules,
    train_locally,
)  # fmt: skip
from .losses import diversity_loss


@dataclass
class FedGenConfig:
    noise_dim: int = 32
    hidden: int = 256
    generator_steps: int = 100  # server steps per round
    generator_batch: int = 64
    generator_lr: float = 3e-4
    diversity: float = 1.0
    alpha: float = 1.0  # weight of the generated-feature cross-entropy on the client
    beta: float = 1.0  # weight of the KL between the head on G(z, y) and the model on x
    decay: float = 0.98  # alpha and beta are multiplied by decay every round

    def __post_init__(self):
        for name in ("noise_dim", "hidden", "generator_steps", "generator_batch"):
            if getattr(self, name) < 1:
                raise UsageError(f"fedgen {name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.decay <= 1:
            raise UsageError(f"fedgen decay must be in (0, 1], got {self.decay}")


class FeatureGenerator(nn.Module):
    """``G(z, y)``: noise (B, noise_dim) and labels (B,) -> features (B, feature_dim) >= 0, through
    ``Linear -> BatchNorm -> ReLU -> Linear -> ReLU`` on ``[z, onehot(y)]``."""

    def __init__(self, num_classes: int, feature_dim: int, noise_dim: int = 32, hidden: int = 256):
        super().__init__()
        self.num_classes, self.noise_dim = num_classes, noise_dim
        self.net = nn.Sequential(
            nn.Linear(noise_dim + num_classes, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, feature_dim),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.relu(self.net(torch.cat([z, F.one_hot(labels, self.num_classes).to(z.dtype)], dim=1)))


def class_weights(counts: np.ndarray) -> torch.Tensor:
    """(clients, classes): each client's share of the examples of each class (columns sum to 1; a class nobody
    holds: all 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(0, keepdims=True)
    return torch.from_numpy(np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)).float()


def weighted_head_loss(heads: list[nn.Module], feats: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor):
    """``mean_i sum_k weights[k, y_i] CE(head_k(feats_i), y_i)``."""
    per_client = torch.stack([F.cross_entropy(head(feats), labels, reduction="none") for head in heads])  # (K, B)
    return (weights[:, labels] * per_client).sum(0).mean()


class FedGen(FederatedMethod):
    name = "fedgen"
    Config = FedGenConfig

    def __init__(self, config, setup, *, num_classes, channels):
        super().__init__(config, setup, num_classes=num_classes, channels=channels)
        probe = build_model(setup, num_classes, channels)
        self.feature_dim = stage_modules(probe)[-1].in_features
        torch.manual_seed(setup.seed + 1)
        self.generator = self._new_generator()
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=config.generator_lr)
        self.available = np.zeros(num_classes, dtype=bool)  # classes some client holds (known after round 1)

    def _new_generator(self) -> FeatureGenerator:
        cfg = self.config
        return FeatureGenerator(self.num_classes, self.feature_dim, cfg.noise_dim, cfg.hidden)

    def server_extra(self, server_round: int) -> Tensors:
        if server_round == 1:  # no generator has been trained yet
            return {}
        extra = {f"generator.{k}": v for k, v in self.generator.state_dict().items()}
        extra["available"] = torch.from_numpy(self.available)
        return extra

    def client_update(self, server_round, arrays, extra, data: ClientData, state, generator) -> ClientReply:
        cfg = self.config
        model = build_model(self.setup, self.num_classes, self.channels)
        model.load_state_dict(arrays)
        extra_loss = None
        if extra:
            gen = self._new_generator()
            gen.load_state_dict({k[len("generator.") :]: v for k, v in extra.items() if k.startswith("generator.")})
            gen.eval().requires_grad_(False)
            classes = torch.nonzero(extra["available"]).flatten()
            scale = cfg.decay ** (server_round - 1)
            head = stage_modules(model)[-1]

            def extra_loss(model, x, y, index):
                b = len(y)
                sampled = classes[torch.randint(len(classes), (b,), generator=generator)]
                feats = gen(torch.randn(b, cfg.noise_dim, generator=generator), sampled)
                teacher = F.cross_entropy(head(feats), sampled)
                with torch.no_grad():
                    target = F.softmax(head(gen(torch.randn(b, cfg.noise_dim, generator=generator), y)), dim=1)
                latent = F.kl_div(F.log_softmax(model(x), dim=1), target, reduction="batchmean")
                return scale * (cfg.alpha * teacher + cfg.beta * latent)

        loss = train_locally(model, data, self.setup, generator=generator, extra_loss=extra_loss)
        return ClientReply(model.state_dict(), len(data.labels), data.counts, metrics={"train_loss": loss})

    def server_update(self, server_round, arrays, replies):
        new = super().server_update(server_round, arrays, replies)
        counts = np.stack([r.counts for r in replies])
        self.available = counts.sum(0) > 0
        self.train_generator(replies, counts)
        return new

    def train_generator(self, replies: list[ClientReply], counts: np.ndarray) -> float:
        """``generator_steps`` Adam steps of the generator against the clients' heads (module docstring)."""
        cfg = self.config
        heads = []
        for reply in replies:
            model = build_model(self.setup, self.num_classes, self.channels)
            model.load_state_dict(reply.arrays)
            heads.append(stage_modules(model)[-1].requires_grad_(False))
        weights = class_weights(counts)
        classes = torch.nonzero(torch.from_numpy(self.available)).flatten()
        self.generator.train()
        loss = torch.zeros(())
        for _ in range(cfg.generator_steps):
            z = torch.randn(cfg.generator_batch, cfg.noise_dim)
            labels = classes[torch.randint(len(classes), (cfg.generator_batch,))]
            feats = self.generator(z, labels)
            loss = weighted_head_loss(heads, feats, labels, weights) + cfg.diversity * diversity_loss(z, feats)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.generator.eval()
        return float(loss.detach())
