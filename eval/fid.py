"""FID and KID from streamed features, and cached reference statistics.

Feature statistics are accumulated in float64 (sum and sum of outer products), so the covariance does not depend on
the batch size; the Frechet distance and the unbiased KID estimator are torch-fidelity's (``fid_statistics_to_metric``,
``kid_features_to_metric``), wrapped with input checks. Reference statistics are ``.npz`` files holding ``mu``,
``sigma``, ``count``, the feature extractor's ``extractor`` name and ``resize`` mode, and optionally the ``features``
themselves (needed for KID), read with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gendistill.errors import UsageError
from gendistill.files import open_npz

KID_SUBSETS = 100  # torch-fidelity's and the KID paper's defaults
KID_SUBSET_SIZE = 1000


@dataclass
class FeatureStats:
    """Gaussian fit of features: ``mu`` (D,), ``sigma`` (D, D) float64, from ``count`` samples."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    extractor: str  # the feature extractor's name (features of different extractors are never compared)
    resize: str  # how images reached the extractor's input size
    features: np.ndarray | None = None  # (count, D) float32, kept for KID when asked

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (``.npz``) through a temporary file."""
        path = Path(path)
        if path.suffix != ".npz":
            raise UsageError(f"statistics files end in .npz, got {str(path)!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, **{name: np.asarray(value) for name, value in vars(self).items() if value is not None})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read a statistics file; a missing, truncated or foreign file is one error naming it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"statistics file {str(path)!r} does not exist")
        with open_npz(path, what="statistics file") as data:
            missing = {"mu", "sigma", "count", "extractor", "resize"} - set(data.files)
            if missing:
                raise UsageError(f"{path} lacks {', '.join(sorted(missing))}; expected a gendistill statistics file")
            features = data["features"] if "features" in data.files else None
            return cls(
                mu=data["mu"].astype(np.float64),
                sigma=data["sigma"].astype(np.float64),
                count=int(data["count"]),
                extractor=str(data["extractor"]),
                resize=str(data["resize"]),
                features=features,
            )


class StatsAccumulator:
    """Running float64 sums of features (B, D); ``keep_features`` also keeps them (float32, CPU) for KID."""

    def __init__(self, *, keep_features: bool = False):
        self.count = 0
        self.total: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None
        self.kept: list[torch.Tensor] | None = [] if keep_features else None

    def update(self, features: torch.Tensor) -> None:
        if features.dim() != 2:
            raise UsageError(f"features must be (B, D), got shape {tuple(features.shape)}")
        f = features.detach().to(torch.float64)
        if self.total is None:
            self.total = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        elif f.shape[1] != self.total.shape[0]:
            raise UsageError(f"features of dimension {f.shape[1]} after {self.total.shape[0]}-d ones")
        self.total += f.sum(0)
        self.outer += f.T @ f
        self.count += f.shape[0]
        if self.kept is not None:
            self.kept.append(features.detach().float().cpu())

    def stats(self, *, extractor: str, resize: str) -> FeatureStats:
        if self.count < 2:
            raise UsageError(f"statistics need at least 2 samples, got {self.count}")
        mu = self.total / self.count
        sigma = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        features = torch.cat(self.kept).numpy() if self.kept is not None else None
        return FeatureStats(mu.cpu().numpy(), sigma.cpu().numpy(), self.count, extractor, resize, features)


@torch.no_grad()
def compute_stats(
    batches: Iterable[torch.Tensor],
    extractor: nn.Module,
    *,
    device: torch.device | str = "cpu",
    keep_features: bool = False,
    on_batch=None,
) -> FeatureStats:
    """Statistics of ``extractor`` features of image batches (B, C, H, W) in [0, 1]; ``on_batch(images)`` sees each
    batch (e.g. to keep a sample grid)."""
    acc = StatsAccumulator(keep_features=keep_features)
    for images in batches:
        if on_batch is not None:
            on_batch(images)
        acc.update(extractor(images.to(device)))
    return acc.stats(extractor=extractor.name, resize=extractor.resize)


def _check_comparable(a: FeatureStats, b: FeatureStats) -> None:
    if a.extractor != b.extractor:
        raise UsageError(f"statistics come from different feature extractors: {a.extractor!r} vs {b.extractor!r}")
    if a.mu.shape != b.mu.shape:
        raise UsageError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` (torch-fidelity's computation, float64)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    _check_comparable(a, b)
    stat = [{"mu": s.mu.astype(np.float64), "sigma": s.sigma.astype(np.float64)} for s in (a, b)]
    return float(fid_statistics_to_metric(stat[0], stat[1], verbose=False)[KEY_METRIC_FID])


def kernel_inception_distance(
    a: FeatureStats, b: FeatureStats, *, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE, seed: int = 0
) -> dict[str, float]:
    """Unbiased MMD^2 with the cubic polynomial kernel ``(x.y / D + 1)^3``, mean and std over ``subsets`` random
    subsets of ``min(subset_size, count_a, count_b)`` samples of each side (torch-fidelity's estimator)."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    _check_comparable(a, b)
    for side in (a, b):
        if side.features is None:
            raise UsageError("KID needs the features themselves; statistics saved without features cannot give KID")
    size = min(subset_size, a.count, b.count)
    if size < 2:
        raise UsageError(f"KID needs at least 2 samples on each side, got {a.count} and {b.count}")
    out = kid_features_to_metric(
        torch.from_numpy(np.asarray(a.features, dtype=np.float64)),
        torch.from_numpy(np.asarray(b.features, dtype=np.float64)),
        kid_subsets=subsets,
        kid_subset_size=size,
        rng_seed=seed,
        verbose=False,
    )
    return {"mean": out[KEY_METRIC_KID_MEAN], "std": out[KEY_METRIC_KID_STD], "subset_size": size, "subsets": subsets}
