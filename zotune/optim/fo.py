"""First-order baselines with real backpropagation, in the same API and registry.

They take the same closure as the zeroth-order methods, one that only returns the loss:
`opt.step(closure)` clears the gradients, calls the closure and backpropagates under
`torch.enable_grad()`, clips the gradients' global norm to `max_grad_norm` (1.0, the Hugging
Face Trainer's default, which the MeZO and ZO-Bench fine-tuning baselines ran with; 0 or None:
no clipping), then takes torch's step. Memory: gradients (1 × d) plus the activations kept for
backward; FO-Adam adds 2 × d of moments.

The papers' FO protocol is `--method fo-adam` (or `fo-sgd`) with this clipping and
`--lr-scheduler linear` (linear decay to 0, HF's default schedule; `--warmup-steps` as theirs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from ..engine.estimators import MicroBatches
from .groups import param_groups
from .hparams import Hyperparameter


def _check_clip(max_grad_norm: float | None) -> None:
    if max_grad_norm is not None and not max_grad_norm >= 0:
        raise ValueError(
            f"max_grad_norm must be >= 0 (0 or None: no clipping), got {max_grad_norm}"
        )


class Backprop:
    """The closure contract of every zotune optimizer, for a torch first-order optimizer."""

    replayable = False
    backprop = True
    wired: ClassVar[tuple[str, ...]] = ()
    model_options: ClassVar[dict[str, Hyperparameter]] = {}
    forward_passes = 0
    summary: ClassVar[str] = ""
    forwards: ClassVar[str] = ""
    max_grad_norm: float | None = 1.0

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
        if self.max_grad_norm:
            params = [p for g in self.param_groups for p in g["params"]]  # type: ignore[attr-defined]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        super().step()  # type: ignore[misc]
        self.forward_passes += len(parts)
        return total / len(parts)


class FOSGD(Backprop, torch.optim.SGD):
    """torch.optim.SGD (ZO-Bench's FO-SGD baseline)."""

    name = "fo-sgd"
    summary: ClassVar[str] = "torch.optim.SGD with backprop, gradients clipped at norm 1.0"
    forwards: ClassVar[str] = "1 + backward"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        max_grad_norm: float | None = 1.0,
    ):
        _check_clip(max_grad_norm)
        self.max_grad_norm = max_grad_norm
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
    summary: ClassVar[str] = "torch.optim.Adam with backprop, gradients clipped at norm 1.0"
    forwards: ClassVar[str] = "1 + backward"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        max_grad_norm: float | None = 1.0,
    ):
        _check_clip(max_grad_norm)
        self.max_grad_norm = max_grad_norm
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad
        )
