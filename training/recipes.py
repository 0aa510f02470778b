"""Recipes: dataclasses with defaults that run, loaded from YAML (``yaml.safe_load`` only) and flags.

Precedence: dataclass defaults < ``--config recipe.yaml`` < command-line flags. Every field is a flag
(``num_intervals`` -> ``--num-intervals``); an unknown YAML key is a ``ValueError`` listing the valid ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import math
import re
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from diffusers.optimization import SchedulerType

from gendistill.errors import UsageError

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")
# torch.compile backends for the trainable modules; "inductor" is the one that generates kernels.
COMPILE_BACKENDS = ("no", "eager", "aot_eager", "inductor")


@dataclass
class TrainRecipe:
    """Fields every recipe shares; read by the training core."""

    output: str = "gendistill-run"  # run folder: checkpoints/, logs/, samples/ and the exported artefact
    max_steps: int = 1000  # training iterations (each runs every phase's optimizer steps)
    max_seconds: float = 0.0  # also stop after this many seconds of training, evaluations not counted (0: no limit)
    batch_size: int = 128  # per-process batch size
    lr: float = 1e-4  # AdamW learning rate
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes' 8-bit AdamW: less optimizer memory, CUDA)
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    lr_scheduler: str = "constant_with_warmup"  # any diffusers get_scheduler name
    lr_warmup_steps: int = 0  # warm-up optimizer steps
    grad_clip: float = 1.0  # max gradient norm (0 disables clipping)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | no | fp16 | bf16
    cpu: bool = False  # train on the CPU even where CUDA is available
    fused_kernels: bool = True  # fused Triton kernels on CUDA (gendistill.kernels); false: the plain-torch path
    fused_optimizer: bool = True  # AdamW's fused CUDA kernel when every trainable parameter is on CUDA
    compile: str = "no"  # torch.compile backend for the trainable modules: no | eager | aot_eager | inductor
    channels_last: bool = False  # 4-D weights (and so the convolutions) in channels-last memory layout
    ema_decay: float = 0.999  # EMA of the trainable weights, used for export (0 disables EMA)
    seed: int = 0  # global seed (per process: seed + process index)
    checkpoint_every: int = 500  # save a resumable checkpoint every N steps (0: only at the end)
    checkpoints_total_limit: int = 2  # keep at most this many checkpoints
    eval_every: int = 100  # compute the task's quality metrics every N steps (0: only at start and end)
    sample_every: int = 500  # write a PNG sample grid every N steps (0: only at the end)
    log_every: int = 10  # log losses every N steps
    max_nonfinite_steps: int = 20  # abort after this many non-finite losses in a row
    resume: str | None = None  # "latest" or a checkpoint folder to resume from
    overwrite: bool = False  # replace an output folder that holds another run

    # Fields naming files or folders the run reads: the output may not be, hold or lie inside any of them.
    INPUT_PATHS: typing.ClassVar[tuple[str, ...]] = ()
    # Fields that may differ between a run and its resumption ("output": a run folder may be moved or renamed).
    RESUMABLE_CHANGES: typing.ClassVar[tuple[str, ...]] = (
        "output",
        "resume",
        "overwrite",
        "max_steps",
        "max_seconds",
        "fused_kernels",
        "fused_optimizer",
        "compile",
        "channels_last",
        "cpu",
    )

    def input_paths(self) -> dict[str, str | None]:
        """The files and folders the run reads, by the option that names them (``INPUT_PATHS``' fields)."""
        return {"--" + name.replace("_", "-"): getattr(self, name) for name in self.INPUT_PATHS}

    def validate(self) -> None:
        _check_finite(self)
        for name in (
            "max_steps",
            "batch_size",
            "gradient_accumulation_steps",
            "log_every",
            "max_nonfinite_steps",
            "checkpoints_total_limit",
        ):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("checkpoint_every", "eval_every", "sample_every", "lr_warmup_steps", "max_seconds"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UsageError(f"lr must be positive, got {self.lr}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UsageError(
                f"mixed_precision {self.mixed_precision!r} is not valid; valid: {', '.join(MIXED_PRECISION)}"
            )
        if self.compile not in COMPILE_BACKENDS:
            raise UsageError(f"compile {self.compile!r} is not valid; valid: {', '.join(COMPILE_BACKENDS)}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"optimizer {self.optimizer!r} is not valid; valid: {', '.join(OPTIMIZERS)}")
        if self.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise UsageError(
                "optimizer adamw8bit needs bitsandbytes, which is not installed: pip install bitsandbytes"
            )
        schedulers = [s.value for s in SchedulerType]
        if self.lr_scheduler not in schedulers:
            raise UsageError(f"lr_scheduler {self.lr_scheduler!r} is not valid; valid: {', '.join(schedulers)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UsageError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not self.output:
            raise UsageError("output folder is required (--output DIR)")


def _check_finite(recipe) -> None:
    """Every float of a recipe (also inside lists) must be a finite number: inf/nan learning rates, weights or
    budgets are refused before they reach an optimizer or the log."""
    for f in fields(recipe):
        value = getattr(recipe, f.name)
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise UsageError(f"{f.name} must be a finite number, got {value!r}")


def _base_type(tp):
    """``int | None`` -> (int, True); ``list[int] | None`` -> (list[int], True)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def convert_value(value, tp, name: str):
    """``value`` (a string from a flag, a method option or YAML, or a YAML scalar) as type ``tp``; a ``UsageError``
    naming ``name`` otherwise. The one conversion of every recipe field and method option."""
    base, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise UsageError(f"{name} may not be empty")
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        (item,) = typing.get_args(base)[:1]
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, list | tuple):
            value = [value]
        return origin(convert_value(v, item, name) for v in value)
    if base is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as err:
                raise UsageError(f"{name} must be a JSON object, e.g. '{{\"key\": 1}}': {err}") from None
        if not isinstance(value, dict):
            raise UsageError(f"{name} must be a JSON object (a mapping), got {value!r}")
        return dict(value)
    if base is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"{name} must be true or false, got {value!r}")
    try:
        return base(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be of type {base.__name__}, got {value!r}") from None


def parse_options(items: list[str] | None, hints: dict[str, object], *, owner: str) -> dict[str, object]:
    """``key=value`` items (a method's ``--method-options``) as a dict, each value converted by :func:`convert_value`
    to the type ``hints[key]`` names; an item that is not ``key=value`` with a key of ``hints`` is a ``UsageError``
    listing the keys of ``owner`` (what the options belong to, e.g. a method's name)."""
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or key not in hints:
            raise UsageError(f"method option {item!r} is not key=value with a key of {owner}: {', '.join(hints)}")
        options[key] = convert_value(value, hints[key], f"method option {key}={value!r}")
    return options


def load_yaml(path: str | Path) -> dict:
    """The mapping of a YAML recipe file; a missing file, bad YAML or a non-mapping is one error naming the file."""
    from gendistill.files import read_yaml

    path = Path(path)
    data = read_yaml(path, what="recipe file") or {}
    if not isinstance(data, dict):
        raise UsageError(f"recipe file {str(path)!r} must hold a mapping of field: value, got {type(data).__name__}")
    return data


def build_recipe(cls, values: dict, *, method: str | None = None):
    """Make a recipe of dataclass ``cls`` from ``values``; unknown keys are a ``ValueError`` naming the valid ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    values = dict(values)
    if "method" not in names:  # a recipe whose own field is "method" (dfkd) reads it as that field
        given_method = values.pop("method", None)
        if given_method is not None and given_method != method:
            raise UsageError(f"recipe is for method {given_method!r} but this command runs {method!r}")
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UsageError(f"unknown recipe key(s) {', '.join(unknown)}; valid keys: {', '.join(names)}")
    recipe = cls(**{k: convert_value(v, hints[k], k) for k, v in values.items()})
    recipe.validate()
    return recipe


def field_comments(cls) -> dict[str, str]:
    """The ``# comment`` after each field of ``cls`` and its dataclass bases (subclasses win): the flag's help."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            match = re.match(r"^\s{4}(\w+):[^#]*#\s*(.+)$", line)
            if match:
                comments[match.group(1)] = match.group(2).strip()
    return comments


def add_recipe_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--field-name`` flag per dataclass field (value parsed later, so YAML and flags share conversion)."""
    parser.add_argument("--config", help="YAML recipe (keys are the field names below)")
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        base, _ = _base_type(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        # argparse %-formats help strings: a literal % (e.g. "10% of each class") must be doubled.
        help_text = f"{comments.get(f.name, '')} (default: {default})".strip().replace("%", "%%")
        if base is bool:
            parser.add_argument(flag, dest=f.name, nargs="?", const="true", default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_text)


def parse_recipe(cls, argv: list[str] | None, *, prog: str, method: str, description: str = ""):
    """Parse ``argv`` into a recipe of dataclass ``cls``. Bad flags exit with code 2 (argparse)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_recipe_arguments(parser, cls)
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config", None)
    values = load_yaml(config_path) if config_path else {}
    values.update(args)
    return build_recipe(cls, values, method=method)


def recipe_dict(recipe) -> dict:
    return dataclasses.asdict(recipe)
