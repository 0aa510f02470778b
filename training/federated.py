"""``gendistill federated``: federated learning with data-free distillation on Flower's simulation engine.

Runs one method (fedavg, fedgen, fedftg, fedd2s) over virtual clients that each hold a non-IID share of the
training data, logs the global model's held-out accuracy every round, scores every client's model on its own label
distribution at the end, and writes into ``--output``: ``results.json`` (every number and setting), the global
model as a classifier folder (``global_model/``: safetensors + config.json, loadable by ``gendistill eval``) for
methods that have one, and ``report/`` (report.md with the accuracy curve and the per-client table).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gendistill.errors import UsageError
from gendistill.files import check_output_not_input, read_json

from .core import RUN_FILE, write_json_atomic
from .recipes import parse_recipe

COMMAND = "federated"


@dataclass
class FederatedRecipe:
    output: str = "gendistill-federated"  # run folder: results.json, global_model/, report/
    method: str = "fedavg"  # fedavg | fedgen | fedftg | fedd2s
    rounds: int = 20  # federated rounds
    clients: int = 10  # virtual clients (Flower supernodes)
    fraction: float = 1.0  # share of the clients that train in each round
    data: str = "mnist5k"  # mnist5k (offline), a folder of class subfolders, or an .npz (images, labels)
    split: str = "dirichlet"  # dirichlet (label skew by Dir(alpha)) | classes (classes_per_client each)
    alpha: float = 0.1  # Dirichlet concentration (smaller: fewer classes per client)
    classes_per_client: int = 2  # for --split classes
    arch: str = "lenet5"  # model of every client: lenet5 | lenet5_half
    image_size: int = 32  # images are resized to this (LeNet-5 needs 32)
    local_epochs: int = 1  # client SGD epochs per round
    batch_size: int = 32  # client batch size
    lr: float = 0.01  # client SGD learning rate (momentum 0.9)
    grad_clip: float = 5.0  # client gradient-norm clipping (0: none)
    finetune_epochs: int = 1  # local fine-tuning of the global model before the personalized score (0: none)
    options: dict = field(default_factory=dict)  # the method's options, e.g. {"generator_steps": 50} (YAML/JSON)
    seed: int = 0  # split, initialization and every client's randomness
    overwrite: bool = False  # replace a previous run of gendistill federated in --output
    verbose: bool = False  # show Flower's own log

    def validate(self) -> None:
        from gendistill.federated import METHODS

        if self.method not in METHODS:
            raise UsageError(f"unknown federated method {self.method!r}; valid: {', '.join(METHODS)}")
        for name in ("rounds", "clients", "local_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.finetune_epochs < 0:
            raise UsageError(f"--finetune-epochs must be >= 0, got {self.finetune_epochs}")

    def setup(self):
        from gendistill.federated import FederatedSetup

        names = {f.name for f in dataclasses.fields(FederatedSetup)}
        return FederatedSetup(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


def check_output(recipe: FederatedRecipe) -> Path:
    """The output folder if this run may write there: new, empty, or a previous ``gendistill federated`` run with
    ``--overwrite``. A folder gendistill did not write is never replaced."""
    out = Path(recipe.output)
    check_output_not_input(out, {"--data": recipe.data})
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {recipe.output!r} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return out
    marker = out / RUN_FILE
    previous = read_json(marker, what="run file") if marker.is_file() else None
    if not isinstance(previous, dict) or previous.get("command") != COMMAND:
        raise UsageError(
            f"output folder {recipe.output!r} is not empty and holds no gendistill federated run ({RUN_FILE}); "
            "gendistill never replaces a folder it did not write: choose a new or empty folder"
        )
    if not recipe.overwrite:
        raise UsageError(f"output folder {recipe.output!r} already holds a run; pass --overwrite to replace it")
    return out


def run(recipe: FederatedRecipe, *, report: Callable[[dict, Path], None] | None = None) -> dict:
    """Run the federation; write ``results.json``, ``global_model/`` and (with ``report``) ``report/``."""
    from gendistill.dfkd.models import save_classifier
    from gendistill.federated.simulation import make_method, run_federated

    try:
        import flwr  # noqa: F401
    except ImportError:
        raise UsageError("gendistill federated needs Flower: pip install 'gendistill[federated]'") from None
    from gendistill.federated.base import load_split

    out = check_output(recipe)
    setup = recipe.setup()
    # Validate the split, the data and the method's options before anything is written.
    clients, num_classes = load_split(setup)
    method = make_method(recipe.method, recipe.options, setup, num_classes=num_classes,
                         channels=clients[0].images.shape[1])  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("results.json", "global_model", "report"):  # only ever inside a folder this command wrote
        path = out / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    write_json_atomic(out / RUN_FILE, {"command": COMMAND, "recipe": dataclasses.asdict(recipe)})

    def progress(server_round: int, row: dict) -> None:
        accuracy = f" global accuracy {row['global_accuracy']:.4f}" if "global_accuracy" in row else ""
        print(f"round {server_round}/{recipe.rounds}:{accuracy} mean client loss {row['train_loss']:.4f}", flush=True)

    results = run_federated(
        recipe.method, setup, rounds=recipe.rounds, options=recipe.options, fraction=recipe.fraction,
        finetune_epochs=recipe.finetune_epochs, on_round=progress, verbose=recipe.verbose,
    )  # fmt: skip
    arrays = results.pop("arrays")
    if "final_global_accuracy" in results and arrays is not None:
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            save_classifier(method.global_classifier(arrays), Path(tmp) / "global_model")
            (Path(tmp) / "global_model").rename(out / "global_model")
    if report is not None:
        report(results, out / "report")
    write_json_atomic(out / "results.json", results)  # last: the run is complete when it exists
    return results


def main(argv: list[str] | None = None, *, report: Callable[[dict, Path], None] | None = None) -> int:
    recipe = parse_recipe(
        FederatedRecipe,
        argv,
        prog="gendistill federated",
        method=COMMAND,
        description="Federated learning with data-free distillation (FedAvg, FedGen, FedFTG, FedD2S) on Flower's "
        "simulation engine; needs pip install 'gendistill[federated]'.",
    )
    results = run(recipe, report=report)
    line = f"{recipe.method}: mean personalized accuracy {results['mean_personalized_accuracy']:.4f}"
    if "final_global_accuracy" in results:
        line += f", global accuracy {results['final_global_accuracy']:.4f}"
    if "mean_finetuned_accuracy" in results:
        line += f", after local fine-tuning {results['mean_finetuned_accuracy']:.4f}"
    print(f"{line} ({results['seconds']:.0f} s); results in {Path(recipe.output) / 'results.json'}")
    return 0
