"""Hybrid ZO-FO (ZO-Bench's enhancement): backpropagate through the top of the network only."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..engine.estimators import Closure
from ..engine.rules import SGD
from .base import ZOOptimizer


class HybridZOFO(ZOOptimizer):
    """ZO-SGD on `params` (the lower layers) + first-order SGD on `fo_params` (e.g. the last k
    layers and the head, chosen by the CLI with --set fo_layers=k).

    Per step: the two-sided ZO estimate and update of the lower part (2 forward passes, 3
    regenerations), then one forward + backward with only `fo_params` requiring grad, so the
    backward pass stops at the first FO layer: θ_FO ← θ_FO − η_FO·∇L. Memory: gradients and
    kept activations of the FO part only. Its trajectory covers the ZO part only, so it is not
    replayable.
    """

    name = "hybrid-zo-fo"
    replayable = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        fo_params: Iterable[torch.Tensor] = (),
        fo_lr: float = 1e-4,
        **kw: Any,
    ):
        super().__init__(params, SGD(), lr=lr, fo_lr=fo_lr, **kw)
        self.fo_params = [p for p in fo_params]
        if not self.fo_params:
            raise ValueError("hybrid-zo-fo needs fo_params (the layers trained by backprop)")
        self.fo_lr = fo_lr
        for p in self.space.tensors:  # ZO needs no autograd: keep backward out of the lower part
            p.requires_grad_(False)

    def step(self, closure: Closure) -> float:  # type: ignore[override]
        loss = super().step(closure)
        for p in self.fo_params:
            p.grad = None
        with torch.enable_grad():
            value = closure()
            value.backward()
        with torch.no_grad():
            for p in self.fo_params:
                if p.grad is not None:
                    p.sub_(p.grad, alpha=self.fo_lr)
                    p.grad = None
        self.forward_passes += 1
        return loss
