"""What every federated method shares: the clients' data, the model and its stages, local training, evaluation and
the method interface the Flower apps (:mod:`gendistill.federated.simulation`) drive.

A method is plain torch: :meth:`FederatedMethod.client_update` runs on a client with its own examples and what the
server sent; :meth:`FederatedMethod.server_update` runs on the server with every client's reply. Flower carries the
messages; nothing here imports it, so each step is testable without a simulation.
"""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..dfkd.models import Classifier, build_classifier
from ..errors import UsageError
from .splits import label_counts, split_clients

Tensors = dict[str, torch.Tensor]


@dataclass
class FederatedSetup:
    """The federation: data, split, model and the local training every method shares (``gendistill federated``'s
    options; each client rebuilds its data from these, so only they travel in the messages)."""

    data: str = "mnist5k"  # training data: "mnist5k" (offline), a folder of class subfolders, or an .npz
    clients: int = 10
    split: str = "dirichlet"  # "dirichlet" (label skew by Dir(alpha)) or "classes" (classes_per_client each)
    alpha: float = 0.1
    classes_per_client: int = 2
    arch: str = "lenet5"  # a zoo classifier with stages (stage_modules): lenet5, lenet5_half
    image_size: int = 32
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01  # local SGD (momentum 0.9)
    grad_clip: float = 5.0  # local gradient-norm clipping (0: none); FedGen's extra terms need it at higher lr
    seed: int = 0

    def as_config(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config) -> FederatedSetup:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: config[k] for k in names if k in config})


@dataclass
class ClientData:
    """One client's training examples (images in [0, 1]) and its label distribution."""

    images: torch.Tensor
    labels: torch.Tensor
    counts: np.ndarray  # (num_classes,) examples per class

    @property
    def distribution(self) -> np.ndarray:
        return self.counts / self.counts.sum()


@functools.lru_cache(maxsize=4)
def _dataset(data: str, image_size: int, split: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    from ..data.classification import load_classification_data

    images, labels, names = load_classification_data(data, split=split, image_size=image_size)
    return images, labels, len(names)


def load_split(setup: FederatedSetup) -> tuple[list[ClientData], int]:
    """Every client's data under ``setup`` (deterministic in its fields) and the number of classes."""
    images, labels, num_classes = _dataset(setup.data, setup.image_size, "train")
    parts = split_clients(
        labels.numpy(), setup.clients, kind=setup.split, alpha=setup.alpha,
        classes_per_client=setup.classes_per_client, seed=setup.seed,
    )  # fmt: skip
    clients = [ClientData(images[p], labels[p], label_counts(labels[p].numpy(), num_classes)) for p in parts]
    return clients, num_classes


def load_heldout(setup: FederatedSetup) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out test split of ``setup.data`` (no client ever sees it)."""
    images, labels, _ = _dataset(setup.data, setup.image_size, "test")
    return images, labels


def build_model(setup: FederatedSetup, num_classes: int, channels: int) -> Classifier:
    model = build_classifier(setup.arch, num_classes=num_classes, in_channels=channels, image_size=setup.image_size)
    stage_modules(model)  # fail early on an architecture without stages
    return model


# --- stages -------------------------------------------------------------------------------------------------------
def stage_modules(model: Classifier) -> list[nn.Module]:
    """The model's net as a sequence of stages whose composition is the forward (LeNet-5: conv1 block, conv2 block,
    conv3 block (flattened), fc1 block, fc2 = the head). FedGen reads the input of the last stage (the features),
    FedD2S cuts between any two."""
    net = model.net
    if not all(hasattr(net, n) for n in ("conv1", "conv2", "conv3", "fc1", "fc2")):
        raise UsageError(
            f"federated methods need a LeNet-5 family model (lenet5, lenet5_half), got {model.config.arch}"
        )
    return [
        _Stage(lambda x: F.max_pool2d(F.relu(net.bn1(net.conv1(x))), 2), net.conv1, net.bn1),
        _Stage(lambda x: F.max_pool2d(F.relu(net.bn2(net.conv2(x))), 2), net.conv2, net.bn2),
        _Stage(lambda x: F.relu(net.bn3(net.conv3(x))).flatten(1), net.conv3, net.bn3),
        _Stage(lambda x: F.relu(net.fc1(x)), net.fc1),
        net.fc2,
    ]


class _Stage(nn.Module):
    def __init__(self, fn, *modules):
        super().__init__()
        self.fn = fn
        self.parts = nn.ModuleList(modules)

    def forward(self, x):
        return self.fn(x)


def forward_from(stages: list[nn.Module], x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Run stages ``start`` .. ``stop - 1`` on ``x``."""
    for stage in stages[start:stop]:
        x = stage(x)
    return x


def normalize(model: Classifier, images: torch.Tensor) -> torch.Tensor:
    """The net's input for images in [0, 1] (the classifier's own normalization)."""
    return images if model.mean is None else (images - model.mean) / model.std


def features_and_logits(model: Classifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input of the head (B, D) and the logits (B, K)."""
    stages = stage_modules(model)
    feats = forward_from(stages, normalize(model, images), 0, -1)
    return feats, stages[-1](feats)


# --- local training and evaluation --------------------------------------------------------------------------------
def batches(n: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def local_sgd(model: nn.Module, setup: FederatedSetup) -> torch.optim.Optimizer:
    """The clients' optimizer: SGD at ``setup.lr``, momentum 0.9 (fresh every round, as in FedAvg)."""
    return torch.optim.SGD(model.parameters(), lr=setup.lr, momentum=0.9)


def train_locally(
    model: Classifier,
    data: ClientData,
    setup: FederatedSetup,
    *,
    generator: torch.Generator,
    epochs: int | None = None,
    extra_loss=None,
) -> float:
    """``epochs`` (default ``setup.local_epochs``) of SGD on the client's examples, minimizing
    ``CE(model(x), y) + extra_loss(model, x, y, index)`` (``index``: the batch's row numbers), gradients clipped to
    norm ``setup.grad_clip``. Returns the mean loss."""
    model.train()
    optimizer = local_sgd(model, setup)
    total, count = 0.0, 0
    for _ in range(setup.local_epochs if epochs is None else epochs):
        for index in batches(len(data.labels), setup.batch_size, generator):
            x, y = data.images[index], data.labels[index]
            loss = F.cross_entropy(model(x), y)
            if extra_loss is not None:
                loss = loss + extra_loss(model, x, y, index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if setup.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), setup.grad_clip)
            optimizer.step()
            total, count = total + loss.item(), count + 1
    return total / max(count, 1)


@torch.no_grad()
def per_class_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """(num_classes,) accuracy of ``model`` on the examples of each class (nan for a class with none)."""
    was = model.training
    model.eval()
    predictions = torch.cat([model(images[i : i + 500]).argmax(1) for i in range(0, len(labels), 500)])
    model.train(was)
    right = np.bincount(labels.numpy(), weights=(predictions == labels).numpy().astype(float), minlength=num_classes)
    seen = np.bincount(labels.numpy(), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return right / seen


def personalized_accuracy(per_class: np.ndarray, distribution: np.ndarray) -> float:
    """A client's accuracy on its own label distribution: held-out per-class accuracies weighted by the share of
    each class in the client's training data (the held-out set is balanced, so this is the accuracy on a test set
    drawn like the client's)."""
    held = distribution > 0
    return float((np.nan_to_num(per_class[held]) * distribution[held]).sum() / distribution[held].sum())


# --- the method interface -----------------------------------------------------------------------------------------
@dataclass
class ClientReply:
    """What a client sends back: the arrays of its model (or what the method shares instead), its number of
    examples and label counts, scalar metrics (and, on the server, which client it is)."""

    arrays: Tensors
    num_examples: int
    counts: np.ndarray
    metrics: dict[str, float] = field(default_factory=dict)
    client: int = -1


class FederatedMethod(ABC):
    """A federated algorithm in two halves (module docstring). State kept across rounds lives on the method object
    on the server (``server_update``) and in the client's ``state`` dict (the Flower context's state)."""

    name = "base"
    Config: type = None  # the dataclass of the method's options
    personalized = False  # clients keep their own models (evaluated on their own distribution)
    global_model = True  # the server holds a global classifier (evaluated on the held-out set every round)

    def __init__(self, config, setup: FederatedSetup, *, num_classes: int, channels: int):
        self.config, self.setup = config, setup
        self.num_classes, self.channels = num_classes, channels

    def initial_arrays(self) -> Tensors:
        """The server's first global arrays (a freshly built model, seeded)."""
        torch.manual_seed(self.setup.seed)
        return build_model(self.setup, self.num_classes, self.channels).state_dict()

    def server_extra(self, server_round: int) -> Tensors:
        """Arrays sent to every client with the global arrays (FedGen's generator)."""
        return {}

    def client_extra(self, server_round: int, client: int) -> Tensors:
        """Arrays sent to one client (FedD2S's soft labels)."""
        return {}

    @abstractmethod
    def client_update(self, server_round: int, arrays: Tensors, extra: Tensors, data: ClientData, state: dict,
                      generator: torch.Generator) -> ClientReply:  # fmt: skip
        """One round on a client: train on ``data`` from the server's ``arrays`` and ``extra``; ``state`` (a dict)
        persists between the client's rounds; draw randomness from ``generator`` and the global torch RNG (both
        seeded per client and round)."""

    def server_update(self, server_round: int, arrays: Tensors, replies: list[ClientReply]) -> Tensors:
        """The next global arrays from the clients' replies (FedAvg: their average weighted by examples)."""
        return weighted_average([r.arrays for r in replies], [r.num_examples for r in replies])

    def client_model(self, arrays: Tensors, state: dict) -> Classifier:
        """The model a client is judged with at the end: the global one (fine-tuned by the caller for the
        personalized baseline), or its own for a personalized method."""
        model = build_model(self.setup, self.num_classes, self.channels)
        model.load_state_dict(arrays)
        return model

    def global_classifier(self, arrays: Tensors) -> Classifier:
        model = build_model(self.setup, self.num_classes, self.channels)
        model.load_state_dict(arrays)
        return model


def weighted_average(states: list[Tensors], weights: list[float]) -> Tensors:
    """FedAvg's aggregate: ``sum_k w_k state_k / sum_k w_k`` per array (integer buffers: the first client's)."""
    if not states:
        raise UsageError("no client replied: nothing to aggregate")
    total = float(sum(weights))
    out = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            out[name] = sum(s[name].double() * (w / total) for s, w in zip(states, weights)).to(first.dtype)
        else:
            out[name] = first.clone()
    return out
