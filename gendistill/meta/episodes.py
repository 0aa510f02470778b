"""Few-shot episodes and the adaptation that meta-learning trains for and is judged by.

An N-way K-shot episode draws N classes, K support and Q query images of each, and relabels the drawn classes
0..N-1 in the order drawn. :func:`adapt` fine-tunes a copy of a model's weights on the support images with plain
gradient steps (MAML's inner loop, Finn et al. 2017), functionally (``torch.func.functional_call``), so the meta
gradient can flow through it (``create_graph=True``) or not (the first-order variant, and every evaluation).
:func:`meta_test` is the protocol every meta-learner of this package is judged by: the same seeded episodes for
every model, each adapted from the model's weights and scored on its query images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..errors import UsageError


def adapt(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int,
    lr: float,
    create_graph: bool,
) -> dict[str, torch.Tensor]:
    """``steps`` gradient steps of ``F.cross_entropy`` on (``images``, ``targets``) from weights ``params`` (a dict
    of the model's named parameters, e.g. ``dict(model.named_parameters())``): the adapted weights, as a new dict
    (``params`` is not modified). ``targets``: class indices (B,) or probabilities (B, K), which torch's
    cross-entropy takes as they are (then the KD loss, up to the targets' entropy). ``create_graph``: keep the graph
    of the steps, so a loss of the adapted weights differentiates back to ``params`` through them (second order)."""
    names = list(params)
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, params, (images,)), targets)
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)
        params = {n: params[n] - lr * g for n, g in zip(names, grads)}
    return params


def draw_episode(
    class_images: list[torch.Tensor], *, ways: int, shots: int, queries: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One episode from ``class_images`` (one tensor (M_c, C, H, W) per class): support images (N K, ...), their
    labels (N K,), query images (N Q, ...) and labels (N Q,), labels 0..N-1 in the order the classes were drawn."""
    chosen = torch.randperm(len(class_images), generator=generator)[:ways].tolist()
    support, query = [], []
    for images in (class_images[c] for c in chosen):
        index = torch.randperm(len(images), generator=generator)[: shots + queries]
        support.append(images[index[:shots]])
        query.append(images[index[shots:]])
    labels = torch.arange(ways)
    return torch.cat(support), labels.repeat_interleave(shots), torch.cat(query), labels.repeat_interleave(queries)


def check_episode_sets(class_images: list[torch.Tensor], *, ways: int, shots: int, queries: int) -> None:
    if ways < 2 or shots < 1 or queries < 1:
        raise UsageError(f"episodes need ways >= 2, shots >= 1 and queries >= 1, got {ways}, {shots}, {queries}")
    if len(class_images) < ways:
        raise UsageError(
            f"{ways}-way episodes need at least {ways} classes, the meta-test data has {len(class_images)}"
        )
    small = [i for i, images in enumerate(class_images) if len(images) < shots + queries]
    if small:
        raise UsageError(
            f"meta-test classes {small} have fewer than shots + queries = {shots + queries} images; "
            "lower --test-queries or give more images"
        )


def meta_test(
    model: nn.Module,
    class_images: list[torch.Tensor],
    *,
    ways: int,
    shots: int,
    queries: int,
    episodes: int,
    steps: int,
    lr: float,
    seed: int = 0,
) -> dict[str, float]:
    """Mean query accuracy over ``episodes`` seeded N-way K-shot episodes of ``class_images`` (unseen classes), each
    adapted from ``model``'s weights by ``steps`` gradient steps of ``lr`` on its support images; with the half-width
    of the normal 95% interval of that mean. The same ``seed`` gives every model the same episodes."""
    check_episode_sets(class_images, ways=ways, shots=shots, queries=queries)
    generator = torch.Generator().manual_seed(seed)
    base = {n: p.detach() for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    scores = []
    for _ in range(episodes):
        sx, sy, qx, qy = draw_episode(class_images, ways=ways, shots=shots, queries=queries, generator=generator)
        params = {n: p.clone().requires_grad_() for n, p in base.items()}
        with torch.enable_grad():
            params = adapt(model, params, sx, sy, steps=steps, lr=lr, create_graph=False)
        with torch.no_grad():
            scores.append((functional_call(model, params, (qx,)).argmax(1) == qy).float().mean().item())
    model.train(was_training)
    mean = sum(scores) / len(scores)
    spread = math.sqrt(sum((s - mean) ** 2 for s in scores) / max(1, len(scores) - 1))
    return {"accuracy": mean, "ci95": 1.96 * spread / math.sqrt(len(scores)), "episodes": float(len(scores))}
