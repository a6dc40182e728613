"""Runs that survive: killed at a random step (SIGKILL: nothing runs on the way out) or stopped by
SIGTERM, then resumed, a run ends bit for bit where the uninterrupted run ends."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zotune.cli import main

STEPS = 40


def args_for(model: str, out: Path, method: str, peft: str, *extra: str) -> list[str]:
    return [
        "train", "--model", model, "--task", "sst2", "--method", method, "--peft", peft,
        "--steps", str(STEPS), "--eval-every", "5", "--batch-size", "4", "--lr", "1e-3",
        "--eps", "1e-2", "--num-train", "32", "--num-dev", "16", "--num-test", "16",
        "--eval-batch-size", "16", "--save-every", "3", "--save-weights", "--keep", "final",
        "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip


def rows(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        row.pop("elapsed"), row.pop("seconds")  # wall times differ, nothing else may
        out.append(row)
    return out


def start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen(
        [sys.executable, "-m", "zotune.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for_step(proc: subprocess.Popen, run: Path, step: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended first: {proc.stderr.read().decode()[-500:]}")
        time.sleep(0.005)
    raise AssertionError("the run did not reach the step in time")


def assert_same_run(a: Path, b: Path) -> None:
    assert rows(a) == rows(b)
    wa, wb = load_file(str(a / "weights.safetensors")), load_file(str(b / "weights.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    for key in ("status", "dev", "test", "best_step", "forward_passes", "final_dev"):
        assert sa[key] == sb[key], key
    assert not (b / "checkpoint").exists()  # a completed run keeps no checkpoint


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    """The reference runs, computed once per case."""
    done: dict[tuple, Path] = {}

    def get(method: str, peft: str, *extra: str) -> Path:
        key = (method, peft, *extra)
        if key not in done:
            out = tmp_path_factory.mktemp("ref") / "run"
            assert main(args_for(tiny_model_dir, out, method, peft, *extra)) == 0
            done[key] = out
        return done[key]

    return get


CASES = [
    ("mezo", "full", ()),
    ("zo-adam", "full", ()),
    ("mezo-svrg", "full", ("--set", "refresh=4")),
    ("mezo", "lora", ()),
]


@pytest.mark.parametrize("method,peft,extra", CASES)
def test_a_run_killed_at_a_random_step_resumes_bit_for_bit(
    tiny_model_dir, tmp_path, uninterrupted, method, peft, extra
):
    out = tmp_path / "run"
    kill_at = random.Random(f"{method}-{peft}").randint(4, STEPS - 12)
    proc = start(args_for(tiny_model_dir, out, method, peft, *extra))
    wait_for_step(proc, out, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((out / "summary.json").read_text())["status"] == "running"
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert_same_run(uninterrupted(method, peft, *extra), out)


def test_sigterm_checkpoints_marks_the_run_interrupted_and_resumes(
    tiny_model_dir, tmp_path, uninterrupted
):
    out = tmp_path / "run"
    proc = start(args_for(tiny_model_dir, out, "zo-adam", "full"))
    wait_for_step(proc, out, 7)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert "zotune train --resume" in proc.stderr.read().decode()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["step"] >= 7
    assert (out / "checkpoint" / "loop.json").exists() and (out / "trajectory.zot").exists()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert_same_run(uninterrupted("zo-adam", "full"), out)


def test_a_checkpoint_from_another_version_resumes_without_a_partial_row_count(
    tiny_model_dir, tmp_path
):
    out = tmp_path / "run"
    proc = start(args_for(tiny_model_dir, out, "mezo", "full"))
    wait_for_step(proc, out, 7)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    loop = out / "checkpoint" / "loop.json"
    state = json.loads(loop.read_text())
    assert state["train_rows"] == 2 * 4 * state["step"]
    del state["train_rows"]  # as a checkpoint written before rows were counted
    state["a_later_field"] = 1  # and one a later zotune adds: left to that zotune
    loop.write_text(json.dumps(state))
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and "rows" not in summary
    log = rows(out)
    assert all("rows" in r for r in log[: state["step"]])
    assert not any("rows" in r for r in log[state["step"] :])


def test_resume_refuses_what_it_cannot_continue(tiny_model_dir, tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing"), "--quiet"]) == 2
    out = tmp_path / "run"
    assert main(args_for(tiny_model_dir, out, "mezo", "full")) == 0  # completed
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--lr", "1", "--quiet"]) == 2
