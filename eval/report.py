"""``metrics.json`` + ``report.md`` with PNGs: what every ``gendistill eval`` command writes.

Every number is stored with its settings (feature extractor, sample count, seeds, resize mode...) and the device
and library versions of the run. The report opens with the pictures, then the tables. Nothing in the output
folder looks complete before it is: PNGs are written first, ``metrics.json`` and ``report.md`` last, each through
a temporary file and ``os.replace``.

A report only writes into a folder that is new, empty, or holds a report gendistill wrote before (recognized by
``gendistill_report.json``, the first file a report writes into its folder). Any other folder is refused before
anything is computed or written: a user's own ``report.md`` or ``metrics.json`` is never replaced or deleted.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchvision.utils import save_image

from gendistill.errors import UsageError
from gendistill.files import read_jsonl

MARKER = "gendistill_report.json"  # written first into every report folder: later runs may write there again
RUN_LOG = Path("logs") / "metrics.jsonl"  # a training run's log, relative to its output folder

CURVE_GROUPS = {  # training-curve plots: group name -> which logged keys it shows
    "loss": lambda key: key.startswith("loss"),
    "trajectory_error": lambda key: key.endswith("trajectory_error"),
    "accuracy": lambda key: key.endswith("accuracy") or key.endswith("agreement"),
}


def read_run_log(folder: str | os.PathLike) -> tuple[list[dict], list[int]]:
    """The rows of a training run's ``logs/metrics.jsonl`` and the 1-based numbers of the lines that could not be
    read (a run killed while writing leaves a partial last line); no rows if ``folder`` holds no run log.
    :meth:`Report.run_log` also says in the report which lines were skipped."""
    return read_jsonl(Path(folder) / RUN_LOG)


def check_report_folder(output: str | os.PathLike) -> Path:
    """``output`` as a ``Path`` if a report may be written there: it does not exist, is an empty folder, or holds
    a report gendistill wrote (``MARKER``); otherwise a ``ValueError`` naming it. Reads only, writes nothing."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"output {str(output)!r} exists and is not a folder")
    if not output.is_dir() or not any(output.iterdir()):
        return output
    refusal = (
        f"output folder {str(output)!r} is not empty and holds no report written by gendistill ({MARKER}); "
        "gendistill only writes reports into a new or empty folder or into one holding its own report, so that "
        "it never replaces files it did not write: choose another output folder"
    )
    marker = output / MARKER
    if not marker.is_file() or marker.is_symlink():
        raise UsageError(refusal)
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        content = None
    if not isinstance(content, dict) or content.get("written_by") != "gendistill":
        raise UsageError(refusal)
    return output


def device_description(device: torch.device | str) -> str:
    """``"cuda: NVIDIA H100 80GB HBM3"`` or ``"cpu: x86_64, 2 threads"``: what a number was measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"{device.type}: {platform.machine()}, {torch.get_num_threads()} threads"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {}
    for name in ("gendistill", "torch", "torchvision", "diffusers", "torch-fidelity", "clip-anytorch"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return found


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _cell(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


@dataclass
class Report:
    """Collects metrics, images and tables of one evaluation; :meth:`save` writes them into ``output``."""

    output: Path
    title: str
    command: str  # e.g. "eval fid"
    device: str | torch.device  # stored as device_description(...) of a torch.device
    metrics: dict[str, dict] = field(default_factory=dict)
    _images: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)
    _tables: list[tuple[str, list[dict]]] = field(default_factory=list)
    _lead_tables: list[tuple[str, list[dict]]] = field(default_factory=list)
    _notes: list[str] = field(default_factory=list)
    _run_logs: dict[Path, list[dict]] = field(default_factory=dict)  # run logs read so far (each noted once)

    def __post_init__(self) -> None:
        """Claim ``output`` (see :func:`check_report_folder`): write ``MARKER`` first, then remove the previous
        report's ``report.md`` and ``metrics.json`` so that a crash cannot leave an older report looking current."""
        self.output = check_report_folder(self.output)
        if isinstance(self.device, torch.device):
            self.device = device_description(self.device)
        self.output.mkdir(parents=True, exist_ok=True)
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        marker = {"written_by": "gendistill", "command": self.command, "created": created}
        _write_text(self.output / MARKER, json.dumps(marker, indent=2) + "\n")
        for stale in ("report.md", "metrics.json"):
            (self.output / stale).unlink(missing_ok=True)

    def add_metric(self, name: str, value, **settings) -> None:
        """One number (or a dict of numbers) and everything needed to reproduce it."""
        self.metrics[name] = {"value": value, "settings": settings}

    def add_grid(self, name: str, images: torch.Tensor, caption: str, *, nrow: int = 8) -> Path:
        """Save images (B, C, H, W) in [0, 1] as one PNG grid ``name``.png."""
        path = self.output / f"{name}.png"
        save_image(images.detach().float().cpu().clamp(0, 1), path, nrow=nrow, padding=2, pad_value=1.0)
        self._images.append((path.name, caption))
        return path

    def add_plot(
        self,
        name: str,
        series: dict[str, tuple[list, list]],
        caption: str,
        *,
        xlabel: str,
        ylabel: str,
        logx: bool = False,
    ) -> Path:
        """A line plot ``name``.png of ``{label: (xs, ys)}``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logx:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        path = self.output / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        self._images.append((path.name, caption))
        return path

    def add_training_curves(self, folder: str | os.PathLike, *, prefix: str = "") -> None:
        """One plot per group of scalars logged by the run that wrote ``folder`` (``CURVE_GROUPS``), against step;
        ``prefix`` keeps the files of several runs in one report apart."""
        rows = self.run_log(folder)
        for group, belongs in CURVE_GROUPS.items():
            series = {}
            for key in sorted({k for row in rows for k in row if belongs(k)}):
                points = [(row["step"], row[key]) for row in rows if key in row and "step" in row]
                if len(points) > 1:
                    series[key] = ([p[0] for p in points], [p[1] for p in points])
            if series:
                caption = f"training curve: {group} (from {Path(folder).name}/logs/metrics.jsonl)"
                self.add_plot(f"{prefix}curve_{group}", series, caption, xlabel="step", ylabel=group)

    def run_log(self, folder: str | os.PathLike) -> list[dict]:
        """The readable rows of the run log of ``folder`` (:func:`read_run_log`); lines that could not be read are
        named in a note of the report, once per file."""
        path = Path(folder) / RUN_LOG
        key = path.resolve()
        if key not in self._run_logs:
            rows, skipped = read_run_log(folder)
            if skipped:
                lines = ", ".join(map(str, skipped[:10]))
                if len(skipped) > 10:
                    lines += f" and {len(skipped) - 10} more"
                self.add_note(
                    f"**Skipped {len(skipped)} unreadable line(s) of {path}:** line(s) {lines} (a run killed while "
                    f"writing leaves a partial last line); the {len(rows)} readable rows are used."
                )
            self._run_logs[key] = rows
        return self._run_logs[key]

    def add_table(self, title: str, rows: list[dict], *, lead: bool = False) -> None:
        """A table after the metrics, or before them with ``lead`` (a summary)."""
        (self._lead_tables if lead else self._tables).append((title, rows))

    def add_note(self, text: str) -> None:
        self._notes.append(text)

    def save(self) -> Path:
        """Write ``metrics.json`` then ``report.md``; returns the report's path."""
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        payload = {
            "command": self.command,
            "device": self.device,
            "created": created,
            "versions": versions(),
            "metrics": self.metrics,
        }
        _write_text(self.output / "metrics.json", json.dumps(payload, indent=2, default=_json_default) + "\n")
        lines = [f"# {self.title}", ""]
        for file, caption in self._images:
            lines += [f"![{caption}]({file})", "", f"*{caption}*", ""]
        summary = [{"metric": k, "value": _summary_value(v["value"])} for k, v in self.metrics.items()]
        for title, rows in [*self._lead_tables, ("Metrics", summary), *self._tables]:
            if not rows:
                continue
            columns = list(dict.fromkeys(k for row in rows for k in row))
            lines += [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
            lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
            lines.append("")
        lines += ["## Settings", ""]
        for name, entry in self.metrics.items():
            settings = ", ".join(f"{k}={_cell(v)}" for k, v in entry["settings"].items())
            lines.append(f"- **{name}**: {settings}")
        lines.append("")
        for note in self._notes:  # one paragraph each
            lines += [note, ""]
        lines += [f"Device: {self.device}. Written {created}.", ""]
        path = self.output / "report.md"
        _write_text(path, "\n".join(lines))
        return path


def _summary_value(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    return _cell(value)


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in metrics.json")
