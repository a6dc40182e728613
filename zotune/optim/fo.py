"""First-order baselines with real backpropagation, in the same API and registry.

They take the same closure as the zeroth-order methods, one that only returns the loss:
`opt.step(closure)` clears the gradients, calls the closure and backpropagates under
`torch.enable_grad()`, then takes torch's step. Memory: gradients (1 × d) plus the activations
kept for backward; FO-Adam adds 2 × d of moments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from ..engine.estimators import MicroBatches
from .groups import param_groups
from .hparams import Hyperparameter


class Backprop:
    """The closure contract of every zotune optimizer, for a torch first-order optimizer."""

    replayable = False
    backprop = True
    wired: ClassVar[tuple[str, ...]] = ()
    model_options: ClassVar[dict[str, Hyperparameter]] = {}
    forward_passes = 0

    @classmethod
    def arguments_for(
        cls,
        model: torch.nn.Module,
        *,
        weight_decay: float,
        full_loss: Callable[[], Any] | None,
        options: dict[str, Any],
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        return param_groups(model, weight_decay), {}

    def step(self, closure: Callable[[], torch.Tensor]) -> float:  # type: ignore[override]
        """One step: zero the gradients, call `closure` (a forward pass returning the loss, no
        backward), backpropagate and update; returns the loss."""
        if closure is None:
            raise ValueError("zotune optimizers need a closure that returns the loss")
        parts = closure.losses if isinstance(closure, MicroBatches) else [closure]
        total = 0.0
        with torch.enable_grad():
            self.zero_grad()  # type: ignore[attr-defined]
            for part in parts:  # one micro-batch's graph at a time
                loss = part()
                (loss / len(parts) if len(parts) > 1 else loss).backward()
                total += float(loss.detach())
        super().step()  # type: ignore[misc]
        self.forward_passes += len(parts)
        return total / len(parts)


class FOSGD(Backprop, torch.optim.SGD):
    """torch.optim.SGD (ZO-Bench's FO-SGD baseline)."""

    name = "fo-sgd"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ):
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
        )


class FOAdam(Backprop, torch.optim.Adam):
    """torch.optim.Adam (the fine-tuning baseline of MeZO and ZO-Bench)."""

    name = "fo-adam"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
    ):
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad
        )
