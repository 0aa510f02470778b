"""Federated distillation on the offline MNIST subset: FedGen and FedFTG against FedAvg's global model, FedD2S's
personalized models against FedAvg fine-tuned locally, at equal rounds, on Flower's simulation engine.

Setup (the issue's): 10 clients holding a Dirichlet(alpha = 0.1) label-skewed share of the 4,500 training digits,
LeNet-5 on every client, every client trains in every round (1 local epoch of SGD, batch 32, lr 0.01), the
global model judged on the 500 held-out digits after every round, every client's model on the held-out digits
weighted by its own label distribution at the end (FedAvg's global model after one epoch of local fine-tuning).
Every setting of a run is in its ``setup`` and ``options``.

    python benchmarks/federated_mnist.py --rounds 20 --seeds 0 1 2 \
        --out benchmarks/results/federated_mnist_cpu_DATE.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

from gendistill.federated import FederatedSetup
from gendistill.federated.simulation import run_federated

METHODS = ("fedavg", "fedgen", "fedftg", "fedd2s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--option", action="append", default=[], help="METHOD:key=value (JSON value)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    options: dict[str, dict] = {m: {} for m in METHODS}
    for item in args.option:
        method, _, pair = item.partition(":")
        key, _, value = pair.partition("=")
        options[method][key] = json.loads(value)
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            setup = FederatedSetup(clients=args.clients, alpha=args.alpha, local_epochs=args.local_epochs, seed=seed)
            result = run_federated(method, setup, rounds=args.rounds, options=options[method])
            result.pop("arrays")
            row = {k: result[k] for k in ("method", "options", "setup", "seconds", "mean_personalized_accuracy")}
            row["seed"] = seed
            for key in ("final_global_accuracy", "mean_finetuned_accuracy"):
                if key in result:
                    row[key] = result[key]
            row["global_accuracy_by_round"] = [r.get("global_accuracy") for r in result["rounds"]]
            row["client_accuracy"] = [c["accuracy"] for c in result["clients"]]
            row["client_classes"] = [sum(1 for n in c["counts"] if n) for c in result["clients"]]
            runs.append(row)
            print(json.dumps({k: v for k, v in row.items() if "by_round" not in k}), file=sys.stderr, flush=True)
    comparison = []
    for seed in args.seeds:
        by = {r["method"]: r for r in runs if r["seed"] == seed}
        entry = {"seed": seed}
        if "fedavg" in by:
            base = by["fedavg"]
            for m in ("fedgen", "fedftg"):
                if m in by:
                    entry[f"{m}_minus_fedavg_global"] = by[m]["final_global_accuracy"] - base["final_global_accuracy"]
            if "fedd2s" in by:
                entry["fedd2s_minus_finetuned_fedavg_personalized"] = (
                    by["fedd2s"]["mean_personalized_accuracy"] - base["mean_finetuned_accuracy"]
                )
        comparison.append(entry)
    out = {
        "benchmark": "federated_mnist",
        "device": f"cpu: {platform.machine()}, {torch.get_num_threads()} threads",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "settings": {
            "rounds": args.rounds,
            "clients": args.clients,
            "alpha": args.alpha,
            "local_epochs": args.local_epochs,
            "options": options,
        },  # fmt: skip
        "runs": runs,
        "comparison": comparison,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
