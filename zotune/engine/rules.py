"""Update rules: what a step does with the gradient estimate ĝ = Σ_k c_k·z_k.

A rule works one block at a time (see `directions.Block`): it reads θ0 and regenerates the z_k it
needs, and rewrites θ0 in place. Rules with state keep dense float32 buffers per parameter in
the optimizer's `state` (torch.optim convention), so their memory is stated per rule.

| rule     | update                                                    | extra memory |
|----------|-----------------------------------------------------------|--------------|
| sgd      | θ ← θ - η(ĝ + λθ)                                         | none         |
| momentum | m ← βm + ĝ;  θ ← θ - η(m + λθ)                            | 1 × params   |
| sign     | θ ← θ - η(sign(ĝ) + λθ)                                   | none         |
| adam     | m, v ← EMAs of ĝ, ĝ²;  θ ← θ - η(m̂/(√v̂ + δ) + λθ)        | 2 × params   |
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .directions import Block
from .native import UpdateMode

Coeffs = Sequence[tuple[int, float]]  # (seed_k, c_k): ĝ = Σ c_k z(seed_k)


def estimate(block: Block, coeffs: Coeffs) -> torch.Tensor:
    """ĝ for one block, in the block's reusable "g" buffer (valid until the next block)."""
    (seed, c), *rest = coeffs
    g = torch.mul(block.z(seed), c, out=block.buffer("g"))
    for seed, c in rest:
        g.add_(torch.mul(block.z(seed), c, out=block.buffer("tmp")))
    return g


def _decay(block: Block, lr: float, weight_decay: float) -> None:
    if weight_decay:
        theta = block.theta
        theta.sub_(torch.mul(theta, lr * weight_decay, out=block.buffer("tmp")))


class Rule:
    name = "rule"
    buffers: tuple[str, ...] = ()  # names of dense per-parameter state buffers

    def kernel(
        self, c: float, lr: float, state: dict[str, torch.Tensor], step: int
    ) -> tuple | None:
        """(mode, c, buffer m, buffer v, constants) for the fused kernel when ĝ = c·z (for
        ĝ = c1·z1 + c2·z2 it is asked once per coefficient), or None when this rule runs as
        torch ops only. The mode is a `native.UpdateMode`: the C kernel repeats the rule's torch
        arithmetic operation for operation (tests check they agree bit for bit)."""
        return None

    def apply(
        self,
        block: Block,
        coeffs: Coeffs,
        lr: float,
        weight_decay: float,
        state: dict[str, torch.Tensor],
        step: int,
    ) -> None:
        raise NotImplementedError


def _view(state: dict[str, torch.Tensor], name: str, block: Block) -> torch.Tensor:
    return state[name].view(-1)[block.start : block.start + block.theta.numel()]


class SGD(Rule):
    name = "sgd"

    def kernel(self, c, lr, state, step):
        return UpdateMode.SGD, c, None, None, ()

    def apply(self, block, coeffs, lr, weight_decay, state, step):
        g = estimate(block, coeffs)
        _decay(block, lr, weight_decay)
        block.theta.sub_(g.mul_(lr))


@dataclass
class Momentum(Rule):
    """Heavy-ball momentum as torch.optim.SGD(momentum=β, dampening=0)."""

    beta: float = 0.9
    name = "momentum"
    buffers = ("momentum",)

    def kernel(self, c, lr, state, step):
        return UpdateMode.MOMENTUM, c, state["momentum"], None, (self.beta,)

    def apply(self, block, coeffs, lr, weight_decay, state, step):
        g = estimate(block, coeffs)
        m = _view(state, "momentum", block)
        m.mul_(self.beta).add_(g)
        _decay(block, lr, weight_decay)
        block.theta.sub_(torch.mul(m, lr, out=block.buffer("tmp")))


@dataclass
class Sign(Rule):
    """Element-wise sign of the estimate (ZO-Bench's paper); `official=True` uses sign(Σc_k)·z."""

    official: bool = False
    name = "sign"

    def kernel(self, c, lr, state, step):
        if self.official:
            return UpdateMode.SGD, 1.0 if c > 0 else -1.0 if c < 0 else 0.0, None, None, ()
        return UpdateMode.SIGN, c, None, None, ()

    def apply(self, block, coeffs, lr, weight_decay, state, step):
        if self.official:
            g = estimate(block, [(s, 1.0 if c > 0 else -1.0 if c < 0 else 0.0) for s, c in coeffs])
        else:
            g = estimate(block, coeffs).sign_()
        _decay(block, lr, weight_decay)
        block.theta.sub_(g.mul_(lr))


@dataclass
class Adam(Rule):
    """Adam on ĝ (ZO-Adam), with bias correction; decoupled weight decay when λ > 0."""

    beta1: float = 0.9
    beta2: float = 0.999
    delta: float = 1e-8
    name = "adam"
    buffers = ("exp_avg", "exp_avg_sq")

    def kernel(self, c, lr, state, step):
        t = step + 1
        b1, b2 = self.beta1, self.beta2
        consts = (b1, 1 - b1, b2, 1 - b2, 1 / (1 - b2**t), self.delta, lr / (1 - b1**t))
        return UpdateMode.ADAM, c, state["exp_avg"], state["exp_avg_sq"], consts

    def apply(self, block, coeffs, lr, weight_decay, state, step):
        g = estimate(block, coeffs)
        m, v = _view(state, "exp_avg", block), _view(state, "exp_avg_sq", block)
        m.mul_(self.beta1).add_(g * (1 - self.beta1))
        v.mul_(self.beta2).add_(g.mul_(g).mul_(1 - self.beta2))
        t = step + 1
        # v times the reciprocal of the bias correction (a division per element costs more);
        # sqrt through float64: correctly rounded on every device, as the C kernel's sqrtf
        # (torch's float32 CPU sqrt is not: it differs in the last bit for ~20% of inputs)
        denom = (v * (1 / (1 - self.beta2**t))).double().sqrt_().float().add_(self.delta)
        _decay(block, lr, weight_decay)
        block.theta.sub_((m / denom).mul_(lr / (1 - self.beta1**t)))


def new_state(rule: Rule, param: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        name: torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        for name in rule.buffers
    }
