"""`zotune bench` over long suites: a run interrupted inside a grid resumes from its checkpoint,
and a suite can add runs that depend on finished ones (seeds at the rate chosen on dev)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from test_resume import start, wait_for_step

import zotune.bench as bench
from zotune.bench import execute, run_id, run_suite


def tiny_run(model: str, **kw) -> dict:
    run = dict(
        model=model, task="sst2", method="mezo", steps=12, eval_every=4, batch_size=4,
        num_train=32, num_dev=16, num_test=16, eval_batch_size=16, lr=1e-3, eps=1e-2,
        save_every=2, recipe="paper",
    )  # fmt: skip
    return {**run, **kw}


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed", "seconds")} for r in rows]


def test_an_interrupted_run_in_a_grid_resumes_where_it_stopped(tiny_model_dir, tmp_path, capsys):
    run = tiny_run(tiny_model_dir)
    whole = tmp_path / "whole"
    execute([run], whole)
    out = tmp_path / "grid"
    target = out / "runs" / run_id(run)
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(run))
    proc = start(["train", "--config", str(cfg), "--out", str(target), "--quiet"])
    wait_for_step(proc, target, 5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert json.loads((target / "summary.json").read_text())["status"] == "interrupted"
    capsys.readouterr()
    [result] = execute([run], out)
    assert "(resumed)" in capsys.readouterr().out
    assert result.get("status") == "completed", result.get("error")
    # the steps before the interruption were not computed again, and the run ends as one
    # that was never interrupted
    assert metrics(target) == metrics(whole / "runs" / run_id(run))


def test_a_suite_adds_seeds_at_the_rate_chosen_on_dev(tiny_model_dir, tmp_path, monkeypatch):
    grid = [tiny_run(tiny_model_dir, lr=lr, seed=0, steps=4) for lr in (1e-4, 1e-2)]
    monkeypatch.setattr(bench, "suite", lambda name, out: grid + bench._seeds_at_best(grid, out))
    results = run_suite("tiny", tmp_path)
    assert len(results) == 4  # the grid, then seeds 1 and 2 at one of its rates
    dev = {r["lr"]: next(iter(r["dev"].values())) for r in results if r["seed"] == 0}
    chosen = max(dev, key=dev.get)
    assert sorted(r["seed"] for r in results if r["lr"] == chosen) == [0, 1, 2]
    report = (tmp_path / "report.md").read_text()
    assert "Mean ± standard deviation over seeds" in report and "| 3 |" in report
    for png in ("dev_vs_forward_passes_seeds.png", "dev_vs_wall_time_seeds.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_run_ids_leave_out_where_and_when_a_run_stops_but_not_what_it_computes():
    run = tiny_run("m")
    same = [dict(run, data_dir="/elsewhere"), dict(run, device="cuda"), dict(run, patience=3)]
    assert {run_id(r) for r in same} == {run_id(run)}
    assert run_id(dict(run, lr=2e-3)) != run_id(run) and run_id(dict(run, seed=1)) != run_id(run)


def test_workers_sharing_a_folder_skip_the_runs_another_holds(
    tiny_model_dir, tmp_path, monkeypatch
):
    grid = [tiny_run(tiny_model_dir, lr=lr, steps=2) for lr in (1e-4, 1e-2)]
    monkeypatch.setattr(bench, "suite", lambda name, out: grid)
    held, free = (run_id(r) for r in grid)
    with bench.claim(tmp_path, held) as mine:  # another worker is running the first run
        assert mine
        results = run_suite("tiny", tmp_path, device="cpu")
    assert [r["id"] for r in results] == [free]
    assert not (tmp_path / "runs" / held).exists()
    # the device named for the suite reaches the runs it derives as it goes
    assert "device: cpu" in (tmp_path / "configs" / f"{free}.yaml").read_text()
    # once that worker has let go (finished or died), the run is free to take
    assert {r["id"] for r in run_suite("tiny", tmp_path)} == {held, free}


def test_a_dead_workers_claim_is_free(tmp_path):
    import subprocess
    import sys

    lock = tmp_path / "locks" / "r"
    lock.parent.mkdir()
    hold = "import fcntl, sys, time\nf = open(sys.argv[1], 'a')\nfcntl.flock(f, fcntl.LOCK_EX)\nprint(1, flush=True)\ntime.sleep(60)"
    proc = subprocess.Popen(
        [sys.executable, "-c", hold, str(lock)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "1"
    with bench.claim(tmp_path, "r") as mine:
        assert not mine
    proc.kill()
    proc.wait()
    with bench.claim(tmp_path, "r") as mine:
        assert mine
