"""Federated distillation on Flower's simulation engine (``pip install 'gendistill[federated]'``): non-IID client
splits, FedAvg, FedGen, FedFTG and FedD2S. The methods are plain torch (``fedavg.py``, ``fedgen.py``, ``fedftg.py``,
``fedd2s.py``); :mod:`gendistill.federated.simulation` runs them as Flower apps (``run_federated``), and only it
imports ``flwr``."""

from .base import FederatedSetup
from .splits import class_split, dirichlet_split

METHODS = ("fedavg", "fedgen", "fedftg", "fedd2s")

__all__ = ["METHODS", "FederatedSetup", "class_split", "dirichlet_split"]
