"""What FedFTG's server distils from on the federated MNIST benchmark: does the clients' class-level ensemble know
the classes, or does it echo the label it is asked about?

FedFTG (``gendistill/federated/fedftg.py``) labels a generated image of class ``y`` by the *class-level ensemble*
``E(x; y) = sum_k w_k(y) logits_k(x)``, each client weighted by its share of the examples of ``y``. Under a strong
label skew the clients that hold most of ``y`` have seen few other classes, and such a client says "y" for nearly
any image; then ``E(x; y)`` says ``y`` whatever ``x`` is, and distilling it teaches the global model nothing about
the images. This probe measures that along FedAvg's own trajectory, on the 500 held-out digits, after every round:

- ``global``: the averaged model's accuracy (FedAvg's global accuracy);
- ``class_level_true``: accuracy of ``E(x; y)`` asked with the digit's true label ``y``;
- ``echo``: the share of digits for which ``E(x; y')``, asked with a random *wrong* label ``y'``, answers ``y'``
  (0 for an ensemble that reads the image, 1 for one that repeats its question);
- ``plain_ensemble``: accuracy of the clients' probabilities averaged by their numbers of examples (no label).

Accuracies are balanced (the mean of the per-class accuracies), as the benchmark's global accuracy.

The federation is the benchmark's (``benchmarks/federated_mnist.py``: 10 clients, Dirichlet alpha 0.1, LeNet-5,
one local epoch of SGD at lr 0.01), run in this process with the library's own client training and averaging (the
same split, initialization and per-(seed, round, client) seeding as the Flower apps; no Flower: nothing here is
a method, only a measurement of the clients' models), so its global accuracies follow the Flower runs' closely
but not bit for bit.

    python benchmarks/federated_ensemble_echo.py --seeds 0 1 2 \
        --out benchmarks/results/federated_ensemble_echo_cpu_DATE.json
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np
import torch

from gendistill.eval.report import device_description
from gendistill.federated.base import (
    FederatedSetup,
    build_model,
    load_heldout,
    load_split,
    per_class_accuracy,
    train_locally,
    weighted_average,
)
from gendistill.federated.fedftg import class_level_ensemble
from gendistill.federated.fedgen import class_weights
from gendistill.federated.simulation import _seed


def balanced_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """The mean over classes of the share of each class's examples predicted right (the benchmark's global
    accuracy is this, by ``per_class_accuracy``)."""
    return float(torch.stack([(predictions[labels == c] == c).float().mean() for c in labels.unique()]).mean())


def ensemble_scores(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, shares: torch.Tensor, shift: torch.Tensor
) -> dict[str, float]:
    """``logits`` (clients, N, K) of every client on N examples, ``weights`` (clients, K) the class-level ensemble's,
    ``shares`` (clients,) the clients' shares of all examples, ``shift`` (N,) in 1..K-1 (the wrong label asked
    about example i is ``(labels_i + shift_i) mod K``). Returns the class-level ensemble's balanced accuracy when
    asked with the true labels, its echo (the share of examples for which, asked with the wrong label, it answers
    that label) and the balanced accuracy of the example-weighted mean of the clients' probabilities."""
    wrong = (labels + shift) % logits.shape[-1]
    true_answer = class_level_ensemble(logits, labels, weights).argmax(1)
    wrong_answer = class_level_ensemble(logits, wrong, weights).argmax(1)
    plain = (logits.softmax(-1) * shares[:, None, None]).sum(0).argmax(1)
    return {
        "class_level_true": balanced_accuracy(true_answer, labels),
        "echo": float((wrong_answer == wrong).float().mean()),
        "plain_ensemble": balanced_accuracy(plain, labels),
    }


def probe(seed: int, rounds: int, setup_kwargs: dict) -> list[dict]:
    setup = FederatedSetup(seed=seed, **setup_kwargs)
    clients, num_classes = load_split(setup)
    images, labels = load_heldout(setup)
    channels = clients[0].images.shape[1]
    counts = np.stack([c.counts for c in clients])
    weights = class_weights(counts)
    shares = torch.from_numpy(counts.sum(1) / counts.sum()).float()
    torch.manual_seed(seed)
    state = build_model(setup, num_classes, channels).state_dict()
    rows = []
    for server_round in range(1, rounds + 1):
        states = []
        for k, data in enumerate(clients):
            s = _seed(seed, server_round, k)
            torch.manual_seed(s)
            model = build_model(setup, num_classes, channels)
            model.load_state_dict(state)
            train_locally(model, data, setup, generator=torch.Generator().manual_seed(s))
            states.append(model.state_dict())
        state = weighted_average(states, [len(c.labels) for c in clients])
        model = build_model(setup, num_classes, channels)
        model.load_state_dict(state)
        with torch.no_grad():
            logits = []
            for s in states:
                m = build_model(setup, num_classes, channels)
                m.load_state_dict(s)
                logits.append(m.eval()(images))
            shift = torch.randint(1, num_classes, labels.shape, generator=torch.Generator().manual_seed(seed))
            scores = ensemble_scores(torch.stack(logits), labels, weights, shares, shift)
        global_accuracy = float(np.nanmean(per_class_accuracy(model, images, labels, num_classes)))
        rows.append({"round": server_round, "global": round(global_accuracy, 4),
                     **{k: round(v, 4) for k, v in scores.items()}})  # fmt: skip
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    setup_kwargs = {"clients": args.clients, "alpha": args.alpha}
    runs = [{"seed": seed, "rounds": probe(seed, args.rounds, setup_kwargs)} for seed in args.seeds]
    out = {
        "benchmark": "federated_ensemble_echo",
        "device": device_description("cpu"),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "settings": {"rounds": args.rounds, **setup_kwargs, "setup": FederatedSetup(**setup_kwargs).as_config()},
        "runs": runs,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
