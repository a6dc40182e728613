"""ZO-Bench's optimizers (Zhang et al., 2024, arXiv 2402.11592), each a composition of the
engine: the estimator is MeZO's (two-sided SPSA unless set otherwise), only the rule changes.

Costs per step with q = 1 (d = number of trainable numbers):

| method       | forward passes | z regenerations | extra memory     |
|--------------|----------------|-----------------|------------------|
| zo-sgd-mmt   | 2              | 3               | 1 × d (momentum) |
| zo-sgd-sign  | 2              | 3               | none             |
| zo-adam      | 2              | 3               | 2 × d (moments)  |
| zo-sgd-cons  | 5              | 5               | none             |
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..engine.estimators import Closure, evaluate
from ..engine.rules import SGD, Adam, Momentum, Sign
from ..engine.space import Offset
from .base import ZOOptimizer


class ZOSGDMomentum(ZOOptimizer):
    """ZO-SGD with heavy-ball momentum (as torch.optim.SGD(momentum=β)).

    m ← β·m + ĝ;  θ ← θ − η(m + λθ),  ĝ = g·z from two-sided SPSA.
    """

    name = "zo-sgd-mmt"

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, momentum: float = 0.9, **kw: Any):
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, Momentum(momentum), lr=lr, config=dict(momentum=momentum), **kw)


class ZOSGDSign(ZOOptimizer):
    """ZO-SGD-Sign: θ ← θ − η(sign(ĝ) + λθ), the element-wise sign of the estimate (the paper).

    `official=True` uses the official code's sign(g)·z instead (a ±z step).
    """

    name = "zo-sgd-sign"

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, official: bool = False, **kw: Any):
        super().__init__(params, Sign(official), lr=lr, config=dict(official=official), **kw)


class ZOAdam(ZOOptimizer):
    """ZO-Adam: Adam's bias-corrected moments of ĝ; θ ← θ − η(m̂/(√v̂ + δ) + λθ)."""

    name = "zo-adam"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        delta: float = 1e-8,
        **kw: Any,
    ):
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1) or delta <= 0:
            raise ValueError(f"betas must be in [0, 1) and delta > 0, got {betas}, {delta}")
        config = dict(betas=[b1, b2], delta=delta)
        super().__init__(params, Adam(b1, b2, delta), lr=lr, config=config, **kw)


class ZOSGDConservative(ZOOptimizer):
    """ZO-SGD-Cons: take the SGD step only if it helps.

    With u = η·g·z from two-sided SPSA, evaluate L(θ), L(θ − u), L(θ + u) on the same batch and
    keep the best of the three points (plain SGD moves, not the official code's AdamW fallback,
    so "undo" is exact). Costs 5 forward passes and 5 regenerations of z a step; no memory.
    """

    name = "zo-sgd-cons"

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, **kw: Any):
        if kw.get("weight_decay"):
            raise ValueError("zo-sgd-cons compares plain steps: use weight_decay=0")
        if kw.get("queries", 1) != 1:
            raise ValueError("zo-sgd-cons uses one query per step")
        super().__init__(params, SGD(), lr=lr, **kw)

    @torch.no_grad()
    def step(self, closure: Closure) -> float:  # type: ignore[override]
        if closure is None:
            raise ValueError("zeroth-order optimizers need a closure that returns the loss")
        self.begin_step()
        base = evaluate(closure)
        if len({grp["lr"] for grp in self.param_groups}) > 1:  # (before any move of the weights)
            raise ValueError("zo-sgd-cons needs one learning rate for all groups")
        lr = self.param_groups[0]["lr"]
        est = self.estimate(closure, self.step_seeds())
        seed, g = est.seeds[0], est.grads[0]
        current = est.pending
        try:
            losses = {0.0: base}
            for c in (g, -g):  # θ - η·c·z
                target = Offset(seed, -lr * c)
                self.space.transition(current, target)
                current = target
                losses[c] = evaluate(closure)
        except BaseException:
            self.space.transition(current, None)
            raise
        best = min(losses, key=losses.get)
        record = {
            "grads": [best],
            "lr": [lr] * len(self.param_groups),
            "wd": [0.0] * len(self.param_groups),
        }
        self.apply(record, current)
        self.forward_passes += est.forward_passes + 3
        return losses[best]
