"""Where a run's per-step metrics go (`--report-to`), and the provenance a run records.

`open_reporters(run_dir, ["jsonl", "tensorboard"], config)` returns one object whose
`log(step, row)` sends a row to every target:

- ``jsonl``: the run's ``metrics.jsonl``, one JSON line per call, flushed each time; rows are
  written as given (nested dicts such as ``{"dev": {"accuracy": ...}}`` stay nested).
- ``tensorboard``: scalars through ``torch.utils.tensorboard.SummaryWriter`` into
  ``run_dir/tensorboard``; nested dicts become ``dev/accuracy``.
- ``wandb``: an offline Weights & Biases run under ``run_dir/wandb`` (upload it later with
  ``wandb sync``); the same flattened scalars.

A target whose package is missing (tensorboard, wandb) prints a one-line note on stderr and is
skipped: the run goes on. A resumed run (``resume=True, resume_step=N``) first drops what a
previous attempt logged after step N, since the run recomputes those steps.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

TARGETS = ("jsonl", "tensorboard", "wandb")

# The pip extra that brings each optional target's package.
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def parse_targets(spec: str | Iterable[str] | None) -> list[str]:
    """``"jsonl, tensorboard"`` (or a list) -> ``["jsonl", "tensorboard"]``, duplicates
    dropped; ``""``/``"none"`` -> ``[]``. An unknown name is a ValueError naming the valid ones."""
    if spec is None:
        return []
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    targets: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise ValueError(f"report targets are names, got {part!r}")
        name = part.strip().lower()
        if name in ("", "none"):
            continue
        if name not in TARGETS:
            raise ValueError(f"unknown report target '{name}': choose from {', '.join(TARGETS)}")
        if name not in targets:
            targets.append(name)
    return targets


def flatten(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The row's numbers as ``{"loss": 0.7, "dev/accuracy": 0.9}``: nested dicts joined with
    "/", numpy/torch scalars converted, strings, lists and None left out ("step" too: it is the
    x axis)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if not prefix and key == "step":
            continue
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=f"{name}/"))
            continue
        number = _number(value)
        if number is not None:
            out[name] = number
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, (bool, int, float)):
        return float(value)
    item = getattr(value, "item", None)  # numpy scalars, one-element torch tensors
    if callable(item):
        try:
            got = item()
        except (ValueError, RuntimeError, TypeError):  # more than one element
            return None
        if isinstance(got, (bool, int, float)):
            return float(got)
    return None


def _jsonable(value: Any) -> Any:
    """json.dumps' fallback: numpy/torch scalars as Python numbers."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (ValueError, RuntimeError, TypeError):
            pass
    raise TypeError(f"cannot write {type(value).__name__} to metrics.jsonl")


def truncate_jsonl(path: str | os.PathLike, step: int) -> int:
    """Drop the lines of a metrics.jsonl whose "step" is beyond `step`, and any line that does
    not parse (the torn last line of a killed run); lines without a step stay. Rewritten
    atomically; returns how many lines were dropped (0 when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            if row["step"] > step:
                dropped += 1
                continue
        kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)
    return dropped


class _Jsonl:
    def __init__(self, run_dir: Path, resume: bool, resume_step: int | None):
        self.path = run_dir / "metrics.jsonl"
        if resume and resume_step is not None:
            truncate_jsonl(self.path, resume_step)
        self.file = open(self.path, "a" if resume else "w", encoding="utf-8")

    def log(self, step: int, row: Mapping[str, Any]) -> None:
        record = {"step": step, **{k: v for k, v in row.items() if k != "step"}}
        self.file.write(json.dumps(record, default=_jsonable) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class _TensorBoard:
    def __init__(self, run_dir: Path, config: Mapping[str, Any], resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard discards the events a previous attempt logged from that step on
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(
            log_dir=str(run_dir / "tensorboard"), purge_step=purge, flush_secs=30
        )
        if resume_step is None:
            text = json.dumps(config, indent=2, default=str)
            self.writer.add_text("config", "```\n" + text + "\n```", global_step=0)

    def log(self, step: int, row: Mapping[str, Any]) -> None:
        for name, value in flatten(row).items():
            self.writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run_dir: Path, config: Mapping[str, Any], resume_step: int | None):
        import wandb

        # the run's final name: during training run_dir is a temporary folder beside `out`
        name = Path(str(config.get("out") or run_dir)).name
        settings = wandb.Settings(silent=True, console="off")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "zotune"),
            name=name,
            group=name,  # a resumed attempt is a second wandb run in the same group
            dir=str(run_dir),
            config={**config, "resumed_from_step": resume_step},
            mode="offline",  # never the network from a training run: `wandb sync` uploads
            settings=settings,
        )

    def log(self, step: int, row: Mapping[str, Any]) -> None:
        self.run.log(flatten(row), step=step)

    def close(self) -> None:
        self.run.finish()


_OPENERS = {"jsonl": None, "tensorboard": _TensorBoard, "wandb": _Wandb}


class Reporters:
    """The open targets of one run: `log(step, row)` to all, `close()` when done (also a
    context manager). `targets` names those actually open (a missing package's are not)."""

    def __init__(self, sinks: dict[str, Any]):
        self._sinks = sinks
        self.closed = False

    @property
    def targets(self) -> list[str]:
        return list(self._sinks)

    def log(self, step: int, row: Mapping[str, Any]) -> None:
        if self.closed:
            raise ValueError("log() on closed reporters")
        for sink in self._sinks.values():
            sink.log(int(step), row)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        errors = []
        for sink in self._sinks.values():
            try:
                sink.close()
            except Exception as e:  # close the others before raising
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> Reporters:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_reporters(
    run_dir: str | os.PathLike,
    targets: str | Iterable[str],
    config: Mapping[str, Any],
    resume: bool = False,
    *,
    resume_step: int | None = None,
) -> Reporters:
    """Open each target for a run writing into `run_dir` (which must exist).

    `config` is what the run records about itself (`asdict(cfg)`, provenance included): it goes
    to TensorBoard as text and to wandb as the run's config. With `resume=True` the jsonl file
    is appended to rather than replaced; with `resume_step=N` (implies resume) the jsonl lines
    and TensorBoard events of steps after N are dropped first, since the run recomputes them.
    """
    names = parse_targets(targets)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    resume = resume or resume_step is not None
    config = dict(config)
    sinks: dict[str, Any] = {}
    try:
        for name in names:
            if name == "jsonl":
                sinks[name] = _Jsonl(run_dir, resume, resume_step)
                continue
            try:
                importlib.import_module(_PACKAGES[name])
                sinks[name] = _OPENERS[name](run_dir, config, resume_step)
            except ImportError as e:
                why = (str(e).strip().splitlines() or [type(e).__name__])[0]
                print(
                    f"zotune: --report-to {name} skipped: {_PACKAGES[name]} is not usable ({why}); "
                    "pip install 'zotune[log]'",
                    file=sys.stderr,
                )
    except BaseException:
        Reporters(sinks).close()
        raise
    return Reporters(sinks)


# -- provenance ------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        module = sys.modules.get(package)
        return getattr(module, "__version__", None)


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(root), *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return done.stdout.strip()


def source_commit(root: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """``{"commit": short hash, "dirty": bool}`` of the git checkout zotune's source lives in,
    or None: not a checkout (e.g. installed into site-packages), no git, or any git error.
    The checkout must be zotune's own: its top level is `root`, the folder above the package."""
    if root is None:
        root = Path(__file__).resolve().parent.parent
    root = Path(root).resolve()
    try:
        top = _git(root, "rev-parse", "--show-toplevel")
        if Path(top).resolve() != root:  # e.g. a virtualenv inside some other repository
            return None
        commit = _git(root, "rev-parse", "--short", "HEAD")
        dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return {"commit": commit, "dirty": dirty} if commit else None


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """What produced a run: versions, source commit, host, command line, start time (UTC).

    `argv` is the whole command line (program first); default `sys.argv`. Only plain strings,
    bools and None, so it goes into config.yaml (`yaml.safe_dump`) and summary.json as is."""
    from . import __version__

    argv = list(sys.argv if argv is None else argv)
    return {
        "zotune": __version__,
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "python": platform.python_version(),
        "git": source_commit(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "command": shlex.join(str(a) for a in argv),
        "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


__all__ = [
    "TARGETS",
    "Reporters",
    "flatten",
    "open_reporters",
    "parse_targets",
    "provenance",
    "source_commit",
    "truncate_jsonl",
]
