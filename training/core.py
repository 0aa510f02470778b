"""The one training loop every gendistill method runs on.

Accelerate does devices, precision, DDP/FSDP (``accelerate launch``), accumulation, clipping and
``save_state``/``load_state`` with automatic checkpoint naming and a total limit; diffusers gives ``EMAModel`` and
``get_scheduler``. The loop knows nothing about the method: it asks the task (see ``gendistill.task``) for its
phases, batches and losses.

Run folder layout (``recipe.output``)::

    gendistill_run.json          the recipe of the run: the marker of a folder gendistill wrote
    checkpoints/checkpoint_<i>/  accelerate state + EMA (safetensors) + the task's own state when it has one
                                 (``task_state.safetensors``: a DFKD synthesizer's pool, bank, counters) +
                                 ``trainer_state.json`` (counters, EMA and task scalars), which is written last: only
                                 then is the checkpoint complete
    logs/metrics.jsonl           every logged scalar, one strict-JSON object per line (also sent to trackers), with
                                 "elapsed_s" (wall time) and "train_s" (without evaluations, grids, checkpoints)
    samples/step_<n>.png         sample grids of generative tasks

What is guaranteed (the README's reliability section lists the tests):
- ``--overwrite`` replaces only a folder holding ``gendistill_run.json``; the output may not be, hold or lie inside
  an input (``recipe.INPUT_PATHS``).
- A run is identified by its recipe minus where it lives, so a moved run folder resumes.
- Nothing in a checkpoint is unpickled: counters, EMA and the task's state are JSON + safetensors; accelerate reads
  its optimizer, scheduler and RNG files with ``torch.load(weights_only=True)``. A checkpoint that cannot be restored
  exactly (a missing or unreadable file, RNG state or task state included) is an error, never a log line.
- Non-finite losses and gradients skip the step; too many in a row, or non-finite weights at a checkpoint, raise
  ``DivergedError`` and that checkpoint is never marked complete.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from accelerate.utils import load as accelerate_load
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file
from torchvision.utils import save_image
from tqdm.auto import tqdm

from gendistill.errors import DivergedError, UsageError
from gendistill.files import check_output_not_input, read_json, read_jsonl, read_safetensors

from .recipes import TrainRecipe, recipe_dict

logger = logging.getLogger(__name__)

RUN_FILE = "gendistill_run.json"
STATE_FILE = "trainer_state.json"  # written last, atomically: its presence marks a complete checkpoint
TASK_STATE_FILE = "task_state.safetensors"  # the tensors of the task's extra_state() (process i > 0: task_state_<i>)
TENSOR_KEY = "__tensor__"  # in trainer_state.json's "task_state", marks a tensor stored in the task state file


class NonFiniteLossError(DivergedError):
    """Too many non-finite steps in a row, or non-finite weights at a checkpoint (the CLI exits with code 3)."""


class Counters:
    """Step counters, checkpointed in ``trainer_state.json`` (so resume is exact)."""

    def __init__(self):
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` as JSON through a temporary file, flushed to disk, then renamed over ``path``: a crash leaves
    either the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(_finite_or_none(data), f, indent=2, sort_keys=True, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _finite_or_none(value):
    """``value`` with every non-finite float replaced by ``None``, so the JSON written is strict (no NaN/Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def _checkpoint_index(folder: Path) -> int:
    match = re.fullmatch(r"checkpoint_(\d+)", folder.name)
    return int(match.group(1)) if match else -1


def complete_checkpoints(output: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(output) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _checkpoint_index(p) >= 0 and (p / STATE_FILE).is_file()]
    return sorted(found, key=_checkpoint_index)


def resolve_resume(recipe: TrainRecipe) -> Path | None:
    """The checkpoint folder ``recipe.resume`` points to (a relative path that does not exist from the working folder
    is read relative to the run folder); ``ValueError`` when there is nothing to resume."""
    if recipe.resume is None:
        return None
    if recipe.resume == "latest":
        found = complete_checkpoints(recipe.output)
        if not found:
            raise UsageError(f"--resume latest: no complete checkpoint in {recipe.output!r}/checkpoints to resume")
        return found[-1]
    path = Path(recipe.resume)
    if not path.is_absolute() and not path.exists() and (Path(recipe.output) / path).exists():
        path = Path(recipe.output) / path  # "checkpoints/checkpoint_3", relative to the run folder
    if not (path / STATE_FILE).is_file():
        raise UsageError(f"--resume {recipe.resume!r} is not a complete gendistill checkpoint (no {STATE_FILE})")
    return path


def check_output_folder(recipe: TrainRecipe, command: str) -> None:
    """Refuse an output folder that is an input, or holds anything but this run (or, with ``overwrite``, any
    gendistill run); read-only.

    ``--overwrite`` replaces only a folder that holds ``gendistill_run.json``, the marker every run writes first:
    a folder gendistill did not write is never deleted, with or without it.
    """
    out = Path(recipe.output)
    if recipe.overwrite and recipe.resume is not None:
        raise UsageError("--overwrite and --resume contradict each other: choose one")
    check_output_not_input(out, recipe.input_paths())
    if not out.exists():
        if recipe.resume is not None:
            raise UsageError(f"--resume {recipe.resume}: output folder {recipe.output!r} does not exist")
        return
    if not out.is_dir():
        raise UsageError(f"output {recipe.output!r} exists and is not a folder")
    if not any(out.iterdir()):
        return
    run_file = out / RUN_FILE
    if not run_file.is_file():
        raise UsageError(
            f"output folder {recipe.output!r} is not empty and holds no gendistill run ({RUN_FILE}); gendistill "
            "never replaces a folder it did not write (--overwrite does not apply to it): choose a new or empty folder"
        )
    if recipe.overwrite:
        return  # a run gendistill wrote: Trainer replaces it
    previous = read_json(run_file, what="run file")
    if not isinstance(previous, dict) or not isinstance(previous.get("recipe"), dict):
        raise UsageError(f"run file {str(run_file)!r} holds no recipe; it was not written by gendistill")
    # Compare as JSON sees it (tuples and lists both become lists).
    current = json.loads(json.dumps({"command": command, "recipe": recipe_dict(recipe)}))
    ignore = set(recipe.RESUMABLE_CHANGES)
    diffs = [
        k
        for k in sorted(set(previous["recipe"]) | set(current["recipe"]))
        if k not in ignore and previous["recipe"].get(k) != current["recipe"].get(k)
    ]
    if previous.get("command") != command:
        diffs.insert(0, "command")
    if diffs:
        detail = ", ".join(
            f"{k}: {previous['recipe'].get(k)!r} -> {current['recipe'].get(k)!r}" for k in diffs[:4] if k != "command"
        )
        raise UsageError(
            f"output folder {recipe.output!r} already holds a different run "
            f"({detail or 'other command'}); "
            "pass --overwrite to replace that run or choose another folder"
        )
    if recipe.resume is None:
        raise UsageError(
            f"output folder {recipe.output!r} already holds this run; "
            "pass --resume latest to continue it or --overwrite to start again"
        )


def export_pipeline(pipe, output: Path) -> None:
    """``pipe.save_pretrained`` into ``output`` without a half-written folder ever looking complete: everything is
    written to a temporary folder and moved in, ``model_index.json`` (what loaders look for) last."""
    tmp = output / ".export-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp)
    (output / "model_index.json").unlink(missing_ok=True)
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "model_index.json"):
        target = output / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()


def logged_values(output: str | Path, key: str) -> list[float]:
    """Every value of ``key`` in a run's ``logs/metrics.jsonl``, in logging order (a line cut off by a crash is
    skipped with a warning)."""
    rows, _ = read_jsonl(Path(output) / "logs" / "metrics.jsonl")
    return [row[key] for row in rows if key in row]


def _trackers() -> list[str]:
    return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []


def _flat_config(recipe: TrainRecipe) -> dict:
    """Tracker-friendly hyper-parameters (scalars only)."""
    out = {}
    for key, value in recipe_dict(recipe).items():
        out[key] = value if isinstance(value, int | float | str | bool) else str(value)
    return out


def resolve_mixed_precision(recipe: TrainRecipe) -> str:
    """``recipe.mixed_precision`` with "auto" resolved: bf16 on CUDA, no (fp32) elsewhere."""
    if recipe.mixed_precision == "auto":
        return "bf16" if torch.cuda.is_available() and not recipe.cpu else "no"
    return recipe.mixed_precision


def make_optimizer(
    recipe: TrainRecipe, params: list[torch.nn.Parameter], lr: float, *, beta1: float | None = None
) -> torch.optim.Optimizer:
    """AdamW (torch's fused kernel when ``fused_optimizer`` and every parameter is on CUDA), or bitsandbytes' 8-bit
    AdamW (``optimizer: adamw8bit``) to save optimizer-state memory. ``beta1`` overrides the recipe's
    ``adam_beta1`` (a phase's own, ``Phase.adam_beta1``)."""
    beta1 = recipe.adam_beta1 if beta1 is None else beta1
    kwargs = {"lr": lr, "betas": (beta1, recipe.adam_beta2), "weight_decay": recipe.weight_decay}
    if recipe.optimizer == "adamw8bit":
        import bitsandbytes  # checked by TrainRecipe.validate

        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    if recipe.fused_optimizer and params and all(p.is_cuda for p in params):
        kwargs["fused"] = True  # one multi-tensor kernel per step instead of a loop over parameters
    return torch.optim.AdamW(params, **kwargs)


class Trainer:
    """Runs a task's phases for ``recipe.max_steps`` iterations with checkpoints, EMA, logging and samples.

    Args:
        task: the task module (frozen teacher + trainable modules, see ``gendistill.task``).
        recipe: the run's recipe (a ``TrainRecipe`` subclass).
        command: the CLI command that made the run (recorded in ``gendistill_run.json``).
        output_checked: the caller already ran ``check_output_folder`` on every process (``run_recipe`` does).
    """

    def __init__(self, task: torch.nn.Module, recipe: TrainRecipe, *, command: str, output_checked: bool = False):
        recipe.validate()
        self.recipe, self.command, self.task = recipe, command, task
        self.output = Path(recipe.output)
        mixed = resolve_mixed_precision(recipe)
        if AcceleratorState._shared_state.get("_mixed_precision", mixed) != mixed:
            # Accelerate keeps the first Accelerator's precision for the whole process (and refuses another); a later
            # run in the same process (a Python user's second recipe, a benchmark's next run) gets its recipe's.
            # The process group (PartialState) is kept.
            AcceleratorState._reset_state()
        self.accelerator = accelerator = Accelerator(
            cpu=recipe.cpu,
            mixed_precision=mixed,
            gradient_accumulation_steps=recipe.gradient_accumulation_steps,
            log_with=_trackers() or None,
            step_scheduler_with_optimizer=False,
            project_config=ProjectConfiguration(
                project_dir=str(self.output),
                logging_dir=str(self.output / "logs"),
                automatic_checkpoint_naming=True,
                # Rotation is ours (_rotate_checkpoints): accelerate's deletes the oldest folder by number, which
                # would be the very checkpoint an older-checkpoint resume started from.
                total_limit=None,
            ),
        )
        if not output_checked:  # run_recipe checked it (on every process) before building the task
            check_output_folder(recipe, command)  # every process checks the folder before any process writes
        self.resume_from = resolve_resume(recipe)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if recipe.overwrite and (self.output / RUN_FILE).is_file():
                shutil.rmtree(self.output)  # check_output_folder allowed it: a run gendistill wrote
            self.output.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.output / RUN_FILE, {"command": command, "recipe": recipe_dict(recipe)})
        accelerator.wait_for_everyone()
        set_seed(recipe.seed, device_specific=True)

        task.to(accelerator.device)
        if recipe.channels_last:
            # Convolutions follow their weights' layout: on CPUs (oneDNN) and GPUs channels-last convolutions are
            # often much faster. Checkpoints and exports are written contiguous, so they do not depend on it.
            task.to(memory_format=torch.channels_last)
        self.phases = task.phases()
        self.optimizers, self.schedulers, self.emas = {}, {}, {}
        self.ema_stats: dict[str, RunningStatsEMA] = {}
        for phase in self.phases:
            module = getattr(task, phase.name)
            params = [p for p in module.parameters() if p.requires_grad]
            lr = recipe.lr if phase.lr is None else phase.lr
            optimizer = make_optimizer(recipe, params, lr, beta1=phase.adam_beta1)
            scheduler = get_scheduler(
                recipe.lr_scheduler,
                optimizer=optimizer,
                num_warmup_steps=recipe.lr_warmup_steps,
                num_training_steps=max(1, phase.num_steps(recipe.max_steps)) * phase.steps,
            )
            module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
            if recipe.compile != "no":
                # Here rather than Accelerate's dynamo_backend, which its process-wide state fixes at the first run.
                # Checkpoints hold the prepared module's weights, so they do not depend on this setting.
                module = torch.compile(module, backend=recipe.compile)
            setattr(task, phase.name, module)
            self.optimizers[phase.name], self.schedulers[phase.name] = optimizer, scheduler
            if recipe.ema_decay > 0 and phase.ema:
                # Over the trainable parameters only (a LoRA student's frozen base needs no average).
                live = accelerator.unwrap_model(module, keep_torch_compile=False)
                ema = EMAModel(_trainable(live), decay=recipe.ema_decay)
                ema.to(accelerator.device)
                self.emas[phase.name] = ema
                self.ema_stats[phase.name] = RunningStatsEMA(live)
        self.counters = Counters()
        self._kept_checkpoint: Path | None = None  # an explicitly resumed checkpoint, kept through this run
        self._abandoned: set[int] = set()  # later checkpoints of the continuation that resume left behind
        self._checkpointed_step: int | None = None  # the step of the newest checkpoint of this run
        if self.resume_from is not None:
            self._load(self.resume_from)
        accelerator.init_trackers(command.replace(" ", "_"), config=_flat_config(recipe))
        self.metrics_file = self.output / "logs" / "metrics.jsonl"
        self._started = time.perf_counter()  # wall-clock origin of the logged "elapsed_s" (this process)
        # Seconds spent in evaluations, sample grids and checkpoints: "train_s" and the time budget leave them out.
        self._aside = 0.0
        self._aside_since: float | None = None

    # --- checkpoints ---------------------------------------------------------------------------------------
    def _load(self, folder: Path) -> None:
        """Restore everything from ``folder``; any file that cannot be restored exactly is a ``ValueError``."""
        accelerator = self.accelerator
        state = read_json(folder / STATE_FILE, what="checkpoint state")
        rng_file = folder / f"random_states_{accelerator.process_index}.pkl"
        try:
            # accelerate's own reader: torch.load(weights_only=True), numpy's RNG types allowed, nothing else.
            rng = accelerate_load(rng_file)
        except Exception as err:  # noqa: BLE001 - missing, truncated or a planted pickle: all mean "not exact"
            raise UsageError(
                f"checkpoint {str(folder)!r} cannot be restored exactly: its RNG state {rng_file.name} is missing "
                f"or unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            ) from None
        if hasattr(self.task, "load_extra_state"):
            self._load_task_state(folder, state)  # before the RNG restore: rebuilding the task's state may draw
        try:
            accelerator.load_state(str(folder))
        except Exception as err:  # noqa: BLE001 - safetensors, torch.load and load_state_dict raise many types
            raise UsageError(
                f"checkpoint {str(folder)!r} cannot be restored ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''})"
            ) from None
        # accelerate logs a failed RNG restore at INFO and goes on; an inexact resume must not pass silently.
        if not torch.equal(torch.get_rng_state(), rng["torch_manual_seed"]):
            raise UsageError(f"checkpoint {str(folder)!r}: its RNG state {rng_file.name} could not be restored")
        try:
            self.counters.load_state_dict(state["counters"])
            for name, ema in self.emas.items():
                _load_ema(ema, self.ema_stats[name], folder, name, state["ema"][name])
                ema.to(accelerator.device)
        except (KeyError, TypeError, ValueError) as err:
            raise UsageError(
                f"checkpoint {str(folder)!r} cannot be restored: its counters or EMA are missing or do not match "
                f"this run ({type(err).__name__}: {err})"
            ) from None
        root = self.output / "checkpoints"
        if accelerator.is_main_process and root.is_dir():
            # Folders a crash left incomplete are dropped; they would only confuse the numbering.
            for stale in root.iterdir():
                if _checkpoint_index(stale) > _checkpoint_index(folder) and not (stale / STATE_FILE).is_file():
                    shutil.rmtree(stale)
        accelerator.wait_for_everyone()
        # New checkpoints are numbered after every existing one, so none is overwritten. Resuming an older
        # checkpoint of this run leaves the later ones behind: they are the first to go when rotation needs room, and
        # the checkpoint resumed from stays for the whole run.
        indices = [_checkpoint_index(p) for p in root.iterdir()] if root.is_dir() else []
        accelerator.project_configuration.iteration = max([-1, _checkpoint_index(folder), *indices]) + 1
        if self.recipe.resume != "latest" and folder.resolve().parent == root.resolve():
            self._kept_checkpoint = folder.resolve()
            self._abandoned = {i for i in indices if i > _checkpoint_index(folder)}
        self._checkpointed_step = self.counters.step
        logger.info("resumed from %s at step %d", folder, self.counters.step)

    def _load_task_state(self, folder: Path, state: dict) -> None:
        """``task.load_extra_state`` from this process's ``task_state`` file and its entry of ``"task_state"``."""
        index = self.accelerator.process_index
        try:
            structure = state["task_state"][index]
            tensors = read_safetensors(folder / _task_state_file(index), what="task state")
            self.task.load_extra_state(_join_state(structure, tensors))
        except (KeyError, IndexError, TypeError, ValueError, OSError) as err:
            raise UsageError(
                f"checkpoint {str(folder)!r} cannot be restored: the task's state (e.g. a synthesizer's pool) is "
                f"missing or does not match this run ({type(err).__name__}: {err})"
            ) from None

    def _save_task_state(self, folder: Path) -> list | None:
        """Every process writes the tensors of ``task.extra_state()`` to its ``task_state`` file; returns the JSON
        structures of all processes (main process), None when the task has no extra state."""
        if not hasattr(self.task, "extra_state"):
            return None
        tensors: dict[str, torch.Tensor] = {}
        structure = _split_state(self.task.extra_state(), "", tensors)
        save_file(tensors, str(folder / _task_state_file(self.accelerator.process_index)))
        return gather_object([structure]) if self.accelerator.num_processes > 1 else [structure]

    def save_checkpoint(self) -> Path:
        """``accelerator.save_state`` (automatic name), the task's extra state, the EMA and the counters, then the
        completion marker, written atomically; then rotation to ``checkpoints_total_limit``. Non-finite weights raise
        ``NonFiniteLossError`` and leave the checkpoint incomplete."""
        accelerator = self.accelerator
        accelerator.save_state()
        folder = self.output / "checkpoints" / f"checkpoint_{accelerator.save_iteration - 1}"
        self._check_finite_weights()
        accelerator.wait_for_everyone()
        task_state = self._save_task_state(folder)
        if accelerator.is_main_process:
            ema_state = {name: _save_ema(ema, self.ema_stats[name], folder, name) for name, ema in self.emas.items()}
            payload = {
                "step": self.counters.step,
                "command": self.command,
                "counters": self.counters.state_dict(),
                "ema": ema_state,
            }
            if task_state is not None:
                payload["task_state"] = task_state
            write_json_atomic(folder / STATE_FILE, payload)
            self._rotate_checkpoints(keep=folder)
        self._checkpointed_step = self.counters.step
        accelerator.wait_for_everyone()
        return folder

    def _check_finite_weights(self) -> None:
        for phase in self.phases:
            module = self.accelerator.unwrap_model(getattr(self.task, phase.name), keep_torch_compile=False)
            tensors = [*_trainable(module)]
            if phase.name in self.emas:
                tensors += self.emas[phase.name].shadow_params + self.ema_stats[phase.name].shadow
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                raise NonFiniteLossError(
                    f"the weights of {phase.name!r} are not finite at step {self.counters.step}; this checkpoint is "
                    "not marked complete. Resume from the last complete one with a lower learning rate"
                )

    def _rotate_checkpoints(self, *, keep: Path) -> None:
        """Delete checkpoints until ``checkpoints_total_limit`` remain besides a checkpoint resumed explicitly: those
        an older-checkpoint resume left behind first, then the oldest."""
        root = self.output / "checkpoints"
        candidates = [
            p
            for p in root.iterdir()
            if _checkpoint_index(p) >= 0 and p.resolve() not in (keep.resolve(), self._kept_checkpoint)
        ]
        candidates.sort(key=lambda p: (_checkpoint_index(p) not in self._abandoned, _checkpoint_index(p)))
        excess = len(candidates) + 1 - self.recipe.checkpoints_total_limit
        for stale in candidates[: max(excess, 0)]:
            shutil.rmtree(stale)

    # --- modules for evaluation / export -------------------------------------------------------------------
    def export_module(self, phase: str) -> torch.nn.Module:
        """A copy of the trainable module of ``phase`` with its EMA weights (or live weights without EMA)."""
        module = copy.deepcopy(self.accelerator.unwrap_model(getattr(self.task, phase), keep_torch_compile=False))
        if phase in self.emas:
            self.emas[phase].copy_to(_trainable(module))
            self.ema_stats[phase].copy_to(module)
        return module.eval()

    # --- logging -------------------------------------------------------------------------------------------
    def log(self, values: dict[str, float], step: int) -> None:
        """Send ``values`` to the trackers and append them to ``logs/metrics.jsonl`` as one strict-JSON line
        (non-finite numbers become ``null``)."""
        now = time.perf_counter()
        # Inside an evaluation (which logs its own results), training time stopped when it began.
        trained_until = now if self._aside_since is None else self._aside_since
        values = {**values, "elapsed_s": now - self._started, "train_s": trained_until - self._started - self._aside}
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps(_finite_or_none({"step": step, **values}), allow_nan=False) + "\n"
            with open(self.metrics_file, "a+b") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a line cut off by a crash: start on a new line (readers skip it)
                        f.write(b"\n")
                f.write(line.encode("utf-8"))

    def _live_modules(self) -> dict[str, torch.nn.Module]:
        return {
            p.name: self.accelerator.unwrap_model(getattr(self.task, p.name), keep_torch_compile=False)
            for p in self.phases
        }

    @contextlib.contextmanager
    def averaged_modules(self):
        """The phases' modules with their EMA weights and running statistics swapped in, in place, in eval mode
        (diffusers' ``EMAModel.store``/``copy_to``/``restore``; the live statistics are kept aside the same way);
        the live weights, statistics and modes are back on exit. Evaluations and sample grids use it instead of a
        copy of each module (a second multi-GB UNet for a Stable Diffusion student)."""
        modules = self._live_modules()
        modes = {name: module.training for name, module in modules.items()}
        swapped = []
        try:
            for name, module in modules.items():
                if name in self.emas:
                    params = _trainable(module)
                    live_stats = [t.detach().clone() for t in self.ema_stats[name].live]
                    self.emas[name].store(params)
                    swapped.append((name, params, live_stats))
                    self.emas[name].copy_to(params)
                    self.ema_stats[name].copy_to(module)
                module.eval()
            yield modules
        finally:
            with torch.no_grad():
                for name, params, live_stats in swapped:
                    self.emas[name].restore(params)
                    for tensor, saved in zip(self.ema_stats[name].live, live_stats, strict=True):
                        tensor.copy_(saved)
            for name, module in modules.items():
                module.train(modes[name])

    def evaluate(self, step: int) -> dict[str, float]:
        if not hasattr(self.task, "evaluate") or not self.accelerator.is_main_process:
            return {}
        metrics = dict(self.task.evaluate(**self._live_modules()))
        if self.emas:
            with self.averaged_modules() as averaged:
                ema_metrics = self.task.evaluate(**averaged)
            metrics.update({f"ema/{k}": v for k, v in ema_metrics.items()})
        self.log(metrics, step)
        return metrics

    def write_samples(self, step: int) -> Path | None:
        if not hasattr(self.task, "sample_images") or not self.accelerator.is_main_process:
            return None
        with self.averaged_modules() as averaged:
            images = self.task.sample_images(**averaged)
        path = self.output / "samples" / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(images.float().cpu(), path, nrow=max(1, images.shape[0] // 2))
        return path

    # --- the loop ------------------------------------------------------------------------------------------
    def _phase_step(self, phase, batch_size: int) -> tuple[float, bool]:
        """One optimizer step of ``phase`` (with accumulation). Returns (mean loss, stepped)."""
        accelerator, task = self.accelerator, self.task
        module, optimizer = getattr(task, phase.name), self.optimizers[phase.name]
        # Another phase's backward may have left gradients on this module (a generator's loss runs through the
        # student): every phase step starts from zero.
        optimizer.zero_grad(set_to_none=True)
        total, skipped = 0.0, False
        for _ in range(self.recipe.gradient_accumulation_steps):
            batch = task.sample_batch(phase.name, batch_size, accelerator.device)
            with accelerator.accumulate(module):
                with accelerator.autocast():
                    losses = task(phase.name, batch)
                loss = losses["loss"]
                finite = accelerator.gather(torch.isfinite(loss.detach()).reshape(1)).all()
                if not bool(finite):
                    skipped = True
                    optimizer.zero_grad(set_to_none=True)
                    continue
                accelerator.backward(loss)
                total += float(loss.detach()) / self.recipe.gradient_accumulation_steps
                if accelerator.sync_gradients and not skipped:
                    # The norm of all gradients (clipped to grad_clip when set): a finite loss can still have
                    # inf/NaN gradients (sqrt at 0, a saturated exp), which must not reach the weights. Under fp16
                    # the grad scaler skips such steps itself and lowers its scale.
                    clip = self.recipe.grad_clip if self.recipe.grad_clip > 0 else math.inf
                    norm = accelerator.clip_grad_norm_(module.parameters(), clip)
                    if accelerator.scaler is None and norm is not None and not bool(torch.isfinite(norm)):
                        skipped = True
                        optimizer.zero_grad(set_to_none=True)
                        continue
                    optimizer.step()
                    self.schedulers[phase.name].step()
                    if phase.name in self.emas:
                        self.emas[phase.name].step(
                            _trainable(accelerator.unwrap_model(module, keep_torch_compile=False))
                        )
                        self.ema_stats[phase.name].step(self.emas[phase.name].cur_decay_value)
                optimizer.zero_grad(set_to_none=True)
        return total, not skipped

    def fit(self) -> dict[str, float]:
        """Train to ``recipe.max_steps``; returns the last metrics of ``task.evaluate`` (main process)."""
        recipe, accelerator, counters = self.recipe, self.accelerator, self.counters
        self.task.train()
        if counters.step == 0:
            with self._set_aside():
                self.evaluate(0)
        progress = tqdm(
            total=recipe.max_steps,
            initial=counters.step,
            disable=not accelerator.is_main_process,
            desc=self.command,
            unit="step",
            dynamic_ncols=True,
        )
        examples_per_step = recipe.batch_size * recipe.gradient_accumulation_steps * accelerator.num_processes
        throughput = f"{getattr(self.task, 'example_unit', 'images')}_per_s"  # images_per_s, texts_per_s, ...
        tic, window, losses = time.perf_counter(), 0, {}
        metrics: dict[str, float] = {}
        fit_start = time.perf_counter() - self._aside  # so that now - fit_start - _aside is this fit's training
        while counters.step < recipe.max_steps:
            if recipe.max_seconds and self._over_budget(fit_start):
                logger.info("time budget of %.0f s reached at step %d", recipe.max_seconds, counters.step)
                break
            stepped_all = True
            for phase in self.phases:
                if not phase.runs_at(counters.step):
                    continue
                for _ in range(phase.steps):
                    loss, stepped = self._phase_step(phase, recipe.batch_size)
                    stepped_all &= stepped
                    if stepped:
                        losses.setdefault(f"loss/{phase.name}", []).append(loss)
            if stepped_all:
                counters.nonfinite_in_a_row = 0
            else:
                counters.nonfinite_total += 1
                counters.nonfinite_in_a_row += 1
                logger.warning(
                    "non-finite loss or gradients at step %d: step skipped (%d in a row)",
                    counters.step,
                    counters.nonfinite_in_a_row,
                )
                if counters.nonfinite_in_a_row >= recipe.max_nonfinite_steps:
                    last = complete_checkpoints(self.output)
                    raise NonFiniteLossError(
                        f"{counters.nonfinite_in_a_row} non-finite losses in a row at step {counters.step} (a step "
                        "is skipped when its loss or gradients are not finite); lower the learning rate or use "
                        "--mixed-precision bf16/no" + (f" (last complete checkpoint: {last[-1]})" if last else "")
                    )
            counters.step += 1
            window += 1
            progress.update(1)
            step = counters.step
            if step % recipe.log_every == 0 or step == recipe.max_steps:
                elapsed = time.perf_counter() - tic
                values = {k: sum(v) / len(v) for k, v in losses.items() if v}
                values[throughput] = window * examples_per_step / max(elapsed, 1e-9)
                values["nonfinite_skipped"] = counters.nonfinite_total
                for name, sched in self.schedulers.items():
                    values[f"lr/{name}"] = sched.get_last_lr()[0]
                self.log(values, step)
                progress.set_postfix(
                    {
                        k.split("/")[-1]: f"{v:.4g}"
                        for k, v in values.items()
                        if k.startswith("loss") or k == throughput
                    }
                )
                tic, window, losses = time.perf_counter(), 0, {}
            if recipe.eval_every and step % recipe.eval_every == 0 and step != recipe.max_steps:
                with self._set_aside():
                    metrics = self.evaluate(step) or metrics
            if recipe.sample_every and step % recipe.sample_every == 0 and step != recipe.max_steps:
                with self._set_aside():
                    self.write_samples(step)
            if recipe.checkpoint_every and step % recipe.checkpoint_every == 0 and step != recipe.max_steps:
                with self._set_aside():
                    self.save_checkpoint()
        progress.close()
        with self._set_aside():
            metrics = self.evaluate(counters.step) or metrics
            self.write_samples(counters.step)
            if self._checkpointed_step != counters.step:
                self.save_checkpoint()
        accelerator.wait_for_everyone()
        return metrics

    @contextlib.contextmanager
    def _set_aside(self):
        """Time spent inside is not training time (``train_s``, ``max_seconds``)."""
        if self._aside_since is not None:  # nested: the outer section counts the time
            yield
            return
        self._aside_since = time.perf_counter()
        try:
            yield
        finally:
            self._aside += time.perf_counter() - self._aside_since
            self._aside_since = None

    def _over_budget(self, fit_start: float) -> bool:
        """Whether any process has trained longer than ``max_seconds`` (all processes stop at the same step)."""
        over = float(time.perf_counter() - fit_start - self._aside > self.recipe.max_seconds)
        flag = torch.tensor([over], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="max").item())

    def end(self) -> None:
        self.accelerator.end_training()


def run_recipe(
    recipe: TrainRecipe,
    command: str,
    build_task: Callable[[], torch.nn.Module],
    export: Callable[[Trainer, torch.nn.Module, dict], dict],
    *,
    prepare: Callable[[Trainer, torch.nn.Module], None] | None = None,
) -> dict:
    """The skeleton of every training command: check the output folder (before anything is loaded), build the task,
    train it, export on the main process, write ``results.json``, wait for every process, end.

    Args:
        build_task: makes the task (after the output folder passed its checks).
        export: ``export(trainer, task, metrics)`` on the main process: writes the artefact into ``recipe.output``
            and returns the summary's own entries (``metrics``: the last evaluation's, see ``Trainer.fit``).
        prepare: ``prepare(trainer, task)`` once the trainer exists, before training (e.g. caching text embeddings).

    Returns the summary, ``{"steps", "resumed_at", **export(...)}`` (also ``results.json``); ``{}`` on the other
    processes.
    """
    check_output_folder(recipe, command)
    task = build_task()
    trainer = Trainer(task, recipe, command=command, output_checked=True)
    if prepare is not None:
        prepare(trainer, task)
    resumed_at = trainer.counters.step
    metrics = trainer.fit()
    summary = {}
    if trainer.accelerator.is_main_process:
        summary = {"steps": trainer.counters.step, "resumed_at": resumed_at, **export(trainer, task, metrics)}
        write_json_atomic(Path(recipe.output) / "results.json", summary)
    trainer.accelerator.wait_for_everyone()
    trainer.end()
    return summary


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


class RunningStatsEMA:
    """The exponential moving average of a module's normalization running statistics (``running_mean`` and
    ``running_var`` of its BatchNorm/InstanceNorm layers that track them), kept beside diffusers' ``EMAModel``,
    which averages parameters only.

    Without it the EMA module would normalize with the live module's statistics: activations of the averaged
    weights divided by the statistics of other weights. A ResNet-8 student distilled from a ResNet-20 teacher on
    real digits scored 96% of the teacher with its live weights after 125 steps while its EMA with live statistics
    stayed at chance for 300 steps; with averaged statistics the EMA follows the live student. timm's ``ModelEmaV2``
    averages buffers the same way. :meth:`step` uses the decay ``EMAModel`` just used, so both averages weigh the
    steps alike. The live statistics are found once: the module's layers are not walked on every step."""

    def __init__(self, module: torch.nn.Module):
        self.live = _running_stats(module)  # updated in place by the forwards and by load_state_dict
        self.shadow = [t.detach().clone() for t in self.live]

    @torch.no_grad()
    def step(self, decay: float) -> None:
        for shadow, live in zip(self.shadow, self.live, strict=True):
            shadow.lerp_(live, 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for shadow, live in zip(self.shadow, _running_stats(module), strict=True):
            live.copy_(shadow)


def _running_stats(module: torch.nn.Module) -> list[torch.Tensor]:
    stats = []
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._NormBase) and layer.running_mean is not None:
            stats += [layer.running_mean, layer.running_var]
    return stats


def _save_ema(ema: EMAModel, stats: RunningStatsEMA, folder: Path, name: str) -> dict:
    """The EMA's shadow weights (``shadow.<i>``) and running statistics (``stats.<i>``) as
    ``ema_<name>.safetensors`` in ``folder``; returns its scalars (for JSON)."""
    state = ema.state_dict()
    shadow = {f"shadow.{i}": t.detach().cpu().contiguous() for i, t in enumerate(state.pop("shadow_params"))}
    shadow.update({f"stats.{i}": t.detach().cpu().contiguous() for i, t in enumerate(stats.shadow)})
    save_file(shadow, str(folder / f"ema_{name}.safetensors"))
    return state


def _task_state_file(process_index: int) -> str:
    return TASK_STATE_FILE if process_index == 0 else f"task_state_{process_index}.safetensors"


def _split_state(value, path: str, tensors: dict[str, torch.Tensor]):
    """``value`` (nested dicts and lists of tensors and JSON scalars) as JSON, each tensor replaced by
    ``{"__tensor__": its dotted path}`` and stored (a CPU copy) under that path in ``tensors``."""
    if isinstance(value, torch.Tensor):
        if path in tensors:
            raise UsageError(f"two entries of the task state are both named {path!r}")
        tensors[path] = value.detach().to("cpu", copy=True).contiguous()
        return {TENSOR_KEY: path}
    if isinstance(value, dict):
        return {str(k): _split_state(v, f"{path}.{k}" if path else str(k), tensors) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_split_state(v, f"{path}.{i}" if path else str(i), tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"task state entry {path!r} is a {type(value).__name__}: only tensors and JSON scalars are saved")


def _join_state(value, tensors: dict[str, torch.Tensor]):
    """The inverse of :func:`_split_state`."""
    if isinstance(value, dict):
        if set(value) == {TENSOR_KEY}:
            return tensors[value[TENSOR_KEY]]
        return {k: _join_state(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_state(v, tensors) for v in value]
    return value


def _load_ema(ema: EMAModel, stats: RunningStatsEMA, folder: Path, name: str, scalars: dict) -> None:
    shadow = read_safetensors(folder / f"ema_{name}.safetensors", what="EMA weights")
    params = [shadow[f"shadow.{i}"] for i in range(sum(key.startswith("shadow.") for key in shadow))]
    saved_stats = [shadow[f"stats.{i}"] for i in range(sum(key.startswith("stats.") for key in shadow))]
    expected = [tuple(p.shape) for p in ema.shadow_params]
    if [tuple(p.shape) for p in params] != expected:
        raise UsageError(f"the EMA weights of {name!r} do not match the model")
    if [tuple(t.shape) for t in saved_stats] != [tuple(t.shape) for t in stats.shadow]:
        raise UsageError(f"the EMA running statistics of {name!r} do not match the model")
    ema.load_state_dict({**scalars, "shadow_params": params})
    for target, saved in zip(stats.shadow, saved_stats, strict=True):
        target.copy_(saved)
