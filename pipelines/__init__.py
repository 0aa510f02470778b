"""Samplers for distilled students, in the style of diffusers pipelines (each depends only on torch and diffusers)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .pipeline_boot import BootImagePipeline, BootPipeline

__all__ = ["BootImagePipeline", "BootPipeline", "load_boot_pipeline"]

PIPELINES = {cls.__name__: cls for cls in (BootImagePipeline, BootPipeline)}


def load_boot_pipeline(folder: str | os.PathLike) -> BootImagePipeline | BootPipeline:
    """The BOOT pipeline class that ``folder``'s ``model_index.json`` names, loaded without running folder code.

    Every way the folder can be bad is a ``FileNotFoundError`` or ``ValueError`` naming it: a missing or invalid
    ``model_index.json``, and components whose files are truncated or corrupt.
    """
    index_path = Path(folder) / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json; expected a folder written by gendistill boot")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{index_path} is not valid JSON ({err}); expected a folder written by gendistill boot"
        ) from None
    name = index.get("_class_name") if isinstance(index, dict) else None
    name = name[-1] if isinstance(name, list) and name else name
    if name not in PIPELINES:
        raise ValueError(f"{index_path} describes pipeline {name!r}; valid: {', '.join(PIPELINES)}")
    try:
        pipe = PIPELINES[name].from_pretrained(folder)
    except (FileNotFoundError, ValueError):  # the loader's own checks, which name the file and what is valid
        raise
    except Exception as err:  # diffusers/transformers/safetensors errors of a component's files: undocumented types
        message = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(
            f"BOOT student {str(folder)!r} could not be loaded ({type(err).__name__}: {message}); "
            "expected the complete folder that gendistill boot writes"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe
