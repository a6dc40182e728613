"""Estimators: unbiased on a quadratic, the forward passes they make, finite differences."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zotune.engine.estimators import one_sided, two_sided
from zotune.engine.space import ParameterSpace
from zotune.optim import build
from zotune.testing import reference_z


def test_two_sided_estimator_is_unbiased_on_a_quadratic():
    torch.manual_seed(0)
    d = 40
    a = torch.randn(d, d)
    hess = a @ a.T / d + torch.eye(d)
    b = torch.randn(d)
    theta = torch.randn(d)
    true_grad = hess @ theta + b
    space = ParameterSpace([theta], threads=1)

    def loss():
        return 0.5 * theta @ hess @ theta + b @ theta

    total = torch.zeros(d)
    n = 1500
    for s in range(n):
        est = two_sided(space, loss, [s], 1e-3)
        space.transition(est.pending, None)
        total += est.grads[0] * reference_z((d,), s, 0)
    cos = torch.nn.functional.cosine_similarity(total / n, true_grad, dim=0)
    assert cos > 0.9


def test_closure_call_counts():
    model = nn.Linear(4, 1)
    x = torch.randn(8, 4)
    calls = []

    def closure():
        calls.append(1)
        return model(x).pow(2).mean()

    for queries, estimator, expected in [
        (1, "two-sided", 2),
        (3, "two-sided", 6),
        (3, "one-sided", 4),
    ]:
        calls.clear()
        opt = build(
            "mezo", model.parameters(), lr=1e-3, eps=1e-3, queries=queries, estimator=estimator
        )
        opt.step(closure)
        assert len(calls) == expected
        assert opt.forward_passes == expected


def test_one_sided_estimator_matches_finite_difference():
    w = torch.tensor([1.0, -2.0, 0.5])
    space = ParameterSpace([w], threads=1)

    def loss():
        return float((w**2).sum())

    est = one_sided(space, loss, [5], 1e-3)
    z = reference_z((3,), 5, 0)
    space.transition(est.pending, None)
    expected = (float(((w + 1e-3 * z) ** 2).sum()) - loss()) / 1e-3
    assert est.grads[0] == pytest.approx(expected, rel=1e-3)
