"""Data-free meta-learning from black-box classifiers: BiDf-MKD (``bidf_mkd``), its zero-order data recovery
(``recovery``) and the few-shot episodes it is trained for and judged by (``episodes``)."""

from .bidf_mkd import METHODS, MetaConfig, MetaDistillTask
from .episodes import adapt, meta_test
from .recovery import Recovery, RecoveryConfig

__all__ = [
    "METHODS",
    "MetaConfig",
    "MetaDistillTask",
    "Recovery",
    "RecoveryConfig",
    "adapt",
    "meta_test",
]
