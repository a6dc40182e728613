"""Forward gradient (ZO-Bench's baseline): the exact directional derivative by forward-mode AD."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..engine.directions import derive_seed
from ..engine.estimators import Closure, Estimate, MicroBatches
from ..engine.rules import SGD
from .base import ZOOptimizer
from .groups import param_groups


class ForwardGrad(ZOOptimizer):
    """Forward gradient: d = ∇L(θ)·v by one JVP (no backward pass), θ ← θ − η(d·v + λθ).

    v is the direction z drawn from the step seed, so the update regenerates it and the run
    replays like MeZO. Cost per step: 1 forward pass carrying tangents (about 2-3× a plain
    forward), 2 regenerations of z. Memory: v materialized (1 × d) plus the tangents of the
    activations. Needs the model: `build("forward-grad", params, model=model)` (`build_for`
    passes it).
    """

    name = "forward-grad"
    summary: ClassVar[str] = "directional derivative ∇L·v by one forward-mode JVP"
    forwards: ClassVar[str] = "1 (with tangents)"
    wired: ClassVar[tuple[str, ...]] = ("model",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        model: torch.nn.Module | None = None,
        **kw: Any,
    ):
        if kw.get("queries", 1) != 1:
            raise ValueError("forward-grad uses one direction per step")
        if kw.get("mask", "none") != "none":
            raise ValueError("forward-grad does not take a mask")
        super().__init__(params, SGD(), lr=lr, **kw)
        self.model = model

    @classmethod
    def arguments_for(
        cls,
        model: torch.nn.Module,
        *,
        weight_decay: float,
        full_loss: Callable[[], Any] | None,
        options: dict[str, Any],
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        return param_groups(model, weight_decay), {"model": model}

    def estimate(self, closure: Closure, seeds: list[int]) -> Estimate:
        if self.model is None:
            raise ValueError(
                "forward-grad needs the model: build('forward-grad', params, model=model)"
            )
        owners = {}
        for module in self.model.modules():
            for attr, p in module._parameters.items():
                if p is not None:
                    owners.setdefault(id(p), []).append((module, attr))
        swapped = []
        with fwAD.dual_level():
            try:
                for key, p in enumerate(self.space.tensors):
                    v = torch.empty(p.numel(), dtype=torch.float32, device=p.device)
                    self.space.direction.fill_(v, derive_seed(seeds[0], key), 0)
                    dual = fwAD.make_dual(p.detach(), v.view_as(p).to(p.dtype))
                    for module, attr in owners.get(id(p), []):
                        module._parameters[attr] = dual  # a plain swap, as torch.func does
                        swapped.append((module, attr, p))
                # The fused attention kernels have no forward-mode AD; the math one does.
                parts = closure.losses if isinstance(closure, MicroBatches) else [closure]
                with sdpa_kernel([SDPBackend.MATH]):
                    loss = sum(part() for part in parts) / len(parts)  # (duals add up)
                primal, tangent = fwAD.unpack_dual(loss)
            finally:
                for module, attr, p in swapped:
                    module._parameters[attr] = p
        if tangent is None:
            raise ValueError("the loss does not depend on the trainable parameters")
        self.space.regenerations += 1
        return Estimate(
            list(seeds), [float(tangent)], float(primal), len(parts), None, [float(primal)]
        )
