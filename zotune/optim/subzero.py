"""SubZero (Yu et al., 2024, arXiv 2410.08989; zimingyy/SubZero): ZO-SGD along layer-wise
low-rank perturbations in random orthonormal subspaces."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from ..engine.rules import SGD, Momentum
from .lozo import LowRankZO


class SubZero(LowRankZO):
    """SubZero, the released code's `subzero_sgd`.

    Per matrix θ (m × n): U (m × r) and V (n × r) orthonormal (QR of Gaussian draws), redrawn
    every F steps; each step a fresh r × r Gaussian core Z0 (other tensors: dense z):
        z = U Z0 Vᵀ · √(mn)/r   (so E‖z‖² = mn, as a dense z's)
        g = (L(θ + εz) − L(θ − εz)) / 2ε,   θ ← θ − η(g·z + λθ)
    r = `rank` (8; at most min(m, n)), F = `interval` (2000). `momentum` > 0: heavy-ball
    momentum on g·z as torch.optim.SGD (the released code's option, default 0), a dense buffer.
    `square=true`: factor each matrix as its most nearly square shape, as the released code
    does for LoRA, prefix and prompt tuning.

    Cost per step: 2 forward passes, 3 regenerations of z (Z0, r² numbers per matrix, and
    L = U·Z0·√(mn)/r, m·r² ops, formed once a step; each regeneration sums r outer products:
    2r − 1 float32 ops per element, in the C kernel's pass on the CPU in float32, else torch
    ops); an attached embedding's rows move only where a batch reads them. Memory: U and V, (m + n)·r per matrix (as the released code), and the
    step's L, m·r per matrix, caches rebuilt from their seeds; QR runs in float64 on the CPU
    every F steps, so the factors are the same on any device up to LAPACK's float64 rounding.
    """

    name = "subzero"
    summary: ClassVar[str] = (
        "SubZero: low-rank z in per-layer random orthonormal subspaces (refreshed every F steps)"
    )
    forwards: ClassVar[str] = "2"
    orthonormal = True
    squeeze = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        rank: int = 8,
        interval: int = 2000,
        momentum: float = 0.0,
        **kw: Any,
    ):
        if not 0 <= momentum < 1:
            raise ValueError(f"subzero: momentum must be in [0, 1), got {momentum}")
        rule = Momentum(momentum) if momentum else SGD()
        config = dict(momentum=momentum)
        super().__init__(params, rule, rank, interval, lr=lr, config=config, **kw)
