"""Trajectories: the cheapest checkpoint in ZO fine-tuning.

A run's updates are fully determined by its per-step seeds and projected gradients (plus the
learning rates in force), so a run is saved as the optimizer's config and one small record per
step, gzip-compressed JSON: tens of bytes a step. `replay` applies the records to the initial
weights and rebuilds the fine-tuned weights bit for bit, with no forward pass
(`zotune.optim.replay`: rebuilding needs the optimizer, which sits above this module).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .directions import GENERATOR

FORMAT = "zotune-trajectory/1"


class Trajectory:
    def __init__(self, method: str, config: dict[str, Any], tensors: Sequence[torch.Tensor]):
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
