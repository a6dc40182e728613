"""Replay: rebuild a run's weights from its trajectory, with no forward pass."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from ..engine.directions import GENERATOR
from ..engine.trajectory import load
from .registry import build


@torch.no_grad()
def replay(
    model_or_params: torch.nn.Module | Iterable[torch.Tensor],
    path: str | os.PathLike,
    steps: int | None = None,
) -> int:
    """Apply a saved trajectory (its first `steps` steps, default all) to the initial weights,
    in place; returns the number of steps applied.

    Pass the model (tensors are found by the names saved with the run) or the same flat list of
    tensors, in the same order, that the optimizer was given.
    """
    data = load(path)
    meta = data["tensors"]
    if isinstance(model_or_params, torch.nn.Module):
        named = dict(model_or_params.named_parameters())
        missing = [m["name"] for m in meta if m["name"] not in named]
        if missing:
            raise ValueError(
                f"the model has no parameter {missing[0]!r} that the trajectory updates"
            )
        tensors = [named[m["name"]] for m in meta]
    else:
        tensors = list(model_or_params)
    if len(tensors) != len(meta):
        raise ValueError(f"the trajectory updates {len(meta)} tensors, {len(tensors)} were given")
    for t, m in zip(tensors, meta):
        if list(t.shape) != m["shape"]:
            raise ValueError(
                f"tensor shape {list(t.shape)} does not match the trajectory's {m['shape']}"
            )
    if data.get("generator") != GENERATOR:
        raise ValueError(
            f"trajectory made with directions {data.get('generator')}, this zotune draws {GENERATOR}"
        )
    ngroups = max((m["group"] for m in meta), default=-1) + 1
    groups = [
        {"params": [t for t, m in zip(tensors, meta) if m["group"] == g]} for g in range(ngroups)
    ]
    opt = build(data["method"], [g for g in groups if g["params"]], **data["config"])
    records = data["records"][:steps] if steps is not None else data["records"]
    for record in records:
        opt.apply(record)
    return len(records)
