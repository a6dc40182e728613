"""Open a `zotune train` run directory and rebuild its model at a kept step.

A run is rebuilt from its config (`train.load_for`: same seed, same initial weights, head and
adapter init) and then either its trajectory (zeroth-order runs: `optim.replay` of the first
`step` records, bit for bit) or its saved trainable tensors (first-order and hybrid runs, which
leave no trajectory: `--save-weights`). Step 0 is the initial model, rebuilt from the config
alone. Every error is a `ConfigError` with a one-line message.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .train import BASELINES, ConfigError, TrainConfig

CONFIG = "config.yaml"
SUMMARY = "summary.json"
TRAJECTORY = "trajectory.zot"
WEIGHTS = "weights.safetensors"  # the final trainable tensors (--save-weights)
# The best-on-dev trainable tensors, for runs that keep them (a run may write either file; each
# may say its step in the safetensors metadata as {"step": "N"}).
BEST_WEIGHTS = "best.safetensors"
KEEPS = ("best", "final")


@dataclass(frozen=True)
class Run:
    """What a run directory holds; `steps` is the last step that can be rebuilt."""

    path: Path
    config: TrainConfig
    summary: dict[str, Any] | None
    trajectory: Path | None  # trajectory.zot, when the method is replayable
    weights: dict[int, Path]  # step -> saved trainable tensors
    steps: int

    @property
    def replayable(self) -> bool:
        return self.trajectory is not None

    @property
    def best_step(self) -> int | None:
        return None if self.summary is None else int(self.summary.get("best_step", 0))

    def step_for(self, keep: str | int) -> int:
        """The step `keep` names: best (the summary's best-on-dev step), final, or a number."""
        keep = parse_keep(keep)
        if keep == "final":
            return self.steps
        if keep == "best":
            if self.best_step is None:
                raise ConfigError(
                    f"{self.path} has no {SUMMARY}, so no best step: use --keep final or a step"
                )
            step = self.best_step
        else:
            step = keep
        if not 0 <= step <= self.steps:
            raise ConfigError(
                f"step {step} is out of range: {self.path} has steps 0 to {self.steps}"
            )
        return step

    def rebuildable(self, step: int) -> bool:
        return step == 0 or self.replayable or step in self.weights


def parse_keep(keep: str | int) -> str | int:
    """'best', 'final' or a step number (a non-negative int, or its text)."""
    if isinstance(keep, bool):
        raise ConfigError(f"--keep must be best, final or a step number, got {keep}")
    if isinstance(keep, int):
        if keep < 0:
            raise ConfigError(f"--keep must be best, final or a step number >= 0, got {keep}")
        return keep
    text = str(keep).strip().lower()
    if text in KEEPS:
        return text
    if text.isdigit():
        return int(text)
    raise ConfigError(f"--keep must be best, final or a step number, got '{keep}'")


def _weights_step(path: Path) -> int | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ConfigError(f"{path} is not a safetensors file ({e})") from None
    step = meta.get("step")
    return int(step) if step is not None and str(step).isdigit() else None


def open_run(run_dir: str | os.PathLike) -> Run:
    """Read a run directory's config, summary and what it saved (trajectory, weights)."""
    path = Path(run_dir)
    if not path.exists():
        raise ConfigError(f"run directory {path} does not exist")
    if not path.is_dir() or not (path / CONFIG).is_file():
        raise ConfigError(
            f"{path} is not a zotune run directory (no {CONFIG}): pass the --out of a `zotune train`"
        )
    config = TrainConfig.from_dict(TrainConfig.from_yaml(path / CONFIG))
    summary = None
    if (path / SUMMARY).is_file():
        try:
            summary = json.loads((path / SUMMARY).read_text(encoding="utf-8"))
        except ValueError as e:
            raise ConfigError(f"{path / SUMMARY} is not valid JSON ({e})") from None
    trajectory = path / TRAJECTORY if (path / TRAJECTORY).is_file() else None
    if trajectory is not None:
        from .engine.trajectory import load

        try:
            steps = len(load(trajectory)["records"])
        except (ValueError, KeyError) as e:
            raise ConfigError(
                str(e).splitlines()[0] if str(e) else f"{trajectory}: {e!r}"
            ) from None
    elif summary is not None and "steps" in summary:
        steps = int(summary["steps"])
    else:
        steps = int(config.steps)
    weights: dict[int, Path] = {}
    if (path / WEIGHTS).is_file():
        step = _weights_step(path / WEIGHTS)
        weights[steps if step is None else step] = path / WEIGHTS
    if (path / BEST_WEIGHTS).is_file():
        step = _weights_step(path / BEST_WEIGHTS)
        best = summary.get("best_step") if summary else None
        if step is None and best is not None:
            step = int(best)
        if step is not None:
            weights.setdefault(step, path / BEST_WEIGHTS)
    return Run(path, config, summary, trajectory, weights, steps)


def _check_loadable(run: Run, step: int) -> None:
    cfg = run.config
    if cfg.method in BASELINES and step != 0:
        raise ConfigError(f"{run.path} is a {cfg.method} baseline: it trains no weights")
    if run.rebuildable(step):
        return
    if not run.weights:
        raise ConfigError(
            f"{run.path} has neither {TRAJECTORY} ({cfg.method} is not replayable) nor "
            f"{WEIGHTS}: rerun it with --save-weights"
        )
    saved = ", ".join(str(s) for s in sorted(run.weights))
    raise ConfigError(
        f"{run.path} ({cfg.method}, no trajectory) saved the weights of step {saved} only, "
        f"not step {step}: pick --keep {sorted(run.weights)[-1]} (or 0, the initial model)"
    )


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy saved trainable tensors into the model's parameters of the same names."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ConfigError(f"{path} holds {unknown[0]!r}, which the rebuilt model does not have")
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in tensors)
    if missing:
        raise ConfigError(f"{path} lacks the trainable tensor {missing[0]!r}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            p = params[name]
            if p.shape != tensor.shape:
                raise ConfigError(
                    f"{path}: {name} has shape {list(tensor.shape)}, the model's is {list(p.shape)}"
                )
            p.copy_(tensor.to(p.device, p.dtype))


def load_run_model(
    run_dir: str | os.PathLike | Run,
    keep: str | int = "best",
    *,
    overrides: dict[str, Any] | None = None,
) -> tuple[TrainConfig, Any, Any, Any]:
    """(cfg, task, loaded, objective) with the model as it was at the step `keep` names:
    best (the summary's best-on-dev step, what the run reported), final, or a step number.

    `overrides` replaces config settings before loading (e.g. another data_dir or num_dev);
    those that change the initial weights (model, seed, peft...) make the rebuild meaningless.
    """
    from .optim import replay
    from .train import load_for

    run = run_dir if isinstance(run_dir, Run) else open_run(run_dir)
    step = run.step_for(keep)
    _check_loadable(run, step)
    cfg = TrainConfig.from_dict({**asdict(run.config), **(overrides or {})})
    cfg.validate()
    task, loaded, objective = load_for(cfg)
    if step == 0:
        pass
    elif run.replayable:
        try:
            replay(loaded.model, run.trajectory, steps=step)
        except ValueError as e:  # the rebuilt model does not match the trajectory
            raise ConfigError(f"cannot replay {run.trajectory}: {e}") from None
    else:
        _load_weights(loaded.model, run.weights[step])
    return cfg, task, loaded, objective
