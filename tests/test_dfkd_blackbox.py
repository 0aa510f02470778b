"""Black-box teachers: only probabilities or labels come out, every image is counted, the budget holds; the
zero-order gradient against autograd's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gendistill.dfkd.blackbox import BlackBoxTeacher, QueryBudgetExceeded, zero_order_grad
from gendistill.errors import UsageError


def _linear_teacher(d=12, k=4):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, k))


def test_the_wrapper_answers_probabilities_or_labels_and_counts_queries():
    model = _linear_teacher()
    x = torch.randn(5, 1, 3, 4)
    bb = BlackBoxTeacher(model, budget=12)
    probs = bb(x)
    torch.testing.assert_close(probs, F.softmax(model(x), 1))
    assert not probs.requires_grad and bb.queries == 5
    labels = BlackBoxTeacher(model, output="labels")(x)
    assert torch.equal(labels, model(x).argmax(1))
    bb(x)
    with pytest.raises(QueryBudgetExceeded, match="budget of 12 images exhausted \\(10 used, 5 more asked\\)"):
        bb(x)
    assert bb.queries == 10  # a refused query is not counted
    with pytest.raises(UsageError, match="valid: probs, labels"):
        BlackBoxTeacher(model, output="logits")


def test_the_zero_order_gradient_follows_the_true_one():
    model = _linear_teacher()
    x = torch.randn(3, 1, 3, 4)
    y = torch.tensor([0, 1, 2])
    bb = BlackBoxTeacher(model)

    def loss(images):  # per-image cross-entropy from probabilities only
        probs = bb(images)
        return -torch.log(probs.gather(1, y.repeat(images.shape[0] // 3).unsqueeze(1)).squeeze(1))

    xg = x.clone().requires_grad_()
    (true,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    g = zero_order_grad(loss, x, directions=2000, sigma=1e-3, generator=torch.Generator().manual_seed(0))
    cos = F.cosine_similarity(g.flatten(1), true.flatten(1))
    assert (cos > 0.95).all(), cos  # d = 12: many directions per dimension, nearly exact
    assert bb.queries == 2 * 2000 * 3
    few = zero_order_grad(loss, x, directions=4, generator=torch.Generator().manual_seed(0))
    assert F.cosine_similarity(few.flatten(1), true.flatten(1)).mean() < cos.mean()
    with pytest.raises(UsageError, match="directions must be >= 1"):
        zero_order_grad(loss, x, directions=0)
