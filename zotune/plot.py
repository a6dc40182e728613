"""`zotune plot`: learning curves of finished (or running) runs, read from their metrics.jsonl.

Two panels: the dev metric against training forward passes (the cost measure of zeroth-order
methods; the zero-shot score at 0 when summary.json has it) and the training loss against the
step, smoothed with a moving average. Baselines that train nothing (ICL, linear probe) are drawn
as a level in the dev panel.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .settings import ConfigError
from .tasks.base import LOWER_IS_BETTER


def read_run(run: str | os.PathLike) -> dict[str, Any]:
    """A run directory's rows, summary (may be empty) and label; a ConfigError if unreadable."""
    path = Path(run)
    if not path.is_dir():
        raise ConfigError(f"run {path} does not exist: pass the --out folders of `zotune train`")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{path} has no metrics.jsonl: pass the --out folder of a `zotune train`")
    rows = []
    for i, line in enumerate(metrics.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ConfigError(f"{metrics} line {i} is not JSON: the file is damaged") from None
        if not isinstance(row, dict) or "step" not in row:
            raise ConfigError(f"{metrics} line {i} has no step: not a zotune metrics file")
        rows.append(row)
    if not rows:
        raise ConfigError(f"{metrics} is empty: the run has not logged a step yet")
    summary: dict[str, Any] = {}
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        except ValueError:
            summary = {}  # the curves are in metrics.jsonl; a damaged summary costs the label only
    method = summary.get("method") or _config_value(path, "method")
    peft = summary.get("peft") or _config_value(path, "peft")
    details = "/".join(str(x) for x in (method, peft) if x and x != "none")
    name = path.resolve().name
    return {
        "name": name,
        "label": f"{name} ({details})" if details else name,
        "rows": rows,
        "summary": summary,
    }


def _config_value(path: Path, key: str) -> Any:
    import yaml

    try:
        values = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return values.get(key) if isinstance(values, dict) else None


def primary_metric(run: dict[str, Any]) -> str | None:
    """The task's metric: summary["metric"] when recorded, else the first dev metric logged
    (evaluate() puts the task's metric first: accuracy, or f1 before em)."""
    if run["summary"].get("metric"):
        return run["summary"]["metric"]
    for row in run["rows"]:
        if isinstance(row.get("dev"), dict) and row["dev"]:
            return next(iter(row["dev"]))
    for key in ("dev", "zero_shot"):
        if isinstance(run["summary"].get(key), dict) and run["summary"][key]:
            return next(iter(run["summary"][key]))
    return None


def smooth(values: list[float], window: int | None = None) -> list[float]:
    """A trailing moving average over `window` points (default: a 20th of the series)."""
    window = window or max(1, len(values) // 20)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(runs: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Draw the runs' curves into the image `out` (format from its suffix); returns its path."""
    loaded = [read_run(r) for r in runs]
    out = Path(out)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("zotune plot needs matplotlib: pip install matplotlib") from None
    metrics = {primary_metric(r) for r in loaded} - {None}
    fig, (dev_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.cm.tab20.colors if len(loaded) > 10 else plt.cm.tab10.colors
    for i, run in enumerate(loaded):
        color, label, metric = colors[i % len(colors)], run["label"], primary_metric(run)
        scale = 1 if metric in LOWER_IS_BETTER else 100  # fractions in %, losses as they are
        rows, summary = run["rows"], run["summary"]
        trained = [r for r in rows if r["step"] > 0]
        if metric is not None:
            if not trained:  # a baseline: one score, drawn as a level
                score = next((r["dev"][metric] for r in rows if metric in r.get("dev", {})), None)
                if score is not None:
                    dev_ax.axhline(scale * score, ls="--", lw=1, color=color, label=label)
            else:
                points = [
                    (r.get("forward_passes", r["step"]), r["dev"][metric])
                    for r in trained
                    if isinstance(r.get("dev"), dict) and metric in r["dev"]
                ]
                if metric in summary.get("zero_shot", {}):
                    points.insert(0, (0, summary["zero_shot"][metric]))
                if points:
                    dev_ax.plot(
                        [p[0] for p in points],
                        [scale * p[1] for p in points],
                        marker="o",
                        ms=3,
                        color=color,
                        label=label,
                    )
        losses = [(r["step"], float(r["loss"])) for r in trained if r.get("loss") is not None]
        if losses:
            steps, values = [s for s, _ in losses], [v for _, v in losses]
            loss_ax.plot(steps, values, color=color, alpha=0.2, lw=0.8)
            loss_ax.plot(steps, smooth(values), color=color, lw=1.6, label=label)
    dev_ax.set_xlabel("training forward passes")
    unit = "" if metrics and metrics <= set(LOWER_IS_BETTER) else " (%)"
    dev_ax.set_ylabel(f"dev {' / '.join(sorted(metrics)) or 'metric'}{unit}")
    dev_ax.set_title("dev metric vs forward passes")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("training loss (moving average)")
    loss_ax.set_title("training loss")
    for ax in (dev_ax, loss_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = out.suffix.lstrip(".").lower() or "png"
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        plt.close(fig)
        raise ConfigError(
            f"--out {out}: unknown image format '.{fmt}': use one of "
            + ", ".join("." + k for k in sorted(supported))
        )
    # written beside `out` and renamed, so a failure never leaves half an image
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, format=fmt)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return out
