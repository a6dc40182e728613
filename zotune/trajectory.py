"""Trajectories: the cheapest checkpoint in ZO fine-tuning.

A run's updates are fully determined by its per-step seeds and projected gradients (plus the
learning rates in force), so a run is saved as the optimizer's config and one small record per
step, gzip-compressed JSON: tens of bytes a step. `replay` applies the records to the initial
weights and rebuilds the fine-tuned weights bit for bit, with no forward pass.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

FORMAT = "zotune-trajectory/1"


class Trajectory:
    def __init__(self, method: str, config: dict[str, Any], tensors: Sequence[torch.Tensor]):
        from .directions import GENERATOR

        self.method, self.config = method, dict(config)
        self.tensors = [
            {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in tensors
        ]
        self.generator = GENERATOR
        self.groups: list[int] = []  # group index of each tensor, set by the optimizer
        self.names: list[str | None] = [None] * len(tensors)
        self.records: list[dict[str, Any]] = []

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def name_tensors(self, model: torch.nn.Module, tensors: Sequence[torch.Tensor]) -> None:
        """Remember parameter names so `replay` can find the tensors in a freshly loaded model."""
        by_id = {id(p): n for n, p in model.named_parameters()}
        self.names = [by_id.get(id(t)) for t in tensors]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "method": self.method,
            "config": self.config,
            "generator": self.generator,
            "tensors": [
                dict(t, group=g, name=n) for t, g, n in zip(self.tensors, self.groups, self.names)
            ],
            "records": _columns(self.records),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (a temp file renamed into place)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, separators=(",", ":"))
        os.replace(tmp, path)
        return path


def _columns(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Store records column by column (smaller once compressed); absent values become None."""
    keys = sorted({k for r in records for k in r})
    return {"n": len(records), **{k: [r.get(k) for r in records] for k in keys}}


def _rows(columns: dict[str, Any]) -> list[dict[str, Any]]:
    n = columns.pop("n")
    return [{k: v[i] for k, v in columns.items() if v[i] is not None} for i in range(n)]


def load(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no trajectory at {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a zotune trajectory ({e})") from None
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file")
    data["records"] = _rows(data["records"])
    return data


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
    from .optim import build

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
    from .directions import GENERATOR

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
