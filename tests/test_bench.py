"""`zotune bench` over long suites: a run interrupted inside a grid resumes from its checkpoint,
and a suite can add runs that depend on finished ones (seeds at the rate chosen on dev)."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from matplotlib.figure import Figure
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
    # the seeds cut the same batch of 4 into 2 sorted micro-batches (as the convergence
    # suite's later SST-2 runs do): the same examples and loss, so one setting over seeds
    cut = dict(batch_size=2, grad_accum=2, sort_micro_batches=True)
    monkeypatch.setattr(
        bench, "suite", lambda name, out: grid + bench._seeds_at_best(grid, out, **cut)
    )
    results = run_suite("tiny", tmp_path)
    assert len(results) == 4  # the grid, then seeds 1 and 2 at one of its rates
    dev = {r["lr"]: next(iter(r["dev"].values())) for r in results if r["seed"] == 0}
    chosen = max(dev, key=dev.get)
    assert sorted(r["seed"] for r in results if r["lr"] == chosen) == [0, 1, 2]
    assert [r["forward_passes"] for r in results] == [8, 8, 16, 16]  # model calls
    report = (tmp_path / "report.md").read_text()
    assert "Mean ± standard deviation over seeds" in report and "| 3 |" in report
    # ... counted in passes over the whole batch in the report: 2 a MeZO step for every run
    rows = [line.split(" | ") for line in report.splitlines() if "| mezo | full |" in line]
    assert [row[6] for row in rows] == ["8"] * 4
    seeds = next(line for line in report.splitlines() if "| 3 |" in line)
    assert seeds.split(" | ")[10] == "8"
    for png in ("dev_vs_forward_passes_seeds.png", "dev_vs_wall_time_seeds.png"):
        width, height = struct.unpack(">II", (tmp_path / png).read_bytes()[16:24])
        assert (width, height) == (7.5 * 120, 8 * 120)  # one task: its panel over its zoom
    # the zoom row spans 5 points either side of where the seeds' curves start
    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    [group] = bench._seed_groups(results)
    bench._band_plots(results, [group], tmp_path)
    start = sum(100 * next(iter(r["zero_shot"].values())) for r in group) / len(group)
    for fig in figures:
        full, zoom = fig.axes[:2]
        assert zoom.get_ylim() == pytest.approx((start - 5, start + 5))
        assert [len(ax.lines) for ax in (full, zoom)] == [1, 1]  # the same curves in both
    # a seed restored without its curve (from a results.csv): the others are drawn, and the
    # label says so, rather than the method vanishing from the plot
    (tmp_path / "runs" / group[0]["id"] / "metrics.jsonl").unlink()
    figures.clear()
    bench._band_plots(results, [group], tmp_path)
    [label] = {fig.axes[0].get_legend_handles_labels()[1][0] for fig in figures}
    assert label.endswith("(2 of 3 seeds; the rest restored without their curves)")
    for fig in figures:
        assert [len(ax.lines) for ax in fig.axes[:2]] == [1, 1]


def test_run_ids_leave_out_where_and_when_a_run_stops_but_not_what_it_computes():
    run = tiny_run("m")
    same = [dict(run, data_dir="/elsewhere"), dict(run, device="cuda"), dict(run, patience=3)]
    assert {run_id(r) for r in same} == {run_id(run)}
    assert run_id(dict(run, lr=2e-3)) != run_id(run) and run_id(dict(run, seed=1)) != run_id(run)


def hold(lock: Path, seconds: float) -> subprocess.Popen:
    """Another worker: a process that holds `lock` for `seconds`."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    code = (
        "import fcntl, sys, time\nf = open(sys.argv[1], 'a')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
        "print(1, flush=True)\ntime.sleep(float(sys.argv[2]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(lock), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "1"
    return proc


def test_workers_sharing_a_folder_skip_the_runs_another_holds(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    grid = [tiny_run(tiny_model_dir, lr=lr, steps=2) for lr in (1e-4, 1e-2)]
    monkeypatch.setattr(bench, "suite", lambda name, out: grid)
    monkeypatch.setattr(bench, "WAIT_SECONDS", 0.2)
    held, free = (run_id(r) for r in grid)
    other = hold(tmp_path / "locks" / held, 3)  # another worker has the first run for 3 s
    results = run_suite("tiny", tmp_path, device="cpu")
    other.wait()
    # this worker ran the free run first, then waited for the held one to be let go
    started = [
        line.split("] ")[1].split()[0]
        for line in capsys.readouterr().out.splitlines()
        if ": [1/1] " in line
    ]
    assert started == [free, held]
    assert {r["id"] for r in results} == {held, free}
    assert all(r.get("status") == "completed" for r in results)
    # the device named for the suite reaches the runs it derives as it goes
    assert "device: cpu" in (tmp_path / "configs" / f"{free}.yaml").read_text()


def test_a_claim_lasts_while_the_worker_or_its_run_lives(tmp_path):
    worker = (
        "import os, subprocess, sys\nfrom pathlib import Path\nfrom zotune.bench import claim\n"
        "with claim(Path(sys.argv[1]), 'r') as fd:\n"
        "    run = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], pass_fds=(fd,))\n"
        "    print(run.pid, flush=True)\n"
        "    os._exit(0)  # the worker is killed; its run's process goes on\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", worker, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    run = int(proc.stdout.readline())
    proc.wait()
    with bench.claim(tmp_path, "r") as fd:
        assert fd is None  # still taken: its run is still being computed
    os.kill(run, signal.SIGKILL)
    deadline = time.time() + 10
    while True:
        with bench.claim(tmp_path, "r") as fd:
            if fd is not None:
                break  # both gone: free to be resumed
        assert time.time() < deadline
        time.sleep(0.05)


def test_a_signal_to_the_worker_reaches_its_run_once_and_the_worker_waits(tmp_path):
    import threading

    mark = tmp_path / "got"
    child = (
        "import os, signal, sys, time\n"
        "def stop(signum, frame):\n"
        "    time.sleep(0.3)  # a checkpoint being written\n"
        "    open(sys.argv[1], 'a').write(f'{signum} {os.getsid(0)}\\n'); sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\ntime.sleep(30)\n"
    )
    threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    done, stopped = bench._run_child(
        [sys.executable, "-c", child, str(mark)], quiet=True, lock_fd=-1
    )
    assert done.returncode == 143 and stopped
    signum, session = mark.read_text().split()  # once, and after it the worker went on
    assert int(signum) == signal.SIGTERM and int(session) != os.getsid(0)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    # a run signalled before it can take the signal (still loading) dies of it: the worker
    # still stops, and says that the run's last checkpoint stands
    threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    done, stopped = bench._run_child(
        [sys.executable, "-c", "import time; time.sleep(30)"], quiet=True, lock_fd=-1
    )
    assert stopped and done.returncode == 143 and "the last one stands" in done.stderr


def test_the_convergence_suite_keeps_its_finished_runs_and_sorts_later_sst2_batches(tmp_path):
    runs = bench.suite("convergence", tmp_path)  # no run finished: the grids and baselines
    ids = [run_id(r) for r in runs]
    # the SST-2 seed-0 grids finished on 2026-12-07 padded to each batch's longest: their ids
    # (folders, results) must not move when the suite's later runs change how they batch
    assert {
        "minilm-l6-sst2-linear-probe-full-2fa8b90b", "minilm-l6-sst2-mezo-full-bf42ec1b",
        "minilm-l6-sst2-zo-adam-full-71478f93", "minilm-l6-sst2-sparse-mezo-full-92ab080a",
        "minilm-l6-sst2-mezo-svrg-full-6133c4f3", "minilm-l6-sst2-mezo-full-de06e9c4",
    } <= set(ids)  # fmt: skip
    later = {"fo-adam", "fo-sgd", "fzoo", "lozo", "hizoo"}
    fresh = {(r["method"], r["task"], r["lr"]) for r in runs if r["init_head"] == "fresh"}
    assert fresh == {(m, t, lr) for t in ("sst2", "rte") for m, lrs in
                     [("mezo", (1e-5, 1e-4)), ("fo-adam", (1e-5, 3e-5))] for lr in lrs}  # fmt: skip
    for r in runs:
        cut = (r.get("batch_size"), r.get("grad_accum", 1), r.get("sort_micro_batches", False))
        if r["task"] == "rte":
            assert cut == (4, 4, True)
        elif r["method"] in later:
            assert cut == (8, 2, True)
        else:
            assert cut == (16, 1, False)
    # once a grid has finished, its seeds 1 and 2 run with SST-2's later batching, and group
    # with the seed-0 run in the seed tables all the same
    for r in runs:
        if r["task"] == "sst2" and r["method"] not in later and r.get("seed") == 0:
            (tmp_path / "runs" / run_id(r)).mkdir(parents=True)
            summary = {"status": "completed", "dev": {"accuracy": r["lr"]}}
            (tmp_path / "runs" / run_id(r) / "summary.json").write_text(json.dumps(summary))
    seeds = [r for r in bench.suite("convergence", tmp_path) if r.get("seed") in (1, 2)]
    assert len(seeds) == 2 * 5 and all(r["task"] == "sst2" for r in seeds)
    for r in seeds:
        assert (r["batch_size"], r["grad_accum"], r["sort_micro_batches"]) == (8, 2, True)
        [seed0] = [g for g in runs if g.get("seed") == 0 and g["method"] == r["method"]
                   and g["lr"] == r["lr"] and g["init_head"] == r["init_head"] and g["task"] == "sst2"]  # fmt: skip
        assert bench._setting(r) == bench._setting(seed0)


def test_forward_passes_to_mezos_best_count_against_mezo_at_the_same_seed_and_head(tmp_path):
    def run(rid: str, method: str, dev: list[float], seed: int = 0, head: str = "linear-probe"):
        (tmp_path / "runs" / rid).mkdir(parents=True)
        # 40 calls of 16 rows = 20 passes over the batch of 2 micro-batches
        rows = [{"step": 10 * i, "forward_passes": 40 * i, "rows": 640 * i, "dev": {"accuracy": d}} for i, d in enumerate(dev, 1)]  # fmt: skip
        (tmp_path / "runs" / rid / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
        return dict(id=rid, model="m", task="sst2", method=method, lr=1e-7, seed=seed, steps=30,
                    init_head=head, grad_accum=2, zero_shot={"accuracy": 0.5},
                    dev={"accuracy": max(dev)})  # fmt: skip

    results = [
        run("a", "mezo", [0.6, 0.8, 0.7]),
        run("b", "mezo", [0.9, 0.85, 0.9], seed=1),  # seed 1's own dev rows: its own target
        run("c", "mezo-svrg", [0.81, 0.7, 0.7]),
        run("e", "mezo-svrg", [0.81, 0.84, 0.95], seed=1),
        run("d", "mezo", [0.55, 0.6, 0.58], head="fresh"),  # its own target, from its own head
        run("f", "mezo", [0.5, 0.45, 0.4], seed=2),  # MeZO never beat its start: no target
        run("g", "mezo-svrg", [0.6, 0.7, 0.7], seed=2),
    ]
    rows = [
        line.split(" | ")[2:] for line in bench._to_target(results, tmp_path) if "| m |" in line
    ]
    # forward passes over the whole batch (2 micro-batches: 40 calls = 20 passes)
    assert rows == [
        ["mezo", "linear-probe", "1e-07", "0", "80.0", "40 |"],
        ["mezo", "linear-probe", "1e-07", "1", "90.0", "20 |"],
        ["mezo-svrg", "linear-probe", "1e-07", "0", "80.0", "20 |"],
        ["mezo-svrg", "linear-probe", "1e-07", "1", "90.0", "60 |"],
        ["mezo", "fresh", "1e-07", "0", "60.0", "40 |"],
    ]


def test_seeds_that_a_plateau_stopped_at_different_steps_share_one_setting(
    tiny_model_dir, tmp_path
):
    grid = [tiny_run(tiny_model_dir, seed=s, steps=8, eval_every=2) for s in (0, 1)]
    grid[1]["patience"] = 1  # stops at its first evaluation that is no new best
    results = execute(grid, tmp_path)
    assert results[0]["steps"] == 8 and results[1]["steps"] < 8  # the steps each ran
    [group] = bench._seed_groups(results)
    assert sorted(r["seed"] for r in group) == [0, 1]


def test_mezo_svrg_passes_count_the_anchors_rows_and_match_the_calls_of_older_logs(
    tiny_model_dir, tmp_path
):
    """An anchor step reads the anchor's rows twice in chunks of the eval batch size; a
    minibatch step makes 4 passes over the batch. Passes over the batch count rows, and a log
    from before rows were counted (calls only) gives the same passes."""
    run = tiny_run(
        tiny_model_dir, method="mezo-svrg", steps=7, batch_size=2, grad_accum=2,
        full_batch_rows=24, eval_batch_size=16, extra={"refresh": 3},
    )  # fmt: skip
    [r] = execute([run], tmp_path)
    log = metrics(tmp_path / "runs" / r["id"])
    anchors = [1, 4, 7]  # every 3rd step from the first
    # anchor: 2 x 24 rows in chunks of 16 (2 calls each); minibatch: 4 passes x 2 micro-batches
    calls = [sum(4 if s in anchors else 8 for s in range(1, n + 1)) for n in range(1, 8)]
    rows = [sum(48 if s in anchors else 16 for s in range(1, n + 1)) for n in range(1, 8)]
    assert [x["forward_passes"] for x in log] == calls and [x["rows"] for x in log] == rows
    assert r["rows"] == rows[-1]
    passes = [bench._passes(r, x) for x in log]
    assert passes == [n / 4 for n in rows]  # 12 passes of the batch of 4 an anchor step
    old = {k: v for k, v in r.items() if k != "rows"}
    assert [bench._passes(old, {k: v for k, v in x.items() if k != "rows"}) for x in log] == passes
    assert bench._passes(old, old) == passes[-1]


def test_a_long_suite_plots_one_panel_per_task(tmp_path):
    results = []
    for i in range(22):
        rid, task = f"r{i}", ("sst2", "rte")[i % 2]
        (tmp_path / "runs" / rid).mkdir(parents=True)
        rows = [{"step": 10, "forward_passes": 20, "rows": 320, "dev": {"accuracy": 0.6}}]
        (tmp_path / "runs" / rid / "metrics.jsonl").write_text(json.dumps(rows[0]))
        results.append(dict(id=rid, model="m", task=task, method="mezo", lr=1e-7, seed=i % 3,
                            steps=10, batch_size=16, zero_shot={"accuracy": 0.5}, peak_memory_mb=1.0,
                            seconds_per_step=0.1))  # fmt: skip
    bench._plots(results, tmp_path)
    width = struct.unpack(">I", (tmp_path / "dev_vs_forward_passes.png").read_bytes()[16:20])[0]
    assert width == 2 * 7 * 120  # two panels, 7 inches each at 120 dpi
    bench._plots(results[:20], tmp_path)  # a short suite: one panel
    width = struct.unpack(">I", (tmp_path / "dev_vs_forward_passes.png").read_bytes()[16:20])[0]
    assert width == 7 * 120


def test_a_suite_moved_to_a_new_machine_takes_its_finished_runs_from_the_committed_results(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """What is committed (results.jsonl, or only results.csv) is enough to go on elsewhere:
    the finished runs are not run again, report as before, and feed the seeds' rate choice."""
    grid = [tiny_run(tiny_model_dir, lr=lr, seed=0, steps=4, eval_every=2) for lr in (1e-4, 1e-2)]
    monkeypatch.setattr(bench, "suite", lambda name, out: grid + bench._seeds_at_best(grid, out))
    first = run_suite("tiny", tmp_path / "old")
    records = [json.loads(x) for x in (tmp_path / "old" / "results.jsonl").read_text().splitlines()]
    assert all(len(r["curve"]) == 2 for r in records)  # each run's dev evaluations, kept
    table = lambda out: [x for x in (out / "report.md").read_text().splitlines() if "| mezo |" in x]  # noqa: E731
    to_target = lambda x: x.count("|") == 9  # noqa: E731 - its rows: 8 columns

    def no_runs(*a, **k):
        raise AssertionError("a restored run was run again")

    monkeypatch.setattr(bench, "_run_child", no_runs)
    restored = {}
    for kept in ("results.jsonl", "results.csv"):
        archive = tmp_path / f"committed-{kept}"
        archive.mkdir()
        (archive / kept).write_bytes((tmp_path / "old" / kept).read_bytes())
        new = tmp_path / f"new-{kept}"
        # an earlier try of one run, stopped on the new machine before it finished
        (new / "runs" / first[0]["id"]).mkdir(parents=True)
        (new / "runs" / first[0]["id"] / "summary.json").write_text('{"status": "interrupted"}')
        capsys.readouterr()
        again = run_suite("tiny", new, restore_from=archive)
        assert "restored 4 finished runs" in capsys.readouterr().out
        assert [(r["id"], r["dev"], r["test"], r["steps"]) for r in again] == [
            (r["id"], r["dev"], r["test"], r["steps"]) for r in first
        ]
        # the run rows and the seed table; when each run first reached MeZO's best needs curves
        assert table(new) == [
            x for x in table(tmp_path / "old") if kept == "results.jsonl" or not to_target(x)
        ]
        assert any(map(to_target, table(new))) == (kept == "results.jsonl")
        curves = [(new / "runs" / r["id"] / "metrics.jsonl").is_file() for r in first]
        assert curves == [kept == "results.jsonl"] * 4  # a CSV keeps no curve: none is made up
        seeds_png = (new / "dev_vs_forward_passes_seeds.png").is_file()
        assert seeds_png == (kept == "results.jsonl")
        restored[kept] = (again, new)
        run_suite("tiny", new, restore_from=archive)
        assert "restored 0 finished runs" in capsys.readouterr().out  # none taken twice
    # the plot of every run says where the curves went, rather than look as if nothing ran
    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    for kept, (results, out) in restored.items():
        bench._plots(results, out)
        title = figures[-3].axes[0].get_title()  # then memory and step time
        lost = "(4 runs restored without their curves: results.csv rows only)"
        assert title == ("" if kept == "results.jsonl" else lost)
    # a run that another worker holds is left to it
    held = tmp_path / "held"
    with bench.claim(held, first[1]["id"]):
        assert bench.restore(tmp_path / "committed-results.jsonl", held) == 3
    assert not (held / "runs" / first[1]["id"]).exists()
    # bad archives: one line that says what is wrong, and nothing written
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "results.jsonl").write_text('{"peak_memory_mb": 1.0}\n')
    for archive, says in [(empty, "no results.jsonl or results.csv"), (tmp_path / "memory", "without a run id")]:  # fmt: skip
        err = subprocess.run(
            [sys.executable, "-m", "zotune.cli", "bench", "convergence", "--out",
             str(tmp_path / "x"), "--restore", str(archive), "--report-only"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert err.returncode != 0 and says in err.stderr
        assert len(err.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "x" / "runs").exists()


def test_a_csv_row_comes_back_as_the_record_it_was_flattened_from():
    record = {"id": "r", "dev": {"f1": 0.5, "em": 0.25}, "metric": "f1", "seed": 1, "lr": 1e-7,
              "extra": {"refresh": 50}, "stopped_early": "no new best", "sort_micro_batches": True,
              "provenance": {"git": {"commit": "1234e56", "dirty": False}}}  # fmt: skip
    flat = {k: str(v) for k, v in bench._flatten(record).items()}
    back = bench._from_csv(dict(sorted(flat.items())))  # the CSV sorts its columns
    assert back == record and list(back["dev"]) == ["f1", "em"]
