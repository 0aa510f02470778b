"""Data-free distillation of diffusion models and classifiers."""

__version__ = "0.1.0"
