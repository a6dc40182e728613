"""Checkpoints: what a run needs to resume bit for bit, written atomically into RUN/checkpoint/.

A checkpoint holds the trained tensors (safetensors, by parameter name), the optimizer's and the
LR scheduler's state dicts and torch's RNG state (`optimizer.pt`), and the loop's own state
(`loop.json`: the step, forward passes and the rows they read, times, the best-on-dev record).
It is written into `checkpoint.tmp/` and swapped in by renames, so a run killed at any moment
keeps either the previous checkpoint or the new one whole. Writing costs one pass over the
trained tensors (a LoRA or prefix run: kilobytes to a few MB; a full-parameter run: its weights,
plus its rule state for momentum and Adam) — see `zotune train --save-every`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

CHECKPOINT, NEW, OLD = "checkpoint", "checkpoint.tmp", "checkpoint.old"


@dataclass
class LoopState:
    """The training loop's own state after `step` completed steps."""

    step: int = 0
    train_forwards: int = 0  # forward passes made by training steps (not by evaluation)
    forward_seconds: float = 0.0  # time inside the steps' forward passes
    train_tokens: int = 0  # tokens those forward passes read (padding excluded)
    # rows (examples) they read; None when the run began before rows were counted (its
    # checkpoint has no such field), so a resumed old run never reports a partial count
    train_rows: int | None = None
    step_seconds: float = 0.0  # time inside the steps
    wall_seconds: float = 0.0  # wall time of the run so far, every session before this one
    zero_shot: dict[str, float] = field(default_factory=dict)
    zero_shot_test: dict[str, float] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=dict)  # {"step", "dev", "test"}
    last_dev: dict[str, float] | None = None
    stopped: int = 0  # the step a plateau stopped the run at (--patience), 0 while it goes on


def trained_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The model's parameters that training changes, by name: those that require grad and those
    in the optimizer's param groups (a zeroth-order part may not require grad)."""
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    return {
        name: p for name, p in model.named_parameters() if p.requires_grad or id(p) in in_groups
    }


def save(
    run: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    scheduler: Any,
    state: LoopState,
) -> None:
    """Write a checkpoint of the run at `state.step`, replacing the previous one atomically."""
    from safetensors.torch import save_file

    new, current, old = run / NEW, run / CHECKPOINT, run / OLD
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir()
    tensors = {n: p.detach().contiguous() for n, p in trained_tensors(model, opt).items()}
    save_file(tensors, str(new / "weights.safetensors"))
    torch.save(
        {
            "optimizer": opt.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": torch.get_rng_state(),
        },
        new / "optimizer.pt",
    )
    (new / "loop.json").write_text(json.dumps(asdict(state), indent=1))
    for f in new.iterdir():  # on disk before the swap: a crash then leaves a whole checkpoint
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if current.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(current, old)
    os.replace(new, current)
    shutil.rmtree(old, ignore_errors=True)


def exists(run: Path) -> bool:
    return (run / CHECKPOINT / "loop.json").exists() or (run / OLD / "loop.json").exists()


def load(
    run: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, scheduler: Any
) -> LoopState:
    """Restore a run's checkpoint into a freshly built model, optimizer and scheduler."""
    from safetensors.torch import load_file

    where = run / CHECKPOINT
    if not (where / "loop.json").exists():  # killed between the two renames of `save`
        where = run / OLD
    tensors = load_file(str(where / "weights.safetensors"))
    named = trained_tensors(model, opt)
    if set(tensors) != set(named):
        missing = sorted(set(named) ^ set(tensors))[0]
        raise ValueError(f"the checkpoint in {where} does not match this model ({missing!r})")
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(tensors[name])
    saved = torch.load(where / "optimizer.pt", weights_only=True)
    opt.load_state_dict(saved["optimizer"])
    if scheduler is not None and saved["scheduler"] is not None:
        scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    state = json.loads((where / "loop.json").read_text())
    # fields a newer zotune added are left to it (workers on two commits may share a folder)
    return LoopState(**{k: v for k, v in state.items() if k in LoopState.__dataclass_fields__})
