"""Samplers for distilled students, in the style of diffusers pipelines (each depends only on torch and diffusers)."""

from .pipeline_boot import BootImagePipeline, BootPipeline

__all__ = ["BootImagePipeline", "BootPipeline"]
