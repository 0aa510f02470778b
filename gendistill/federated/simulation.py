"""The Flower apps: a ``ClientApp`` whose train/evaluate handlers run a method's client half, and a ``ServerApp``
whose strategy (a subclass of Flower's ``FedAvg``: its node sampling, message handling and round loop) runs the
method's server half; :func:`run_federated` runs them on Flower's simulation engine (``flwr.simulation``, Ray
actors as the clients).

Messages: ``arrays`` (ArrayRecord: the global model, or what the method shares instead), ``extra`` (ArrayRecord:
the method's other arrays, e.g. FedGen's generator or FedD2S's soft labels), ``config`` (ConfigRecord: the
federation's settings, the method and its options, the round), ``metrics`` (MetricRecord: ``num-examples``,
``client``, ``counts`` and the method's scalars); a reply holds ``arrays`` and ``metrics`` only (Flower's
aggregation checks expect one ArrayRecord). A client rebuilds its data from the settings (every split is
deterministic), so no example leaves it; what it keeps between rounds (FedD2S's own model) lives in its Flower
context's state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from ..errors import UsageError
from .base import (
    FederatedMethod,
    FederatedSetup,
    load_heldout,
    load_split,
    per_class_accuracy,
    personalized_accuracy,
    train_locally,
)

STATE_KEY = "gendistill"


def method_classes() -> dict[str, type[FederatedMethod]]:
    from .fedavg import FedAvg
    from .fedd2s import FedD2S
    from .fedftg import FedFTG
    from .fedgen import FedGen

    return {m.name: m for m in (FedAvg, FedGen, FedFTG, FedD2S)}


def make_method(name: str, options: dict, setup: FederatedSetup, *, num_classes: int, channels: int):
    """The method ``name`` with ``options`` (its config's fields) under ``setup``."""
    classes = method_classes()
    if name not in classes:
        raise UsageError(f"unknown federated method {name!r}; valid: {', '.join(classes)}")
    cls = classes[name]
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise UsageError(
            f"{name} has no option {', '.join(unknown)}; its options: {', '.join(sorted(fields)) or 'none'}"
        )
    return cls(cls.Config(**options), setup, num_classes=num_classes, channels=channels)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "little") % (2**63)


def _method_from_config(config) -> FederatedMethod:
    setup = FederatedSetup.from_config(config)
    clients, num_classes = load_split(setup)
    options = json.loads(str(config["method-options"]))
    return make_method(str(config["method"]), options, setup, num_classes=num_classes,
                       channels=clients[0].images.shape[1])  # fmt: skip


_CLIENT_METHODS: dict[str, FederatedMethod] = {}


def _client_method(config) -> FederatedMethod:
    key = json.dumps({k: config[k] for k in sorted(config.keys()) if k not in ("server-round", "finetune-epochs")})
    if key not in _CLIENT_METHODS:
        _CLIENT_METHODS.clear()
        _CLIENT_METHODS[key] = _method_from_config(config)
    return _CLIENT_METHODS[key]


def _load_state(context) -> dict:
    from flwr.app import ArrayRecord

    record = context.state.get(STATE_KEY)
    return {} if record is None else {"model": ArrayRecord.to_torch_state_dict(record)}


def client_app():
    """The ``ClientApp``: ``train`` runs the method's client update on the node's partition; ``evaluate`` scores
    the model the client would use (its own, or the global one fine-tuned for ``finetune-epochs``) on its label
    distribution."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def client_of(msg, context) -> tuple:
        """The message's config, the method it names (cached per process) and this node's client index."""
        torch.set_num_threads(1)  # one Ray actor per client, one thread each
        config = msg.content["config"]
        return config, _client_method(config), int(context.node_config["partition-id"])

    @app.train()
    def train(msg, context):
        config, method, client = client_of(msg, context)
        data = load_split(method.setup)[0][client]
        server_round = int(config["server-round"])
        seed = _seed(method.setup.seed, server_round, client)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        arrays = msg.content["arrays"].to_torch_state_dict()
        extra = msg.content["extra"].to_torch_state_dict() if "extra" in msg.content else {}
        state = _load_state(context)
        reply = method.client_update(server_round, arrays, extra, data, state, generator)
        if "model" in state:
            context.state[STATE_KEY] = ArrayRecord(state["model"])
        metrics = {"num-examples": reply.num_examples, "client": client, "counts": [int(c) for c in reply.counts]}
        metrics.update({k: float(v) for k, v in reply.metrics.items()})
        content = RecordDict({"arrays": ArrayRecord(reply.arrays), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg, context):
        config, method, client = client_of(msg, context)
        clients, num_classes = load_split(method.setup)
        data = clients[client]
        images, labels = load_heldout(method.setup)
        arrays = msg.content["arrays"].to_torch_state_dict()
        model = method.client_model(arrays, _load_state(context))
        metrics = {"num-examples": len(data.labels), "client": client}
        metrics["accuracy"] = personalized_accuracy(per_class_accuracy(model, images, labels, num_classes),
                                                    data.distribution)  # fmt: skip
        epochs = int(config["finetune-epochs"])
        if not method.personalized and epochs > 0:
            seed = _seed(method.setup.seed, "finetune", client)
            torch.manual_seed(seed)
            train_locally(model, data, method.setup, generator=torch.Generator().manual_seed(seed), epochs=epochs)
            metrics["finetuned_accuracy"] = personalized_accuracy(
                per_class_accuracy(model, images, labels, num_classes), data.distribution
            )
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def _strategy_class():
    from flwr.app import ArrayRecord, MessageType, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    from .base import ClientReply

    class MethodStrategy(FedAvg):
        """Flower's FedAvg with the method's server half in ``aggregate_train`` and its arrays in the messages;
        client-side evaluation only in the last round."""

        def __init__(self, method: FederatedMethod, rounds: int, finetune_epochs: int, **kwargs):
            super().__init__(**kwargs)
            self.method, self.rounds, self.finetune_epochs = method, rounds, finetune_epochs
            self.node_client: dict[int, int] = {}
            self.client_metrics: dict[int, dict] = {}
            self.train_loss: dict[int, float] = {}

        def configure_train(self, server_round, arrays, config, grid):
            messages = list(super().configure_train(server_round, arrays, config, grid))
            shared = self.method.server_extra(server_round)
            out = []
            for message in messages:
                node = message.metadata.dst_node_id
                extra = dict(shared)
                if node in self.node_client:  # known from its first reply
                    extra.update(self.method.client_extra(server_round, self.node_client[node]))
                content = RecordDict({"arrays": message.content["arrays"], "config": message.content["config"],
                                      "extra": ArrayRecord(extra)})  # fmt: skip
                out.extend(self._construct_messages(content, [node], MessageType.TRAIN))
            return out

        def aggregate_train(self, server_round, replies):
            valid, _ = self._check_and_log_replies(replies, is_train=True)
            if not valid:
                raise RuntimeError(f"round {server_round}: no client replied without an error")
            parsed = []
            for msg in valid:
                m = msg.content["metrics"]
                client = int(m["client"])
                self.node_client[msg.metadata.src_node_id] = client
                parsed.append(ClientReply(
                    msg.content["arrays"].to_torch_state_dict(), int(m["num-examples"]), np.asarray(m["counts"]),
                    client=client, metrics={"train_loss": float(m["train_loss"])},
                ))  # fmt: skip
            parsed.sort(key=lambda r: r.client)
            arrays = self.method.server_update(server_round, self.current_arrays, parsed)
            self.current_arrays = arrays
            loss = float(np.mean([r.metrics["train_loss"] for r in parsed]))
            self.train_loss[server_round] = loss
            return ArrayRecord(arrays), MetricRecord({"train_loss": loss})

        def configure_evaluate(self, server_round, arrays, config, grid):
            if server_round != self.rounds:
                return []
            config["finetune-epochs"] = self.finetune_epochs
            return super().configure_evaluate(server_round, arrays, config, grid)

        def aggregate_evaluate(self, server_round, replies):
            valid, _ = self._check_and_log_replies(replies, is_train=False)
            for msg in valid:
                m = msg.content["metrics"]
                self.client_metrics[int(m["client"])] = {k: float(v) for k, v in m.items() if k != "client"}
            return None

    return MethodStrategy


def run_federated(
    method: str,
    setup: FederatedSetup,
    *,
    rounds: int,
    options: dict | None = None,
    fraction: float = 1.0,
    finetune_epochs: int = 1,
    on_round: Callable[[int, dict], None] | None = None,
    verbose: bool = False,
) -> dict:
    """Run ``method`` for ``rounds`` rounds on Flower's simulation engine with ``setup.clients`` virtual clients.

    Returns the results: ``rounds`` (per round: the global model's held-out accuracy, when the method has one, and
    the clients' mean training loss), ``clients`` (per client: examples, label counts, personalized accuracy, and
    after ``finetune_epochs`` of local fine-tuning for methods with a global model), their means, and the wall time.
    ``on_round(round, row)`` is called after each round (progress)."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    if rounds < 1:
        raise UsageError(f"rounds must be >= 1, got {rounds}")
    if not 0 < fraction <= 1:
        raise UsageError(f"fraction must be in (0, 1], got {fraction}")
    options = dict(options or {})
    clients, num_classes = load_split(setup)  # validates the split before any simulation starts
    instance = make_method(method, options, setup, num_classes=num_classes, channels=clients[0].images.shape[1])
    images, labels = load_heldout(setup)
    rows: dict[int, dict] = {}
    outcome: dict = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord):
        row = {"round": server_round}
        if instance.global_model:
            model = instance.global_classifier(arrays.to_torch_state_dict())
            row["global_accuracy"] = float(np.nanmean(per_class_accuracy(model, images, labels, num_classes)))
        if server_round > 0:
            row["train_loss"] = strategy.train_loss.get(server_round)
            if on_round is not None:
                on_round(server_round, row)
        rows[server_round] = row
        return MetricRecord({k: v for k, v in row.items() if isinstance(v, (int, float))})

    strategy = _strategy_class()(
        instance, rounds, finetune_epochs, fraction_train=fraction, fraction_evaluate=1.0,
        min_train_nodes=max(1, int(setup.clients * fraction)), min_evaluate_nodes=setup.clients,
        min_available_nodes=setup.clients,
    )  # fmt: skip
    server = ServerApp()

    @server.main()
    def main(grid, context):
        initial = instance.initial_arrays()
        strategy.current_arrays = initial
        config = setup.as_config()
        config.update({"method": method, "method-options": json.dumps(options)})
        strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=rounds,
                       train_config=ConfigRecord(config), evaluate_config=ConfigRecord(config),
                       evaluate_fn=evaluate_fn)  # fmt: skip
        outcome["arrays"] = strategy.current_arrays

    # Ray (Flower's simulation backend) warns that it will stop hiding accelerators from CPU-only actors: keep
    # today's behaviour without the warning.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    tic = time.perf_counter()
    try:
        run_simulation(
            server_app=server, client_app=client_app(), num_supernodes=setup.clients,
            backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"include_dashboard": False}},
            verbose_logging=verbose,
        )  # fmt: skip
    finally:
        flwr_logger.setLevel(level)
    seconds = time.perf_counter() - tic
    if len(rows) != rounds + 1 or len(strategy.client_metrics) != setup.clients:
        raise RuntimeError(
            f"the simulation ended early: {len(rows) - 1} of {rounds} rounds, {len(strategy.client_metrics)} of "
            f"{setup.clients} client evaluations (run with verbose=True / --verbose to see Flower's log)"
        )
    per_client = []
    for c, data in enumerate(clients):
        entry = {"client": c, "examples": int(len(data.labels)), "counts": [int(v) for v in data.counts]}
        entry.update({k: v for k, v in strategy.client_metrics[c].items() if k != "num-examples"})
        per_client.append(entry)
    summary = {
        "method": method,
        "options": dataclasses.asdict(instance.config),
        "setup": setup.as_config(),
        "rounds": [rows[r] for r in sorted(rows)],
        "clients": per_client,
        "mean_personalized_accuracy": float(np.mean([c["accuracy"] for c in per_client])),
        "seconds": seconds,
    }
    if instance.global_model:
        summary["final_global_accuracy"] = rows[rounds]["global_accuracy"]
    if "finetuned_accuracy" in per_client[0]:
        summary["mean_finetuned_accuracy"] = float(np.mean([c["finetuned_accuracy"] for c in per_client]))
    summary["arrays"] = outcome.get("arrays")
    return summary
