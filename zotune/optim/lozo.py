"""LOZO and LOZO-M (Chen et al., 2024, arXiv 2410.07698; optsuite/LOZO): ZO-SGD along low-rank
directions z = U·Vᵀ per matrix, V kept for ν steps; LOZO-M keeps its momentum as the m × r
factor. `LowRankZO` is their shell, shared with SubZero (subzero.py)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..engine.directions import LowRank, derive_seed, matrix_shape, outer_
from ..engine.rules import SGD, Coeffs, Rule, Update, estimate
from .base import ZOOptimizer

REFRESH_SALT = 0x52455352  # refresh seeds: derive_seed(run seed, first step of the span, salt)


class LowRankZO(ZOOptimizer):
    """A ZO optimizer whose space draws `LowRank` directions: each matrix's z is L·Rᵀ of rank
    `rank`, its R (and SubZero's L basis) refreshed every `interval` steps, other tensors'
    z element-wise. Step t's seeds are bound to the refresh seed of step t − (t mod interval),
    so step, replay and resume draw the same factors. `square`: factor each matrix as its most
    nearly square m × n (SubZero's choice for PEFT tensors) instead of its own shape."""

    orthonormal: ClassVar[bool] = False  # SubZero's U Z0 Vᵀ rather than LOZO's U Vᵀ
    squeeze: ClassVar[bool] = False  # a matrix once its sizes of 1 are dropped (SubZero)

    def __init__(
        self,
        params: Iterable[Any],
        rule: Rule,
        rank: int,
        interval: int,
        square: bool = False,
        config: dict[str, Any] | None = None,
        **kw: Any,
    ):
        if int(rank) != rank or rank < 1:
            raise ValueError(f"{self.name}: rank must be an integer >= 1, got {rank}")
        if int(interval) != interval or interval < 1:
            raise ValueError(f"{self.name}: interval must be an integer >= 1, got {interval}")
        config = dict(rank=int(rank), interval=int(interval), square=square, **(config or {}))
        super().__init__(params, rule, config=config, **kw)
        self.interval = int(interval)
        shapes = {}
        for k, t in enumerate(self.space.tensors):
            shape = matrix_shape(t, self.squeeze, square)
            if shape is not None:
                shapes[k] = shape
        law = self.config["direction"]
        self.space.direction = LowRank(shapes, int(rank), law, self.orthonormal)

    @property
    def direction(self) -> LowRank:
        return self.space.direction

    def refresh_seed(self, step: int) -> int:
        return derive_seed(self.seed, step - step % self.interval, REFRESH_SALT)

    def step_seeds(self, queries: int | None = None) -> list[int]:
        seeds = super().step_seeds(queries)
        for s in seeds:
            self.direction.bind(s, self.refresh_seed(self.steps))
        self.direction.keep_lefts(seeds)
        return seeds

    def seeds_of(self, record: dict[str, Any]) -> list[int]:
        seeds = super().seeds_of(record)
        for s in seeds:  # (a record's own seeds too)
            self.direction.bind(s, self.refresh_seed(self.steps))
        self.direction.keep_lefts(seeds)
        return seeds


class LOZO(LowRankZO):
    """LOZO, the paper's Algorithm 1 with the released code's scaling.

    Per matrix θ (m × n), step t, k = ⌊t/ν⌋: U_t (m × r) drawn from the step's seed, V_k (n × r)
    from the seed of step kν, both with N(0, 1) entries; z = U_t V_kᵀ (other tensors: dense z):
        g = (L(θ + εz) − L(θ − εz)) / 2ε,   θ ← θ − η(g·z + λθ)
    (the paper writes g·z/r; the released code, whose learning rates the paper reports, has no
    1/r). r = `rank` (2; at most min(m, n)), ν = `interval` (50).

    Cost per step: 2 forward passes, 3 regenerations of z (U, m·r numbers per matrix, drawn
    once a step; each regeneration sums r outer products: 2r − 1 float32 ops per element, in
    the C kernel's pass on the CPU in float32, else torch ops); an attached embedding's rows
    move only where a batch reads them. Memory: V, n·r per matrix, and the step's U, m·r per
    matrix (as the released code), caches rebuilt from their seeds.
    """

    name = "lozo"
    summary: ClassVar[str] = (
        "LOZO: two-sided SPSA along low-rank z = U·Vᵀ per matrix (V kept ν steps), SGD"
    )
    forwards: ClassVar[str] = "2"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-7,
        rank: int = 2,
        interval: int = 50,
        **kw: Any,
    ):
        super().__init__(params, SGD(), rank, interval, lr=lr, **kw)


@dataclass
class FactorMomentum(Rule):
    """LOZO-M's step on a block: matrices θ ← θ − η(N·Vᵀ + λθ), with N (m × r) the momentum
    factor the optimizer updated for this step (in the state as "momentum"); other tensors
    m ← βm + (1 − β)ĝ (m = ĝ on the first step), θ ← θ − η(m + λθ)."""

    beta: float = 0.9
    direction: LowRank | None = None
    name = "factor-momentum"
    buffers = ("momentum",)  # N (m × r) for a matrix, a dense buffer for the other tensors

    def apply(self, block, coeffs: Coeffs, lr, weight_decay, state, step):
        theta, d = block.theta, self.direction
        start, n = block.start, theta.numel()
        if block.key in d.shapes:
            g = d.times_right_(block.buffer("g"), state["momentum"], coeffs[0][0], block.key, start)
        else:
            m = state["momentum"].view(-1)[start : start + n]
            ghat = estimate(block, coeffs)
            if step == 0:
                m.copy_(ghat)
            else:
                m.mul_(self.beta).add_(ghat.mul_(1 - self.beta))
            g = m
        if weight_decay:
            theta.sub_(torch.mul(theta, lr * weight_decay, out=block.buffer("tmp")))
        theta.sub_(torch.mul(g, lr, out=block.buffer("tmp")))


class LOZOM(LowRankZO):
    """LOZO-M: LOZO with momentum kept on the low-rank factor.

    With ĝ's factor G_t = Σ_k c_k U_k (q = 1: g·U_t), per matrix:
        N_t = β N_{t−1} + (1 − β) G_t                     within a span of ν steps
        N_t = β N_{t−1} (V_{k−1}ᵀ V_k / n) + (1 − β) G_t   when V was just resampled
        N_0 = G_0;   θ ← θ − η(N_t V_kᵀ + λθ)
    (the released code's rule, including N_0 without the 1 − β and the projection of the old
    momentum onto the new V; at ν = 1 that code never projects, here every step does). Other
    tensors: m ← βm + (1 − β)g·z, m_0 = g·z; θ ← θ − η(m + λθ). β = `beta` (0.9).

    Cost per step: 2 forward passes, 3 regenerations (the update draws no z for matrices: it
    sums N·Vᵀ; the perturbations move in the C kernel, the update on the torch path, its rule
    having no kernel form). Memory: N, m·r per matrix, plus V (n·r per matrix) and dense momentum for the
    tensors that are not matrices (biases, norms). The projection's r × r product V_{k−1}ᵀV_k
    is a float64 matmul (the same bits on one device; across devices, to float64 rounding).
    """

    name = "lozo-m"
    summary: ClassVar[str] = (
        "LOZO-M: LOZO with momentum kept on the m×r factor, not the full matrix"
    )
    forwards: ClassVar[str] = "2"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-7,
        rank: int = 2,
        interval: int = 50,
        beta: float = 0.9,
        **kw: Any,
    ):
        if not 0 <= beta < 1:
            raise ValueError(f"lozo-m: beta must be in [0, 1), got {beta}")
        rule = FactorMomentum(beta)
        super().__init__(params, rule, rank, interval, lr=lr, config=dict(beta=beta), **kw)
        rule.direction = self.direction

    def update_for(self, coeffs: list[tuple[int, float]], record: dict[str, Any]) -> Update | None:
        """Update each matrix's N for this step (once, before the pass), then the pass."""
        if not coeffs:
            return None
        d, t, beta = self.direction, self.steps, self.rule.beta
        resampled = t > 0 and t % self.interval == 0
        for k, p in enumerate(self.space.tensors):
            state = self.state[p]
            if k not in d.shapes:
                if "momentum" not in state:
                    state["momentum"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                continue
            factor = self._gradient_factor(coeffs, k, p.device)
            old = state.get("momentum")
            if t == 0 or old is None:
                state["momentum"] = factor
                continue
            if resampled:  # project N onto the new V: N (V_oldᵀ V_new / n)
                v_old = d.right(self.refresh_seed(t - 1), k, p.device)
                v_new = d.right(self.refresh_seed(t), k, p.device)
                proj = (v_old.double().T @ v_new.double()).div_(v_old.shape[0]).float()
                old = outer_(torch.empty_like(old).view(-1), old, proj, 0,
                             torch.empty(old.numel(), device=p.device)).view_as(old)  # fmt: skip
            state["momentum"] = old.mul_(beta).add_(factor.mul_(1 - beta))
        return Update(
            rule=self.rule,
            coeffs=tuple(coeffs),
            step=t,
            lr=tuple(record["lr"]),
            weight_decay=tuple(record["wd"]),
            group_of=self._group_of,
            states=[self.state[p] for p in self.space.tensors],
        )

    def _gradient_factor(self, coeffs, key: int, device: torch.device) -> torch.Tensor:
        """G = Σ_k c_k U_k (m × r), summed in order."""
        total = None
        for seed, c in coeffs:
            u = self.direction.factors(seed, key, device)[0].mul_(c)
            total = u if total is None else total.add_(u)
        return total
