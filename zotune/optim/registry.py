"""The registry of methods by name: `build("mezo", model.parameters(), lr=1e-6, eps=1e-3)`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .base import ZOOptimizer
from .blockwise import BlockwiseZO
from .fo import FOSGD, FOAdam
from .forward_grad import ForwardGrad
from .hybrid import HybridZOFO
from .mezo import MeZO
from .sparse import RMeZO, SparseMeZO
from .svrg import MeZOSVRG
from .zo_bench import ZOAdam, ZOSGDConservative, ZOSGDMomentum, ZOSGDSign

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "mezo": MeZO,
    "zo-sgd": MeZO,
    "zo-sgd-mmt": ZOSGDMomentum,
    "zo-sgd-sign": ZOSGDSign,
    "zo-sgd-cons": ZOSGDConservative,
    "zo-adam": ZOAdam,
    "forward-grad": ForwardGrad,
    "mezo-svrg": MeZOSVRG,
    "sparse-mezo": SparseMeZO,
    "r-mezo": RMeZO,
    "zo-blockwise": BlockwiseZO,
    "hybrid-zo-fo": HybridZOFO,
    "fo-sgd": FOSGD,
    "fo-adam": FOAdam,
}


def available() -> list[str]:
    """Names accepted by `build`."""
    return sorted(OPTIMIZERS)


def build(name: str, params: Iterable[Any], **hparams: Any) -> torch.optim.Optimizer:
    """Create the optimizer registered as `name` over `params` (tensors or param groups)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown method '{name}': choose one of {', '.join(available())}")
    opt = OPTIMIZERS[name](params, **hparams)
    opt.name = name
    if isinstance(opt, ZOOptimizer):
        opt.trajectory.method = name
    return opt
