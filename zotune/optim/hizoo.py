"""HiZOO (Zhao et al., 2024, arXiv 2402.15173, ICLR 2025; official code Yanjun-Zhao/HiZOO):
MeZO with a diagonal Hessian estimate from a third forward pass, used to shape z."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from ..engine.estimators import Closure, evaluate, two_sided
from ..engine.moves import KernelTerms
from ..engine.native import UpdateMode
from ..engine.rules import Rule, Update, _decay, _view
from .base import ZOOptimizer


@dataclass(frozen=True)
class HessianInformed(Rule):
    """HiZOO's step for one coefficient (seed, g), with the step's curvature scalar
    c = |L+ + L− − 2L0| / 2ε² and smoothing α:
        H ← (1 − α)·H + α·c·H ⊙ z²,   θ ← θ − η(g·z/√H + λθ)   (H after its update),
    z unscaled (the space scales its offsets by 1/√H), √H correctly rounded. The C kernel's
    HESSIAN mode repeats it operation for operation."""

    smooth: float = 1e-8
    curvature: float = 0.0
    name = "hessian-informed"
    buffers = ("hessian",)

    def kernel(self, c, lr, state, step):
        consts = (1 - self.smooth, self.smooth * self.curvature)
        return KernelTerms(UpdateMode.HESSIAN, c, state["hessian"], None, consts)

    def apply(self, block, coeffs, lr, weight_decay, state, step):
        ((seed, g),) = coeffs
        z = block.raw_z(seed)
        h = _view(state, "hessian", block)
        estimate = (
            torch.mul(z, z, out=block.buffer("tmp")).mul_(h).mul_(self.smooth * self.curvature)
        )
        h.mul_(1 - self.smooth).add_(estimate)
        root = h.double().sqrt_().float()  # (correctly rounded, as the kernel's)
        step_ = torch.div(z, root, out=block.buffer("g")).mul_(g)
        _decay(block, lr, weight_decay)
        block.theta.sub_(step_.mul_(lr))


class HiZOO(ZOOptimizer):
    """HiZOO, the official code's `zo_Hessian_step_update` (z ~ N(0, I), H = diag Hessian
    estimate, ones at the start):

        L0 = L(θ),  L± = L(θ ± ε·z/√H),  g = (L+ − L−)/2ε,
        H ← (1 − α)·H + α·|L+ + L− − 2L0|/(2ε²)·H ⊙ z²,
        θ ← θ − η(g·z/√H + λθ)       (the updated H; λ coupled, as the official code)

    `smooth` is α (the official `hessian_smooth_type` constant: 1e-8 in its README's example;
    α = 0 is MeZO exactly). The records keep g and the curvature scalar, so a replay rebuilds H.

    Cost per step: 3 forward passes, 3 regenerations of z in 3 passes over the weights (the
    last restores θ and updates H and θ), each also reading H (and the last writing it). Memory:
    one float32 buffer the size of each trained tensor (H: 1 × d, "the diagonal state"). The C
    kernel reads H in place and scales z by 1/√H per element (`zt_unit.hess`, the HESSIAN
    update mode), bit for bit as the torch path; embedding rows are not attached (their path
    has no H). Masks are not supported.
    """

    name = "hizoo"
    summary: ClassVar[str] = "MeZO with z shaped by a diagonal Hessian estimate from a 3rd forward"
    forwards: ClassVar[str] = "3"

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, smooth: float = 1e-8, **kw: Any):
        if not (math.isfinite(smooth) and 0 <= smooth < 1):
            raise ValueError(f"smooth must be in [0, 1), got {smooth}")
        if kw.get("queries", 1) != 1 or kw.get("estimator", "two-sided") != "two-sided":
            raise ValueError("hizoo uses one two-sided query per step")
        if kw.get("mask", "none") != "none":
            raise ValueError("hizoo takes no mask")
        rule = HessianInformed(smooth)
        super().__init__(params, rule, lr=lr, config=dict(smooth=smooth), **kw)
        for p in self.space.tensors:  # H starts at ones (the official code's)
            self.state[p] = {"hessian": torch.ones(p.shape, dtype=torch.float32, device=p.device)}
        self.space.z_scale = self._hessian

    def _hessian(self, index: int) -> torch.Tensor:
        """H of the space's tensor `index` (z is scaled by 1/√H): looked up at each use, as a
        loaded state dict replaces the buffers."""
        return self.state[self.space.tensors[index]]["hessian"]

    @torch.no_grad()
    def step(self, closure: Closure) -> float:  # type: ignore[override]
        if closure is None:
            raise ValueError("zeroth-order optimizers need a closure that returns the loss")
        self.begin_step()
        base = evaluate(closure)
        est = two_sided(self.space, closure, self.step_seeds(), self.eps)
        plus, minus = est.losses
        record = {
            "grads": est.grads,
            "curvature": abs(plus + minus - 2 * base) / (2 * self.eps**2),
            "lr": [g["lr"] for g in self.param_groups],
            "wd": [g["weight_decay"] for g in self.param_groups],
        }
        self.apply(record, est.pending)
        self.forward_passes += est.forward_passes + 1
        return (base + plus + minus) / 3

    def update_for(self, coeffs: list[tuple[int, float]], record: dict[str, Any]) -> Update | None:
        self.rule = replace(self.rule, curvature=record["curvature"])
        return super().update_for(coeffs, record)
