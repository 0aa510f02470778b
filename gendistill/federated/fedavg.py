"""FedAvg (McMahan et al., AISTATS 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
Data"): every client trains the global model on its own examples for ``local_epochs`` of SGD, and the server
averages the clients' weights, each weighted by its number of examples. The baseline the other methods build on;
its aggregation is Flower's own ``FedAvg`` strategy's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ClientData, ClientReply, FederatedMethod, Tensors, build_model, train_locally


@dataclass
class FedAvgConfig:
    pass


class FedAvg(FederatedMethod):
    name = "fedavg"
    Config = FedAvgConfig

    def client_update(self, server_round: int, arrays: Tensors, extra: Tensors, data: ClientData, state: dict,
                      generator: torch.Generator) -> ClientReply:  # fmt: skip
        model = build_model(self.setup, self.num_classes, self.channels)
        model.load_state_dict(arrays)
        loss = train_locally(model, data, self.setup, generator=generator)
        return ClientReply(model.state_dict(), len(data.labels), data.counts, metrics={"train_loss": loss})
