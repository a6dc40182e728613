"""`zotune plot`: two tiny runs -> one PNG with both panels; one-line errors for bad runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zotune.cli import main
from zotune.plot import primary_metric, read_run, smooth


def tiny_run(model: str, out: Path, method: str) -> None:
    args = ["train", "--model", model, "--task", "sst2", "--method", method, "--steps", "6",
            "--eval-every", "2", "--batch-size", "4", "--num-train", "16", "--num-dev", "8",
            "--num-test", "8", "--lr", "1e-3", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_two_runs(tiny_model_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    tiny_run(tiny_model_dir, runs / "a", "mezo")
    tiny_run(tiny_model_dir, runs / "b", "zo-sgd-sign")
    capsys.readouterr()
    out = tmp_path / "figs" / "curves.png"
    assert main(["plot", str(runs / "a"), str(runs / "b"), "--out", str(out)]) == 0
    assert f"wrote {out} (2 runs)" in capsys.readouterr().out
    width, height = png_size(out)
    assert width > height > 300 and out.stat().st_size > 20_000  # two panels with curves
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    run = read_run(runs / "b")
    assert run["label"] == "b (zo-sgd-sign/full)" and primary_metric(run) == "accuracy"


def test_plot_a_baseline_and_a_run_without_summary(tmp_path):
    base = tmp_path / "icl"
    base.mkdir()
    (base / "metrics.jsonl").write_text(json.dumps({"step": 0, "dev": {"f1": 0.4, "em": 0.3}}))
    (base / "summary.json").write_text(json.dumps({"method": "icl", "peft": "none"}))
    live = tmp_path / "live"  # a run still going: no summary yet, only its config
    live.mkdir()
    rows = [{"step": s, "loss": 1 / s, "forward_passes": 2 * s, "elapsed": s} for s in range(1, 9)]
    rows[3]["dev"] = {"f1": 0.5, "em": 0.4}
    (live / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (live / "config.yaml").write_text("method: mezo\npeft: lora\n")
    assert main(["plot", str(base), str(live), "--out", str(tmp_path / "p.svg")]) == 0
    assert "<svg" in (tmp_path / "p.svg").read_text()
    assert read_run(live)["label"] == "live (mezo/lora)" and read_run(base)["label"] == "icl (icl)"
    assert primary_metric(read_run(base)) == "f1"


def test_smooth_is_a_trailing_mean():
    assert smooth([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    assert smooth([2.0] * 50) == [2.0] * 50


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "does not exist"),
        ("empty_dir", "has no metrics.jsonl"),
        ("empty_metrics", "is empty"),
        ("garbage", "line 2 is not JSON"),
    ],
)
def test_bad_runs_are_one_line_errors(tmp_path, capsys, setup, message):
    run = tmp_path / "run"
    if setup != "missing":
        run.mkdir()
    if setup == "empty_metrics":
        (run / "metrics.jsonl").write_text("")
    if setup == "garbage":
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\n{oops\n')
    out = tmp_path / "p.png"
    assert main(["plot", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and not out.exists()


def test_unknown_image_format(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert main(["plot", str(run), "--out", str(tmp_path / "p.xyz")]) == 2
    assert "unknown image format '.xyz'" in capsys.readouterr().err
