"""FZOO (Dang et al., 2025, arXiv 2506.09034; official code DKmiyan/FZOO): one-sided estimates
along N Rademacher directions that share L(θ), the step normalised by the spread of the N losses."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any, ClassVar

from ..engine.estimators import Closure, Estimate, one_sided
from ..engine.rules import SGD
from .base import ZOOptimizer


def normalized_by_spread(est: Estimate) -> Estimate:
    """g_k = (L(θ + εu_k) − L(θ)) / σ, σ the population standard deviation of the N perturbed
    losses (FZOO); 0 when σ is 0 (the losses carry no direction)."""
    base, perturbed = est.losses[0], est.losses[1:]
    sigma = statistics.pstdev(perturbed) if len(perturbed) > 1 else 0.0
    est.grads = [(loss - base) / sigma if sigma > 0 else 0.0 for loss in perturbed]
    return est


class FZOO(ZOOptimizer):
    """FZOO, the paper's update (the official code's `zo_step` / `zo_update`):

        L_k = L(θ + εu_k), k = 1..N (u_k Rademacher), L_0 = L(θ), σ = std(L_1..L_N),
        θ ← θ − η/(N·σ) · Σ_k (L_k − L_0)·u_k   (− ηλθ with weight decay).

    σ ~ ε·|∇L| makes the step scale-free in ε and larger where the loss is flat (normalised
    SGD). `queries` is N (8, the official scripts' default); the records keep (L_k − L_0)/σ.

    Cost per step: N + 1 forward passes (the paper batches the N queries into one batched
    forward on a GPU; zotune runs them one after another), 2N − 1 regenerations of u in the
    estimate plus N in the update pass, which also restores θ (3N − 1 in all). Every pass runs
    in the C kernel, the N-term update included. Memory: the weights only.
    """

    name = "fzoo"
    summary: ClassVar[str] = "N one-sided Rademacher queries sharing L(θ), step / std of the losses"
    forwards: ClassVar[str] = "N+1 (queries=8: 9)"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-5,
        eps: float = 1e-3,
        queries: int = 8,
        direction: str = "rademacher",
        **kw: Any,
    ):
        if int(queries) != queries or queries < 2:
            raise ValueError(f"fzoo needs queries >= 2 (a spread of losses), got {queries}")
        if kw.get("estimator", "one-sided") != "one-sided":
            raise ValueError("fzoo's estimator is one-sided")
        kw.pop("estimator", None)
        super().__init__(
            params, SGD(), lr=lr, eps=eps, queries=queries, direction=direction,
            estimator="one-sided", **kw,
        )  # fmt: skip

    def estimate(self, closure: Closure, seeds: list[int]) -> Estimate:
        return normalized_by_spread(one_sided(self.space, closure, seeds, self.eps))
