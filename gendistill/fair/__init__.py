"""Fair synthetic data by data-free distillation (Fair4Free's setting): a fair conditional VAE teacher, a smaller
decoder distilled from it in latent space without its data, and fair samples (``gendistill fair``; fairness
metrics need ``pip install 'gendistill[fair]'``)."""

from .data import biased_digits
from .models import Decoder, FairVAE, load_decoder, save_decoder
from .task import FairVAETask, LatentDistillTask, gaussian_mmd

__all__ = [
    "Decoder",
    "FairVAE",
    "FairVAETask",
    "LatentDistillTask",
    "biased_digits",
    "gaussian_mmd",
    "load_decoder",
    "save_decoder",
]
