"""zotune.reporting: metrics.jsonl, TensorBoard and offline wandb targets, resume truncation,
missing packages, provenance, and the `report_to` setting."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from zotune.reporting import (
    TARGETS,
    flatten,
    open_reporters,
    parse_targets,
    provenance,
    source_commit,
    truncate_jsonl,
)
from zotune.train import ConfigError, TrainConfig

CONFIG = {"model": "tiny", "task": "sst2", "lr": 1e-3, "out": "runs/demo"}


def row(step: int, dev: bool = False) -> dict:
    r = {
        "loss": 1.0 / step,
        "forward_passes": 2 * step,
        "elapsed": 0.5 * step,
        "seconds_per_step": 0.5,
        "lr": 1e-3,
        "grad_norm": 0.25 * step,
    }
    if dev:
        r["dev"] = {"accuracy": 0.5 + step / 100, "f1": 0.4}
    return r


def read_jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_jsonl_rows_as_given_and_flushed_each_call(tmp_path):
    rep = open_reporters(tmp_path, ["jsonl"], CONFIG)
    rep.log(1, row(1))
    assert read_jsonl(tmp_path) == [{"step": 1, **row(1)}]  # flushed before close
    rep.log(2, {**row(2, dev=True), "step": 2, "n": np.int64(3), "t": torch.tensor(0.5)})
    rep.close()
    rep.close()  # idempotent
    rows = read_jsonl(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["dev"] == {"accuracy": 0.52, "f1": 0.4}  # nested stays nested
    assert rows[1]["n"] == 3 and rows[1]["t"] == 0.5
    assert list(rows[1])[0] == "step"
    with pytest.raises(ValueError, match="closed"):
        rep.log(3, row(3))


def test_a_fresh_run_replaces_metrics_and_a_resumed_one_drops_the_recomputed_steps(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("stale\n")
    with open_reporters(tmp_path, "jsonl", CONFIG) as rep:
        for step in range(1, 6):
            rep.log(step, row(step, dev=step % 2 == 0))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.1')  # the torn last line of a killed run
    with open_reporters(tmp_path, ["jsonl"], CONFIG, resume=True, resume_step=3) as rep:
        for step in range(4, 7):
            rep.log(step, row(step))
    steps = [r["step"] for r in read_jsonl(tmp_path)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert "dev" not in read_jsonl(tmp_path)[3]  # step 4 is the recomputed row
    # resume without a step appends everything
    with open_reporters(tmp_path, ["jsonl"], CONFIG, resume=True) as rep:
        rep.log(7, row(7))
    assert [r["step"] for r in read_jsonl(tmp_path)] == [1, 2, 3, 4, 5, 6, 7]


def test_truncate_jsonl_keeps_stepless_rows_and_counts_what_it_drops(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert truncate_jsonl(path, 3) == 0  # no file: nothing to do
    lines = [{"note": "x"}, {"step": 1}, {"step": 2}, {"step": 5}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "{bad\n")
    assert truncate_jsonl(path, 2) == 2
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:3]


def test_flatten_joins_nested_keys_and_keeps_only_numbers():
    flat = flatten({"step": 3, "loss": np.float32(0.5), "dev": {"accuracy": 0.75}, "s": "x"})
    assert flat == {"loss": 0.5, "dev/accuracy": 0.75}
    assert flatten({"a": {"b": {"c": 1}}, "t": torch.ones(2), "n": None}) == {"a/b/c": 1.0}


def test_unknown_target_names_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown report target 'mlflow'.*jsonl, tensorboard"):
        open_reporters(tmp_path, ["jsonl", "mlflow"], CONFIG)
    assert not (tmp_path / "metrics.jsonl").exists()
    assert parse_targets(" JSONL, tensorboard,jsonl ") == ["jsonl", "tensorboard"]
    assert parse_targets("none") == parse_targets("") == []
    assert set(TARGETS) == {"jsonl", "tensorboard", "wandb"}


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with open_reporters(tmp_path, ["jsonl", "tensorboard"], CONFIG) as rep:
        assert rep.targets == ["jsonl", "tensorboard"]
        for step in range(1, 5):
            rep.log(step, row(step, dev=step % 2 == 0))
    logdir = tmp_path / "tensorboard"
    assert list(logdir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(logdir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"loss", "forward_passes", "elapsed", "seconds_per_step", "lr", "grad_norm"}
    assert expected | {"dev/accuracy", "dev/f1"} <= tags
    assert [(e.step, e.value) for e in events.Scalars("grad_norm")] == [
        (s, pytest.approx(0.25 * s)) for s in range(1, 5)
    ]
    assert [e.step for e in events.Scalars("dev/accuracy")] == [2, 4]
    assert events.Scalars("dev/accuracy")[-1].value == pytest.approx(0.54)


def test_tensorboard_resume_purges_the_recomputed_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with open_reporters(tmp_path, ["tensorboard"], CONFIG) as rep:
        for step in range(1, 6):
            rep.log(step, {"loss": 1.0})
    with open_reporters(tmp_path, ["tensorboard"], CONFIG, resume=True, resume_step=2) as rep:
        for step in range(3, 7):
            rep.log(step, {"loss": 2.0})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("loss")]
    assert got == [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0), (5, 2.0), (6, 2.0)]


def test_wandb_runs_offline_under_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "online")  # offline regardless
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with open_reporters(tmp_path, ["wandb"], CONFIG) as rep:
        assert rep.targets == ["wandb"]
        for step in range(1, 4):
            rep.log(step, row(step, dev=step == 3))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert not (tmp_path / "metrics.jsonl").exists()  # only the targets asked for


@pytest.mark.parametrize("target,package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_package_is_a_note_not_an_error(tmp_path, monkeypatch, capsys, target, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now fails
    with open_reporters(tmp_path, ["jsonl", target], CONFIG) as rep:
        assert rep.targets == ["jsonl"]
        rep.log(1, row(1, dev=True))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--report-to {target} skipped" in err[0]
    assert "zotune[log]" in err[0]
    assert [r["step"] for r in read_jsonl(tmp_path)] == [1]
    assert not (tmp_path / target).exists()


def test_provenance_records_versions_commit_host_command_and_time():
    prov = provenance(["zotune", "train", "--out", "a b"])
    keys = {"zotune", "torch", "transformers", "peft", "python", "git", "host", "platform"}
    assert keys | {"command", "start_time"} <= set(prov)
    assert prov["command"] == "zotune train --out 'a b'"
    assert prov["torch"] == torch.__version__.split("+")[0] or prov["torch"] == torch.__version__
    assert prov["start_time"].endswith("+00:00") and "T" in prov["start_time"]
    assert yaml.safe_load(yaml.safe_dump(prov)) == prov  # config.yaml-safe
    json.dumps(prov)
    repo = Path(__file__).resolve().parent.parent
    if (repo / ".git").exists():  # a checkout (a worktree's .git is a file)
        assert set(prov["git"]) == {"commit", "dirty"}
        assert len(prov["git"]["commit"]) >= 7 and isinstance(prov["git"]["dirty"], bool)
    assert provenance()["command"]  # sys.argv by default


def test_source_commit_is_none_outside_a_checkout(tmp_path, monkeypatch):
    assert source_commit(tmp_path) is None  # not a git repository
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert source_commit() is None


def test_report_to_setting_is_checked_and_provenance_is_ignored_on_read_back(tmp_path):
    assert TrainConfig().report_to == "jsonl"
    cfg = TrainConfig(report_to="tensorboard, jsonl", steps=3)
    cfg.validate()
    assert cfg.report_to == "tensorboard,jsonl"
    with pytest.raises(ConfigError, match="--report-to: unknown report target 'csv'.*wandb"):
        TrainConfig(report_to="jsonl,csv").validate()
    saved = {**asdict(cfg), "provenance": provenance([])}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    back = TrainConfig.from_dict(TrainConfig.from_yaml(tmp_path / "config.yaml"))
    assert back == cfg


def test_cli_has_report_to(capsys):
    from zotune.cli import parser

    args = parser().parse_args(["train", "--report-to", "jsonl,tensorboard"])
    assert args.report_to == "jsonl,tensorboard"
