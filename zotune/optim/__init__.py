"""Optimizers, by name: `build("mezo", model.parameters(), lr=1e-6, eps=1e-3)`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .base import ZOOptimizer
from .mezo import MeZO

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "mezo": MeZO,
    "zo-sgd": MeZO,
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


# Norm layers by type (HF's RMSNorm classes are their own, not nn.RMSNorm, hence the name test).
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORMS) or type(module).__name__.endswith(("Norm", "RMSNorm"))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into a decayed group and one without weight decay.

    Biases and the weights of normalization layers get no decay; they are found by module type
    and attribute name, not by substrings of parameter names (which miss e.g. Llama's final norm).
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if attr == "bias" or _is_norm(module) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


__all__ = ["MeZO", "ZOOptimizer", "available", "build", "param_groups"]
