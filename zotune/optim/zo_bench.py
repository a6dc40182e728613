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
from dataclasses import replace
from typing import Any, ClassVar

import torch

from ..engine.estimators import Closure, evaluate
from ..engine.rules import SGD, Adam, HFAdamW, Momentum, Sign
from ..engine.space import Offset
from .base import ZOOptimizer


class ZOSGDMomentum(ZOOptimizer):
    """ZO-SGD with heavy-ball momentum (as torch.optim.SGD(momentum=β)).

    m ← β·m + ĝ;  θ ← θ − η(m + λθ),  ĝ = g·z from two-sided SPSA.
    """

    name = "zo-sgd-mmt"
    summary: ClassVar[str] = "ZO-SGD with heavy-ball momentum (ZO-Bench)"
    forwards: ClassVar[str] = "2"

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, momentum: float = 0.9, **kw: Any):
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, Momentum(momentum), lr=lr, config=dict(momentum=momentum), **kw)


def _official(method: str, value: bool | str, choices: tuple) -> bool | str:
    if value not in choices:  # (True == 1: compare types too)
        names = ", ".join(str(c).lower() for c in choices)
        raise ValueError(f"{method}: official must be one of {names}, got {value!r}")
    return value


class ZOSGDSign(ZOOptimizer):
    """ZO-SGD-Sign: θ ← θ − η(sign(ĝ) + λθ), the element-wise sign of the estimate (the paper).

    `official=true` uses the official code's sign(g)·z instead (a ±z step). `official=adamw` is
    what produced ZO-Bench's tables: its released sweeps give no `--optimizer`, so the trainer
    falls through to Hugging Face's AdamW (β = 0.9, 0.999, δ = 1e-8, decoupled decay), stepped
    on ĝ = sign(g)·z (`rules.HFAdamW`: 2 × d of moments, torch ops only).
    """

    name = "zo-sgd-sign"
    summary: ClassVar[str] = "ZO-SGD on the element-wise sign of the estimate (ZO-Bench)"
    forwards: ClassVar[str] = "2"

    def __init__(
        self, params: Iterable[Any], lr: float = 1e-6, official: bool | str = False, **kw: Any
    ):
        official = _official(self.name, official, (False, True, "adamw"))
        rule = HFAdamW() if official == "adamw" else Sign(official is True)
        super().__init__(params, rule, lr=lr, config=dict(official=official), **kw)

    def coefficients(self, record: dict[str, Any]) -> list[tuple[int, float]]:
        if self.config["official"] != "adamw":
            return super().coefficients(record)
        q = len(record["grads"])  # the official zo_step: sign(g_k)·z_k / q
        signs = [1.0 if g > 0 else -1.0 if g < 0 else 0.0 for g in record["grads"]]
        return [(s, c / q) for s, c in zip(self.seeds_of(record), signs)]


class ZOAdam(ZOOptimizer):
    """ZO-Adam: Adam's bias-corrected moments of ĝ; θ ← θ − η(m̂/(√v̂ + δ) + λθ)."""

    name = "zo-adam"
    summary: ClassVar[str] = "Adam on the SPSA estimate (ZO-Bench)"
    forwards: ClassVar[str] = "2"

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

    `official=adamw` is what produced ZO-Bench's tables (its sweeps fall through to Hugging
    Face's AdamW): each move is an AdamW step on ±c·g·z — +1 (L1 there), −2 (L2 there), then +1
    if L(θ) was best or +2 if L1 was (the official `zo_conserv_step`'s choice) — so the Adam
    moments advance 2 or 3 times a step and the "undo" is not exact. The records keep the moves.
    Costs 5 forward passes, 4 or 5 regenerations; 2 × d of moments; torch ops only.
    """

    name = "zo-sgd-cons"
    summary: ClassVar[str] = "ZO-SGD keeping the best of θ, θ−u, θ+u on the batch (ZO-Bench)"
    forwards: ClassVar[str] = "5"

    def __init__(
        self, params: Iterable[Any], lr: float = 1e-6, official: bool | str = False, **kw: Any
    ):
        official = _official(self.name, official, (False, "adamw"))
        if kw.get("weight_decay") and not official:
            raise ValueError("zo-sgd-cons compares plain steps: use weight_decay=0")
        if kw.get("queries", 1) != 1:
            raise ValueError("zo-sgd-cons uses one query per step")
        rule = HFAdamW() if official else SGD()
        super().__init__(params, rule, lr=lr, config=dict(official=official), **kw)
        self.adam_steps = 0  # AdamW steps taken (official=adamw): 2 or 3 a step

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        super().load_extra_state(extra)
        self.adam_steps = sum(len(r.get("moves", ())) for r in self.trajectory.records)

    def _move(self, seed: int, c: float, record: dict[str, Any], pending: Offset | None) -> None:
        """One AdamW step on ĝ = c·z (restoring `pending` in the same pass)."""
        update = replace(self.update_for([(seed, c)], record), step=self.adam_steps)
        self.space.transition(pending, None, update)
        self.adam_steps += 1

    def apply(self, record: dict[str, Any], pending: Offset | None = None) -> None:
        if "moves" not in record:
            return super().apply(record, pending)
        self.begin_step()  # (a replay: at this step's θ0)
        seed, g = self.seeds_of(record)[0], record["grads"][0]
        for scale in record["moves"]:
            self._move(seed, scale * g, record, None)
        self.trajectory.append(record)
        self.steps += 1

    def _adamw_step(self, closure: Closure) -> float:
        self.begin_step()
        base = evaluate(closure)
        est = self.estimate(closure, self.step_seeds())
        seed, g = est.seeds[0], est.grads[0]
        groups = self.param_groups
        record = {
            "grads": [g],
            "moves": [],
            "lr": [grp["lr"] for grp in groups],
            "wd": [grp["weight_decay"] for grp in groups],
        }
        self._move(seed, g, record, est.pending)  # (restores θ in the same pass)
        record["moves"].append(1.0)
        first = evaluate(closure)
        self._move(seed, -2.0 * g, record, None)
        record["moves"].append(-2.0)
        second = evaluate(closure)
        losses = [base, first, second]
        if first > base:  # the official choice: back to θ, or stay at the second point
            last = 1.0 if base < second else None
        else:  # to the first point, or stay
            last = 2.0 if first < second else None
        if last is not None:
            self._move(seed, last * g, record, None)
            record["moves"].append(last)
        self.trajectory.append(record)
        self.steps += 1
        self.forward_passes += est.forward_passes + 3
        return min(losses)

    @torch.no_grad()
    def step(self, closure: Closure) -> float:  # type: ignore[override]
        if closure is None:
            raise ValueError("zeroth-order optimizers need a closure that returns the loss")
        if self.config["official"]:
            return self._adamw_step(closure)
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
