"""FedD2S (Atapour et al., 2024, "FedD2S: Personalized Data-Free Federated Knowledge Distillation").

Personalized federated learning by mutual distillation, without any public data and without averaging weights:
every client keeps its own model; the server keeps *head models*, the deeper part of the architecture from a cut
point on. Each round, at the current cut ``c``:

1. the client trains its own model on its examples, with

       CE(model(x), y) + beta * tau^2 KL(S / tau || model(x) / tau) + gamma * CE(H_c(stages[:c](x)), y)

   where ``H_c`` is the server's head of cut ``c`` (frozen) and ``S = H_c(stages[:c](x))`` its soft labels for
   these very examples: the global head distills back into the client, its cross-entropy through the client's
   shallow layers (which must produce representations the head trained on every client reads right) and its soft
   labels into the whole client model. In the first round of a cut, before the server has trained its head,
   ``S`` is the server's soft labels from the last round (the previous cut's head on the representations the
   client sent) and the third term is absent; in round 1 both are. Then the client sends the representations
   ``r = stages[:c](x)`` of its examples, its logits and its labels;
2. the server trains the head of cut ``c`` on every client's representations with ``CE(head(r), y) + tau^2
   KL(client logits / tau || head(r) / tau)`` (``server_epochs`` epochs of SGD), and computes the soft labels
   ``S = head(r)`` it sends each client for its own examples.

**Deep-to-shallow layer dropping**: the cut starts at the deepest stage (the head is the last linear layer) and
moves one stage shallower every ``drop_every`` rounds, down to ``min_cut``: the deeper layers of the client model
drop out of the federation one after the other, and what they learned stays personal, while the shallower layers
keep receiving the federation's knowledge through the server's soft labels.

Choices of this implementation (the paper leaves them to its code): one head per cut point, each started fresh
from the model's initial weights when its cut is first used; SGD (momentum 0.9, the clients' learning rate) on
the server; the client's representations are computed after its local training, with its model in eval mode; the
soft labels come from the head the client received, computed on the client (the same head the server would use,
on the client's current representations instead of last round's); the defaults (cut down to the first conv
block, a move every 3 rounds, 5 server epochs) were chosen on seed 0 of the MNIST benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UsageError
from .base import (
    ClientData,
    ClientReply,
    FederatedMethod,
    Tensors,
    build_model,
    forward_from,
    normalize,
    stage_modules,
    train_locally,
)  # fmt: skip
from .fedftg import kl_to


@dataclass
class FedD2SConfig:
    drop_every: int = 3  # rounds between two moves of the cut one stage shallower
    min_cut: int = 1  # the shallowest cut (stages before it are never shared): 1 = after the first conv block
    beta: float = 1.0  # weight of the server's soft labels in the client's loss
    gamma: float = 1.0  # weight of the global head's cross-entropy on the client's representations
    tau: float = 2.0  # temperature of both distillations
    server_epochs: int = 5
    server_batch: int = 64

    def __post_init__(self):
        if self.drop_every < 1 or self.min_cut < 1 or self.server_epochs < 1 or self.server_batch < 1:
            raise UsageError("fedd2s drop_every, min_cut, server_epochs and server_batch must be >= 1")


class FedD2S(FederatedMethod):
    name = "fedd2s"
    Config = FedD2SConfig
    personalized = True
    global_model = False

    def __init__(self, config, setup, *, num_classes, channels):
        super().__init__(config, setup, num_classes=num_classes, channels=channels)
        self.num_stages = len(stage_modules(build_model(setup, num_classes, channels)))
        if not 1 <= config.min_cut < self.num_stages:
            raise UsageError(f"fedd2s min_cut must be in 1..{self.num_stages - 1}, got {config.min_cut}")
        self.heads: dict[int, Tensors] = {}
        self.soft_labels: dict[int, torch.Tensor] = {}  # client -> (n, K) logits for its examples

    def cut(self, server_round: int) -> int:
        """The stage index the representations are taken before, in ``server_round`` (1-based): the head's first
        stage (``num_stages - 1``: only the last linear layer) in the first ``drop_every`` rounds, then one
        shallower every ``drop_every`` rounds, never below ``min_cut``."""
        deepest = self.num_stages - 1
        return max(self.config.min_cut, deepest - (server_round - 1) // self.config.drop_every)

    def initial_arrays(self) -> Tensors:
        torch.manual_seed(self.setup.seed)
        self.initial = build_model(self.setup, self.num_classes, self.channels).state_dict()
        return self.initial

    def server_extra(self, server_round: int) -> Tensors:
        cut = self.cut(server_round)
        extra = {"cut": torch.tensor(cut)}
        if cut in self.heads:
            extra.update({f"head.{k}": v for k, v in self.heads[cut].items()})
        return extra

    def client_extra(self, server_round: int, client: int) -> Tensors:
        soft = self.soft_labels.get(client)
        return {} if soft is None else {"soft_labels": soft}

    def client_update(self, server_round, arrays, extra, data: ClientData, state, generator) -> ClientReply:
        cfg = self.config
        model = build_model(self.setup, self.num_classes, self.channels)
        model.load_state_dict(state.get("model", arrays))  # its own model; the common start in round 1
        cut = int(extra["cut"])
        soft = extra.get("soft_labels")
        if soft is not None and soft.shape != (len(data.labels), self.num_classes):
            raise UsageError(f"soft labels of shape {tuple(soft.shape)} for a client of {len(data.labels)} examples")
        head = None
        if any(k.startswith("head.") for k in extra):
            head = build_model(self.setup, self.num_classes, self.channels)
            head.load_state_dict({k[len("head.") :]: v for k, v in extra.items() if k.startswith("head.")})
            head.eval().requires_grad_(False)
            head_stages = stage_modules(head)
        extra_loss = None
        if soft is not None or head is not None:

            def extra_loss(model, x, y, index):
                loss = torch.zeros(())
                if head is not None:
                    reps = forward_from(stage_modules(model), normalize(model, x), 0, cut)
                    head_logits = forward_from(head_stages, reps, cut)
                    loss = loss + cfg.gamma * F.cross_entropy(head_logits, y)
                    # The head's soft labels on today's representations (the server's are a round old).
                    return loss + cfg.beta * kl_to(head_logits.detach(), model(x), cfg.tau)
                if soft is not None:
                    loss = loss + cfg.beta * kl_to(soft[index], model(x), cfg.tau)
                return loss

        loss = train_locally(model, data, self.setup, generator=generator, extra_loss=extra_loss)
        state["model"] = model.state_dict()
        model.eval()
        with torch.no_grad():
            stages = stage_modules(model)
            reps = forward_from(stages, normalize(model, data.images), 0, cut)
            logits = forward_from(stages, reps, cut)
        shared = {"representations": reps, "logits": logits, "labels": data.labels}
        return ClientReply(shared, len(data.labels), data.counts, metrics={"train_loss": loss})

    def server_update(self, server_round, arrays, replies):
        cfg = self.config
        cut = self.cut(server_round)
        model = build_model(self.setup, self.num_classes, self.channels)
        model.load_state_dict(self.heads.get(cut, self.initial))
        stages = stage_modules(model)
        head_params = [p for stage in stages[cut:] for p in stage.parameters()]
        optimizer = torch.optim.SGD(head_params, lr=self.setup.lr, momentum=0.9)
        reps = torch.cat([r.arrays["representations"] for r in replies])
        client_logits = torch.cat([r.arrays["logits"] for r in replies])
        labels = torch.cat([r.arrays["labels"] for r in replies])
        model.train()
        for _ in range(cfg.server_epochs):
            for index in torch.randperm(len(labels)).split(cfg.server_batch):
                out = forward_from(stages, reps[index], cut)
                loss = F.cross_entropy(out, labels[index]) + kl_to(client_logits[index], out, cfg.tau)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        model.eval()
        self.heads[cut] = model.state_dict()
        with torch.no_grad():
            for reply in replies:
                self.soft_labels[reply.client] = forward_from(stages, reply.arrays["representations"], cut)
        return self.heads[cut]

    def client_model(self, arrays, state):
        model = build_model(self.setup, self.num_classes, self.channels)
        model.load_state_dict(state["model"])
        return model
