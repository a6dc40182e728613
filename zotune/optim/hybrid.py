"""Hybrid ZO-FO (ZO-Bench's enhancement): backpropagate through the top of the network only."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from ..engine.estimators import Closure, MicroBatches
from ..engine.rules import SGD
from .base import ZOOptimizer
from .groups import param_groups, split_top
from .hparams import Hyperparameter


class HybridZOFO(ZOOptimizer):
    """ZO-SGD on `params` (the lower layers) + first-order SGD on `fo_params` (e.g. the last k
    layers and the head: `build_for(model, "hybrid-zo-fo", fo_layers=k)`, --set fo_layers=k).

    Per step: the two-sided ZO estimate and update of the lower part (2 forward passes, 3
    regenerations), then one forward + backward with only `fo_params` requiring grad, so the
    backward pass stops at the first FO layer: θ_FO ← θ_FO − η_FO·∇L. Memory: gradients and
    kept activations of the FO part only. Its trajectory covers the ZO part only, so it is not
    replayable.
    """

    name = "hybrid-zo-fo"
    summary: ClassVar[str] = "ZO-SGD on the lower layers, backprop SGD on the top layers and head"
    forwards: ClassVar[str] = "3 + a partial backward"
    replayable = False
    backprop = True
    wired: ClassVar[tuple[str, ...]] = ("fo_params",)
    model_options: ClassVar[dict[str, Hyperparameter]] = {
        "fo_layers": Hyperparameter("fo_layers", int, 1)
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        fo_params: Iterable[torch.Tensor] = (),
        fo_lr: float = 1e-4,
        **kw: Any,
    ):
        super().__init__(params, SGD(), lr=lr, config=dict(fo_lr=fo_lr), **kw)
        self.fo_params = [p for p in fo_params]
        if not self.fo_params:
            raise ValueError("hybrid-zo-fo needs fo_params (the layers trained by backprop)")
        self.fo_lr = fo_lr
        for p in self.space.tensors:  # ZO needs no autograd: keep backward out of the lower part
            p.requires_grad_(False)

    @classmethod
    def arguments_for(
        cls,
        model: torch.nn.Module,
        *,
        weight_decay: float,
        full_loss: Callable[[], Any] | None,
        options: dict[str, Any],
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """ZO groups: the layers below the last `fo_layers` (decay / no decay); FO: the rest."""
        layers = options.get("fo_layers", 1)
        if layers < 1:
            raise ValueError(f"fo_layers must be an integer >= 1, got {layers}")
        lower, top = split_top(model, layers)
        if not lower or not top:
            raise ValueError(
                "hybrid-zo-fo needs trainable parameters both below and in the top layers"
            )
        below = {id(p) for p in lower}
        groups = [
            {**g, "params": [p for p in g["params"] if id(p) in below]}
            for g in param_groups(model, weight_decay)
        ]
        return [g for g in groups if g["params"]], {"fo_params": top}

    def step(self, closure: Closure) -> float:  # type: ignore[override]
        loss = super().step(closure)
        for p in self.fo_params:
            p.grad = None
        parts = closure.losses if isinstance(closure, MicroBatches) else [closure]
        with torch.enable_grad():
            for part in parts:  # one micro-batch's graph at a time
                value = part()
                (value / len(parts) if len(parts) > 1 else value).backward()
        with torch.no_grad():
            for p in self.fo_params:
                if p.grad is not None:
                    p.sub_(p.grad, alpha=self.fo_lr)
                    p.grad = None
        self.forward_passes += len(parts)
        return loss
