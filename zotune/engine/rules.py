"""Update rules: what a step does with the gradient estimate ĝ = Σ_k c_k·z_k.

A rule works one block at a time (see `torch_path.Block`): it reads θ0 and regenerates the z_k it
needs, and rewrites θ0 in place. Where it can, it also states the same arithmetic in the C
kernel's terms (`Rule.kernel` -> `KernelTerms`). An optimizer hands the engine an `Update`: the
rule, ĝ's coefficients and the per-tensor learning rates, decays and state, for one pass. Rules with state keep dense float32 buffers per parameter in
the optimizer's `state` (torch.optim convention), so their memory is stated per rule.

| rule     | update                                                    | extra memory |
|----------|-----------------------------------------------------------|--------------|
| sgd      | θ ← θ - η(ĝ + λθ)                                         | none         |
| momentum | m ← βm + ĝ;  θ ← θ - η(m + λθ)                            | 1 × params   |
| sign     | θ ← θ - η(sign(ĝ) + λθ)                                   | none         |
| adam     | m, v ← EMAs of ĝ, ĝ²;  θ ← θ - η(m̂/(√v̂ + δ) + λθ)        | 2 × params   |
| hf-adamw | adam with HF's ε placement and decay after the step     | 2 × params   |
| window-adam | m, v rebuilt from the last W (seed, g) pairs; as adam     | none (W regenerations) |
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .moves import Block, KernelTerms, KernelUpdate
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
    ) -> KernelTerms | None:
        """This rule's step for ĝ = c·z in the fused kernel's terms (for ĝ = Σ_k c_k·z_k it is
        asked once per coefficient), or None when the rule runs as torch ops only."""
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


def _moments(
    block: Block, coeffs: Coeffs, state: dict[str, torch.Tensor], beta1: float, beta2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's moments of the block, updated in place with ĝ: m ← β1·m + (1 − β1)·ĝ,
    v ← β2·v + (1 − β2)·ĝ² (Adam and HF AdamW alike)."""
    g = estimate(block, coeffs)
    m, v = _view(state, "exp_avg", block), _view(state, "exp_avg_sq", block)
    m.mul_(beta1).add_(g * (1 - beta1))
    v.mul_(beta2).add_(g.mul_(g).mul_(1 - beta2))
    return m, v


class SGD(Rule):
    name = "sgd"

    def kernel(self, c, lr, state, step):
        return KernelTerms(UpdateMode.SGD, c)

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
        return KernelTerms(UpdateMode.MOMENTUM, c, state["momentum"], None, (self.beta,))

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
            return KernelTerms(UpdateMode.SGD, 1.0 if c > 0 else -1.0 if c < 0 else 0.0)
        return KernelTerms(UpdateMode.SIGN, c)

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
        return KernelTerms(UpdateMode.ADAM, c, state["exp_avg"], state["exp_avg_sq"], consts)

    def apply(self, block, coeffs, lr, weight_decay, state, step):
        m, v = _moments(block, coeffs, state, self.beta1, self.beta2)
        t = step + 1
        # v times the reciprocal of the bias correction (a division per element costs more);
        # sqrt through float64: correctly rounded on every device, as the C kernel's sqrtf
        # (torch's float32 CPU sqrt is not: it differs in the last bit for ~20% of inputs)
        denom = (v * (1 / (1 - self.beta2**t))).double().sqrt_().float().add_(self.delta)
        _decay(block, lr, weight_decay)
        block.theta.sub_((m / denom).mul_(lr / (1 - self.beta1**t)))


@dataclass
class HFAdamW(Rule):
    """AdamW as Hugging Face's `transformers.AdamW` (`adamw_hf`, the Trainer's default, which
    ZO-Bench's released sweeps fell through to): denominator √v + δ before bias correction,
    step η·√(1 − β2^t)/(1 − β1^t), decay θ ← θ − ηλθ after the step. Torch ops only."""

    beta1: float = 0.9
    beta2: float = 0.999
    delta: float = 1e-8
    name = "hf-adamw"
    buffers = ("exp_avg", "exp_avg_sq")

    def apply(self, block, coeffs, lr, weight_decay, state, step):
        m, v = _moments(block, coeffs, state, self.beta1, self.beta2)
        t = step + 1
        size = lr * (1 - self.beta2**t) ** 0.5 / (1 - self.beta1**t)
        denom = v.double().sqrt_().float().add_(self.delta)
        block.theta.sub_((m / denom).mul_(size))
        _decay(block, lr, weight_decay)


@dataclass
class WindowAdam(Rule):
    """Adam-style moments rebuilt from the last W steps' (seed, g) instead of kept (AdaMeZO):
    with coefficients (seed_i, g_i) oldest first, i = 0 .. n-1,
        m = Σ_i β1^(n-1-i)·g_i·z_i,   v = Σ_i β2^(n-1-i)·g_i²·z_i²,
        θ ← θ - η(m/(√v + δ) + λθ).
    No state: each step regenerates the window's n directions. The kernel's WINDOW_ADAM mode
    computes the same weights c_i·β^(n-1-i) from the terms' positions, and the same sums."""

    beta1: float = 0.7
    beta2: float = 0.9
    delta: float = 1e-5
    name = "window-adam"

    def kernel(self, c, lr, state, step):
        return KernelTerms(
            UpdateMode.WINDOW_ADAM, c, constants=(self.beta1, self.beta2, self.delta)
        )

    def apply(self, block, coeffs, lr, weight_decay, state, step):
        n = len(coeffs)
        m = block.buffer("g").zero_()
        v = block.buffer("v").zero_()
        tmp = block.buffer("tmp")
        for i, (seed, c) in enumerate(coeffs):  # oldest first, as the official code sums
            z = block.z(seed)
            m.add_(torch.mul(z, c * self.beta1 ** (n - 1 - i), out=tmp))
            torch.mul(z, z, out=tmp)
            v.add_(tmp.mul_(c * c * self.beta2 ** (n - 1 - i)))
        denom = v.double().sqrt_().float().add_(self.delta)  # (correctly rounded, as Adam's)
        _decay(block, lr, weight_decay)
        block.theta.sub_(m.div_(denom).mul_(lr))


def new_state(rule: Rule, param: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        name: torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        for name in rule.buffers
    }


_NO_STATE: dict[str, torch.Tensor] = {}


@dataclass(frozen=True)
class Update:
    """One pass's change of θ0: θ0 ← rule(θ0, ĝ) with ĝ = Σ_k c_k·z(seed_k), for each tensor
    of a space by its key, with its param group's learning rate and weight decay and its rule
    state. The torch path calls `apply` per block; the kernel path asks `kernel(key)`."""

    rule: Rule
    coeffs: tuple[tuple[int, float], ...]  # (seed_k, c_k)
    step: int  # t, from 0 (Adam's bias correction)
    lr: tuple[float, ...]  # per param group
    weight_decay: tuple[float, ...]  # per param group
    group_of: Sequence[int]  # tensor key -> its param group
    states: Sequence[dict[str, torch.Tensor]] = ()  # tensor key -> rule state (rules with buffers)

    def _state(self, key: int) -> dict[str, torch.Tensor]:
        return self.states[key] if self.rule.buffers else _NO_STATE

    def apply(self, block: Block) -> None:
        g = self.group_of[block.key]
        self.rule.apply(
            block, self.coeffs, self.lr[g], self.weight_decay[g], self._state(block.key), self.step
        )

    def kernel(self, key: int) -> KernelUpdate | None:
        g, state = self.group_of[key], self._state(key)
        lr = self.lr[g]
        # the rule maps each coefficient alike (the official sign rule: c -> sign c)
        each = [(seed, self.rule.kernel(c, lr, state, self.step)) for seed, c in self.coeffs]
        if each[0][1] is None:
            return None
        coeffs = tuple((seed, terms.c) for seed, terms in each)
        return KernelUpdate(coeffs, lr, self.weight_decay[g], each[0][1])
