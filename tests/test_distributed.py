"""Distributed runs: 2 ranks over gloo on the CPU (one thread each) against one process.

This process (rank 0) and one subprocess (rank 1) run every case in turn, each case a `zotune
train` command line with its own process group; the same command line in one process is the
reference. In the last case rank 1 gets SIGKILL mid-run.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zotune import distributed
from zotune.cli import main
from zotune.engine.estimators import ESTIMATORS, Estimate, combine
from zotune.engine.space import ParameterSpace
from zotune.settings import ConfigError
from zotune.train import TrainConfig, train

CASES = {  # name: the settings of each case; 2 ranks split --grad-accum 2, or else --queries
    "mezo": ["--method", "mezo", "--grad-accum", "2"],
    "zo-adam": ["--method", "zo-adam", "--grad-accum", "2"],
    "mezo-svrg": ["--method", "mezo-svrg", "--grad-accum", "2", "--set", "lr_full=1e-3"],
    "lora": ["--method", "mezo", "--peft", "lora", "--grad-accum", "2"],
    "queries": ["--method", "mezo", "--queries", "2"],
    "queries-one-sided": ["--method", "r-mezo", "--queries", "4", "--estimator", "one-sided"],
}
KILLED = ["--method", "mezo", "--grad-accum", "2", "--steps", "1000", "--save-every", "4"]

# Rank 1 runs the cases in turn, each on its own port, in a process group it makes itself (as
# a Python user of `zotune.train.train` may); rank 0 lets the CLI join and leave one.
WORKER = """
import json, os, sys
import torch.distributed as dist
from zotune.cli import main
for port, argv in json.loads(sys.argv[1]):
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo")
    main(argv)
    dist.destroy_process_group()
"""


def argv_for(model: str, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", model, "--task", "sst2", "--peft", "full", "--steps", "4",
        "--eval-every", "2", "--batch-size", "4", "--lr", "1e-3", "--eps", "1e-2",
        "--num-train", "32", "--num-dev", "16", "--num-test", "16", "--eval-batch-size", "8",
        "--save-weights", "--keep", "final", "--recipe", "paper", "--out", str(out), "--quiet",
        *extra,
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(run: Path, *drop: str) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key in ("seconds", "elapsed", *drop):
            row.pop(key, None)
        out.append(row)
    return out


def assert_same_run(a: Path, b: Path, *drop: str) -> None:
    assert rows(a, *drop) == rows(b, *drop)
    wa, wb = load_file(str(a / "weights.safetensors")), load_file(str(b / "weights.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ta, tb = (json.loads(gzip.decompress((r / "trajectory.zot").read_bytes())) for r in (a, b))
    assert ta == tb
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    for key in ("status", "dev", "test", "best_step", "final_dev"):
        assert sa[key] == sb[key], key


@pytest.fixture(scope="module")
def launched(tiny_model_dir, tmp_path_factory):
    """Every case on 2 ranks, this process rank 0 and a subprocess rank 1 (which a thread kills
    in the last case): {case: run dir} and rank 0's stderr in the killed case."""
    root = tmp_path_factory.mktemp("ranks")
    cases = [(free_port(), argv_for(tiny_model_dir, root / n, *e)) for n, e in CASES.items()]
    cases.append((free_port(), argv_for(tiny_model_dir, root / "killed", *KILLED)))
    env = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", ZOTUNE_DIST_TIMEOUT="60")
    log = root / "rank1.log"
    with open(log, "wb") as f:
        rank1 = subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(cases)],
            env={**os.environ, **env, "RANK": "1", "LOCAL_RANK": "1", "OMP_NUM_THREADS": "1",
                 "PYTHONPATH": os.pathsep.join(sys.path), "TMPDIR": str(root)},  # (its scratch)
            stdout=subprocess.DEVNULL,
            stderr=f,
        )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in {**env, "RANK": "0", "LOCAL_RANK": "0"}.items():
                mp.setenv(key, value)
            for port, argv in cases[:-1]:
                mp.setenv("MASTER_PORT", str(port))
                assert main(argv) == 0, log.read_text()[-2000:]
            killer = threading.Thread(target=kill_at_row, args=(rank1, root / "killed", 6))
            killer.start()
            mp.setenv("MASTER_PORT", str(cases[-1][0]))
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr):
                code = main(cases[-1][1])
            killer.join()
            assert code == 2, stderr.getvalue()[-2000:]
    finally:
        torch.set_num_threads(threads)
        rank1.kill()
        rank1.wait()
    return {n: root / n for n in [*CASES, "killed"]}, stderr.getvalue()


def kill_at_row(proc: subprocess.Popen, run: Path, row: int) -> None:
    """SIGKILL `proc` once the run has logged `row` steps."""
    metrics, deadline = run / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= row:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_run_the_one_process_run_bit_for_bit(
    case, launched, tiny_model_dir, tmp_path, one_thread
):
    """2 ranks splitting the micro-batches (or the directions) of each step: the same losses,
    dev scores, trajectory and final weights as one process running the same command."""
    runs, _ = launched
    assert main(argv_for(tiny_model_dir, tmp_path / "one", *CASES[case])) == 0
    # each query group evaluates L(θ) itself for the one-sided estimator: 2 forward passes
    # more, and the tokens and rows they read
    drop = ("forward_passes", "tokens", "rows") if case == "queries-one-sided" else ()
    assert_same_run(runs[case], tmp_path / "one", *drop)
    assert not list(runs[case].glob("checkpoint*"))  # rank 0 wrote it; nothing left over


def test_a_killed_rank_ends_the_run_resumable_on_another_number_of_ranks(
    launched, tiny_model_dir, tmp_path, one_thread
):
    runs, log = launched
    run = runs["killed"]
    errors = [line for line in log.splitlines() if line.startswith("zotune: error:")]
    assert len(errors) == 1 and "another rank stopped answering" in errors[0], log[-2000:]
    assert f"zotune train --resume {run}" in errors[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 4 <= summary["step"] < 20
    # resumed in one process (its --grad-accum 2 micro-batches in turn): the uninterrupted run
    assert main(["train", "--resume", str(run), "--steps", "20", "--quiet"]) == 0
    reference = tmp_path / "one"
    assert main(argv_for(tiny_model_dir, reference, *KILLED[:-4], "--steps", "20")) == 0
    assert_same_run(run, reference)


def test_methods_that_need_more_than_losses_refuse_to_start(monkeypatch, tiny_model_dir):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for method, why in (("fo-adam", "backpropagates"), ("zo-blockwise", "block by block")):
        cfg = TrainConfig(model=tiny_model_dir, method=method, grad_accum=2)
        with pytest.raises(ConfigError, match=f"{method} runs in one process only: it .*{why}"):
            train(cfg)
    cfg = TrainConfig(model=tiny_model_dir, method="mezo", grad_accum=3, queries=1)
    with pytest.raises(ConfigError, match="make --grad-accum a multiple of 2, or --queries"):
        train(cfg)


def test_the_rank_grid_splits_micro_batches_first_then_queries():
    assert distributed.grid(4, 4, 1) == (4, 1)
    assert distributed.grid(4, 2, 2) == (2, 2)  # 2 data-parallel groups of 2 query ranks
    assert distributed.grid(4, 1, 8) == (1, 4)
    assert distributed.grid(6, 4, 3) == (2, 3)
    with pytest.raises(ConfigError):
        distributed.grid(4, 2, 1)


@pytest.mark.parametrize("estimator", ["two-sided", "one-sided"])
def test_estimates_of_slices_of_the_seeds_combine_into_the_estimate_of_all(estimator):
    """Query parallelism's arithmetic: each rank's slice of the seeds, from the same θ, merged."""
    torch.manual_seed(0)
    w = torch.randn(1000)
    space = ParameterSpace([w])
    closure = lambda: float((w - 0.5).square().sum())  # noqa: E731
    seeds = [11, 12, 13, 14]

    def run(part: list[int]) -> Estimate:
        est = ESTIMATORS[estimator](space, closure, part, 1e-2)
        space.transition(est.pending, None)
        return est

    whole = run(seeds)
    merged = combine(estimator, [run(seeds[:2]), run(seeds[2:])])
    assert (merged.seeds, merged.grads, merged.loss, merged.losses, merged.forward_passes) == (
        whole.seeds,
        whole.grads,
        whole.loss,
        whole.losses,
        whole.forward_passes,
    )
