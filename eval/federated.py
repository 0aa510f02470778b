"""The report of a ``gendistill federated`` run: accuracy against rounds and every client's accuracy."""

from __future__ import annotations

from pathlib import Path

from .report import Report


def write_federated_report(results: dict, output: Path) -> Path:
    """``output/report.md`` (+ metrics.json, accuracy.png) from :func:`gendistill.federated.simulation.run_federated`'s
    results."""
    method = results["method"]
    setup = results["setup"]
    report = Report(output, title=f"gendistill federated: {method}", command="federated", device="cpu")
    rows = [r for r in results["rounds"] if r["round"] > 0]
    if any("global_accuracy" in r for r in results["rounds"]):
        points = [r for r in results["rounds"] if "global_accuracy" in r]
        report.add_plot(
            "accuracy",
            {f"{method} global model": ([r["round"] for r in points], [r["global_accuracy"] for r in points])},
            "held-out accuracy of the global model after each round",
            xlabel="round",
            ylabel="held-out accuracy",
        )
        report.add_metric("final_global_accuracy", results["final_global_accuracy"], rounds=len(rows), **setup)
    settings = {"rounds": len(rows), "method_options": results["options"], **setup}
    report.add_metric("mean_personalized_accuracy", results["mean_personalized_accuracy"], **settings)
    if "mean_finetuned_accuracy" in results:
        report.add_metric("mean_finetuned_accuracy", results["mean_finetuned_accuracy"], **settings)
    report.add_table("Rounds", rows)
    clients = []
    for c in results["clients"]:
        held = [str(k) for k, n in enumerate(c["counts"]) if n]
        row = {"client": c["client"], "examples": c["examples"], "classes held": " ".join(held),
               "personalized accuracy": c["accuracy"]}  # fmt: skip
        if "finetuned_accuracy" in c:
            row["after local fine-tuning"] = c["finetuned_accuracy"]
        clients.append(row)
    report.add_table("Clients", clients)
    report.add_note(
        "Personalized accuracy: each client's model (its own for a personalized method, else the global one) on the "
        "held-out set, the accuracy of every class weighted by that class's share of the client's training data "
        "(the score on a test set drawn like the client's own data)."
    )
    return report.save()
