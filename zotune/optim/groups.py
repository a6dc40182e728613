"""Param groups of a model: weight decay by module type, one group per layer, the top layers."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

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


_LAYER = re.compile(r"\.(\d+)\.")


def layer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Param groups by numbered layer (`...layers.N...`) and other top-level part (embeddings,
    head), in model order, each split into decayed and undecayed parameters; a group's "block"
    is its layer's number: the blocks of block-wise ZO."""
    decayed = {
        id(p) for g in param_groups(model, weight_decay) if g["weight_decay"] for p in g["params"]
    }
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            m = _LAYER.search(name)
            key = name[: m.end()] if m else name.split(".")[0] + ":" + name.rsplit(".", 1)[0]
            groups.setdefault(key, []).append(p)
    out = []
    for block, params in enumerate(groups.values()):
        for decay in (True, False):
            part = [p for p in params if (id(p) in decayed) == decay]
            if part:  # "block": the layer, which a decayed and an undecayed group may share
                out.append(
                    {"params": part, "weight_decay": weight_decay if decay else 0.0, "block": block}
                )
    return out


def split_top(model: nn.Module, layers: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(lower, top): top = the last `layers` numbered layers and everything after them (final
    norm, head); lower = the rest. The split hybrid ZO-FO trains by ZO and by backprop."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    numbers = [int(m.group(1)) for n, _ in named if (m := _LAYER.search(n))]
    last = max(numbers, default=-1)
    top, seen_layers = [], False
    lower = []
    for name, p in named:
        m = _LAYER.search(name)
        if m:
            seen_layers = True
            (top if int(m.group(1)) > last - layers else lower).append(p)
        else:
            (top if seen_layers else lower).append(p)
    return lower, top
