"""Black-box teachers: a classifier that can only be queried (an API), and zero-order gradients through it.

:class:`BlackBoxTeacher` wraps any classifier so that the only thing it gives is the output of ``query``:
probabilities (``output="probs"``) or only the top-1 labels (``output="labels"``), computed without gradients,
never its weights, features or BatchNorm statistics. Every image queried is counted; past ``budget`` queries it
raises :class:`QueryBudgetExceeded` (before running the query).

:func:`zero_order_grad` estimates the gradient of a scalar loss of the teacher's answers with respect to the input
images from queries alone: the antithetic Gaussian estimator

    g(x) = 1 / (2 sigma q) * sum_{i=1..q} [L(T(x + sigma u_i)) - L(T(x - sigma u_i))] u_i,   u_i ~ N(0, I)

per image (the loss must be a sum of per-image terms, so each image's estimate uses only its own queries), at a
cost of ``2 q`` queries per image. Its cosine similarity with the true gradient grows with q relative to the
number of pixels d (for a locally linear loss, about ``sqrt(q / (q + d))``); ``directions`` trades queries for
accuracy (``benchmarks/blackbox_zo.py`` measures it on MNIST teachers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError

BLACKBOX_OUTPUTS = ("probs", "labels")


class QueryBudgetExceeded(RuntimeError):
    """A black-box teacher was asked for more images than its budget allows."""


class BlackBoxTeacher:
    """Query-only access to ``model`` (module docstring). ``queries`` counts the images answered so far."""

    def __init__(self, model: nn.Module, *, output: str = "probs", budget: int | None = None):
        if output not in BLACKBOX_OUTPUTS:
            raise UsageError(f"black-box output {output!r} is not valid; valid: {', '.join(BLACKBOX_OUTPUTS)}")
        if budget is not None and budget < 1:
            raise UsageError(f"query budget must be >= 1 or None (unlimited), got {budget}")
        self._model = model.eval()
        self.output, self.budget, self.queries = output, budget, 0
        self.num_classes = getattr(getattr(model, "config", None), "num_classes", None)

    @torch.no_grad()
    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Probabilities (B, K) or labels (B,) for images (B, C, H, W); counts B queries."""
        n = images.shape[0]
        if self.budget is not None and self.queries + n > self.budget:
            raise QueryBudgetExceeded(
                f"query budget of {self.budget} images exhausted ({self.queries} used, {n} more asked)"
            )
        self.queries += n
        logits = self._model(images)
        if self.output == "labels":
            return logits.argmax(dim=1)
        return F.softmax(logits.float(), dim=1)

    __call__ = query


def zero_order_grad(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    directions: int,
    sigma: float = 1e-3,
    generator: torch.Generator | None = None,
    chunk: int = 64,
    resolution: int | None = None,
) -> torch.Tensor:
    """The antithetic zero-order estimate of ``d sum_b loss_fn(x)[b] / dx`` (module docstring).

    ``loss_fn`` maps images (N, C, H, W) to per-image losses (N,) using only queries of a black-box teacher.
    ``directions``: q, the random directions per image (2 q queries per image); ``sigma``: the step along each;
    ``chunk``: directions evaluated per call of ``loss_fn``; ``resolution`` r: directions drawn at r x r per channel
    and upsampled bilinearly to the image size (a low-frequency subspace of dimension C r^2: the estimate is then of
    the gradient's component in that subspace, with a cosine to it that grows with q / (C r^2) instead of
    q / (C H W); None: directions at full resolution)."""
    if directions < 1:
        raise UsageError(f"directions must be >= 1, got {directions}")
    if sigma <= 0:
        raise UsageError(f"sigma must be > 0, got {sigma}")
    if resolution is not None and not (x.dim() == 4 and 1 <= resolution <= min(x.shape[-2:])):
        raise UsageError(
            f"resolution must be between 1 and the image size {tuple(x.shape[-2:])} (images (B, C, H, W)), "
            f"got {resolution}"
        )
    b = x.shape[0]
    grad = torch.zeros_like(x)
    x = x.detach()
    done = 0
    while done < directions:
        k = min(chunk, directions - done)
        if resolution is None or resolution == x.shape[-1] == x.shape[-2]:
            u = torch.randn((k, *x.shape), generator=generator, device=x.device)
        else:
            u = torch.randn((k * b, x.shape[1], resolution, resolution), generator=generator, device=x.device)
            u = F.interpolate(u, size=x.shape[-2:], mode="bilinear", align_corners=False).reshape(k, *x.shape)
        plus = loss_fn((x.unsqueeze(0) + sigma * u).flatten(0, 1)).reshape(k, b)
        minus = loss_fn((x.unsqueeze(0) - sigma * u).flatten(0, 1)).reshape(k, b)
        grad += ((plus - minus).reshape(k, b, *[1] * (x.dim() - 1)) * u).sum(0)
        done += k
    return grad / (2 * sigma * directions)
