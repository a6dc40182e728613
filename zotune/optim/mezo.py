"""MeZO (Malladi et al., 2023, arXiv 2305.17333): in-place ZO-SGD with the random-seed trick."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from ..engine.rules import SGD
from .base import ZOOptimizer


class MeZO(ZOOptimizer):
    """MeZO, the paper's Algorithm 1 (also registered as `zo-sgd`).

    Update rule, per step t with seed s_t (two-sided, q = 1):
        g = (L(θ + εz) - L(θ - εz)) / 2ε,   z ~ N(0, I) drawn from s_t
        θ ← θ - η_t (g·z + λθ)               (λ only on groups that set weight_decay)
    With q queries, g·z is replaced by the mean of g_k·z_k over q seeds.

    Cost per step: 2 forward passes (2q; one-sided: q + 1) and 3 regenerations of z (the
    restore of θ - εz is fused into the update: θ ← θ + (ε - ηg)·z in one pass; the official
    code regenerates 4 times). Memory: the weights plus one block of z per thread; no state.
    """

    name = "mezo"
    summary: ClassVar[str] = "MeZO: two-sided SPSA and SGD, in place from a seed (= zo-sgd)"
    forwards: ClassVar[str] = "2"

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, **kwargs: Any):
        super().__init__(params, SGD(), lr=lr, eps=eps, **kwargs)
