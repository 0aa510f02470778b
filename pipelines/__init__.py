"""Samplers for distilled students, in the style of diffusers pipelines (each depends only on torch and diffusers)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .pipeline_boot import BootImagePipeline, BootPipeline

__all__ = ["BootImagePipeline", "BootPipeline", "load_boot_pipeline"]

PIPELINES = {cls.__name__: cls for cls in (BootImagePipeline, BootPipeline)}


def load_boot_pipeline(folder: str | os.PathLike) -> BootImagePipeline | BootPipeline:
    """The BOOT pipeline class that ``folder``'s ``model_index.json`` names, loaded without running folder code."""
    index_path = Path(folder) / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json; expected a folder written by gendistill boot")
    name = json.loads(index_path.read_text(encoding="utf-8")).get("_class_name")
    name = name[-1] if isinstance(name, list) and name else name
    if name not in PIPELINES:
        raise ValueError(f"{index_path} describes pipeline {name!r}; valid: {', '.join(PIPELINES)}")
    pipe = PIPELINES[name].from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe
