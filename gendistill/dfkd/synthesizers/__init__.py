"""DFKD synthesizers, one file per method. ``METHODS`` maps each method's name to its class."""

from __future__ import annotations

from ...errors import UsageError
from .base import GeneratorSynthesizer, PoolSynthesizer, Synthesizer, SynthesizerConfig
from .cae import CAE
from .cmi import CMI
from .dafl import DAFL
from .deepinversion import DeepInversion
from .dfad import DFAD
from .dfme import DFME
from .dfq import DFQ
from .fast import Fast
from .kd3 import KD3
from .mixmix import MixMix
from .nayer import NAYER
from .unlabeled import Unlabeled
from .zskt import ZSKT

METHODS: dict[str, type[Synthesizer]] = {
    cls.name: cls
    for cls in (DAFL, DFAD, DFME, ZSKT, DFQ, DeepInversion, MixMix, CMI, Fast, NAYER, CAE, Unlabeled, KD3)
}


def get_method(name: str) -> type[Synthesizer]:
    """The synthesizer class of method ``name``; ``ValueError`` listing the valid names otherwise."""
    if name not in METHODS:
        raise UsageError(f"unknown DFKD method {name!r}; valid: {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = ["METHODS", "GeneratorSynthesizer", "PoolSynthesizer", "Synthesizer", "SynthesizerConfig", "get_method"]
